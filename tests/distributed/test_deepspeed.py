"""DeepSpeed ZeRO-3 on two CPU processes (gloo): every rank holds a partition of each weight.
An adapter of a PeftModel partitioned by ``deepspeed.initialize`` gets the same values, and the
base weights the same residual, as one process with the whole model and all the data."""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the shared helpers

TARGETS = ["q_proj", "down_proj"]
ZERO3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
         "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_allow_untested_optimizer": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, out_dir, persistence_threshold):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    from peft import LoraConfig, get_peft_model

    from fisher_kernels import init_lora
    from fisher_kernels.distributed.sharded import whole
    from tiny_models import make_model, make_samples, pad_batches

    deepspeed.init_distributed(dist_backend="gloo")
    config = dict(ZERO3, zero_optimization={"stage": 3, "stage3_param_persistence_threshold": persistence_threshold})
    batches = pad_batches(make_samples("llama", n=8), 2)
    results = {}
    try:  # a base model partitioned before wrapping: its new adapters would be outside the engine's optimizer
        engine, *_ = deepspeed.initialize(model=make_model("llama"), config=config)
        init_lora(engine.module, batches[rank::world_size], r=3, progress=False)
        results["fresh"] = "no error"
    except TypeError as err:
        results["fresh"] = str(err)
    peft_model = get_peft_model(make_model("llama"), LoraConfig(r=3, target_modules=TARGETS))
    engine, *_ = deepspeed.initialize(model=peft_model, config=config,
                                      model_parameters=[p for p in peft_model.parameters() if p.requires_grad])
    init_lora(engine.module, batches[rank::world_size], progress=False)
    for name, module in engine.module.get_base_model().named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            results[name] = (whole(module.lora_A["default"].weight), whole(module.lora_B["default"].weight),
                             whole(module.base_layer.weight))
    with torch.no_grad():
        results["logits"] = engine.module(**batches[0]).logits
    loss = engine(**batches[rank]).loss  # the engine trains the initialised adapter
    engine.backward(loss)
    engine.step()
    results["trained"] = {name: not torch.equal(whole(module.lora_B["default"].weight), results[name][1])
                          for name, module in engine.module.get_base_model().named_modules()
                          if name in results}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


# 0: every weight partitioned and gathered per module; the default 1e5 keeps the tiny model's weights
# whole on every rank (persistent), with their partitions beside them
@pytest.mark.parametrize("persistence_threshold", [0, 100000])
def test_zero3_partitioned_adapter_equals_one_process_over_all_the_data(tmp_path, persistence_threshold):
    from peft import LoraConfig, get_peft_model

    from fisher_kernels import init_lora
    from tiny_models import make_model, make_samples, pad_batches

    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path), persistence_threshold), nprocs=2, join=True)
    batches = pad_batches(make_samples("llama", n=8), 2)
    single = init_lora(get_peft_model(make_model("llama"), LoraConfig(r=3, target_modules=TARGETS)), batches,
                       progress=False)
    with torch.no_grad():
        logits = single(**batches[0]).logits
    layers = {name: m for name, m in single.get_base_model().named_modules()
              if hasattr(m, "lora_A") and "default" in m.lora_A}
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert "get_peft_model" in results["fresh"] and "ZeRO-3" in results["fresh"], results["fresh"]
        assert results.keys() - {"fresh", "logits", "trained"} == layers.keys()
        assert all(results["trained"].values()), results["trained"]
        for name, layer in layers.items():
            A, B, W = results[name]
            sign = torch.where((A * layer.lora_A["default"].weight).sum(1) < 0, -1.0, 1.0)
            for got, expected in ((A * sign[:, None], layer.lora_A["default"].weight),
                                  (B * sign, layer.lora_B["default"].weight), (W, layer.base_layer.weight)):
                expected = expected.detach()
                assert torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item()), (
                    rank, name, (got - expected).abs().max())
        assert torch.allclose(results["logits"], logits, atol=1e-4)
