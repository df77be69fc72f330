"""Writing computed initialisations into real PEFT ``LoraLayer``s."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .layers import set_weight_matrix
from .methods import LayerInit


def make_lora_config(target_names: list[str], r: int, lora_alpha: float, lora_config=None, fan_in_fan_out=False):
    """A ``LoraConfig`` for exactly ``target_names`` (a copy of ``lora_config`` when given).
    ``fan_in_fan_out`` must be True for GPT-2 ``Conv1D`` targets."""
    from peft import LoraConfig

    config = LoraConfig(r=r, lora_alpha=lora_alpha) if lora_config is None else copy.deepcopy(lora_config)
    if getattr(config, "use_dora", False):
        raise ValueError("lora_config.use_dora=True is not supported: DoRA rescales the adapter, "
                         "which would break the initialisation")
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        raise ValueError("lora_config.rank_pattern / alpha_pattern are not supported yet: use one r and lora_alpha")
    config.target_modules = list(target_names)
    config.init_lora_weights = True
    config.fan_in_fan_out = fan_in_fan_out
    return config


@torch.no_grad()
def wrap_with_lora(model: nn.Module, inits: dict[str, LayerInit], config, scale: float, original_weights):
    """``get_peft_model(model, config)`` then write each ``LayerInit`` into its LoRA layer.

    ``original_weights`` ({name: W (d_out, d_in)}) restores the base weights if anything fails
    half-way, and the LoRA layers are then removed again, so a failure loses nothing.
    """
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    adapter = peft_model.active_adapter
    written = []
    try:
        for name, init in inits.items():
            layer = model.get_submodule(name)
            layer.train(layer.get_base_layer().training)  # new dropout modules follow the model's mode
            if not math.isclose(layer.scaling[adapter], scale, rel_tol=1e-9):
                raise RuntimeError(f"layer {name!r}: PEFT's scaling {layer.scaling[adapter]} differs from {scale}")
            if init.lora_A is not None:
                lora_A = layer.lora_A[adapter].weight
                lora_A.copy_(init.lora_A.to(lora_A.device, lora_A.dtype))
            if init.lora_B is not None:
                lora_B = layer.lora_B[adapter].weight
                lora_B.copy_(init.lora_B.to(lora_B.device, lora_B.dtype))
            if init.base_weight is not None:
                written.append(name)
                set_weight_matrix(layer.get_base_layer(), init.base_weight.to(layer.get_base_layer().weight.device))
    except BaseException:
        for name in written:
            set_weight_matrix(model.get_submodule(name).get_base_layer(), original_weights[name])
        peft_model.unload()
        raise
    return peft_model


def save_residual_model(peft_model, adapter_dir: str, base_dir: str) -> None:
    """Save a model whose base weights the method changed: the adapter to ``adapter_dir`` and
    the residual base model (``W' = W − s·B A``) to ``base_dir``.

    Reload with ``PeftModel.from_pretrained(AutoModel...from_pretrained(base_dir), adapter_dir)``.
    To get a plain LoRA adapter for the *original* model instead, use PEFT's conversion path
    (``save_pretrained(..., path_initial_model_for_weight_conversion=...)``, as for PiSSA).
    The model passed in is left as it was.
    """
    peft_model.save_pretrained(adapter_dir)
    base = copy.deepcopy(peft_model).unload()
    base.save_pretrained(base_dir)


