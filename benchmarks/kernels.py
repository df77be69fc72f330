"""Each statistics kernel against the plain PyTorch equivalent on the masked-gathered rows.

    python -m benchmarks.kernels [--d 4096 --tokens 16384 --dtype bfloat16 --backends cuda,triton,cublas,auto,torch]

The PyTorch baseline is what a non-fused implementation does: gather the unmasked rows
(``x[mask]``), cast to fp32, then ``torch.addmm`` (or the elementwise equivalent). Timings are
medians of CUDA-event-timed repeats (wall clock on CPU). Prints a markdown table; ``--json``
writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fisher_kernels.ops import backends, get_ops


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up / compilation
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def baselines(x, mask, basis, g):
    def syrk():
        rows = x[mask].float()
        return torch.addmm(torch.zeros(x.shape[1], x.shape[1], device=x.device), rows.T, rows)

    def column_sumsq():
        return x[mask].float().square().sum(0)

    def projected_energy():
        return (x[mask].float() @ basis.float()).square().sum(0)

    def outer():
        return torch.addmm(torch.zeros(g.shape[1], x.shape[1], device=x.device), g[mask].float().T, x[mask].float())

    return {"masked_syrk_": syrk, "masked_column_sumsq_": column_sumsq,
            "masked_projected_energy_": projected_energy, "masked_outer_": outer}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--basis", type=int, default=1024, help="basis vectors for the projected energy")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--basis-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the projected energy's basis (FILet stores it in the model's dtype)")
    parser.add_argument("--masked-fraction", type=float, default=0.2)
    parser.add_argument("--backends", default="cuda,triton,cublas,auto,torch")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.tokens, args.d, device=device, generator=g).to(dtype)
    grad = torch.randn(args.tokens, args.d, device=device, generator=g).to(dtype)
    mask = torch.rand(args.tokens, device=device, generator=g) >= args.masked_fraction
    basis = torch.randn(args.d, args.basis, device=device, generator=g).to(getattr(torch, args.basis_dtype))
    base = baselines(x, mask, basis, grad)
    available = backends()
    rows = []
    for backend in args.backends.split(","):
        if not available[backend]["available"]:
            print(f"skipping {backend}: {available[backend]['reason']}")
            continue
        ops = get_ops(backend, device)
        calls = {
            "masked_syrk_": lambda: ops.masked_syrk_(torch.zeros(args.d, args.d, device=device), x, mask),
            "masked_column_sumsq_": lambda: ops.masked_column_sumsq_(torch.zeros(args.d, device=device), x, mask),
            "masked_projected_energy_": lambda: ops.masked_projected_energy_(torch.zeros(args.basis, device=device), x, basis, mask),
            "masked_outer_": lambda: ops.masked_outer_(torch.zeros(args.d, args.d, device=device), grad, x, mask),
        }
        for op, call in calls.items():
            ours, theirs = timed(call, args.repeats, device), timed(base[op], args.repeats, device)
            rows.append({"op": op, "backend": backend, "seconds": ours, "pytorch_gathered_seconds": theirs,
                         "speedup": theirs / ours})
    print(f"\n{device}, d = {args.d}, {args.tokens} tokens ({args.masked_fraction:.0%} masked), {args.dtype}; "
          f"projection basis {args.basis_dtype}\n")
    print("| op | backend | ours (ms) | gather + PyTorch (ms) | speed-up |\n| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['op']} | {r['backend']} | {r['seconds'] * 1e3:.2f} | {r['pytorch_gathered_seconds'] * 1e3:.2f} | "
              f"{r['speedup']:.2f}× |")
    chosen = backends()["auto"]["chosen"]
    if chosen:
        print("\nbackend='auto' chose:\n" + json.dumps(chosen, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "args": vars(args), "rows": rows, "auto": chosen}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
