"""KaSA (ICLR 2025; reference code juyongjiang/KaSA), as an initialisation.

The base weight is replaced by its rank-``k`` truncation ``W' = U_k Σ_k V_kᵀ`` with
``k = min(d_out, d_in) − r`` (the r smallest singular components are dropped), and the adapter
``ΔW = s · B diag(d) A`` starts with ``d ~ N(0, 1)``, A Kaiming-uniform, B = 0.

KaSA changes the model's function at step 0 by design (the truncation). The adapter is PEFT's own
KaSA variant (``LoraConfig(kasa_config=KasaConfig(...))``): ``d`` is a separate trainable
parameter (``lora_diag``) and KaSA's training regulariser β‖d‖² + γ(‖BᵀB − I‖ + ‖AAᵀ − I‖) is
``peft_model._get_kasa_loss()``, to be added to the task loss as the paper does. Differences
from the reference code: it keeps ``d_in − r`` components (so layers with ``d_in > d_out`` are not
truncated at all); here, as in PEFT and the paper, ``min(d_out, d_in) − r``. Its regulariser
penalises the d × d Gram matrices ``‖AᵀA − I‖ + ‖BBᵀ − I‖`` and divides the sum by the number of
adapted layers; PEFT's (used here) penalises the r × r ones of the paper's equations, summed over
layers, so β and γ from the reference's scripts do not carry over one to one.
"""

from __future__ import annotations

import math

import torch

from .baselines import decomposition_bytes
from .common import InitMethod, LayerInit, selected_triplets


class KaSA(InitMethod):
    """KaSA initialisation. Options: ``seed`` for ``d`` and the Kaiming draw of A; ``svd_driver``
    for the r smallest singular components (``"gram64"`` by default, ``"svd"`` as PEFT)."""

    name = "kasa"
    splittable = False  # one random stream over the layers, in order: every rank draws it whole
    residual_base = False  # the base changes too, by truncation, not by W − s·B₀A₀

    def __init__(self, r, scale, *, seed: int = 0, svd_driver: str = "gram64"):
        super().__init__(r, scale)
        if svd_driver not in ("svd", "gram", "gram64"):
            raise ValueError(f"svd_driver must be 'svd', 'gram' or 'gram64', got {svd_driver!r}")
        self.seed, self.svd_driver = seed, svd_driver

    def temporary_bytes(self, d_out, d_in, dtype):
        return decomposition_bytes(self.svd_driver, d_out, d_in)

    def initialize(self, weights, stats, prepared):
        self._generator = torch.Generator().manual_seed(self.seed)  # one stream over the layers, in order
        yield from super().initialize(weights, stats, prepared)

    def initialize_layer(self, name, W, stats, prepared):
        if self.r >= min(W.shape):
            raise ValueError(f"layer {name!r}: KaSA with r={self.r} would truncate its {tuple(W.shape)} base weight "
                             f"to rank {min(W.shape) - self.r}; use r < {min(W.shape)}")
        _, U, S, Vh = selected_triplets(W, self.svd_driver, lambda k: torch.arange(k - self.r, k))
        d_in = W.shape[1]
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=√5), as nn.Linear and PEFT use
        A = (torch.rand(self.r, d_in, generator=self._generator) * 2 - 1) * bound
        d = torch.randn(self.r, generator=self._generator)
        lora_B = torch.zeros(W.shape[0], self.r, device=W.device)
        # W' = U_k Σ_k V_kᵀ = W − (the r smallest components)
        return LayerInit(A.to(W.device), lora_B, (U * S, Vh), lora_diag=d.to(W.device))
