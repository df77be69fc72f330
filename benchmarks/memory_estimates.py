"""Predicted peak memory of every method for Llama-3-8B and Llama-3-70B shapes (meta device, no weights).

    python -m benchmarks.memory_estimates [--batch-size 8 --seq-len 512 --r 16 --dtype bf16]

Builds each model on the ``meta`` device from its published configuration (no download), runs
:func:`fisher_kernels.estimate_memory` for every method of the package, and prints a markdown
table: the peak in GiB (model included) and its stages, and the smallest of 40/80/141 GiB GPUs it
fits on (with a 5 % margin for the CUDA context and the allocator).
"""

from __future__ import annotations

import argparse

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
    args = parser.parse_args(argv)
    from fisher_kernels import estimate_memory

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    lines = [f"Calibration batches of {args.batch_size}×{args.seq_len} tokens, r = {args.r}, {args.dtype} weights, "
             "all seven linear layers of every block targeted. GiB.", "",
             "| model | method | peak | model | activations | statistics | bases | temporaries | fits on |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    rows = []
    for name in args.models.split(","):
        model = meta_llama(name, dtype)
        for method in METHODS:
            e = estimate_memory(model, method=method, r=args.r, batch_size=args.batch_size, seq_len=args.seq_len,
                                target_modules=TARGETS)
            s = {k: v / 2**30 for k, v in e.stages.items()}
            rows.append({"model": name, "method": method, "peak_bytes": e.peak_bytes, "stages": e.stages})
            lines.append(f"| {name} | {method} | {e.peak_bytes / 2**30:.1f} | {s['model']:.1f} | {s['activations']:.1f} | "
                         f"{s['statistics']:.1f} | {s['bases']:.1f} | {s['temporaries']:.2f} | "
                         f"{smallest_gpu(e.peak_bytes)} |")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
