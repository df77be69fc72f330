"""LoRA-DA (arXiv 2510.24561; reference code zqy0126/LoRA-DA): the subspace that minimises the
predicted bias and variance of fine-tuning.

In the paper's orientation (``W`` is d_in × d_out, the transpose of torch's), per layer:

    Z  = A + λ_in I                               input factor, damped       (d_in, d_in)
    y  = diag(G)                                  output factor diagonal     (d_out,)
    ΔW = −Z⁻¹ ∇Wᵀ diag(1/(y + λ_out))             natural-gradient step      (d_in, d_out)
    Ω  = −α ΔW ΔWᵀ + β · (Σ_j 1/(y_j + λ_out)) / n_pop · Z⁻¹                 (d_in, d_in)
    A0 = the r eigenvectors of Ω with the smallest eigenvalues               (d_in, r)
    B0 = A0ᵀ ΔW                                                              (r, d_out)
    lora_A = A0ᵀ / √γ,  lora_B = B0ᵀ / √γ;  base W kept (reference), or W' = W − s·lora_B lora_A.

The statistics are the reference's: per-sequence mean losses (see the class docstring), so ∇W,
y, and with them β and λ_out, mean what they mean in the reference.

With ``normalize=True`` (the reference default) ΔW is divided by its top singular value σ
and Ω by σ² (the variance term's coefficient included), which leaves Ω's eigenvectors
unchanged and keeps the numbers in range: ``B0`` is then built from ``ΔW / σ``.
Layers that read the same input (q/k/v, gate/up) share one Cholesky factor of Z and are solved
in one batched eigensolver call; the groups are processed one after the other, so the float64
temporaries of one input width are alive at a time.
"""

from __future__ import annotations

import logging
import math

import torch

from ..solvers import lobpcg_extreme
from ..statistics import StatisticsRequest
from .common import InitMethod, LayerInit, residual_update

logger = logging.getLogger(__name__)


def top_singular_value(matrix: torch.Tensor, max_iter: int = 200, rtol: float = 1e-7,
                       check_every: int = 10) -> torch.Tensor:
    """Largest singular value by power iteration on ``MᵀM`` from a fixed start vector. Convergence
    (the last two estimates within ``rtol``) is read back every ``check_every`` iterations, not
    every iteration: each read stalls the host until the device is idle."""
    v = torch.ones(matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
    v = v / v.norm()
    sigma = matrix.new_zeros(())
    for start in range(0, max_iter, check_every):
        for _ in range(min(check_every, max_iter - start)):
            w = matrix.T @ (matrix @ v)
            v = w / w.norm().clamp_min(torch.finfo(w.dtype).tiny)  # M = 0: v = 0, sigma = 0
            previous, sigma = sigma, (matrix @ v).norm()
        if bool((sigma - previous).abs() <= rtol * sigma):
            return sigma
    return sigma


class LoraDA(InitMethod):
    """LoRA-DA initialisation.

    Options (reference recipe values as defaults):
        bias_strength α = 1.0, variance_strength β = 0.03, stable_gamma γ = 1024, normalize = True,
        input_damping λ_in = 1e-6 (``Z = A + λ_in I``), output_damping λ_out = 1e-6
            (``1/(y + λ_out)``); ``damping`` sets both at once,
        population_size n_pop: size of the training set the adapter will be trained on;
            ``None`` uses the number of calibration sequences (say the real number when known),
        residual_base: ``False`` (default, as the reference) keeps the base weight, so the
            step-0 model is ``W + s·B₀A₀``; ``True`` stores ``W − s·B₀A₀`` for an unchanged model,
        solver: ``(matrices (b, n, n), k, largest) -> (values (b, k), vectors (b, n, k))``,
            default the batched LOBPCG (exact ``eigh`` for small widths and as its fallback).

    Statistics as the reference computes them: the loss of a sequence is Hugging Face's mean
    cross-entropy over its label tokens, ``∇W`` is the mean over sequences of the per-sequence
    gradients, ``A`` the mean of ``x xᵀ`` over attention-mask tokens, ``y`` the mean over those
    tokens of the squared output gradients of the per-sequence mean loss. The reference runs at
    batch size 1; here every batch size gives the same numbers (``loss_weighting="sequence"``).
    """

    name = "lora_da"
    loss_weighting = "sequence"

    def __init__(self, r, scale, *, bias_strength: float = 1.0, variance_strength: float = 0.03,
                 damping: float | None = None, input_damping: float = 1e-6, output_damping: float = 1e-6,
                 stable_gamma: float = 1024.0, population_size: int | None = None, normalize: bool = True,
                 residual_base: bool = False, solver=lobpcg_extreme):
        super().__init__(r, scale)
        if damping is not None:
            input_damping = output_damping = damping
        if bias_strength < 0 or variance_strength < 0:
            raise ValueError("bias_strength and variance_strength must be non-negative")
        if bias_strength == 0 and variance_strength == 0:
            raise ValueError("at least one of bias_strength and variance_strength must be positive")
        for label, value in (("input_damping", input_damping), ("output_damping", output_damping)):
            if not value > 0:
                raise ValueError(f"{label} must be positive, got {value}")
        if stable_gamma <= 0:
            raise ValueError(f"stable_gamma must be positive, got {stable_gamma}")
        if population_size is not None and population_size < 1:
            raise ValueError(f"population_size must be a positive integer, got {population_size}")
        self.bias_strength, self.variance_strength = bias_strength, variance_strength
        self.input_damping, self.output_damping, self.stable_gamma = input_damping, output_damping, stable_gamma
        self.clipped_layers: list[str] = []  # layers whose input factor had rounding-negative eigenvalues
        self.population_size, self.normalize, self.solver = population_size, normalize, solver
        self.residual_base = bool(residual_base)

    needs_data = True
    reads_weights = False  # the factors come from the statistics alone (W: device)

    def held_bytes(self, d_out, d_in, dtype):
        return 4 * (d_in * d_in + d_out + d_out * d_in)

    holds_layer_inputs = True
    shares_input_factor = True

    def temporary_bytes(self, d_out, d_in, dtype):
        # the larger of two stages: clipping A's rounding when its Cholesky fails (common with fewer
        # calibration tokens than d_in: A and its eigenvectors in float64 and eigh's workspace, about
        # two more float64 d_in²), and the inverse (the float64 Cholesky factor and inverse of Z and
        # the fp32 inverse; then the step ΔW in float64 with its right-hand side)
        return max(32 * d_in * d_in, 20 * d_in * d_in + 16 * d_in * d_out)

    def statistics_request(self, name, prepared):
        return StatisticsRequest(input_factor=True, output_factor_diag=True, gradient=True)

    def _damped_cholesky(self, name: str, input_factor: torch.Tensor) -> torch.Tensor:
        """Cholesky factor of ``Z = A + λI`` in float64: with few calibration tokens A is rank
        deficient, and a 1e-6 damping is below float32's rounding of A. ``A`` is positive
        semi-definite by construction; when its float32 rounding leaves eigenvalues below ``−λ``
        (repetitive calibration data, a large ``‖A‖``), the negative part is clipped to zero
        first (an eigen-decomposition of this one factor, with a warning) rather than failing
        or, as the reference does, continuing with a broken factor."""
        Z = input_factor.to(torch.float64, copy=True)
        Z.diagonal().add_(self.input_damping)
        L, info = torch.linalg.cholesky_ex(Z)
        if info.item() == 0:
            return L
        del L  # the clipping below holds at most A and its eigenvectors in float64, besides eigh's workspace
        values, vectors = torch.linalg.eigh(Z.copy_(input_factor))
        del Z
        clipped = int((values < 0).sum())
        self.clipped_layers.append(name)  # nothing a user can act on: one debug line per layer, one summary
        logger.debug("layer %r: the input factor A has %d slightly negative eigenvalues from float32 rounding "
                     "(down to %.2e; damping %g); they are clipped to zero", name, clipped, values.min().item(),
                     self.input_damping)
        Z = vectors.mul_(values.clamp_min(0).sqrt()) @ vectors.T  # V Λ₊ Vᵀ as (V √Λ₊)(V √Λ₊)ᵀ
        del vectors
        Z.diagonal().add_(self.input_damping)
        L, info = torch.linalg.cholesky_ex(Z)
        if info.item() != 0:
            raise ValueError(f"layer {name!r}: the damped input factor A + {self.input_damping}·I is not positive "
                             "definite even after clipping A's rounding; increase input_damping")
        return L

    def guidance(self, name: str, layer, cholesky: torch.Tensor, damped_inverse: torch.Tensor | None,
                 population: int):
        """``(Ω (d_in, d_in), ΔW (d_in, d_out))`` of one layer in the statistics' dtype (fp32 from a
        pass, float64 for float64 statistics), both divided by σ(ΔW) (resp. σ²) when ``normalize``.
        ``damped_inverse`` is ``Z⁻¹`` in that dtype (None without the variance term)."""
        dtype = layer.gradient.dtype
        inverse_y = (layer.output_factor_diag.double() + self.output_damping).reciprocal()  # (d_out,)
        delta = -torch.cholesky_solve(layer.gradient.T.double(), cholesky) * inverse_y  # (d_in, d_out)
        variance_coefficient = self.variance_strength * inverse_y.sum() / population
        if self.normalize:
            sigma = top_singular_value(delta)
            if not torch.isfinite(sigma) or sigma <= 0:
                raise ValueError(f"layer {name!r}: the natural-gradient step is zero or not finite "
                                 f"(top singular value {sigma.item()})")
            delta = delta / sigma
            variance_coefficient = variance_coefficient / sigma.square()
        delta = delta.to(dtype)
        if damped_inverse is None:
            omega = torch.zeros(delta.shape[0], delta.shape[0], dtype=dtype, device=delta.device)
        else:
            omega = damped_inverse * variance_coefficient.to(dtype)
        omega.addmm_(delta, delta.T, alpha=-self.bias_strength)
        return omega, delta

    def initialize(self, weights, stats, prepared):
        population = self.population_size or stats.num_sequences
        for names in _input_groups(weights, stats):
            cholesky = self._damped_cholesky(names[0], stats[names[0]].input_factor)
            dtype = stats[names[0]].gradient.dtype
            damped_inverse = torch.cholesky_inverse(cholesky).to(dtype) if self.variance_strength else None
            omegas, deltas = [], []
            for name in names:
                omega, delta = self.guidance(name, stats[name], cholesky, damped_inverse, population)
                omegas.append(omega)
                deltas.append(delta)
            del cholesky, damped_inverse
            matrices = torch.stack(omegas)
            del omegas
            _, vectors = self.solver(matrices, self.r, False)
            del matrices
            root_gamma = math.sqrt(self.stable_gamma)
            for i, name in enumerate(names):
                A0 = vectors[i]                                  # (d_in, r)
                lora_A = A0.T / root_gamma                       # (r, d_in)
                lora_B = (A0.T @ deltas[i]).T / root_gamma       # (d_out, r)
                W = self.weight(weights, name)
                lora_A, lora_B = lora_A.to(W.device), lora_B.to(W.device)
                update = residual_update(lora_A, lora_B, self.scale) if self.residual_base else None
                yield name, LayerInit(lora_A, lora_B, update)
        if self.clipped_layers:
            logger.debug("LoRA-DA: the input factors of %d layers had rounding-negative eigenvalues, clipped to zero",
                         len(self.clipped_layers))


def _input_groups(weights, stats) -> list[list[str]]:
    """Layers grouped by the input factor they share (q/k/v, gate/up), in model order."""
    groups: dict[int, list[str]] = {}
    for name in weights:
        groups.setdefault(id(stats[name].input_factor), []).append(name)
    return list(groups.values())
