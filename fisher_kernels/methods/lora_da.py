"""LoRA-DA: the subspace that minimises the predicted bias and variance of fine-tuning (SPEC §4.2).

In the paper's orientation (``W`` is d_in × d_out, the transpose of torch's), per layer:

    Z  = A + λI                                   input factor, damped       (d_in, d_in)
    y  = diag(G)                                  output factor diagonal     (d_out,)
    ΔW = −Z⁻¹ ∇Wᵀ diag(1/(y + λ))                 natural-gradient step      (d_in, d_out)
    Ω  = −α ΔW ΔWᵀ + β · (Σ_j 1/(y_j + λ)) / n_pop · Z⁻¹                     (d_in, d_in)
    A0 = the r eigenvectors of Ω with the smallest eigenvalues               (d_in, r)
    B0 = A0ᵀ ΔW                                                              (r, d_out)
    lora_A = A0ᵀ / √γ,  lora_B = B0ᵀ / √γ,  W' = W − s · lora_B lora_A.

With ``normalize=True`` (the reference default) ΔW is divided by its top singular value σ
and Ω by σ² (the variance term's coefficient included), which leaves Ω's eigenvectors
unchanged and keeps the numbers in range: ``B0`` is then built from ``ΔW / σ``.
Layers that read the same input share one Cholesky factor of Z; all layers of equal width
are solved in one batched eigensolver call.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..solvers import lobpcg_extreme
from ..statistics import StatisticsRequest
from .common import InitMethod, LayerInit


def top_singular_value(matrix: torch.Tensor, max_iter: int = 200, rtol: float = 1e-7) -> torch.Tensor:
    """Largest singular value by power iteration on ``MᵀM`` from a fixed start vector."""
    v = torch.ones(matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
    v = v / v.norm()
    sigma = matrix.new_zeros(())
    for _ in range(max_iter):
        w = matrix.T @ (matrix @ v)
        norm = w.norm()
        if norm == 0:
            return norm
        v = w / norm
        new_sigma = (matrix @ v).norm()
        if (new_sigma - sigma).abs() <= rtol * new_sigma:
            return new_sigma
        sigma = new_sigma
    return sigma


class LoraDA(InitMethod):
    """LoRA-DA initialisation.

    Options (reference recipe values as defaults):
        bias_strength α = 1.0, variance_strength β = 0.03, damping λ = 1e-6,
        stable_gamma γ = 1024, normalize = True,
        population_size n_pop: size of the training set the adapter will be trained on;
            ``None`` uses the number of calibration sequences (say the real number when known),
        solver: ``(matrices (b, n, n), k, largest) -> (values (b, k), vectors (b, n, k))``,
            default the batched LOBPCG (exact ``eigh`` for small widths and as its fallback).
    """

    name = "lora_da"
    residual_base = True

    def __init__(self, r, scale, *, bias_strength: float = 1.0, variance_strength: float = 0.03,
                 damping: float = 1e-6, stable_gamma: float = 1024.0, population_size: int | None = None,
                 normalize: bool = True, solver=lobpcg_extreme):
        super().__init__(r, scale)
        if bias_strength < 0 or variance_strength < 0:
            raise ValueError("bias_strength and variance_strength must be non-negative")
        if bias_strength == 0 and variance_strength == 0:
            raise ValueError("at least one of bias_strength and variance_strength must be positive")
        if damping <= 0:
            raise ValueError(f"damping must be positive, got {damping}")
        if stable_gamma <= 0:
            raise ValueError(f"stable_gamma must be positive, got {stable_gamma}")
        if population_size is not None and population_size < 1:
            raise ValueError(f"population_size must be a positive integer, got {population_size}")
        self.bias_strength, self.variance_strength = bias_strength, variance_strength
        self.damping, self.stable_gamma = damping, stable_gamma
        self.population_size, self.normalize, self.solver = population_size, normalize, solver

    def statistics_requests(self, weights, prepared):
        return {name: StatisticsRequest(input_factor=True, output_factor_diag=True, gradient=True) for name in weights}

    def _damped_cholesky(self, name: str, input_factor: torch.Tensor) -> torch.Tensor:
        """Cholesky factor of ``Z = A + λI`` in float64: with few calibration tokens A is rank
        deficient, and a 1e-6 damping is below float32's rounding of A."""
        A = input_factor.double()
        Z = A + self.damping * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        L, info = torch.linalg.cholesky_ex(Z)
        if info.item() != 0:
            raise ValueError(f"layer {name!r}: the damped input factor A + {self.damping}·I is not positive "
                             "definite; increase damping")
        return L

    def guidance(self, name: str, layer, cholesky: torch.Tensor, population: int):
        """``(Ω, ΔW)`` of one layer, both divided by σ(ΔW) (resp. σ²) when ``normalize``."""
        inverse_y = (layer.output_factor_diag.double() + self.damping).reciprocal()  # (d_out,)
        delta = -torch.cholesky_solve(layer.gradient.T.double(), cholesky) * inverse_y  # (d_in, d_out)
        variance_coefficient = self.variance_strength * inverse_y.sum() / population
        if self.normalize:
            sigma = top_singular_value(delta)
            if not torch.isfinite(sigma) or sigma <= 0:
                raise ValueError(f"layer {name!r}: the natural-gradient step is zero or not finite "
                                 f"(top singular value {sigma.item()})")
            delta = delta / sigma
            variance_coefficient = variance_coefficient / sigma.square()
        omega = -self.bias_strength * (delta @ delta.T)
        if self.variance_strength:
            omega = omega + variance_coefficient * torch.cholesky_inverse(cholesky)
        return ((omega + omega.T) / 2).float(), delta.float()

    def initialize(self, weights, stats, prepared):
        population = self.population_size or stats.num_sequences
        choleskys: dict[int, torch.Tensor] = {}
        omegas, deltas = {}, {}
        for name in weights:
            layer = stats[name]
            key = id(layer.input_factor)  # layers sharing an input share the factorisation
            if key not in choleskys:
                choleskys[key] = self._damped_cholesky(name, layer.input_factor)
            omegas[name], deltas[name] = self.guidance(name, layer, choleskys[key], population)

        by_width = defaultdict(list)
        for name, omega in omegas.items():
            by_width[omega.shape[0]].append(name)
        root_gamma = math.sqrt(self.stable_gamma)
        out = {}
        for names in by_width.values():
            _, vectors = self.solver(torch.stack([omegas[n] for n in names]), self.r, False)
            for i, name in enumerate(names):
                A0 = vectors[i]                           # (d_in, r)
                lora_A = A0.T / root_gamma                # (r, d_in)
                lora_B = (A0.T @ deltas[name]).T / root_gamma  # (d_out, r)
                W = weights[name]
                lora_A, lora_B = lora_A.to(W.device), lora_B.to(W.device)
                out[name] = LayerInit(lora_A, lora_B, W - self.scale * lora_B @ lora_A)
        return out
