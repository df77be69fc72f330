"""Batched LOBPCG against torch.linalg.eigh in float64.

Tolerances: eigenvalues within 1e-6·‖A‖; eigenvectors compared as subspaces (projector
distance ≤ 1e-4) wherever the k-th and (k+1)-th eigenvalues are separated by 1e-3·‖A‖ (else
the subspace is not determined and only eigenvalues and residuals are checked); residuals
‖A x − λ x‖ ≤ 1e-8·‖A‖ (the float64 default tolerance) plus rounding.
"""

import logging

import pytest
import torch

from fisher_kernels.solvers import lobpcg


def with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    b, n = eigenvalues.shape
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(b, n, n, generator=g, dtype=torch.float64))
    A = (Q * eigenvalues[:, None, :]) @ Q.mT
    return (A + A.mT) / 2


def spectrum(kind: str, b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random_spd":
        return torch.rand(b, n, generator=g, dtype=torch.float64) * 10 + 0.1
    if kind == "clustered":  # five tight clusters
        centres = torch.tensor([0.1, 1.0, 3.0, 7.0, 10.0], dtype=torch.float64)
        return centres[torch.randint(0, 5, (b, n), generator=g)] + 1e-6 * torch.rand(b, n, generator=g, dtype=torch.float64)
    if kind == "repeated":  # eigenvalues of multiplicity 4
        base = torch.linspace(1, 10, (n + 3) // 4, dtype=torch.float64).repeat_interleave(4)[:n]
        return base.expand(b, n).clone()
    if kind == "nearly_singular":
        values = torch.linspace(1e-3, 1, n, dtype=torch.float64).expand(b, n).clone()
        values[:, :3] = torch.tensor([1e-12, 1e-11, 1e-10], dtype=torch.float64)
        return values
    if kind == "indefinite":
        return torch.randn(b, n, generator=g, dtype=torch.float64)
    raise ValueError(kind)


def check(A, result, k, largest):
    values, vectors = torch.linalg.eigh(A)
    if largest:
        values, vectors = values.flip(-1), vectors.flip(-1)
    norm = values.abs().amax(-1, keepdim=True)
    assert result.eigenvalues.shape == (A.shape[0], k) and result.eigenvectors.shape == (A.shape[0], A.shape[1], k)
    assert (result.eigenvalues - values[:, :k]).abs().le(1e-6 * norm).all()
    X = result.eigenvectors
    eye = torch.eye(k, dtype=X.dtype)
    assert torch.allclose(X.mT @ X, eye.expand_as(X.mT @ X), atol=1e-8)
    residual = (A @ X - X * result.eigenvalues[:, None, :]).norm(dim=1)
    assert residual.le(1e-7 * norm).all()
    assert torch.allclose(result.residual_norms, residual, atol=1e-7 * norm.max().item())
    if k < A.shape[1]:
        separated = (values[:, k - 1] - values[:, k]).abs() > 1e-3 * norm[:, 0]
        for i in separated.nonzero().flatten().tolist():
            P_ours = X[i] @ X[i].T
            P_ref = vectors[i, :, :k] @ vectors[i, :, :k].T
            assert (P_ours - P_ref).abs().max() < 1e-4, i


CASES = [  # (n, k, b)
    (8, 1, 4), (64, 4, 3), (100, 4, 16), (200, 8, 2), (300, 64, 1), (512, 16, 2), (1024, 8, 1),
]


@pytest.mark.parametrize("n,k,b", CASES)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kind", ["random_spd", "clustered", "repeated", "nearly_singular", "indefinite"])
def test_lobpcg_matches_eigh(n, k, b, largest, kind):
    A = with_spectrum(spectrum(kind, b, n))
    result = lobpcg(A, k, largest, max_iter=400)
    check(A, result, k, largest)
    # the answer must be LOBPCG's own, not the exact fallback's, wherever it can be (measured: every
    # spectrum but five clusters 1e-6 wide, where the k-th pair sits inside a cluster)
    if n < 64:  # too small for a block method: the direct solve, by design
        assert result.used_eigh.all() and not result.iterations.any()
    elif kind != "clustered":
        assert result.converged.all() and not result.used_eigh.any(), (result.iterations, result.converged)
    assert torch.equal(result.used_eigh, ~result.converged)  # exactly the unconverged fall back


def test_matrix_free_operator_equals_dense_path():
    A = with_spectrum(spectrum("random_spd", 3, 150))
    dense = lobpcg(A, 5, True, seed=3)
    free = lobpcg(lambda X: A @ X, 5, True, n=150, batch=3, dtype=torch.float64, seed=3)
    assert torch.equal(dense.iterations, free.iterations)
    assert torch.allclose(dense.eigenvalues, free.eigenvalues, atol=1e-12)
    assert torch.allclose(dense.eigenvectors.abs(), free.eigenvectors.abs(), atol=1e-8)
    assert not free.used_eigh.any()


def test_float32_batch_converges_without_fallback():
    A = with_spectrum(spectrum("random_spd", 4, 400)).float()
    result = lobpcg(A, 8, True)
    assert result.converged.all() and not result.used_eigh.any()
    ref = torch.linalg.eigvalsh(A.double()).flip(-1)[:, :8]
    assert (result.eigenvalues.double() - ref).abs().max() < 1e-3


def test_non_convergence_is_reported_and_answered_exactly(caplog):
    A = with_spectrum(spectrum("random_spd", 2, 300))
    with caplog.at_level(logging.WARNING, logger="fisher_kernels.solvers.lobpcg"):
        result = lobpcg(A, 6, False, max_iter=2)
    assert not result.converged.any() and result.used_eigh.all()
    assert (result.iterations == 2).all()
    assert "did not converge" in caplog.text
    check(A, result, 6, False)


def test_small_n_uses_the_exact_solver():
    A = with_spectrum(spectrum("random_spd", 2, 20))
    result = lobpcg(A, 3, True)
    assert result.used_eigh.all() and (result.iterations == 0).all()
    check(A, result, 3, True)


def test_preconditioner_speeds_up_convergence():
    A = with_spectrum(spectrum("nearly_singular", 2, 400))
    plain = lobpcg(A, 4, False, max_iter=1000)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(A + 1e-3 * torch.eye(400, dtype=torch.float64)))
    preconditioned = lobpcg(A, 4, False, preconditioner=lambda R: inverse @ R, max_iter=1000)
    assert preconditioned.converged.all()
    assert (preconditioned.iterations < plain.iterations).all()
    check(A, preconditioned, 4, False)


def test_start_is_deterministic():
    A = with_spectrum(spectrum("random_spd", 2, 200)).float()
    a, b = lobpcg(A, 4, True, seed=1), lobpcg(A, 4, True, seed=1)
    assert torch.equal(a.eigenvectors, b.eigenvectors)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="k must be"):
        lobpcg(torch.eye(10).expand(1, 10, 10), 11)
    with pytest.raises(ValueError, match="n and batch"):
        lobpcg(lambda X: X, 2)
    with pytest.raises(ValueError, match=r"\(b, n, n\)"):
        lobpcg(torch.eye(4), 1)
