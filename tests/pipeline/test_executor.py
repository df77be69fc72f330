"""Who runs the per-layer work: one interface for the four cases (the split and sharded ones run under
torch.distributed in tests/distributed/)."""

from fisher_kernels import Calibration, Resources, compute_initialization
from fisher_kernels.pipeline import make_plan
from fisher_kernels.pipeline.compute import collect
from fisher_kernels.pipeline.executor import Local, executor_for, solve_units
from tiny_models import make_model, make_samples, pad_batches


def test_one_process_gets_the_local_executor_whose_stages_give_compute_initializations_result():
    model = make_model("llama")
    data = pad_batches(make_samples("llama", n=4), 2)
    plan = make_plan(model, data, method="lora_da", r=2, scale=1.0, target_modules=None, method_options={},
                     calibration=Calibration(), resources=Resources(progress=False), statistics=None)
    executor = executor_for(plan)
    assert type(executor) is Local
    group = plan.groups[0]
    prepared = executor.prepare(group)
    stats = collect(plan, group, prepared, [])
    units = solve_units(group, stats)  # q, k, v share one input factor: one unit, solved together
    assert any(len(unit) == 3 and unit[0].endswith("q_proj") for unit in units)
    layers = executor.solve(group, stats, prepared)
    expected = compute_initialization(model, data, method="lora_da", r=2, progress=False).layers
    assert layers.keys() == expected.keys()
    for name, init in layers.items():
        for key, value in init.tensors().items():
            assert (value - expected[name].tensors()[key]).abs().max() < 1e-5, (name, key)
    assert stats.layers == {}  # each layer's statistics freed once its result exists
