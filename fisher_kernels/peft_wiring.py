"""Writing computed initialisations into real PEFT ``LoraLayer``s."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .layers import row_blocks, weight_matrix
from .methods import LayerInit


def make_lora_config(target_names: list[str], r: int, lora_alpha: float, lora_config=None, fan_in_fan_out=False,
                     kasa: bool = False):
    """A ``LoraConfig`` for exactly ``target_names`` (a copy of ``lora_config`` when given).
    ``fan_in_fan_out`` must be True for GPT-2 ``Conv1D`` targets. ``kasa``: the adapters are PEFT's
    KaSA variant (``lora_config.kasa_config`` if set, else ``KasaConfig()``)."""
    from peft import KasaConfig, LoraConfig

    config = LoraConfig(r=r, lora_alpha=lora_alpha) if lora_config is None else copy.deepcopy(lora_config)
    if kasa:
        if fan_in_fan_out:
            raise ValueError("method='kasa' needs nn.Linear targets: PEFT's KaSA does not support Conv1D "
                             "(fan_in_fan_out) layers")
        config.kasa_config = getattr(config, "kasa_config", None) or KasaConfig()
    elif getattr(config, "kasa_config", None) is not None:
        raise ValueError("lora_config.kasa_config is set, which makes PEFT truncate the base weights: use "
                         "method='kasa', or a LoraConfig without kasa_config")
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
        peft_model.unload()
        raise
    return peft_model


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


def _base_layer(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


UPDATE_ROWS = 1024


@torch.no_grad()
def add_low_rank_(module: nn.Module, P: torch.Tensor, Q: torch.Tensor, alpha: float) -> None:
    """``W += alpha · P Q`` in place for a layer's weight ``W (d_out, d_in)``: directly for fp32/fp64
    weights, through fp32 temporaries of ``UPDATE_ROWS`` rows for narrower dtypes (the same
    numbers as one fp32 temporary of the whole layer)."""
    W = weight_matrix(module)
    P, Q = P.to(W.device), Q.to(W.device)
    if W.dtype in (torch.float32, torch.float64):
        W.addmm_(P.to(W.dtype), Q.to(W.dtype), alpha=alpha)
        return
    P, Q = P.float(), Q.float()
    for rows in row_blocks(W.shape[0], UPDATE_ROWS):  # fp32 temporaries of UPDATE_ROWS rows at a time
        W[rows] = torch.addmm(W[rows].float(), P[rows], Q, alpha=alpha)


@torch.no_grad()
def apply_base_updates(model: nn.Module, inits: dict[str, LayerInit], progress: bool = False) -> None:
    """``W ← W − P Q`` for every layer whose ``LayerInit`` has a ``base_update``, in place, one
    layer at a time. On any failure (``KeyboardInterrupt`` included) the layers already updated
    get ``P Q`` added back, which restores them up to one rounding in the weight's dtype."""
    from tqdm.auto import tqdm

    todo = [(name, init.base_update) for name, init in inits.items() if init.base_update is not None]
    done = []
    try:
        for name, (P, Q) in tqdm(todo, desc="fisher_kernels: base weights", unit="layer",
                                 disable=not progress or len(todo) < 2):
            add_low_rank_(_base_layer(model, name), P, Q, alpha=-1.0)
            done.append((name, P, Q))
    except BaseException:
        for name, P, Q in reversed(done):
            add_low_rank_(_base_layer(model, name), P, Q, alpha=1.0)
        raise


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


