"""Weight-only baselines: PEFT's default (``gaussian``), PiSSA and MiLoRA (SPEC §4.3)."""

from __future__ import annotations

import torch

from .common import InitMethod, LayerInit, batched_svd, svd_factors


class Gaussian(InitMethod):
    """PEFT's default: ``lora_A`` Kaiming-uniform, ``lora_B = 0``; base weight unchanged."""

    name = "gaussian"

    def initialize(self, weights, stats, prepared):
        return {name: LayerInit(None, None, None) for name in weights}


class PiSSA(InitMethod):
    """PiSSA: adapter on the top-``r`` singular triplets of W, residual base ``W − U_r S_r V_rᵀ``.

    Option ``svd_driver``: ``"gram"`` (default for PiSSA: its top directions are accurate that
    way, 2–3× faster) or ``"svd"``. MiLoRA defaults to ``"svd"``: it needs the bottom ones.
    """

    name = "pissa"
    residual_base = True
    largest = True
    default_driver = "gram"

    def __init__(self, r, scale, *, svd_driver: str | None = None):
        super().__init__(r, scale)
        self.svd_driver = svd_driver or self.default_driver

    def prepare(self, weights):
        return batched_svd(weights, driver=self.svd_driver)

    def initialize(self, weights, stats, prepared):
        out = {}
        for name, W in weights.items():
            U, S, Vh = prepared[name]
            k = S.shape[0]
            idx = torch.arange(self.r) if self.largest else torch.arange(k - self.r, k)
            lora_A, lora_B = svd_factors(U[:, idx], S[idx], Vh[idx], self.scale)
            out[name] = LayerInit(lora_A, lora_B, W - self.scale * lora_B @ lora_A, selected=idx)
        return out


class MiLoRA(PiSSA):
    """MiLoRA: like PiSSA but on the bottom-``r`` (minor) singular triplets."""

    name = "milora"
    largest = False
    default_driver = "svd"
