"""Writing computed initialisations into real PEFT ``LoraLayer``s."""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import signal
import threading
import warnings

import torch
from torch import nn

from .conversion import save_initial_adapter
from .files import publish_directories, staging_directory, write_text_atomically
from .layers import row_blocks, update_rows, weight_matrix
from .quantized import dequantized, is_quantized, quantize_into_, relative_error, restore_weight_
from .sharded import is_partitioned, is_sharded, local_update_factors, modify_whole_
from .methods import LayerInit


def make_lora_config(target_names: list[str], r: int, lora_alpha: float, lora_config=None, fan_in_fan_out=False,
                     kasa: bool = False, heads: list[str] | tuple = (), method: str = ""):
    """The ``LoraConfig`` of the adapters (a copy of ``lora_config`` when given), checked before
    any work is done. Its ``target_modules`` become the explicit list of layers to initialise:
    ``target_names`` less what the config's ``exclude_modules``, ``modules_to_save`` and
    ``layers_to_transform``/``layers_pattern`` leave out, as PEFT would.

    ``fan_in_fan_out`` must be True for GPT-2 ``Conv1D`` targets. ``kasa``: the adapters are PEFT's
    KaSA variant (``lora_config.kasa_config`` if set, else ``KasaConfig()``). ``heads``: task heads
    trained in full when the config names neither ``modules_to_save`` nor a ``task_type`` (as
    PEFT's classification task types do).
    """
    from peft import LoraConfig

    if lora_config is not None and lora_config.init_lora_weights is not True:
        raise ValueError(f"lora_config.init_lora_weights={lora_config.init_lora_weights!r} asks PEFT for another "
                         f"initialisation, which method={method!r} would overwrite: leave it at its default (True)"
                         + (f", or use method={lora_config.init_lora_weights!r}"
                            if lora_config.init_lora_weights in ("pissa", "milora", "gaussian") else ""))
    config = LoraConfig(r=r, lora_alpha=lora_alpha) if lora_config is None else copy.deepcopy(lora_config)
    if heads and config.modules_to_save is None and config.task_type is None:
        config.modules_to_save = list(heads)
    if kasa:
        try:
            from peft import KasaConfig
        except ImportError:
            import peft

            raise ImportError(f"method='kasa' uses PEFT's KaSA adapter (KasaConfig), which peft {peft.__version__} "
                              "lacks: upgrade peft") from None
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
    if getattr(config, "target_parameters", None):
        warnings.warn(
            f"lora_config.target_parameters={list(config.target_parameters)}: PEFT adapts these parameters (fused "
            "3-D mixture-of-experts weights) with its default initialisation (lora_A Kaiming-uniform, lora_B "
            f"zero); method={method!r} initialises only the nn.Linear/Conv1D target layers", UserWarning, stacklevel=3)
    config.target_modules = _selected_by_config(list(target_names), config)
    config.init_lora_weights = True
    config.fan_in_fan_out = fan_in_fan_out
    return config


def _selected_by_config(names: list[str], config) -> list[str]:
    """``names`` less the layers the config's ``exclude_modules``, ``modules_to_save`` and
    ``layers_to_transform``/``layers_pattern`` leave out (PEFT's own matching, applied to the
    names' suffixes so that its layer-index rules take effect)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = copy.deepcopy(config)
    probe.target_modules = sorted({name.split(".")[-1] for name in names})
    kept = [name for name in names if check_target_module_exists(probe, name)]
    if not kept:
        raise ValueError(f"no target layer is left after the LoraConfig's exclude_modules={config.exclude_modules!r}, "
                         f"modules_to_save={config.modules_to_save!r}, layers_to_transform={config.layers_to_transform!r}"
                         f" (targets before: {names[:4]}{'...' if len(names) > 4 else ''})")
    return kept


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


def _base_layer(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


@torch.no_grad()
def add_low_rank_(module: nn.Module, P: torch.Tensor, Q: torch.Tensor, alpha: float) -> None:
    """``W += alpha · P Q`` in place for a layer's weight ``W (d_out, d_in)``: directly for fp32/fp64
    weights, through one fp32 temporary of ``UPDATE_ENTRIES`` entries (``UPDATE_ENTRIES_CUDA`` on a
    GPU) for narrower dtypes (the same numbers as one fp32 temporary of the whole layer). A sharded
    (FSDP2) weight: this rank's rows;
    a partitioned (ZeRO-3) one: gathered, changed on rank 0 and re-partitioned; a quantized
    (bitsandbytes) one: unpacked, changed and quantized again with its own settings."""
    if is_quantized(module):
        W = dequantized(module).float()
        quantize_into_(module, W.addmm_(P.to(W.device, torch.float32), Q.to(W.device, torch.float32), alpha=alpha))
    elif is_sharded(module.weight):
        _add_low_rank_to_(*local_update_factors(module, P, Q), alpha)
    elif is_partitioned(module.weight):  # ZeRO-3: the whole weight, changed on rank 0 and re-partitioned
        modify_whole_(module.weight, lambda W: _add_low_rank_to_(W if isinstance(module, nn.Linear) else W.T, P, Q,
                                                                 alpha))
    else:
        _add_low_rank_to_(weight_matrix(module), P, Q, alpha)


def _add_low_rank_to_(W: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, alpha: float) -> None:
    P, Q = P.to(W.device), Q.to(W.device)
    if W.dtype in (torch.float32, torch.float64):
        W.addmm_(P.to(W.dtype), Q.to(W.dtype), alpha=alpha)
        return
    P, Q = P.float(), Q.float()
    for rows in row_blocks(W.shape[0], update_rows(W.shape[1], W.device)):  # one fp32 block of rows at a time
        W[rows] = W[rows].float().addmm_(P[rows], Q, alpha=alpha)


@torch.no_grad()
def apply_base_updates(model: nn.Module, inits: dict[str, LayerInit], progress: bool = False,
                       sources=None) -> list:
    """``W ← W − P Q`` for every layer whose ``LayerInit`` has a ``base_update``, in place, one
    layer at a time. Returns what was written, for :func:`revert_base_updates`. On any failure
    (``KeyboardInterrupt`` included) the layers already updated get ``P Q`` added back, which
    restores them up to one rounding in the weight's dtype (a quantized layer gets its own
    weight parameter back, exactly).

    A quantized (bitsandbytes) layer's new base is ``W − P Q`` quantized with the layer's settings,
    ``W`` being ``sources[name]`` (a full-precision checkpoint's weight) or else the layer's own
    unpacked weight; each entry of the result then also holds the errors, relative to ``‖W‖``, of
    the initialised weight ``Q(W − P Q) + P Q`` and of the loaded one against ``W``
    (``InitReport.quantization_errors``)."""
    from tqdm.auto import tqdm

    todo = [(name, init.base_update) for name, init in inits.items() if init.base_update is not None]
    done = []
    try:
        for name, (P, Q) in tqdm(todo, desc="fisher_kernels: base weights", unit="layer",
                                 disable=not progress or len(todo) < 2):
            with _interrupts_deferred():  # a layer is written and recorded, or neither
                layer = _base_layer(model, name)
                if is_quantized(layer):  # replaced, not changed: the old weight is kept to restore
                    done.append((name, P, Q, layer.weight, _requantize_residual_(layer, P, Q, sources, name)))
                else:
                    add_low_rank_(layer, P, Q, alpha=-1.0)
                    done.append((name, P, Q, None, None))
    except BaseException:
        revert_base_updates(model, done)
        raise
    return done


def _requantize_residual_(layer: nn.Module, P: torch.Tensor, Q: torch.Tensor, sources, name: str) -> dict:
    """A quantized layer's base ``W − P Q`` quantized into it, and the errors, relative to ``‖W‖``, of the
    initialised weight ``Q(W − P Q) + P Q`` and (with ``sources``) of the loaded quantized weight against ``W``."""
    old = dequantized(layer).float()
    W = sources[name].float() if sources is not None else old
    P, Q = P.to(W.device, torch.float32), Q.to(W.device, torch.float32)
    loaded = relative_error(old, W) if sources is not None else 0.0
    del old
    quantize_into_(layer, W.addmm(P, Q, alpha=-1.0))
    return {"initialised": relative_error(dequantized(layer).addmm_(P, Q), W), "loaded": loaded}


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C during the block is held back until the block has finished (main thread only), so a
    layer's in-place update is never left half-written or unrecorded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@torch.no_grad()
def revert_base_updates(model: nn.Module, done: list) -> None:
    """Undo :func:`apply_base_updates` (``W ← W + P Q``, last layer first; exact up to one rounding)."""
    for name, P, Q, original, _ in reversed(done):
        if original is not None:
            restore_weight_(_base_layer(model, name), original)
        else:
            add_low_rank_(_base_layer(model, name), P, Q, alpha=1.0)


def check_output_dirs(adapter_dir, base_dir, source_dir=None) -> None:
    """Refuse, before anything is written, output directories that cannot take the save: a path that
    exists as a file, the same directory twice, or the directory the model was loaded from (its
    weights would be overwritten by the residual ones)."""
    import os

    paths = {"adapter directory": adapter_dir, "base directory": base_dir}
    for what, path in paths.items():
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"the {what} {path} exists and is not a directory: nothing was saved; choose another path")
    if os.path.realpath(adapter_dir) == os.path.realpath(base_dir):
        raise ValueError(f"the adapter and the residual base would both be written to {base_dir}: give two directories")
    if source_dir and os.path.isdir(source_dir):
        source = os.path.realpath(source_dir)
        for what, path in paths.items():
            target = os.path.realpath(path)
            if source == target or source.startswith(target + os.sep):
                raise ValueError(f"the {what} {path} is where the model was loaded from ({source_dir}): saving there "
                                 "would overwrite its weights; choose another output directory")


def save_residual_model(peft_model, adapter_dir: str, base_dir: str) -> None:
    """Save a model whose base weights the method changed: the adapter to ``adapter_dir`` (with
    ``fisher_kernels_report.json``, how it was made) and the residual base model
    (``W' = W − s·B A``) to ``base_dir``.

    Reload with ``PeftModel.from_pretrained(AutoModel...from_pretrained(base_dir), adapter_dir)``.
    To get a plain LoRA adapter for the *original* model instead, use PEFT's conversion path
    (``save_pretrained(..., path_initial_model_for_weight_conversion=...)``, as for PiSSA).
    The model passed in is left as it was. A sharded (FSDP2, ZeRO-3) model is refused: gather its state
    with ``torch.distributed.checkpoint.state_dict.get_model_state_dict(model,
    options=StateDictOptions(full_state_dict=True, cpu_offload=True))`` (ZeRO-3:
    ``engine.save_16bit_model``) and save that on one rank.
    """
    import os

    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"save_residual_model saves a PeftModel (from init_lora), got {type(peft_model).__name__}")
    sharded = next((name for name, p in peft_model.named_parameters() if is_sharded(p) or is_partitioned(p)), None)
    if sharded is not None:
        raise TypeError(f"parameter {sharded!r} is sharded (FSDP2 / ZeRO-3): save_residual_model would write one "
                        "rank's part. Gather the whole state and save it on rank 0: FSDP2 with torch.distributed."
                        "checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions(full_state_dict="
                        "True, cpu_offload=True)), ZeRO-3 with engine.save_16bit_model(...); the adapter alone saves "
                        "as usual (peft_model.save_pretrained)")
    source = getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", None)
    check_output_dirs(adapter_dir, base_dir, source)
    adapter_tmp, base_tmp = staging_directory(adapter_dir), staging_directory(base_dir)
    try:  # everything is written under temporary names first: a failure leaves the directories as they were
        peft_model.save_pretrained(adapter_tmp)
        report = getattr(peft_model, "fisher_kernels_report", None)
        if report is not None:  # how the adapter was made, beside it
            report.save(os.path.join(adapter_tmp, "fisher_kernels_report.json"))
            if report.initial_adapter:  # what save_as_plain_lora needs after a reload
                save_initial_adapter(report.initial_adapter, adapter_tmp)
        base = copy.deepcopy(peft_model).unload()
        base.save_pretrained(base_tmp)
        _point_adapter_configs_at(adapter_tmp, base_dir)
        publish_directories([(adapter_tmp, adapter_dir), (base_tmp, base_dir)])  # both, or neither
    finally:
        for tmp in (adapter_tmp, base_tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _point_adapter_configs_at(adapter_dir, base_dir) -> None:
    """``base_model_name_or_path`` of every adapter config saved under ``adapter_dir`` names the
    residual base, so that ``AutoPeftModel...from_pretrained(adapter_dir)`` loads the adapter onto the
    weights it was made for, not the original ones (46 logits off on SmolLM2)."""
    import json
    import os

    for folder, _, files in os.walk(str(adapter_dir)):
        if "adapter_config.json" in files:
            path = os.path.join(folder, "adapter_config.json")
            with open(path) as f:
                config = json.load(f)
            config["base_model_name_or_path"] = os.path.abspath(str(base_dir))
            write_text_atomically(path, json.dumps(config, indent=2, sort_keys=True))


