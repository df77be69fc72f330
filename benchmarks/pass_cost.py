"""Operator calls and host synchronisations per calibration batch, against one training
forward+backward of the same batch: hardware-independent (each operator call is a kernel launch
on a GPU, each synchronisation a stall of the host), so it runs on any machine.

    python -m benchmarks.pass_cost                       # every method, Llama-3's 128,256 vocabulary
    python -m benchmarks.pass_cost --methods filet --json pass_cost.json

Per batch: the difference between an ``init_lora`` over ``--batches`` + 4 and one over
``--batches`` batches, divided by 4, so that one-off work (decomposition, autotune, writes) cancels.
Synchronisations are operators that read a device value back to the host (``.item()``, ``int()``,
``bool()``, ``nonzero``, ``masked_select``, ``unique``...) and ``tolist()``/``cpu()``/``numpy()``.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .models import PRESETS, build_model, training_copy

# operators that stall the host on a GPU: a scalar read, or an output whose size depends on values
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
               "repeat_interleave", "_assert_async"}
SYNCING_METHODS = {"tolist", "cpu", "numpy"}
METHODS = ["filet", "filet_full", "lora_ga", "lora_da"]
OPTIONS = {"filet_projected": dict(method="filet", route="projected"), "filet_full": dict(method="filet", route="full")}
PRESET = PRESETS["pass-cost"]


class OperatorCounter(TorchDispatchMode):
    """Counts every ATen operator call (by name) and the ones that synchronise with the host."""

    def __init__(self):
        super().__init__()
        self.calls, self.syncs = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.calls[name] += 1
        if name in SYNCING_OPS:
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))


class _HostReads(TorchFunctionMode):
    """``tolist()``, ``cpu()``, ``numpy()``: host reads that do not reach the dispatcher on a CPU tensor."""

    def __init__(self, syncs: Counter):
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING_METHODS:
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))


class Counted:
    """``with Counted() as c: ...`` then ``c.calls`` (operator calls) and ``c.syncs`` (host syncs)."""

    def __enter__(self):
        self.dispatch = OperatorCounter()
        self.function = _HostReads(self.dispatch.syncs)
        self.function.__enter__()
        self.dispatch.__enter__()
        return self

    def __exit__(self, *exc):
        self.dispatch.__exit__(*exc)
        self.function.__exit__(*exc)

    @property
    def calls(self) -> int:
        return sum(self.dispatch.calls.values())

    @property
    def syncs(self) -> int:
        return sum(self.dispatch.syncs.values())

    @property
    def by_op(self) -> Counter:
        return self.dispatch.calls

    @property
    def syncs_by_op(self) -> Counter:
        return self.dispatch.syncs


def batches_for(preset: dict, n: int, seed: int = 1) -> list[dict]:
    """``n`` batches of random tokens, every other sequence with a padded tail."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        size, length = preset["batch_size"], preset["seq_len"]
        ids = torch.randint(0, preset["vocab"], (size, length), generator=g)
        mask = torch.ones(size, length, dtype=torch.long)
        mask[1::2, length - length // 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def training_step_cost(model, batch, frozen: bool = False) -> Counted:
    """One ordinary training forward+backward (the model's own mean loss); ``frozen``: parameters
    without gradients, the input embeddings made to require one (what a frozen pass differentiates)."""
    model = training_copy(model, frozen).train()
    model(**batch).loss.backward()  # warm: lazy initialisation out of the count
    model.zero_grad(set_to_none=True)
    with Counted() as counted:
        model(**batch).loss.backward()
    return counted


def init_cost(model, batches, method: str, r: int) -> tuple[Counted, Counted]:
    """``init_lora``'s whole cost and that of its calibration pass alone (``run_calibration_pass``)."""
    from fisher_kernels import init_lora
    from fisher_kernels.pipeline import compute as api

    options = dict(OPTIONS.get(method, {"method": method}))
    collect = api.run_calibration_pass
    passes = Counted()

    def counted_pass(*args, **kwargs):
        with passes:
            return collect(*args, **kwargs)

    api.run_calibration_pass = counted_pass
    try:
        with Counted() as counted:
            init_lora(copy.deepcopy(model), batches, r=r, progress=False, **options)
    finally:
        api.run_calibration_pass = collect
    return counted, passes


def _difference(long: Counted, short: Counted, extra: int) -> dict:
    ops = Counter({k: (long.by_op[k] - short.by_op[k]) / extra for k in long.by_op})
    syncs = Counter({k: (long.syncs_by_op[k] - short.syncs_by_op[k]) / extra for k in long.syncs_by_op})
    return {"calls": (long.calls - short.calls) / extra, "syncs": (long.syncs - short.syncs) / extra,
            "top_ops": dict(ops.most_common(12)), "syncs_by_op": {k: v for k, v in syncs.items() if v}}


def per_batch(model, preset: dict, method: str, base_batches: int = 2, extra: int = 4) -> dict:
    """Operator calls and syncs per calibration batch of ``method``: (cost of ``base_batches +
    extra`` batches − cost of ``base_batches``) / ``extra``, for the calibration pass alone and
    for the whole ``init_lora`` (which adds the data-dependent iterations of the solvers: the
    batches change the statistics they start from), with the operators that differ most."""
    data = batches_for(preset, base_batches + extra)
    init_cost(model, data[:1], method, preset["r"])  # warm: autotune probes, lazy imports
    short, short_pass = init_cost(model, data[:base_batches], method, preset["r"])
    long, long_pass = init_cost(model, data, method, preset["r"])
    return {"method": method, **_difference(long_pass, short_pass, extra),
            "init_lora": _difference(long, short, extra)}


def build(preset: dict):
    return build_model(preset)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--vocab", type=int, default=PRESET["vocab"])
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    preset = dict(PRESET, vocab=args.vocab)
    model = build(preset)
    batch = batches_for(preset, 1)[0]
    train, frozen = training_step_cost(model, batch), training_step_cost(model, batch, frozen=True)
    report = {"preset": preset, "training": {"calls": train.calls, "syncs": train.syncs},
              "frozen_training": {"calls": frozen.calls, "syncs": frozen.syncs}, "methods": []}
    print(f"Llama hidden {preset['hidden']}, {preset['layers']} blocks, vocabulary {preset['vocab']:,}, batches of "
          f"{preset['batch_size']} x {preset['seq_len']} tokens")
    print(f"training forward+backward: {train.calls} operator calls, {train.syncs} host syncs "
          f"(frozen parameters: {frozen.calls}, {frozen.syncs})")
    print("| method | pass: operator calls per batch | x training fwd+bwd | host syncs per batch | "
          "init_lora: calls per batch | syncs per batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for method in args.methods.split(","):
        row = per_batch(model, preset, method)
        row["ratio"] = row["calls"] / train.calls
        report["methods"].append(row)
        whole = row["init_lora"]
        print(f"| {method} | {row['calls']:,.0f} | {row['ratio']:.2f}x | {row['syncs']:g} | {whole['calls']:,.0f} | "
              f"{whole['syncs']:g} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
