"""PEFT's LoRA layers: created around the targets with the computed ``lora_A``/``lora_B`` (and KaSA's
``lora_diag``), or removed again.
"""

from __future__ import annotations



import math
import warnings

import torch
from torch import nn

from ..methods import LayerInit




@torch.no_grad()
def wrap_with_lora(model: nn.Module, inits: dict[str, LayerInit], config, scale: float):
    """``get_peft_model(model, config)`` then write each layer's ``lora_A``/``lora_B`` (and KaSA's
    ``lora_diag``).

    Base weights are not touched here (see :func:`apply_base_updates`). If anything fails, the
    LoRA layers are removed again, so the model is as it was.

    KaSA (``config.kasa_config`` set): PEFT's KaSA variant truncates each base weight itself when
    its adapter is created. That truncation is the method's own base update here, computed and
    applied by :func:`apply_base_updates`; so the adapters are created on the ``meta`` device
    (``low_cpu_mem_usage=True``), where PEFT defers its truncation, and each layer's adapter is
    then materialised from the ``LayerInit`` and its deferred truncation cancelled.
    """
    from peft import get_peft_model

    kasa = getattr(config, "kasa_config", None) is not None
    with warnings.catch_warnings():  # PEFT reads a property transformers deprecated: not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, config, low_cpu_mem_usage=kasa)
    adapter = peft_model.active_adapter
    try:
        for name, init in inits.items():
            layer = model.get_submodule(name)
            layer.train(layer.get_base_layer().training)  # new dropout modules follow the model's mode
            if not math.isclose(layer.scaling[adapter], scale, rel_tol=1e-9):
                raise RuntimeError(f"layer {name!r}: PEFT's scaling {layer.scaling[adapter]} differs from {scale}")
            if kasa:
                _materialise_kasa_adapter(name, layer, adapter, init)
                continue
            if init.lora_A is not None:
                lora_A = layer.lora_A[adapter].weight
                lora_A.copy_(init.lora_A.to(lora_A.device, lora_A.dtype))
            if init.lora_B is not None:
                lora_B = layer.lora_B[adapter].weight
                lora_B.copy_(init.lora_B.to(lora_B.device, lora_B.dtype))
    except BaseException:
        remove_peft_layers(model)
        raise
    return peft_model


def remove_peft_layers(model: nn.Module) -> None:
    """Put every PEFT layer of ``model`` back to the module it wraps (LoRA layers to their base
    layer, ``modules_to_save`` wrappers to the original module), without merging: what
    ``PeftModel.unload`` does, also when the ``PeftModel`` object itself was never returned."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if getattr(parent, child, None) is not module:
            continue  # inside a layer that was already put back
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module.get_base_layer()
        setattr(parent, child, original)


def _materialise_kasa_adapter(name: str, layer: nn.Module, adapter: str, init: LayerInit) -> None:
    """Replace the ``meta`` ``lora_A``/``lora_B``/``lora_diag`` of one KaSA layer by the
    initialisation's values (device of the base weight, dtype PEFT chose) and cancel PEFT's
    deferred truncation of its base weight (the method applies its own)."""
    deferred = getattr(layer, "_lora_kasa_truncation_deferred", None)
    if deferred is None or adapter not in deferred or not hasattr(layer, "lora_diag"):
        raise RuntimeError(f"layer {name!r}: this PEFT version's KaSA layer does not defer its base-weight "
                           "truncation as expected (peft >= 0.19 with KasaLinearVariant is supported)")
    if init.lora_A is None or init.lora_B is None or init.lora_diag is None:
        raise RuntimeError(f"layer {name!r}: a KaSA initialisation needs lora_A, lora_B and lora_diag")
    device = layer.get_base_layer().weight.device
    for container, value in ((layer.lora_A[adapter], init.lora_A), (layer.lora_B[adapter], init.lora_B)):
        old = container.weight
        container.weight = nn.Parameter(value.to(device, old.dtype, copy=True), requires_grad=old.requires_grad)
    old = layer.lora_diag[adapter]
    layer.lora_diag[adapter] = nn.Parameter(init.lora_diag.to(device, old.dtype, copy=True),
                                            requires_grad=old.requires_grad)
    deferred.discard(adapter)
