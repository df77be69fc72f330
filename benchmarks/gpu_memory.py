"""Measured CUDA peak of ``init_lora`` on a Llama-3-8B-shaped bf16 model against ``estimate_memory``.

    python -m benchmarks.gpu_memory [--layers 2 --methods filet,lora_ga,lora_da --json OUT]

Builds Llama-3-8B's published shape (no download; random weights) with ``--layers`` blocks
directly on the GPU in bf16, runs ``init_lora`` per method on ``--batches`` calibration batches
of ``--batch-size × --seq-len`` tokens (r 16, all linear layers of the blocks), and compares the
peak CUDA memory above the loaded model (``torch.cuda.max_memory_allocated`` minus what the model
and data hold) with :func:`fisher_kernels.estimate_memory` on the same configuration built on the
``meta`` device. Each method gets a freshly built model. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.models import LLAMA_TARGETS as TARGETS
from benchmarks.models import PRESETS, build_model, calibration_batches


def llama(layers: int, device) -> torch.nn.Module:
    """Llama-3-8B's shape with ``layers`` blocks, bf16, random weights."""
    return build_model(dict(PRESETS["llama-3-8b"], layers=layers), dtype=torch.bfloat16, device=device)


def measure(method: str, args) -> dict:
    from fisher_kernels import estimate_memory, init_lora

    meta = llama(args.layers, "meta")
    estimate = estimate_memory(meta, method=method, r=args.r, batch_size=args.batch_size, seq_len=args.seq_len,
                               target_modules=TARGETS)
    del meta
    torch.cuda.empty_cache()
    model = llama(args.layers, "cuda")
    data = calibration_batches(dict(samples=args.batches * args.batch_size, seq_len=args.seq_len,
                                    batch_size=args.batch_size, vocab=model.config.vocab_size), device="cuda")
    torch.cuda.synchronize()
    loaded = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    peft_model = init_lora(model, data, method=method, r=args.r, target_modules=TARGETS, progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    measured = torch.cuda.max_memory_allocated() - loaded
    predicted = estimate.peak_bytes - estimate.stages["model"]
    del peft_model, model, data
    torch.cuda.empty_cache()
    return {"method": method, "seconds": seconds, "measured_above_model_bytes": measured,
            "estimated_above_model_bytes": predicted, "estimate_over_measured": predicted / max(measured, 1),
            "estimate_stages": estimate.stages}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--methods", default="filet,lora_ga,lora_da")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    rows = []
    print(f"Llama-3-8B shape, {args.layers} blocks, bf16, r {args.r}, {args.batches} batches of "
          f"{args.batch_size}×{args.seq_len} tokens, {torch.cuda.get_device_name()}\n")
    print("| method | seconds | measured above model (GiB) | estimate (GiB) | estimate / measured |\n"
          "| --- | ---: | ---: | ---: | ---: |", flush=True)
    for method in args.methods.split(","):
        try:
            row = measure(method, args)
        except Exception as err:  # report, do not hide
            print(f"| {method} | failed: {type(err).__name__}: {err} | | | |", flush=True)
            continue
        rows.append(row)
        print(f"| {method} | {row['seconds']:.1f} | {row['measured_above_model_bytes'] / 2**30:.2f} | "
              f"{row['estimated_above_model_bytes'] / 2**30:.2f} | {row['estimate_over_measured']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
