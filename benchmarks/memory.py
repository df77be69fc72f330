"""Peak memory of every LoRA initialisation above the loaded model, as a multiple of the target weights.

    python -m benchmarks.memory --json out.json          # every row, fp32 and bf16, 2 and 4 blocks
    python -m benchmarks.memory --methods filet,peft_pissa --dtypes bf16 --blocks 4

Each row runs in a fresh Python process: the model (a random Llama, hidden 1024, intermediate 2816,
16 heads, 4 KV heads, vocabulary 8192; all seven linear layers of every block targeted) and its
calibration batches (2 batches of 4 × 128 tokens, one sequence in each padded: 1,024 tokens) are
built, garbage is collected, the kernel's peak-RSS counter (VmHWM) is reset, and the method runs.
``ratio`` = (peak RSS − RSS before the method) / bytes of the target weights in the model's dtype:
everything the method holds at its worst moment (statistics, bases, copies, temporaries, activations
of its calibration pass), nothing of the model itself. Every row runs with glibc's mmap threshold
fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``): otherwise glibc raises it after the first large free
and keeps later freed blocks in its heap, so RSS measures allocation history rather than use
(PiSSA on a bf16 model read 3.1× instead of 0.8× before this fix). ``estimate`` is what
:func:`fisher_kernels.estimate_memory` predicted for the same row, in the same unit.

Rows: ours (``filet`` and the other methods of the package), PEFT's own implementations of the
same methods (``peft_pissa``, ``peft_lora_ga``, ``peft_corda``, ``peft_kasa``), and ``fwd_bwd``, one
ordinary training forward+backward with parameter gradients, for scale. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch

from benchmarks.models import PRESETS, build_model, calibration_batches, target_module_names
from fisher_kernels.device_memory import process_memory

PRESET = PRESETS["memory"]

OURS = {
    "filet": dict(method="filet"),
    "filet_full": dict(method="filet", route="full"),
    "filet_micro": dict(method="filet", micro_batch_size=1),  # one sequence per forward+backward
    "lora_da": dict(method="lora_da"),
    "lora_ga": dict(method="lora_ga"),
    "pissa": dict(method="pissa"),
    "milora": dict(method="milora"),
    "kasa": dict(method="kasa"),
    "gaussian": dict(method="gaussian"),
}
PEFT = ["peft_pissa", "peft_lora_ga", "peft_corda", "peft_kasa"]
ALL_ROWS = ["fwd_bwd", *OURS, *PEFT]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# glibc raises its mmap threshold after large frees, after which freed blocks below 32 MiB stay in the
# heap and count in RSS; a fixed threshold (glibc's initial 128 KiB) makes RSS follow what is in use.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _process_bytes(field: str) -> int:
    value = process_memory(field)
    if value is None:
        raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux")
    return value


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _run(name: str, model, batches, preset) -> None:
    from benchmarks.init_time import _run_peft
    from benchmarks.models import target_module_names

    if name == "fwd_bwd":
        for p in model.parameters():
            p.requires_grad_(True)
        for batch in batches:
            model(**batch).loss.backward()
    elif name in OURS:
        from fisher_kernels import init_lora

        init_lora(model, batches, r=preset["r"], target_modules=target_module_names(preset), progress=False,
                  **OURS[name])
    elif name == "peft_kasa":
        from peft import KasaConfig, LoraConfig, get_peft_model

        config = LoraConfig(r=preset["r"], lora_alpha=preset["r"], target_modules=target_module_names(preset),
                            kasa_config=KasaConfig())
        get_peft_model(model, config)
    else:
        _run_peft(name, model, batches, preset, "cpu")


def measure_row(name: str, dtype: str, blocks: int, free_factor: float | None = None) -> dict:
    """Measure one row in this process (call it in a fresh one). ``free_factor``: the free memory the
    plan sees is set to this many times the model's bytes (a simulated budget, for the default settings'
    planning); the row then holds ``free_bytes``."""
    torch.set_num_threads(2)
    preset = dict(PRESET, layers=blocks)
    model = build_model(preset, dtype=DTYPES[dtype])
    batches = calibration_batches(preset)
    names = target_module_names(preset)
    target_bytes = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
                       if n.split(".")[-1] in names and hasattr(m, "weight"))
    estimate = None
    free_bytes = None
    if free_factor is not None:
        import fisher_kernels.memory as planner

        model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        free_bytes = int(free_factor * model_bytes)
        planner.available_memory = lambda device: (free_bytes, "a simulated budget")
    if name in OURS and free_factor is None:
        from fisher_kernels import estimate_memory

        options = {k: v for k, v in OURS[name].items() if k not in ("method", "micro_batch_size")}
        batch_size = min(preset["batch_size"], OURS[name].get("micro_batch_size", preset["batch_size"]))
        estimate = estimate_memory(model, method=OURS[name]["method"], r=preset["r"], batch_size=batch_size,
                                   seq_len=preset["seq_len"], target_modules=names, **options)
    gc.collect()
    _reset_peak()
    before = _process_bytes("VmRSS")
    _run(name, model, batches, preset)
    peak = _process_bytes("VmHWM")
    row = {"method": name, "dtype": dtype, "blocks": blocks, "target_bytes": target_bytes,
           "peak_above_model_bytes": peak - before, "ratio": (peak - before) / target_bytes}
    if free_bytes is not None:
        row["free_bytes"] = free_bytes
    if estimate is not None:
        row["estimate_bytes"] = estimate.peak_bytes - estimate.stages["model"]
        row["estimate_ratio"] = row["estimate_bytes"] / target_bytes
    return row


def run_row(name: str, dtype: str, blocks: int) -> dict:
    """Measure one row in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.memory", "--row", json.dumps([name, dtype, blocks])]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **ALLOCATOR_ENV))
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        return {"method": name, "dtype": dtype, "blocks": blocks, "error": lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict]) -> str:
    header = ("| method | dtype | blocks | target weights (MiB) | peak above model (MiB) | × target weights "
              "| estimate (×) |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['dtype']} | {r['blocks']} | | failed: {r['error']} | | |")
            continue
        estimate = f"{r['estimate_ratio']:.2f}" if "estimate_ratio" in r else ""
        lines.append(f"| {r['method']} | {r['dtype']} | {r['blocks']} | {r['target_bytes'] / 2**20:.0f} | "
                     f"{r['peak_above_model_bytes'] / 2**20:.0f} | {r['ratio']:.2f} | {estimate} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(ALL_ROWS))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--blocks", default="2,4")
    parser.add_argument("--json")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row in this process
    args = parser.parse_args(argv)
    if args.row:
        print(json.dumps(measure_row(*json.loads(args.row))))
        return None
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(ALL_ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {ALL_ROWS}")
    rows = []
    for blocks in (int(b) for b in args.blocks.split(",")):
        for dtype in args.dtypes.split(","):
            for name in methods:
                row = run_row(name, dtype, blocks)
                rows.append(row)
                shown = row.get("error") or f"{row['ratio']:.2f}× target weights"
                print(f"{name} {dtype} {blocks} blocks: {shown}", file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": PRESET, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
