"""Initialisation methods: each maps (weights, statistics) to LoRA factors and a base weight."""

from .baselines import Gaussian, MiLoRA, PiSSA
from .common import InitMethod, LayerInit, batched_svd, lora_scale
from .filet import FILet, fisher_energy, select_by_energy
from .lora_da import LoraDA

METHODS: dict[str, type[InitMethod]] = {
    cls.name: cls for cls in (FILet, LoraDA, Gaussian, PiSSA, MiLoRA)
}

__all__ = [
    "METHODS", "InitMethod", "LayerInit", "FILet", "LoraDA", "Gaussian", "PiSSA", "MiLoRA",
    "batched_svd", "fisher_energy", "lora_scale", "select_by_energy",
]
