"""Initialisation methods: each maps (weights, statistics) to LoRA factors and a base weight."""

from .baselines import Gaussian, MiLoRA, PiSSA
from .common import InitMethod, LayerInit, batched_svd, lora_scale
from .filet import FILet, fisher_energy, select_by_energy
from .kasa import KaSA
from .lora_da import LoraDA
from .lora_ga import LoraGA

METHODS: dict[str, type[InitMethod]] = {
    cls.name: cls for cls in (FILet, LoraDA, Gaussian, PiSSA, MiLoRA, KaSA, LoraGA)
}

__all__ = [
    "METHODS", "InitMethod", "LayerInit", "FILet", "LoraDA", "LoraGA", "KaSA", "Gaussian", "PiSSA", "MiLoRA",
    "batched_svd", "fisher_energy", "lora_scale", "select_by_energy",
]
