"""Triton: masked projected energy ``acc += Σ_t mask_t (Pᵀ x_t)²`` for a fixed basis P (d, m).

Each program projects a block of rows onto a block of basis vectors with ``tl.dot``, squares,
masks and reduces over its rows in registers, then adds atomically: the (T, m) projection is
never written to memory. Accumulation and the basis stay in fp32 (IEEE, no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _masked_projected_energy_kernel(
    x_ptr, p_ptr, mask_ptr, out_ptr, T, D, M,
    stride_xt, stride_xd, stride_pd, stride_pm,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    in_rows = rows < T
    proj = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                    mask=in_rows[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs_d[:, None] * stride_pd + offs_m[None, :] * stride_pm,
                    mask=(offs_d[:, None] < D) & (offs_m[None, :] < M), other=0.0)
        proj += tl.dot(x, p, input_precision="ieee")
    proj = proj * proj
    if HAS_MASK:
        w = tl.load(mask_ptr + rows, mask=in_rows, other=0.0)
        proj = proj * w[:, None]
    tl.atomic_add(out_ptr + offs_m, tl.sum(proj, axis=0), mask=offs_m < M)


def masked_projected_energy_(acc: torch.Tensor, x: torch.Tensor, basis: torch.Tensor,
                             mask: torch.Tensor | None) -> torch.Tensor:
    """``acc += Σ_t mask_t (basisᵀ x_t)²``; x (T, d), basis (d, m) fp32, acc (m,) fp32."""
    T, D = x.shape
    M = basis.shape[1]
    if basis.shape[0] != D or acc.shape != (M,) or acc.dtype != torch.float32:
        raise ValueError(f"masked_projected_energy_: x {tuple(x.shape)}, basis {tuple(basis.shape)} and "
                         f"acc {tuple(acc.shape)} {acc.dtype} do not fit")
    if T == 0:
        return acc
    basis = basis.to(torch.float32)
    block_t, block_m, block_d = 64, 64, 32
    mask_arg = x if mask is None else mask.to(torch.float32).contiguous()
    grid = (triton.cdiv(M, block_m), triton.cdiv(T, block_t))
    _masked_projected_energy_kernel[grid](
        x, basis, mask_arg, acc, T, D, M, x.stride(0), x.stride(1), basis.stride(0), basis.stride(1),
        HAS_MASK=mask is not None, BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return acc
