"""Exact extreme eigenpairs of a batch of symmetric matrices via ``torch.linalg.eigh``.

This is the solver interface LoRA-DA calls: ``solver(matrices, k, largest)`` with
``matrices`` (b, n, n) symmetric, returning eigenvalues (b, k) and orthonormal eigenvectors
(b, n, k), ordered from the most extreme inwards.
"""

from __future__ import annotations

import torch


def eigh_extreme(matrices: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest (or smallest) eigenpairs of each symmetric matrix in ``matrices``."""
    if matrices.dim() != 3 or matrices.shape[-1] != matrices.shape[-2]:
        raise ValueError(f"expected a (b, n, n) batch of square matrices, got {tuple(matrices.shape)}")
    n = matrices.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    values, vectors = torch.linalg.eigh(matrices)  # ascending
    if largest:
        values, vectors = values.flip(-1), vectors.flip(-1)
    return values[:, :k], vectors[:, :, :k]
