"""Weight-only baselines: PEFT's default (``gaussian``), PiSSA and MiLoRA."""

from __future__ import annotations

import torch

from .common import InitMethod, LayerInit, residual_update, selected_triplets, svd_factors


class Gaussian(InitMethod):
    """PEFT's default: ``lora_A`` Kaiming-uniform, ``lora_B = 0``; base weight unchanged."""

    name = "gaussian"

    def initialize_layer(self, name, W, stats, prepared):
        return LayerInit(None, None)


class PiSSA(InitMethod):
    """PiSSA: adapter on the top-``r`` singular triplets of W, residual base ``W − U_r S_r V_rᵀ``.

    Option ``svd_driver`` (see :func:`fisher_kernels.methods.selected_triplets`): ``"gram"``
    (default for PiSSA: its top directions are accurate that way, 2–3× faster, and it needs no
    copy of W), ``"gram64"`` or ``"svd"`` (``torch.linalg.svd``, as PEFT's ``"pissa"``).
    MiLoRA defaults to ``"gram64"``: the bottom directions need float64 in the Gram route.
    Each layer is decomposed on its own, after the previous one's result was taken.
    """

    name = "pissa"
    residual_base = True
    largest = True
    default_driver = "gram"

    def __init__(self, r, scale, *, svd_driver: str | None = None):
        super().__init__(r, scale)
        self.svd_driver = svd_driver or self.default_driver
        if self.svd_driver not in ("svd", "gram", "gram64"):
            raise ValueError(f"svd_driver must be 'svd', 'gram' or 'gram64', got {self.svd_driver!r}")

    def temporary_bytes(self, d_out, d_in, dtype):
        return decomposition_bytes(self.svd_driver, d_out, d_in)

    def chosen(self, k: int) -> torch.Tensor:
        return torch.arange(self.r) if self.largest else torch.arange(k - self.r, k)

    def initialize_layer(self, name, W, stats, prepared):
        idx, U, S, Vh = selected_triplets(W, self.svd_driver, self.chosen)
        lora_A, lora_B = svd_factors(U, S, Vh, self.scale)
        return LayerInit(lora_A, lora_B, residual_update(lora_A, lora_B, self.scale), selected=idx)


class MiLoRA(PiSSA):
    """MiLoRA: like PiSSA but on the bottom-``r`` (minor) singular triplets."""

    name = "milora"
    largest = False
    default_driver = "gram64"


def decomposition_bytes(driver: str, d_out: int, d_in: int) -> int:
    """Peak temporaries of :func:`selected_triplets` for one ``d_out × d_in`` weight."""
    small, large = min(d_out, d_in), max(d_out, d_in)
    if driver == "svd":  # fp32 copy of W, U, Vh and LAPACK's workspace
        return 4 * (2 * d_out * d_in + 3 * small * small + small * large)
    itemsize = 8 if driver == "gram64" else 4
    # Gram matrix, eigenvectors, eigh workspace; a float64 chunk of rows of W for the other side
    return itemsize * 4 * small * small + 8 * 1024 * small
