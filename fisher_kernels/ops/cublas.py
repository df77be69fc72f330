"""PyTorch GEMMs in the input dtype with an fp32 result: the cuBLAS tensor-core path.

The reference (``reference.py``) widens bf16/fp16 rows to fp32 before its GEMM, which on a GPU
runs on the fp32 units. Here the GEMM reads the rows as they are and writes fp32
(``torch.mm(..., out_dtype=torch.float32)``: products of bf16/fp16 numbers are exact in fp32 and
the sums are fp32, the same arithmetic as the reference up to summation order). Masked rows are
zeroed in the input dtype first (exact for a 0/1 mask). fp32 inputs take the reference's GEMM.
The projected energy on a compact bf16/fp16 basis projects in that dtype (fp32 rows split in two).
Where ``out_dtype`` is not implemented (CPU builds), the widened product is used, so the module
runs (and is tested) everywhere; on CUDA devices ``backend="auto"`` checks it at run time.
"""

from __future__ import annotations

import torch

from . import reference


def _low_precision(x: torch.Tensor) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16)


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask.to(x.dtype).unsqueeze(1)


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32 from bf16/fp16 operands, without widening them when the device can."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def masked_syrk_(acc, x, mask):
    """``acc += xᵀ diag(mask) x`` (full matrix)."""
    if not _low_precision(x):
        return reference.masked_syrk_(acc, x, mask)
    return acc.add_(mm_fp32(_masked(x, mask).T, x))


def masked_outer_(acc, g, x, mask):
    """``acc += gᵀ diag(mask) x``."""
    if not (_low_precision(g) and x.dtype == g.dtype):
        return reference.masked_outer_(acc, g, x, mask)
    return acc.add_(mm_fp32(_masked(g, mask).T, x))


def split(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (fp32) as ``high + low``, both in ``dtype``: ``high`` is ``x`` rounded to ``dtype``,
    ``low`` the rounded remainder, so that ``high + low`` carries about twice ``dtype``'s
    significant bits (16 for bf16, 22 for fp16)."""
    high = x.to(dtype)
    return high, (x - high.float()).to(dtype)


def masked_projected_energy_(acc, x, basis, mask):
    """``acc += Σ_t mask_t (basisᵀ x_t)²``. With a compact bf16/fp16 basis (FILet's stored
    singular vectors) the projection runs in the basis's dtype with fp32 sums: rows of that dtype
    exactly; fp32 rows as two GEMMs on their :func:`split` (relative error about 2⁻¹⁷ of each
    row, far below the basis's own rounding). Other bases take the reference."""
    if not _low_precision(basis):
        return reference.masked_projected_energy_(acc, x, basis, mask)
    if x.dtype == basis.dtype:
        projected = mm_fp32(x, basis)
    else:
        high, low = split(x.float(), basis.dtype)
        projected = mm_fp32(high, basis).add_(mm_fp32(low, basis))
    return acc.add_((reference._masked_fp32(projected, mask) * projected).sum(dim=0))


masked_column_sumsq_ = reference.masked_column_sumsq_
