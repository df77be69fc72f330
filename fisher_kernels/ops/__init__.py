"""Statistics update ops and the backend registry.

Four in-place updates of fp32 accumulators, each with one signature across backends:

    masked_syrk_(acc, x, mask)                    acc += xᵀ diag(mask) x     (upper triangle at least)
    masked_column_sumsq_(acc, x, mask)            acc += Σ_t mask_t x_t²
    masked_projected_energy_(acc, x, basis, mask) acc += Σ_t mask_t (basisᵀ x_t)²
    masked_outer_(acc, g, x, mask)                acc += gᵀ diag(mask) x

``reference.py`` is the PyTorch definition; ``triton_*.py``, ``cublas.py`` (PyTorch GEMMs in
the input dtype with fp32 output) and the CUDA extension (``csrc/``) must match it. The
registry is decided once, at import: which backends can run here and, for the others, why not.
A backend that cannot load falls back quietly (debug log). ``backend="auto"`` on a CUDA device
chooses per op, dtype and size by a correctness probe and a timing probe (``autotune.py``).
"""

from __future__ import annotations

from . import library  # noqa: F401  (registers torch.ops.fisher_kernels.*)
from . import reference
from .registry import BACKEND_NAMES, OP_NAMES, PIN_VARIABLE, backends, get_ops

__all__ = ["BACKEND_NAMES", "OP_NAMES", "PIN_VARIABLE", "backends", "get_ops", "reference"]
