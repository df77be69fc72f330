"""The weight-decomposition stage: our batched drivers against PEFT's per-layer SVD loop.

    python -m benchmarks.decomposition --preset cpu

Times, on the preset's target weights (fp32): a loop of ``torch.linalg.svd`` per layer (what
PEFT's PiSSA initialisation does) and :func:`fisher_kernels.methods.batched_svd` with each
driver. Then checks that the chosen directions do not change: PiSSA's top-r subspace (projector
within 1e-3 of the per-layer SVD's) and FILet's
top-r by Fisher energy, the latter from full K-FAC factors of one calibration pass over the
preset's data (so every driver is ranked with the same statistics), comparing each driver's
selected index sets with the per-layer SVD's.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.models import PRESETS, build_model, calibration_batches, target_module_names
from fisher_kernels import StatisticsRequest, collect_statistics, resolve_target_modules
from fisher_kernels.layers import weight_matrix
from fisher_kernels.methods import batched_svd, fisher_energy, select_by_energy

DRIVERS = ("svd", "gram64", "gram")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--samples", type=int, default=None, help="calibration sequences (default: the preset's)")
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.samples:
        preset["samples"] = args.samples
    r = preset["r"]
    model = build_model(preset)
    names = resolve_target_modules(model, target_module_names(preset))
    weights = {n: weight_matrix(model.get_submodule(n)).detach().float().clone() for n in names}
    torch.linalg.svd(torch.randn(8, 8))  # warm-up
    torch.linalg.eigh(torch.eye(8))

    start = time.perf_counter()
    loop = {n: torch.linalg.svd(W, full_matrices=False) for n, W in weights.items()}
    loop_seconds = time.perf_counter() - start
    results, seconds = {}, {}
    for driver in DRIVERS:
        start = time.perf_counter()
        results[driver] = batched_svd(weights, driver=driver)
        seconds[driver] = time.perf_counter() - start

    stats = collect_statistics(model, calibration_batches(preset),
                               {n: StatisticsRequest(input_factor=True, output_factor=True) for n in names})
    reference_filet = {}
    for n, (U, S, Vh) in loop.items():
        reference_filet[n] = set(select_by_energy(fisher_energy(U, Vh, stats[n].output_factor, stats[n].input_factor), r).tolist())
    print(f"\nPreset `{args.preset}`: {len(names)} target layers, r = {r}; per-layer torch.linalg.svd loop "
          f"{loop_seconds:.2f} s\n")
    print("| driver | seconds | speed-up vs per-layer SVD loop | PiSSA top-r subspace within 1e-3 | "
          "layers with the same FILet top-r | FILet picks with σ < 0.1·σ_max |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for driver in DRIVERS:
        same_pissa = same_filet = small = 0
        for n, (U, S, Vh) in results[driver].items():
            U_ref = loop[n][0][:, :r]
            same_pissa += bool(((U[:, :r] @ U[:, :r].T) - (U_ref @ U_ref.T)).abs().max() < 1e-3)
            chosen = select_by_energy(fisher_energy(U, Vh, stats[n].output_factor, stats[n].input_factor), r)
            same_filet += set(chosen.tolist()) == reference_filet[n]
            small += int((S[chosen] < 0.1 * S[0]).sum())
        print(f"| {driver} | {seconds[driver]:.2f} | {loop_seconds / seconds[driver]:.2f}× | {same_pissa}/{len(names)} | "
              f"{same_filet}/{len(names)} | {small} |")


if __name__ == "__main__":
    main()
