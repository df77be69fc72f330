"""LoRA-GA (NeurIPS 2024; reference code Outsider565/LoRA-GA), the reference version.

From the averaged gradient ``∇W`` (d_out, d_in) of the calibration data:

    U S Vᵀ = svd_lowrank(∇W, q = min(4r, d_out, d_in), niter = 4)    (seeded; ``svd="exact"``: full SVD)
    A = V[:, :r]ᵀ · c,   B = U[:, r:2r] · c,   c = d_out^{1/4} / √γ   ("stable" scale, γ = 16)
    W' = W − s · B A

PEFT's port (``preprocess_loraga``) differs: it puts ``S[r:2r]`` into B and scales only B; it is
benchmarked separately as ``peft_lora_ga``. Here ``∇W`` is the mean per-token gradient of the
summed loss only with ``gradient_average="token"``; by default it is, as in the reference, the
average over calibration batches of each batch's mean-loss gradient. The two agree for one batch
and differ when batches hold different numbers of label tokens.
"""

from __future__ import annotations

import torch

from ..statistics import StatisticsRequest
from .common import InitMethod, LayerInit, residual_update


def seeded_svd_lowrank(matrix: torch.Tensor, q: int, niter: int, seed: int):
    """``torch.svd_lowrank`` with its random start drawn from a fixed seed."""
    devices = [matrix.device] if matrix.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return torch.svd_lowrank(matrix, q=q, niter=niter)


class LoraGA(InitMethod):
    """LoRA-GA initialisation. Options: ``stable_gamma`` γ (16), ``niter`` (4), ``seed`` (0),
    ``svd``: ``"lowrank"`` (default, the reference's randomized ``svd_lowrank``, approximate when
    the gradient's spectrum decays slowly) or ``"exact"`` (``torch.linalg.svd`` in float64),
    ``gradient_average``: ``"batch"`` (default, as the reference and PEFT: the mean over
    calibration batches of each batch's mean-loss gradient, which depends on how the data is
    batched) or ``"token"`` (the per-token mean gradient of the summed loss: batching-independent).
    """

    name = "lora_ga"
    residual_base = True

    def __init__(self, r, scale, *, stable_gamma: float = 16.0, niter: int = 4, seed: int = 0,
                 gradient_average: str = "batch", svd: str = "lowrank"):
        super().__init__(r, scale)
        if svd not in ("lowrank", "exact"):
            raise ValueError(f"svd must be 'lowrank' or 'exact', got {svd!r}")
        if stable_gamma <= 0:
            raise ValueError(f"stable_gamma must be positive, got {stable_gamma}")
        if gradient_average not in ("batch", "token"):
            raise ValueError(f"gradient_average must be 'batch' or 'token', got {gradient_average!r}")
        self.stable_gamma, self.niter, self.seed, self.svd = stable_gamma, niter, seed, svd
        self.loss_weighting = gradient_average

    needs_data = True
    reads_weights = False  # the factors come from the gradient alone (W: shape and device)
    holds_layer_inputs = True
    loss_weighting = "batch"

    def held_bytes(self, d_out, d_in, dtype):
        return 4 * d_out * d_in

    def temporary_bytes(self, d_out, d_in, dtype):
        if self.svd == "exact":  # float64 copy, U and Vᵀ of the reduced SVD
            return 8 * (2 * d_out * d_in + min(d_out, d_in) * (d_out + d_in))
        q = min(4 * self.r, d_out, d_in)
        return 4 * 3 * q * (d_out + d_in)  # svd_lowrank's blocks

    def statistics_request(self, name, prepared):
        return StatisticsRequest(gradient=True)

    def initialize_layer(self, name, W, stats, prepared):
        d_out, d_in = W.shape
        if 2 * self.r > min(d_out, d_in):
            raise ValueError(f"layer {name!r}: LoRA-GA needs 2r = {2 * self.r} <= min(d_out, d_in) = "
                             f"{min(d_out, d_in)}")
        gradient = stats.gradient.to(W.device)
        if self.svd == "exact":
            U, _, Vh = torch.linalg.svd(gradient.double(), full_matrices=False)
            U, V = U[:, : 2 * self.r].to(gradient.dtype), Vh[: 2 * self.r].T.to(gradient.dtype)
        else:
            U, _, V = seeded_svd_lowrank(gradient, q=min(4 * self.r, d_out, d_in), niter=self.niter, seed=self.seed)
        c = d_out ** 0.25 / self.stable_gamma ** 0.5
        lora_A = V[:, : self.r].T * c          # (r, d_in)
        lora_B = U[:, self.r : 2 * self.r] * c  # (d_out, r)
        return LayerInit(lora_A, lora_B, residual_update(lora_A, lora_B, self.scale))
