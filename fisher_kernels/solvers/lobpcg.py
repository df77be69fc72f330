"""Batched LOBPCG: extreme eigenpairs of many symmetric matrices at once.

Knyazev's locally optimal block preconditioned conjugate gradient, run on a whole batch
``(b, n, n)`` (or a matrix-free operator on ``(b, n, m)`` blocks) in lock-step:

    X ← orthonormal start (seeded), block size m = k + guard vectors
    repeat:
        R = A X − X Θ                              residuals; a column whose ‖r‖ ≤ tol·‖A‖ is converged
        W = T(R), converged columns zeroed          (soft locking; T the optional preconditioner)
        S = [X, W, P],  Rayleigh–Ritz of A on span(S)
        X ← the m extreme Ritz vectors,  P ← their W/P part (the "conjugate" direction)

The Rayleigh–Ritz step orthonormalises S through its Gram matrix: Cholesky–QR when the Gram
matrix is well conditioned, else SVQB (eigen-decomposition of the scaled Gram matrix, dropping
directions below a threshold), which also absorbs the zero columns soft locking leaves. The
small (3m × 3m) problems are solved in float64. The largest eigenpairs are those of −A.

Entries that have not converged after ``max_iter`` iterations get the exact answer of
``torch.linalg.eigh`` (logged as a warning, flagged in the result), as do all entries when n is
too small for a block method to pay off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class LOBPCGResult:
    """Eigenpairs ordered from the most extreme inwards, and how each matrix got them.

    Unpacks like a tuple: ``values, vectors = lobpcg(...)``.
    """

    eigenvalues: torch.Tensor     # (b, k)
    eigenvectors: torch.Tensor    # (b, n, k), orthonormal columns
    residual_norms: torch.Tensor  # (b, k): ‖A x − λ x‖ of each returned pair
    iterations: torch.Tensor      # (b,) iterations the block method ran for each matrix
    converged: torch.Tensor       # (b,) True where LOBPCG itself met the tolerance
    used_eigh: torch.Tensor       # (b,) True where the exact eigh fallback gave the answer

    def __iter__(self):
        yield self.eigenvalues
        yield self.eigenvectors


def _apply(operator, X: torch.Tensor) -> torch.Tensor:
    return operator @ X if isinstance(operator, torch.Tensor) else operator(X)


def _symmetric(M: torch.Tensor) -> torch.Tensor:
    return (M + M.mT) / 2


def _gram_orthonormalizer(G: torch.Tensor, drop_tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``T`` with ``Tᵀ G T = I`` on the kept directions, and the mask of dropped ones.

    Cholesky–QR (``T = L⁻ᵀ``) where G is safely positive definite; SVQB elsewhere.
    G is (b, s, s) float64.
    """
    b, s, _ = G.shape
    eye = torch.eye(s, dtype=G.dtype, device=G.device).expand(b, s, s)
    L, info = torch.linalg.cholesky_ex(G)
    diag = L.diagonal(dim1=-2, dim2=-1).abs()
    ok = (info == 0) & (diag.min(-1).values ** 2 > drop_tol * diag.max(-1).values.clamp_min(1e-300) ** 2)
    T = torch.linalg.solve_triangular(torch.where(ok[:, None, None], L, eye), eye, upper=False).mT
    dropped = torch.zeros(b, s, dtype=torch.bool, device=G.device)
    if not ok.all():  # SVQB for the ill-conditioned entries
        d = G.diagonal(dim1=-2, dim2=-1)
        scale = torch.where(d > 0, d.clamp_min(1e-300).rsqrt(), torch.zeros_like(d))
        mu, V = torch.linalg.eigh(_symmetric(scale[:, :, None] * G * scale[:, None, :]))
        keep = mu > drop_tol * mu.max(-1, keepdim=True).values.clamp_min(1e-300)
        T_svqb = scale[:, :, None] * V * torch.where(keep, mu.clamp_min(1e-300).rsqrt(), torch.zeros_like(mu))[:, None, :]
        T = torch.where(ok[:, None, None], T, T_svqb)
        dropped = torch.where(ok[:, None], dropped, ~keep)
    return T, dropped


def _rayleigh_ritz(S, AS, m, drop_tol):
    """Rayleigh–Ritz of A on span(S).

    Returns the coefficients ``C`` (b, s, m) of the m smallest Ritz vectors (``X = S C``),
    their values (b, m), coefficients ``D`` (b, s, m) of the next search direction ``P = S D``
    (the W/P part of ``C``, made G-orthonormal and G-orthogonal to ``C``), and the largest
    Ritz value magnitude (b,), a lower bound of ‖A‖. The small (s × s) problems are float64.
    """
    G = _symmetric((S.mT @ S).double())  # S is (near) orthonormal: working precision suffices
    H = _symmetric((S.mT @ AS).double())
    T, dropped = _gram_orthonormalizer(G, drop_tol)
    H_reduced = _symmetric(T.mT @ H @ T)
    penalty = 10 * (H_reduced.abs().amax(dim=(-2, -1), keepdim=True) + 1)  # keeps dropped directions last
    H_reduced = H_reduced + torch.diag_embed(dropped.to(H.dtype)) * penalty
    values, Y = torch.linalg.eigh(H_reduced)
    C = T @ Y[:, :, :m]
    D = C.clone()
    D[:, :m] = 0  # the part of the new X that came from W and P
    for _ in range(2):
        D = D - C @ (C.mT @ G @ D)
    T_D, _ = _gram_orthonormalizer(_symmetric(D.mT @ G @ D), drop_tol)
    D = D @ T_D
    size = values.shape[-1]
    live = torch.arange(size, device=values.device)[None, :] < (size - dropped.sum(-1))[:, None]  # penalised last
    norm = values.abs().masked_fill(~live, 0).amax(-1)
    return C.to(S.dtype), values[:, :m].to(S.dtype), D.to(S.dtype), norm.to(S.dtype)


def _normalize_columns(W: torch.Tensor) -> torch.Tensor:
    norms = W.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, W / norms.clamp_min(torch.finfo(W.dtype).tiny), W)


def _orthonormal_search_block(W, basis, drop_tol):
    """W made orthogonal to ``basis`` (orthonormal columns) and orthonormal itself; columns
    that are (nearly) dependent become zero."""
    W = _normalize_columns(W)
    for _ in range(2):
        W = W - basis @ (basis.mT @ W)
    W = torch.where(W.norm(dim=1, keepdim=True) > drop_tol ** 0.5, W, torch.zeros_like(W))
    T, _ = _gram_orthonormalizer(_symmetric((W.mT @ W).double()), drop_tol)
    return W @ T.to(W.dtype)


def _dense(operator, b, n, dtype, device) -> torch.Tensor:
    if isinstance(operator, torch.Tensor):
        return operator
    eye = torch.eye(n, dtype=dtype, device=device).expand(b, n, n).contiguous()
    return _symmetric(operator(eye))


def _exact(A_dense: torch.Tensor, k: int, sign: float):
    values, vectors = torch.linalg.eigh(sign * A_dense)  # ascending for sign·A
    return values[:, :k], vectors[:, :, :k]


def lobpcg(
    A,
    k: int,
    largest: bool = True,
    *,
    n: int | None = None,
    batch: int | None = None,
    X0: torch.Tensor | None = None,
    preconditioner=None,
    guard_vectors: int | None = None,
    tol: float | None = None,
    max_iter: int = 200,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device=None,
) -> LOBPCGResult:
    """The ``k`` largest (or smallest) eigenpairs of each matrix of a symmetric batch.

    Args:
        A: ``(b, n, n)`` symmetric tensor, or a callable ``X (b, n, m) -> A X (b, n, m)``
            (then give ``n`` and ``batch``, or ``X0``; ``dtype``/``device`` default to X0's or
            float32/CPU).
        k: eigenpairs wanted per matrix.
        largest: the top (True) or bottom (False) of the spectrum.
        X0: optional ``(b, n, m)`` start block (m ≥ k); default seeded Gaussian.
        preconditioner: optional callable on residual blocks ``(b, n, m)``; for the bottom of
            an SPD spectrum an approximation of ``A⁻¹`` (for ``largest=True``, of ``(−A)⁻¹``
            shifted to be positive) speeds convergence.
        guard_vectors: extra block columns beyond ``k`` (default ``min(k, 8)``); they speed
            up convergence on clustered spectra and need not converge themselves.
        tol: a pair is converged when ``‖A x − λ x‖ ≤ tol · ‖A‖`` (‖A‖ estimated by the
            largest Ritz value magnitude seen). Default 1e-4 in float32, 1e-8 in float64.
        max_iter: iterations before the exact ``eigh`` fallback takes over.
        seed: seed of the start block.

    Returns:
        :class:`LOBPCGResult` with eigenvalues ``(b, k)``, eigenvectors ``(b, n, k)``,
        per-pair residual norms, per-matrix iteration counts and convergence flags.
    """
    if isinstance(A, torch.Tensor):
        if A.dim() != 3 or A.shape[-1] != A.shape[-2]:
            raise ValueError(f"A must be a (b, n, n) batch of square matrices, got {tuple(A.shape)}")
        batch, n, dtype, device = A.shape[0], A.shape[-1], A.dtype, A.device
    elif callable(A):
        if X0 is not None:
            batch, n, dtype, device = X0.shape[0], X0.shape[1], X0.dtype, X0.device
        if n is None or batch is None:
            raise ValueError("a matrix-free operator needs n and batch (or X0)")
        dtype = dtype or torch.float32
        device = torch.device(device or "cpu")
    else:
        raise TypeError(f"A must be a tensor or a callable, got {type(A).__name__}")
    if not dtype.is_floating_point:
        raise TypeError(f"A must be floating point, got {dtype}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n = {n}], got {k}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be non-negative, got {max_iter}")
    sign = -1.0 if largest else 1.0
    if tol is None:
        tol = 1e-8 if dtype == torch.float64 else 1e-4
    drop_tol = 1e-12 if dtype == torch.float64 else 1e-6  # relative, on squared singular values
    m = k + (min(k, 8) if guard_vectors is None else guard_vectors)
    if X0 is not None:
        if X0.shape[:2] != (batch, n) or X0.shape[2] < k:
            raise ValueError(f"X0 must be (b={batch}, n={n}, m>=k={k}), got {tuple(X0.shape)}")
        m = X0.shape[2]

    def op(X):
        return sign * _apply(A, X)

    if 3 * m > n or n < 64:  # a block method cannot beat a direct solve here
        values, vectors = _exact(_dense(A, batch, n, dtype, device), k, sign)
        residual = (op(vectors) - vectors * values[:, None, :]).norm(dim=1)
        return LOBPCGResult(sign * values, vectors, residual, torch.zeros(batch, dtype=torch.long, device=device),
                            torch.zeros(batch, dtype=torch.bool, device=device),
                            torch.ones(batch, dtype=torch.bool, device=device))

    if X0 is None:
        generator = torch.Generator().manual_seed(seed)
        X0 = torch.randn(batch, n, m, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    X = torch.linalg.qr(X0.to(dtype))[0]
    AX = op(X)
    C, theta, _, norm_estimate = _rayleigh_ritz(X, AX, m, drop_tol)
    X, AX = X @ C, AX @ C
    P = AP = None
    active = torch.ones(batch, dtype=torch.bool, device=device)
    iterations = torch.zeros(batch, dtype=torch.long, device=device)

    for _ in range(max_iter):
        R = AX - X * theta[:, None, :]
        converged_columns = R.norm(dim=1) <= tol * norm_estimate[:, None]
        active &= ~converged_columns[:, :k].all(-1)
        if not active.any():
            break
        iterations += active
        W = R if preconditioner is None else preconditioner(R)
        W = W * (~converged_columns & active[:, None])[:, None, :].to(dtype)  # soft locking
        W = _orthonormal_search_block(W, X if P is None else torch.cat([X, P], dim=2), drop_tol)
        AW = op(W)
        S = torch.cat([X, W] if P is None else [X, W, P], dim=2)
        AS = torch.cat([AX, AW] if P is None else [AX, AW, AP], dim=2)
        C, new_theta, D, ritz_norm = _rayleigh_ritz(S, AS, m, drop_tol)
        norm_estimate = torch.maximum(norm_estimate, ritz_norm)
        if active.all():
            X, AX, P, AP, theta = S @ C, AS @ C, S @ D, AS @ D, new_theta
        else:  # matrices already converged keep their pairs
            keep = active[:, None, None]
            X, AX = torch.where(keep, S @ C, X), torch.where(keep, AS @ C, AX)
            P = S @ D if P is None else torch.where(keep, S @ D, P)
            AP = AS @ D if AP is None else torch.where(keep, AS @ D, AP)
            theta = torch.where(active[:, None], new_theta, theta)

    values, vectors = theta[:, :k], X[:, :, :k]
    residual = (AX[:, :, :k] - vectors * values[:, None, :]).norm(dim=1)
    converged = (residual <= tol * norm_estimate[:, None]).all(-1)
    used_eigh = ~converged
    if used_eigh.any():
        idx = used_eigh.nonzero().squeeze(1)
        logger.warning("lobpcg: %d of %d matrices did not converge in %d iterations (tol %.1e); "
                       "using torch.linalg.eigh for them", len(idx), batch, max_iter, tol)
        dense = _dense(A, batch, n, dtype, device)[idx]
        exact_values, exact_vectors = _exact(dense, k, sign)
        values, vectors = values.clone(), vectors.clone()
        values[idx], vectors[idx] = exact_values, exact_vectors
        residual = residual.clone()
        residual[idx] = (sign * (dense @ exact_vectors) - exact_vectors * exact_values[:, None, :]).norm(dim=1)
    return LOBPCGResult(sign * values, vectors, residual, iterations, converged, used_eigh)


DENSE_BELOW = 1536  # below this width a batched eigh beat LOBPCG in benchmarks/lobpcg.py (2-core CPU)


def lobpcg_extreme(matrices: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The solver interface LoRA-DA calls (see :func:`fisher_kernels.solvers.eigh_extreme`):
    exact ``eigh`` below ``DENSE_BELOW``, batched LOBPCG (100 iterations, then ``eigh``) above."""
    if matrices.shape[-1] < DENSE_BELOW:
        from .eigh import eigh_extreme

        return eigh_extreme(matrices, k, largest)
    result = lobpcg(matrices, k, largest, max_iter=100)
    return result.eigenvalues, result.eigenvectors
