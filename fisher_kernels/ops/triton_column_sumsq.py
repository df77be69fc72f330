"""Triton: masked column sum of squares ``acc += Σ_t mask_t x_t²`` (diag of the Gram matrix).

A 2-D grid over column blocks and row chunks; each program reduces its chunk in fp32
registers and adds the partial sums atomically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _masked_column_sumsq_kernel(
    x_ptr, mask_ptr, out_ptr, T, D, stride_xt, stride_xd, ROWS_PER_PROGRAM,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_cols = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row_start = pid_t * ROWS_PER_PROGRAM
    for t0 in range(row_start, row_start + ROWS_PER_PROGRAM, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        in_rows = (rows < T) & (rows < row_start + ROWS_PER_PROGRAM)
        x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                    mask=in_rows[:, None] & in_cols[None, :], other=0.0).to(tl.float32)
        x = x * x
        if HAS_MASK:
            w = tl.load(mask_ptr + rows, mask=in_rows, other=0.0)
            x = x * w[:, None]
        acc += tl.sum(x, axis=0)
    tl.atomic_add(out_ptr + offs_d, acc, mask=in_cols)


def masked_column_sumsq_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``acc += Σ_t mask_t x_t²``; x (T, D), acc (D,) fp32."""
    T, D = x.shape
    if acc.shape != (D,) or acc.dtype != torch.float32:
        raise ValueError(f"masked_column_sumsq_: acc must be ({D},) fp32, got {tuple(acc.shape)} {acc.dtype}")
    if T == 0:
        return acc
    block_t, block_d, rows_per_program = 32, 64, 1024
    mask_arg = x if mask is None else mask.to(torch.float32).contiguous()
    grid = (triton.cdiv(D, block_d), triton.cdiv(T, rows_per_program))
    _masked_column_sumsq_kernel[grid](
        x, mask_arg, acc, T, D, x.stride(0), x.stride(1), rows_per_program,
        HAS_MASK=mask is not None, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return acc
