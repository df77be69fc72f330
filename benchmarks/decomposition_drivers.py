"""Time of one layer's singular basis per driver and linear-algebra library, per weight shape.

    python -m benchmarks.decomposition_drivers [--preset llama-1b --device cuda --dtype bfloat16]

For each distinct target-weight shape of the preset (random weights of the model's dtype), the
time of :func:`fisher_kernels.methods.common.singular_basis` with each driver (``gram64``,
``gram``, ``svd``) and, on CUDA, with each of torch's linear-algebra back-ends (cuSOLVER,
MAGMA); the median of ``--repeats`` after a warm-up. Then the seconds one decomposition of all
the preset's target layers would take with each. Prints a markdown table; ``--json`` writes it.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

from benchmarks.kernels import timed
from benchmarks.models import PRESETS, build_model, target_module_names
from fisher_kernels.layers import weight_matrix
from fisher_kernels.methods.common import singular_basis

DRIVERS = ("gram64", "gram", "svd")


def shapes_of(preset) -> Counter:
    model = build_model(dict(preset, layers=1, vocab=16))
    names = target_module_names(preset)
    counts = Counter(tuple(weight_matrix(m).shape) for n, m in model.named_modules() if n.split(".")[-1] in names)
    return Counter({shape: count * preset["layers"] for shape, count in counts.items()})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    preset, dtype = PRESETS[args.preset], getattr(torch, args.dtype)
    libraries = ["cusolver", "magma"] if torch.device(args.device).type == "cuda" else ["default"]
    shapes = shapes_of(preset)
    rows, totals = [], Counter()
    for shape, count in shapes.items():
        W = torch.randn(*shape, device=args.device).to(dtype)
        for library in libraries:
            if library != "default":
                torch.backends.cuda.preferred_linalg_library(library)
            for driver in DRIVERS:
                try:
                    seconds = timed(lambda: singular_basis(W, driver=driver), args.repeats, torch.device(args.device).type)
                except Exception as err:  # report, do not hide
                    print(f"{shape} {library} {driver}: failed: {type(err).__name__}: {err}", flush=True)
                    continue
                rows.append({"shape": list(shape), "layers": count, "library": library, "driver": driver,
                             "seconds": seconds})
                totals[(library, driver)] += seconds * count
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.preferred_linalg_library("default")
    print(f"\n{args.device}, {args.dtype} weights of preset `{args.preset}` ({sum(shapes.values())} layers)\n")
    print("| shape (d_out × d_in) | layers | library | driver | seconds per layer |\n| --- | ---: | --- | --- | ---: |")
    for r in rows:
        print(f"| {r['shape'][0]} × {r['shape'][1]} | {r['layers']} | {r['library']} | {r['driver']} | {r['seconds']:.4f} |")
    print("\n| library | driver | all layers once (s) |\n| --- | --- | ---: |")
    for (library, driver), seconds in sorted(totals.items(), key=lambda kv: kv[1]):
        print(f"| {library} | {driver} | {seconds:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows,
                       "totals": [{"library": k[0], "driver": k[1], "seconds": v} for k, v in totals.items()]}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
