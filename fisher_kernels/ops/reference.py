"""Pure-PyTorch statistics updates: the reference every fused kernel is tested against.

Each function updates an fp32 accumulator in place from a block of rows ``x`` (N, d) in any
floating dtype and an optional row mask ``mask`` (N,) of 0/1 (bool or float). Rows with
mask 0 contribute nothing. These four functions *are* the documentation of what the
kernels compute.
"""

from __future__ import annotations

import torch


def _masked_fp32(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = x.float()
    if mask is None:
        return x
    return x * mask.to(torch.float32).unsqueeze(1)


def masked_syrk_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``acc += xᵀ diag(mask) x``; acc (d, d) fp32, x (N, d)."""
    acc.addmm_(_masked_fp32(x, mask).T, x.float())
    return acc


def masked_column_sumsq_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``acc += Σ_t mask_t x_t²`` (the diagonal of ``xᵀ diag(mask) x``); acc (d,) fp32."""
    squares = x.float().square()
    if mask is None:
        return acc.add_(squares.sum(dim=0))
    return acc.addmv_(squares.T, mask.to(torch.float32))


def masked_projected_energy_(
    acc: torch.Tensor, x: torch.Tensor, basis: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """``acc += Σ_t mask_t (basisᵀ x_t)²``; acc (m,) fp32, basis (d, m) fp32 (or a compact bf16/fp16
    basis, widened exactly)."""
    squares = (x.float() @ basis.float()).square()  # (N, m)
    if mask is None:
        return acc.add_(squares.sum(dim=0))
    return acc.addmv_(squares.T, mask.to(torch.float32))


def masked_outer_(
    acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """``acc += gᵀ diag(mask) x`` (the summed weight gradient); acc (d_out, d_in), g (N, d_out)."""
    acc.addmm_(_masked_fp32(g, mask).T, x.float())
    return acc
