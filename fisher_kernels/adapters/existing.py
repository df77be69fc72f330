"""Initialising an adapter of an existing ``PeftModel`` in place (TRL's ``peft_config=`` models,
multi-adapter models, a ``Trainer`` whose optimizer already holds the adapter's parameters).

The statistics are those of the model with every adapter switched off (PEFT's
``disable_adapter``), measured at the LoRA layers' own base layers. The adapter's ``lora_A`` and
``lora_B`` are overwritten in place (the same ``Parameter`` objects, so an optimizer that holds
them stays valid), and a residual method writes ``W − s·B A`` into the base weights, which every
adapter on those layers shares (a warning says so when there are others). Other adapters'
parameters are not touched. All or nothing: on failure the adapter's values and the base weights
are put back.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..distributed.sharded import copy_whole_


def lora_layers_of(peft_model, adapter_name: str) -> dict[str, nn.Module]:
    """``{name: LoraLayer}`` (names in the base model) of the layers that hold ``adapter_name``."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in peft_model.get_base_model().named_modules()
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A}


# PEFT initialisations that write a residual into the base weights when the adapter is created
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def check_adapter_config(peft_model, adapter_name: str, method: str, r, lora_alpha):
    """The adapter's ``LoraConfig``, refused when the method cannot initialise it."""
    from peft import LoraConfig

    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"the PeftModel has no adapter {adapter_name!r} (it has {sorted(peft_model.peft_config)})")
    config = peft_model.peft_config[adapter_name]
    if not isinstance(config, LoraConfig):
        raise TypeError(f"adapter {adapter_name!r} is a {type(config).__name__}, not a LoRA adapter")
    for arg, value, configured in (("r", r, config.r), ("lora_alpha", lora_alpha, config.lora_alpha)):
        if value is not None and value != configured:
            raise ValueError(f"{arg}={value} disagrees with adapter {adapter_name!r}'s {arg}={configured}")
    done = getattr(peft_model, "fisher_kernels_initialized", {})
    if adapter_name in done:
        raise ValueError(f"adapter {adapter_name!r} was already initialised by fisher_kernels ({done[adapter_name]}) and "
                         "may have been trained since: initialising it again would overwrite it (and a residual method "
                         "would subtract a second residual from the base weights); start again from the original model")
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise ValueError(f"adapter {adapter_name!r} was created with init_lora_weights={init!r}, which already replaced "
                         "the base weights by a residual: initialising it again would change the model's outputs. "
                         "Create the adapter with PEFT's default init_lora_weights=True and initialise that one")
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError(f"adapter {adapter_name!r} has a rank_pattern/alpha_pattern, which is not supported yet")
    if getattr(config, "use_dora", False):
        raise ValueError(f"adapter {adapter_name!r} uses DoRA, whose magnitude vector the initialisation would break")
    if method == "kasa" or getattr(config, "kasa_config", None) is not None:
        raise ValueError("KaSA truncates the base weights when its adapter is created: create the adapter with "
                         "init_lora(base_model, method='kasa') instead of initialising an existing one")
    return config


@torch.no_grad()
def write_adapter(peft_model, adapter_name: str, layers: dict[str, nn.Module], inits: dict, scale: float) -> dict:
    """Copy each ``LayerInit``'s ``lora_A``/``lora_B`` into the adapter's existing parameters.
    Returns the previous values, for :func:`restore_adapter`."""
    previous = {}
    for name, layer in layers.items():
        init = inits[name + ".base_layer"]
        if not math.isclose(layer.scaling[adapter_name], scale, rel_tol=1e-9):
            raise RuntimeError(f"layer {name!r}: PEFT's scaling {layer.scaling[adapter_name]} differs from {scale}")
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        previous[name] = (A.detach().clone(), B.detach().clone())
        if init.lora_A is not None:
            copy_whole_(A, init.lora_A)
        if init.lora_B is not None:
            copy_whole_(B, init.lora_B)
    return previous


@torch.no_grad()
def restore_adapter(layers: dict[str, nn.Module], adapter_name: str, previous: dict) -> None:
    for name, (A, B) in previous.items():
        layers[name].lora_A[adapter_name].weight.copy_(A)
        layers[name].lora_B[adapter_name].weight.copy_(B)


def warn_about_shared_bases(layers: dict[str, nn.Module], adapter_name: str, residual: bool) -> None:
    others = sorted({a for layer in layers.values() for a in layer.lora_A if a != adapter_name})
    if residual and others:
        warnings.warn(f"the method writes W − s·B A into the base weights, which adapters {others} share with "
                      f"{adapter_name!r}: their step-0 outputs change with it", UserWarning, stacklevel=3)
