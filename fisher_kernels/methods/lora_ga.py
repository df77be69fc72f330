"""LoRA-GA (NeurIPS 2024; reference code Outsider565/LoRA-GA), the reference version (SPEC §4.3).

From the averaged gradient ``∇W`` (d_out, d_in) of the calibration data:

    U S Vᵀ = svd_lowrank(∇W, q = min(4r, d_out, d_in), niter = 4)    (seeded)
    A = V[:, :r]ᵀ · c,   B = U[:, r:2r] · c,   c = d_out^{1/4} / √γ   ("stable" scale, γ = 16)
    W' = W − s · B A

PEFT's port (``preprocess_loraga``) differs: it puts ``S[r:2r]`` into B and scales only B; it is
benchmarked separately as ``peft_lora_ga``. Here ``∇W`` is the mean per-token gradient of the
summed loss (SPEC §2), the same direction as the reference's batch-averaged gradient.
"""

from __future__ import annotations

import torch

from ..statistics import StatisticsRequest
from .common import InitMethod, LayerInit


def seeded_svd_lowrank(matrix: torch.Tensor, q: int, niter: int, seed: int):
    """``torch.svd_lowrank`` with its random start drawn from a fixed seed."""
    devices = [matrix.device] if matrix.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return torch.svd_lowrank(matrix, q=q, niter=niter)


class LoraGA(InitMethod):
    """LoRA-GA initialisation. Options: ``stable_gamma`` γ (16), ``niter`` (4), ``seed`` (0)."""

    name = "lora_ga"
    residual_base = True

    def __init__(self, r, scale, *, stable_gamma: float = 16.0, niter: int = 4, seed: int = 0):
        super().__init__(r, scale)
        if stable_gamma <= 0:
            raise ValueError(f"stable_gamma must be positive, got {stable_gamma}")
        self.stable_gamma, self.niter, self.seed = stable_gamma, niter, seed

    def statistics_requests(self, weights, prepared):
        return {name: StatisticsRequest(gradient=True) for name in weights}

    def initialize(self, weights, stats, prepared):
        out = {}
        for name, W in weights.items():
            d_out, d_in = W.shape
            if 2 * self.r > min(d_out, d_in):
                raise ValueError(f"layer {name!r}: LoRA-GA needs 2r = {2 * self.r} <= min(d_out, d_in) = "
                                 f"{min(d_out, d_in)}")
            gradient = stats[name].gradient.to(W.device)
            U, _, V = seeded_svd_lowrank(gradient, q=min(4 * self.r, d_out, d_in), niter=self.niter, seed=self.seed)
            c = d_out ** 0.25 / self.stable_gamma ** 0.5
            lora_A = V[:, : self.r].T * c          # (r, d_in)
            lora_B = U[:, self.r : 2 * self.r] * c  # (d_out, r)
            out[name] = LayerInit(lora_A, lora_B, W - self.scale * lora_B @ lora_A)
        return out
