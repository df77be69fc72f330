"""Predicted peak memory of every method for Llama-3-8B and Llama-3-70B shapes (meta device, no weights).

    python -m benchmarks.memory_estimates [--batch-size 8 --seq-len 512 --r 16 --dtype bf16] [--json PATH]

Builds each model on the ``meta`` device from its published configuration (no download), runs
:func:`fisher_kernels.estimate_memory` for every method of the package, and prints a markdown
table: the peak in GiB (model included) and its stages, and the smallest of 40/80/141 GiB GPUs it
fits on (with a 5 % margin for the CUDA context and the allocator). ``--json`` writes the rows
(the docs' table is rendered from ``benchmarks/results/memory_estimates.json`` by
``python -m benchmarks.tables``).
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.models import LLAMA_TARGETS, PRESETS, build_model

MODELS = {"Llama-3-8B": "llama-3-8b", "Llama-3-70B": "llama-3-70b"}  # table name: preset in benchmarks.models
METHODS = ["filet", "lora_da", "lora_ga", "pissa", "milora", "kasa", "gaussian"]
GPUS = [(40, "A100 40GB"), (80, "A100/H100 80GB"), (141, "H200 141GB")]
TARGETS = LLAMA_TARGETS


def meta_llama(name: str, dtype: torch.dtype):
    return build_model(PRESETS[MODELS[name]], dtype=dtype, device="meta")


def smallest_gpu(peak_bytes: int) -> str:
    for gib, label in GPUS:
        if peak_bytes <= 0.95 * gib * 2**30:
            return label
    return "none (shard the model or use max_stats_memory / smaller batches)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", default=None, help="also write the rows (and the settings) to this file")
    args = parser.parse_args(argv)
    from fisher_kernels import estimate_memory

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = []
    for name in args.models.split(","):
        model = meta_llama(name, dtype)
        for method in METHODS:
            e = estimate_memory(model, method=method, r=args.r, batch_size=args.batch_size, seq_len=args.seq_len,
                                target_modules=TARGETS)
            row = {"model": name, "method": method, "peak_bytes": e.peak_bytes, "stages": e.stages}
            if name == "Llama-3-8B":  # what init_lora's default settings plan on one 80 GB GPU
                try:
                    p = estimate_memory(model, method=method, r=args.r, batch_size=args.batch_size,
                                        seq_len=args.seq_len, target_modules=TARGETS, device_bytes=80 * 10**9)
                    row["planned_80gb"] = {"peak_bytes": p.peak_bytes, "micro_batch": None if p.plan is None else
                                           p.plan.micro_batch_size, "budget": None if p.plan is None else p.plan.budget,
                                           "reason": "" if p.plan is None else p.plan.reason}
                except MemoryError as error:
                    row["planned_80gb"] = {"error": str(error)}
            if name == "Llama-3-70B":  # one rank of 8 sharding the model with FSDP2, each with 80 GB
                try:
                    p = estimate_memory(model, method=method, r=args.r, batch_size=args.batch_size,
                                        seq_len=args.seq_len, target_modules=TARGETS, device_bytes=80 * 10**9,
                                        world_size=8)
                    row["fsdp2_8x80gb"] = {"peak_bytes": p.peak_bytes, "stages": p.stages,
                                           "reason": "" if p.plan is None else p.plan.reason}
                except MemoryError as error:
                    row["fsdp2_8x80gb"] = {"error": str(error)}
            rows.append(row)
    result = {"settings": {"batch_size": args.batch_size, "seq_len": args.seq_len, "r": args.r, "dtype": args.dtype},
              "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    lines = [table(result)]
    print("\n".join(lines))
    return rows


def table(result: dict) -> str:
    """The markdown table of :func:`main`'s result."""
    settings = result["settings"]
    lines = [f"Calibration batches of {settings['batch_size']}×{settings['seq_len']} tokens, r = {settings['r']}, "
             f"{settings['dtype']} weights, all seven linear layers of every block targeted. GiB.", "",
             "| model | method | peak | model | activations | statistics | bases | temporaries | fits on |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    planned = [row for row in result["rows"] if "planned_80gb" in row]
    for row in result["rows"]:
        s = {k: v / 2**30 for k, v in row["stages"].items()}
        lines.append(f"| {row['model']} | {row['method']} | {row['peak_bytes'] / 2**30:.1f} | {s['model']:.1f} | "
                     f"{s['activations']:.1f} | {s['statistics']:.1f} | {s['bases']:.1f} | {s['temporaries']:.2f} | "
                     f"{smallest_gpu(row['peak_bytes'])} |")
    if planned:
        lines += ["", "Planned by the default settings (`max_stats_memory` and `micro_batch_size` \"auto\") for "
                  "Llama-3-8B on one 80 GB GPU (80 % of what the model leaves free):", "",
                  "| method | planned peak (GiB) | plan |", "| --- | ---: | --- |"]
        for row in planned:
            p = row["planned_80gb"]
            if "error" in p:
                lines.append(f"| {row['method']} | – | does not fit |")
                continue
            plan = p["reason"].split("planned: ", 1)[-1].split(", estimated")[0] if p["reason"] else "no calibration pass"
            lines.append(f"| {row['method']} | {p['peak_bytes'] / 2**30:.1f} | {plan} |")
    sharded = [row for row in result["rows"] if "fsdp2_8x80gb" in row]
    if sharded:
        lines += ["", "Llama-3-70B sharded with FSDP2 over 8 ranks of 80 GB (`fully_shard` on every block and the "
                  "root), each rank with its own batches of the size above, default settings: per rank, its shard, "
                  "the gathered weights in the pass (the root's and three blocks), the statistics and bases of the layers it owns, "
                  "planned:", "",
                  "| method | peak per rank (GiB) | shard | gathered | statistics + bases | plan |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for row in sharded:
            p = row["fsdp2_8x80gb"]
            if "error" in p:
                lines.append(f"| {row['method']} | – | | | | does not fit |")
                continue
            s = {k: v / 2**30 for k, v in p["stages"].items()}
            plan = p["reason"].split("planned: ", 1)[-1].split(", estimated")[0] if p["reason"] else "no calibration pass"
            lines.append(f"| {row['method']} | {p['peak_bytes'] / 2**30:.1f} | {s['model']:.1f} | {s['gathered']:.1f} | "
                         f"{s['statistics'] + s['bases']:.1f} | {plan} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
