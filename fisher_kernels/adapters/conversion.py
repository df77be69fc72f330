"""Turning an adapter trained on a residual base into a plain LoRA adapter for the original model.

Methods that change the base weight store ``W' = W − s·B₀A₀`` (FILet, LoRA-DA, PiSSA, MiLoRA,
LoRA-GA). After training to ``(B, A)`` the model computes ``W' + s·B A = W + s·(B A − B₀A₀)``,
which is the rank-2r LoRA adapter

    B_plain = [B, B₀]  (d_out, 2r),    A_plain = [A; −A₀]  (2r, d_in)

on the *original* weights (the PiSSA/CorDA conversion in PEFT). ``lora_alpha`` is adjusted so the
scale ``s`` stays the same at rank 2r.
"""

from __future__ import annotations

import copy
import math
import os
import shutil

import torch

from ..files import publish_directories, staging_directory

INITIAL_ADAPTER_FILE = "fisher_kernels_initial_adapter.safetensors"


def save_initial_adapter(initial_adapter: dict, directory) -> None:
    """Write ``{layer: (lora_A₀, lora_B₀)}`` to ``directory/fisher_kernels_initial_adapter.safetensors``."""
    from safetensors.torch import save_file

    tensors = {}
    for layer, (A0, B0) in initial_adapter.items():
        tensors[f"{layer}::A"], tensors[f"{layer}::B"] = A0.contiguous(), B0.contiguous()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(str(directory), INITIAL_ADAPTER_FILE))


def load_initial_adapter(path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The initial adapter saved by :func:`save_initial_adapter` (``path``: the file or its directory)."""
    from safetensors.torch import load_file

    path = os.path.join(str(path), INITIAL_ADAPTER_FILE) if os.path.isdir(str(path)) else str(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: the initial adapter is saved beside the adapter by "
                         "save_residual_model (and 'fisher-kernels init')")
    tensors = load_file(path)
    layers = dict.fromkeys(key.rpartition("::")[0] for key in tensors)
    return {layer: (tensors[f"{layer}::A"], tensors[f"{layer}::B"]) for layer in layers}


def snapshot_adapter(peft_model, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """CPU copies of every LoRA layer's ``(lora_A, lora_B)`` of ``adapter``, keyed by layer name."""
    from peft.tuners.lora import LoraLayer

    from ..distributed.sharded import whole

    base = peft_model.get_base_model()
    return {
        name: (whole(module.lora_A[adapter].weight).cpu().clone(), whole(module.lora_B[adapter].weight).cpu().clone())
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }


def save_as_plain_lora(peft_model, output_dir, initial_adapter=None, adapter: str = "default") -> None:
    """Save the trained ``peft_model`` as a plain LoRA adapter (rank 2r) for the original model.

    ``initial_adapter``: ``{layer: (lora_A₀, lora_B₀)}`` as initialised, or the directory of an
    adapter saved by :func:`fisher_kernels.save_residual_model` (which keeps them beside it, for a
    model reloaded from disk); by default the snapshot ``init_lora`` kept in
    ``peft_model.fisher_kernels_report.initial_adapter``. Load the result with
    ``PeftModel.from_pretrained(original_model, output_dir)``.
    """
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file

    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"save_as_plain_lora converts a PeftModel, got {type(peft_model).__name__}")

    if isinstance(initial_adapter, (str, os.PathLike)):
        initial_adapter = load_initial_adapter(initial_adapter)
    if initial_adapter is None:
        report = getattr(peft_model, "fisher_kernels_report", None)
        initial_adapter = getattr(report, "initial_adapter", None)
        if not initial_adapter:
            raise ValueError("no initial adapter: a model reloaded from disk has none in memory; pass "
                             "initial_adapter='<the adapter directory save_residual_model wrote>' (it holds "
                             f"{INITIAL_ADAPTER_FILE}), or a model from init_lora with a method that changes the base "
                             "weight")
    config = copy.deepcopy(peft_model.peft_config[adapter])
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        raise ValueError("rank_pattern / alpha_pattern adapters are not supported by this conversion")
    scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter)
    converted = {}
    for key, value in state.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            converted[key] = value.detach().cpu().contiguous()
            continue
        layer = key.split(".lora_")[0].removeprefix("base_model.model.")
        if layer not in initial_adapter:
            raise ValueError(f"the initial adapter has no entry for layer {layer!r}")
        A0, B0 = initial_adapter[layer]
        value = value.detach().cpu()
        if ".lora_A." in key:
            converted[key] = torch.cat([value, -A0.to(value.dtype)], dim=0).contiguous()
        else:
            converted[key] = torch.cat([value, B0.to(value.dtype)], dim=1).contiguous()
    config.r = 2 * config.r
    config.lora_alpha = scale * (math.sqrt(config.r) if config.use_rslora else config.r)
    config.init_lora_weights = True
    staged = staging_directory(output_dir)
    try:  # written whole under a temporary name, then moved into place: a failure leaves output_dir as it was
        config.save_pretrained(staged)
        save_file(converted, os.path.join(staged, "adapter_model.safetensors"))
        publish_directories([(staged, str(output_dir))])
    finally:
        shutil.rmtree(staged, ignore_errors=True)
