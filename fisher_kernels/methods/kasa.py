"""KaSA (ICLR 2025; reference code juyongjiang/KaSA), as an initialisation (SPEC §4.3).

The base weight is replaced by its rank-``k`` truncation ``W' = U_k Σ_k V_kᵀ`` with
``k = min(d_out, d_in) − r`` (the r smallest singular components are dropped), and the adapter
``ΔW = s · B diag(d) A`` starts with ``d ~ N(0, 1)``, A Kaiming-uniform, B = 0.

KaSA changes the model's function at step 0 by design (the truncation). PEFT's LoRA layer has
no trainable diagonal, so ``diag(d)`` is folded into ``lora_A`` at init: ``B diag(d) A`` is the
same matrix, but the separate trainable ``d`` and KaSA's training regulariser
(β‖d‖² + γ·orthogonality), which belong to training, are not reproduced.
"""

from __future__ import annotations

import math

import torch

from .common import InitMethod, LayerInit, batched_svd


class KaSA(InitMethod):
    """KaSA initialisation. Option: ``seed`` for ``d`` and the Kaiming draw of A."""

    name = "kasa"
    residual_base = False  # the base changes too, by truncation, not by W − s·B₀A₀

    def __init__(self, r, scale, *, seed: int = 0):
        super().__init__(r, scale)
        self.seed = seed

    def prepare(self, weights):
        return batched_svd(weights)

    def initialize(self, weights, stats, prepared):
        generator = torch.Generator().manual_seed(self.seed)
        out = {}
        for name, W in weights.items():
            U, S, Vh = prepared[name]
            k = S.shape[0] - self.r
            truncated = (U[:, :k] * S[:k]) @ Vh[:k]
            d_in = W.shape[1]
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=√5), as nn.Linear and PEFT use
            A = (torch.rand(self.r, d_in, generator=generator) * 2 - 1) * bound
            d = torch.randn(self.r, generator=generator)
            lora_A = (d[:, None] * A).to(W.device)
            lora_B = torch.zeros(W.shape[0], self.r, device=W.device)
            out[name] = LayerInit(lora_A, lora_B, truncated)
        return out
