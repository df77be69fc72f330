"""Which methods initialise a 4-bit Llama-3-8B on one 24 GB GPU, and at which micro-batch.

    python -m benchmarks.qlora_fit [--model Llama-3-8B --gpu-gib 24 --seq-len 512 --r 16] [--json PATH]

Builds the model on the ``meta`` device in bf16 (no download) and asks
:func:`fisher_kernels.estimate_memory` with ``quantization="4bit"`` for each method and micro-batch
(1, 2, 4, 8 sequences). A method fits when its peak is at most 95 % of the GPU (the CUDA context
and the allocator take the rest). Methods whose statistics alone do not fit in one pass are also
estimated with ``max_stats_memory``: the layers in groups, one calibration pass each, the
statistics of one group held at a time (the fewest passes that fit).
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.memory_estimates import METHODS, MODELS, TARGETS, meta_llama

MICRO_BATCHES = (1, 2, 4, 8)


def fits(model, method: str, r: int, seq_len: int, gpu_bytes: float) -> dict:
    """The largest micro-batch that fits in one pass, and, failing that, with the statistics split."""
    from fisher_kernels import estimate_memory, resolve_target_modules
    from fisher_kernels.memory import consecutive_groups, layer_held_bytes
    from fisher_kernels.methods import METHODS as ALL, lora_scale

    row = {"method": method, "one_pass": None, "split": None}
    for micro in MICRO_BATCHES:
        e = estimate_memory(model, method=method, r=r, batch_size=micro, seq_len=seq_len, target_modules=TARGETS,
                            quantization="4bit")
        if e.peak_bytes <= gpu_bytes:
            row["one_pass"] = {"micro_batch": micro, "peak_bytes": e.peak_bytes}
        if e.stages["statistics"] and row["one_pass"] is None:
            room = gpu_bytes - (e.peak_bytes - e.stages["statistics"])  # what the statistics may take
            layers = layer_held_bytes(model, ALL[method](r, lora_scale(r, r)), resolve_target_modules(model, TARGETS))
            if room >= max(layers.values()) and (row["split"] is None or row["split"]["micro_batch"] < micro):
                row["split"] = {"micro_batch": micro, "passes": len(consecutive_groups(layers, room)),
                                "max_stats_memory": int(room)}
    return row


def table(result: dict) -> str:
    s = result["settings"]
    lines = [f"{s['model']} loaded in 4-bit (nf4, bf16 compute), r = {s['r']}, sequences of {s['seq_len']} tokens, "
             f"one {s['gpu_gib']} GB GPU (95 % usable). Largest micro-batch in {list(MICRO_BATCHES)}.", "",
             "| method | one calibration pass | peak (GiB) | with max_stats_memory |", "| --- | ---: | ---: | --- |"]
    from fisher_kernels.methods import METHODS as ALL

    for row in result["rows"]:
        one, split = row["one_pass"], row["split"]
        if not ALL[row["method"]].needs_data:
            fit = "no calibration pass" if one else "does not fit"
        else:
            fit = f"micro-batch {one['micro_batch']}" if one else "does not fit"
        peak = f"{one['peak_bytes'] / 2**30:.1f}" if one else "–"
        other = f"micro-batch {split['micro_batch']}, {split['passes']} passes" if split and not one else "–"
        lines.append(f"| {row['method']} | {fit} | {peak} | {other} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Llama-3-8B", choices=sorted(MODELS))
    parser.add_argument("--gpu-gib", type=float, default=24)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    model = meta_llama(args.model, torch.bfloat16)
    rows = [fits(model, method, args.r, args.seq_len, 0.95 * args.gpu_gib * 2**30) for method in METHODS
            if method != "kasa"]  # KaSA is refused on quantized models
    result = {"settings": {"model": args.model, "gpu_gib": args.gpu_gib, "seq_len": args.seq_len, "r": args.r},
              "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(table(result))
    return result


if __name__ == "__main__":
    main()
