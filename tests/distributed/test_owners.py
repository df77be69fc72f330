"""Statistics and bases of a sharded model's pass held by one owner rank per layer
(:mod:`fisher_kernels.distributed.owners`): on 2 and 4 gloo ranks each rank holds about 1/N of
them, and the adapters equal one process with the whole model and all of the data."""

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the shared helpers

from distributed.test_distributed import _lora_modules, _sharded, process_group  # noqa: E402
from fisher_kernels.distributed.owners import owners_by_bytes  # noqa: E402
from fisher_kernels.distributed.split_work import rounds  # noqa: E402

METHODS = [("filet", {}), ("lora_da", dict(population_size=100)), ("lora_ga", {})]


def test_owners_by_bytes_deals_the_largest_layers_first_to_the_least_loaded_rank():
    owner = owners_by_bytes({"a": 5, "b": 9, "c": 4, "d": 4, "e": 1}, 2)
    assert owner == {"b": 0, "a": 1, "c": 1, "d": 0, "e": 1}
    assert list(owner) == ["a", "b", "c", "d", "e"]  # model order kept
    loads = [sum(b for n, b in {"a": 5, "b": 9, "c": 4, "d": 4, "e": 1}.items() if owner[n] == r) for r in (0, 1)]
    assert loads == [13, 10]
    assert owners_by_bytes({"a": 1, "b": 1, "c": 1}, 4) == {"a": 0, "b": 1, "c": 2}


def test_rounds_hold_at_most_one_unit_per_rank_in_each_rank_s_order():
    owner = {"a": 1, "b": 1, "c": 0, "d": 1, "e": 0}
    assert rounds([["a", "b"], ["c"], ["d"], ["e"]], owner, 2) == [[["c"], ["a", "b"]], [["e"], ["d"]]]
    assert rounds([], {}, 3) == []


def _rank_main(rank, world_size, init_file, out_dir):
    from fisher_kernels import init_lora
    from fisher_kernels.distributed.sharded import whole
    from tiny_models import make_model, make_samples, pad_batches

    import fisher_kernels.distributed.sharded as sharded

    gathers, gather = [0], sharded.full_weight

    def counted(module):
        gathers[0] += 1
        return gather(module)

    sharded.full_weight = counted
    with process_group(rank, world_size, init_file, timeout_s=120):
        results = {}
        for method, options in METHODS:
            batches = pad_batches(make_samples("llama", n=8), 2)
            gathers[0] = 0
            model = init_lora(_sharded(make_model("llama")), batches[rank::world_size], method=method, r=3,
                              progress=False, **options)
            report = model.fisher_kernels_report
            results[method] = {"held": report.stats_bytes + report.prepared_bytes, "gathers": gathers[0],
                               "A": {n: whole(m.lora_A["default"].weight) for n, m in _lora_modules(model).items()}}
        # per-rank budget of one layer's statistics: several passes, each group's layers dealt to owners
        model = init_lora(_sharded(make_model("llama")), batches[rank::world_size], method="lora_da", r=3,
                          progress=False, population_size=100, max_stats_memory=_largest_layer_bytes())
        results["passes"] = {"plan": model.fisher_kernels_report.memory_plan,
                             "A": {n: whole(m.lora_A["default"].weight) for n, m in _lora_modules(model).items()}}
        model = init_lora(_sharded(make_model("llama")), batches[rank::world_size], r=3, progress=False)
        results["default_plan"] = model.fisher_kernels_report.memory_plan
        torch.save(results, os.path.join(out_dir, f"owners{rank}.pt"))


def _largest_layer_bytes():
    from fisher_kernels.layers import resolve_target_modules
    from fisher_kernels.memory import layer_held_bytes
    from fisher_kernels.methods import METHODS as ALL
    from tiny_models import make_model

    model = make_model("llama")
    return max(layer_held_bytes(model, ALL["lora_da"](3, 1.0, population_size=100),
                                resolve_target_modules(model, None)).values())


@pytest.mark.parametrize("world", [2, 4])
def test_each_of_n_fsdp2_ranks_holds_about_1_over_n_of_the_statistics_and_the_same_adapters(tmp_path, world):
    from fisher_kernels import init_lora
    from fisher_kernels.memory import layer_held_bytes
    from fisher_kernels.methods import METHODS as ALL
    from tiny_models import make_model, make_samples, pad_batches

    mp.spawn(_rank_main, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"owners{r}.pt") for r in range(world)]
    batches = pad_batches(make_samples("llama", n=8), 2)
    for method, options in METHODS:
        single = init_lora(make_model("llama"), batches, method=method, r=3, progress=False, **options)
        one = single.fisher_kernels_report.stats_bytes + single.fisher_kernels_report.prepared_bytes
        layers = layer_held_bytes(make_model("llama"), ALL[method](3, 1.0, **options), single.fisher_kernels_report.target_modules)
        held = [rank[method]["held"] for rank in ranks]
        # nothing held twice; the largest share within one layer of 1/N (layers are dealt whole)
        assert sum(held) == one, (method, held, one)
        assert max(held) <= one / world + max(layers.values()), (method, held, one)
        assert max(held) < 0.75 * one if world == 2 else max(held) < 0.5 * one, (method, held, one)
        # LoRA-GA and LoRA-DA read no weight values: their layers are never gathered; FILet's twice
        # (decomposition, initialisation), each layer by every rank (a gather is a collective)
        assert [rank[method]["gathers"] for rank in ranks] == [0 if method != "filet" else 2 * len(layers)] * world
        cases = [method] + (["passes"] if method == "lora_da" else [])
        for name, module in _lora_modules(single).items():
            expected = module.lora_A["default"].weight.detach()
            for rank, case in ((rank, case) for rank in ranks for case in cases):
                got = rank[case]["A"][name]
                sign = torch.where((got * expected).sum(1) < 0, -1.0, 1.0)[:, None]
                assert torch.allclose(got * sign, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item()), (
                    method, name, world)
    for rank in ranks:  # planned per rank: the default from the free memory, the budget as given
        assert rank["default_plan"].startswith("planned: ") and f"{world} ranks" in rank["default_plan"], rank["default_plan"]
        assert "per rank" in rank["passes"]["plan"] and " 1 calibration pass" not in rank["passes"]["plan"], (
            rank["passes"]["plan"])


def test_a_unit_of_layers_sharing_an_input_spans_owners_in_the_tiny_model():
    """The LoRA-DA case above moves statistics: q/k/v (one shared input factor) are dealt to different ranks."""
    from fisher_kernels.layers import resolve_target_modules
    from fisher_kernels.memory import layer_held_bytes
    from fisher_kernels.methods import METHODS as ALL
    from tiny_models import make_model

    model = make_model("llama")
    names = resolve_target_modules(model, None)
    owner = owners_by_bytes(layer_held_bytes(model, ALL["lora_da"](3, 1.0, population_size=100), names), 2)
    q, k, v = (owner[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert len({q, k, v}) > 1
