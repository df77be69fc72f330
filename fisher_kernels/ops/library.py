"""The statistics ops as PyTorch operators: ``torch.ops.fisher_kernels.<op>``.

Each is registered with ``torch.library.custom_op`` (the mutated accumulator declared, a fake
implementation for ``torch.compile``/meta tracing) and runs ``get_ops(backend, acc.device)``'s
function; ``backend`` defaults to ``"auto"``. They return nothing: the accumulator is updated
in place.

    torch.ops.fisher_kernels.masked_syrk(acc, x, mask)                 acc += xᵀ diag(mask) x (upper triangle)
    torch.ops.fisher_kernels.masked_column_sumsq(acc, x, mask)         acc += Σ_t mask_t x_t²
    torch.ops.fisher_kernels.masked_projected_energy(acc, x, basis, mask)
    torch.ops.fisher_kernels.masked_outer(acc, g, x, mask)             acc += gᵀ diag(mask) x
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .registry import get_ops


def _ops(backend: str, acc: Tensor):
    return get_ops(backend, acc.device)


@torch.library.custom_op("fisher_kernels::masked_syrk", mutates_args=("acc",))
def masked_syrk(acc: Tensor, x: Tensor, mask: Optional[Tensor] = None, backend: str = "auto") -> None:
    """``acc += xᵀ diag(mask) x``; acc (d, d) fp32 (at least its upper triangle is updated)."""
    _ops(backend, acc).masked_syrk_(acc, x, mask)


@torch.library.custom_op("fisher_kernels::masked_column_sumsq", mutates_args=("acc",))
def masked_column_sumsq(acc: Tensor, x: Tensor, mask: Optional[Tensor] = None, backend: str = "auto") -> None:
    """``acc += Σ_t mask_t x_t²``; acc (d,) fp32."""
    _ops(backend, acc).masked_column_sumsq_(acc, x, mask)


@torch.library.custom_op("fisher_kernels::masked_projected_energy", mutates_args=("acc",))
def masked_projected_energy(acc: Tensor, x: Tensor, basis: Tensor, mask: Optional[Tensor] = None,
                            backend: str = "auto") -> None:
    """``acc += Σ_t mask_t (basisᵀ x_t)²``; acc (m,) fp32, basis (d, m) fp32."""
    _ops(backend, acc).masked_projected_energy_(acc, x, basis, mask)


@torch.library.custom_op("fisher_kernels::masked_outer", mutates_args=("acc",))
def masked_outer(acc: Tensor, g: Tensor, x: Tensor, mask: Optional[Tensor] = None, backend: str = "auto") -> None:
    """``acc += gᵀ diag(mask) x``; acc (d_out, d_in) fp32."""
    _ops(backend, acc).masked_outer_(acc, g, x, mask)


def _check(cond: bool, message: str) -> None:
    torch._check(cond, lambda: message)


@masked_syrk.register_fake
def _(acc, x, mask=None, backend="auto"):
    _check(acc.shape == (x.shape[1], x.shape[1]), "masked_syrk: acc must be (d, d) for x (N, d)")


@masked_column_sumsq.register_fake
def _(acc, x, mask=None, backend="auto"):
    _check(acc.shape == (x.shape[1],), "masked_column_sumsq: acc must be (d,) for x (N, d)")


@masked_projected_energy.register_fake
def _(acc, x, basis, mask=None, backend="auto"):
    _check(acc.shape == (basis.shape[1],) and basis.shape[0] == x.shape[1],
           "masked_projected_energy: x (N, d), basis (d, m), acc (m,)")


@masked_outer.register_fake
def _(acc, g, x, mask=None, backend="auto"):
    _check(acc.shape == (g.shape[1], x.shape[1]), "masked_outer: acc must be (d_out, d_in) for g (N, d_out), x (N, d_in)")
