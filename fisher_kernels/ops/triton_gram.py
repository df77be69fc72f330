"""Triton: masked Gram update ``acc += aᵀ diag(mask) b`` with fp32 accumulation.

With ``symmetric=True`` (``a is b``, the K-FAC factors) only output blocks on or above the
diagonal are computed: the lower triangle of ``acc`` is left as it was and consumers read the
upper one (the collector symmetrises once at the end). ``mask`` is read inside the kernel:
masked rows are never gathered or copied.

On a GPU, bf16/fp16 tiles go to the tensor cores as they are (products exact, fp32
accumulation). Triton's CPU interpreter (3.x) computes ``tl.dot`` and products of bf16 tiles wrongly, so
under ``TRITON_INTERPRET=1`` the tiles are widened to fp32 first, which gives the same
products.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _masked_gram_kernel(
    a_ptr, b_ptr, mask_ptr, c_ptr,
    T, M, N,
    stride_at, stride_am, stride_bt, stride_bn, stride_cm, stride_cn,
    HAS_MASK: tl.constexpr, SYMMETRIC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SYMMETRIC and (pid_n + 1) * BLOCK_N <= pid_m * BLOCK_M:
        return  # block lies strictly below the diagonal
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + offs_t
        in_rows = rows < T
        a = tl.load(a_ptr + rows[:, None] * stride_at + offs_m[None, :] * stride_am,
                    mask=in_rows[:, None] & (offs_m[None, :] < M), other=0.0)
        b = tl.load(b_ptr + rows[:, None] * stride_bt + offs_n[None, :] * stride_bn,
                    mask=in_rows[:, None] & (offs_n[None, :] < N), other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        if HAS_MASK:
            w = tl.load(mask_ptr + rows, mask=in_rows, other=0.0)
            a = a * w.to(a.dtype)[:, None]
        acc += tl.dot(tl.trans(a), b, input_precision="ieee")
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c = tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, c + acc, mask=c_mask)


def _block_sizes(dtype: torch.dtype) -> tuple[int, int, int]:
    return (64, 64, 32) if dtype == torch.float32 else (128, 128, 32)


def masked_gram_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None,
                 symmetric: bool = False) -> torch.Tensor:
    """``acc += aᵀ diag(mask) b``; a (T, M), b (T, N), acc (M, N) fp32, mask (T,) or None."""
    T, M = a.shape
    N = b.shape[1]
    if b.shape[0] != T or acc.shape != (M, N) or acc.dtype != torch.float32:
        raise ValueError(f"masked_gram_: shapes a {tuple(a.shape)}, b {tuple(b.shape)}, acc {tuple(acc.shape)} "
                         f"({acc.dtype}) do not fit acc (M, N) fp32 += aᵀ b")
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    if T == 0:
        return acc
    mask_arg = a if mask is None else mask.to(torch.float32).contiguous()
    bm, bn, bt = _block_sizes(a.dtype)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _masked_gram_kernel[grid](
        a, b, mask_arg, acc, T, M, N,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), acc.stride(0), acc.stride(1),
        HAS_MASK=mask is not None, SYMMETRIC=symmetric, UPCAST=_INTERPRETED, BLOCK_M=bm, BLOCK_N=bn, BLOCK_T=bt,
    )
    return acc


def masked_syrk_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``acc += xᵀ diag(mask) x``, upper triangle only (see module docstring)."""
    return masked_gram_(acc, x, x, mask, symmetric=True)


def masked_outer_(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``acc += gᵀ diag(mask) x``, the summed weight gradient (d_out, d_in)."""
    return masked_gram_(acc, g, x, mask, symmetric=False)
