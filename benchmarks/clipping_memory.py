"""Peak memory of LoRA-DA's clipping path (an input factor whose float32 rounding is not positive
definite), measured on the CPU against the estimate's ``32 · d_in²`` bytes.

    MALLOC_MMAP_THRESHOLD_=131072 python -m benchmarks.clipping_memory [--d-in 3072]

``A = XᵀX / 64`` with 64 rows of scale 100 (rank 64 ≪ ``d_in``): the damped Cholesky fails, the
factor is eigendecomposed in float64 and its negative part clipped. Prints the peak resident memory
above ``A`` during ``_damped_cholesky`` (the kernel's ``VmHWM``, reset before the call) in units of
``d_in²`` bytes. Linux only.
"""

from __future__ import annotations

import argparse
import gc

import torch


def measure(d_in: int) -> dict:
    from benchmarks.memory import _process_bytes, _reset_peak
    from fisher_kernels.methods import METHODS

    torch.manual_seed(0)
    X = torch.randn(64, d_in) * 100
    A = (X.T @ X) / 64
    del X
    method = METHODS["lora_da"](8, 1.0)
    gc.collect()
    _reset_peak()
    before = _process_bytes("VmRSS")
    L = method._damped_cholesky("layer", A)
    peak = _process_bytes("VmHWM") - before
    del L
    return {"d_in": d_in, "clipped": bool(method.clipped_layers), "peak_bytes": peak,
            "peak_per_d_in_squared": peak / d_in**2, "estimate_per_d_in_squared": 32}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=3072)
    args = parser.parse_args(argv)
    row = measure(args.d_in)
    print(f"d_in {row['d_in']}: clipped {row['clipped']}; peak above A {row['peak_bytes'] / 2**20:.0f} MiB = "
          f"{row['peak_per_d_in_squared']:.1f} d_in² bytes (estimate 32 d_in²)")
    return row


if __name__ == "__main__":
    main()
