"""Stage 5, ``write``: the results into the model, as one transaction.

:func:`write_new_adapter` wraps a base model with PEFT and writes the adapters and the residual
base; :func:`write_existing_adapter` overwrites one adapter of an existing ``PeftModel`` in place.
Either all of it happens or, on any failure (``KeyboardInterrupt`` included), the model is put back
exactly as found.
"""

from __future__ import annotations

import time

from torch import nn

from ..adapters.conversion import snapshot_adapter
from ..adapters.existing import restore_adapter, write_adapter
from ..adapters.base_weights import apply_base_updates, revert_base_updates
from ..adapters.layers import remove_peft_layers, wrap_with_lora
from ..distributed.sharded import average_gradients_over_ranks, is_sharded, reshard, sharding_of
from .report import InitReport


def write_existing_adapter(peft_model, adapter_name: str, layers: dict, report: InitReport, scale: float,
                           progress: bool, sources=None):
    """``report``'s factors into adapter ``adapter_name``'s LoRA layers (in place: an optimizer that holds
    them stays valid) and, for a residual method, ``W − P Q`` into the base weights; all or nothing."""
    base = peft_model.get_base_model()
    t = time.perf_counter()
    previous, written = {}, []
    try:
        previous = write_adapter(peft_model, adapter_name, layers, report.layers, scale)
        if report.residual_base:
            report.initial_adapter = snapshot_adapter(peft_model, adapter_name)  # for save_as_plain_lora
        written = apply_base_updates(base, report.layers, progress=progress, sources=sources)
        report.quantization_errors = {entry[0]: entry[4] for entry in written if entry[4] is not None}
        report.timings["peft"] = time.perf_counter() - t
        report.timings["total"] += report.timings["peft"]
        attach_report(peft_model, report, adapter_name)
    except BaseException:
        revert_base_updates(base, written)
        restore_adapter(layers, adapter_name, previous)
        report.initial_adapter = None
        raise
    return peft_model


def write_new_adapter(model: nn.Module, report: InitReport, config, scale: float, progress: bool, sources=None):
    """The last stage, all or nothing: PEFT wrapping, the adapters' values, the adapter snapshot
    and the base-weight writes. On any failure (``KeyboardInterrupt`` included) the model is put
    back exactly as found: the base weights already written are restored (``apply_base_updates``),
    the LoRA layers removed, and ``requires_grad``, ``.grad``, train/eval modes and the model's
    attributes reset."""
    t = time.perf_counter()
    parameters = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    attributes = dict(vars(model))
    peft_model, written, hooks = None, [], []
    sharded = sharding_of(model) is not None
    try:
        if sharded:
            reshard(model)  # what is written into the shards is what the next forward gathers
        peft_model = wrap_with_lora(model, report.layers, config, scale)
        if report.residual_base:
            report.initial_adapter = snapshot_adapter(peft_model)  # for save_as_plain_lora
        written = apply_base_updates(model, report.layers, progress=progress, sources=sources)
        report.quantization_errors = {entry[0]: entry[4] for entry in written if entry[4] is not None}
        if sharded:  # the new adapters are plain parameters, outside FSDP: their gradients averaged as FSDP's
            mesh = next(p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh"))
            hooks = average_gradients_over_ranks([p for p in model.parameters() if p.requires_grad and not is_sharded(p)],
                                                 group=mesh.get_group())
            peft_model.fisher_kernels_gradient_hooks = hooks
        report.timings["peft"] = time.perf_counter() - t
        report.timings["total"] += report.timings["peft"]
        attach_report(peft_model, report, "default")
        return peft_model
    except BaseException:
        for hook in hooks:
            hook.remove()
        revert_base_updates(model, written)
        remove_peft_layers(model)
        for p, requires_grad, grad in parameters:
            p.requires_grad_(requires_grad)
            p.grad = grad
        for m, training in modes:
            m.training = training
        for key in set(vars(model)) - set(attributes):
            delattr(model, key)
        vars(model).update(attributes)
        report.initial_adapter = None
        raise


def attach_report(peft_model, report: InitReport, adapter_name: str) -> None:
    """The report on the model, and the adapter marked as initialised (``fisher_kernels_initialized``:
    adapter name -> method), so that a second initialisation of it is refused."""
    peft_model.fisher_kernels_report = report
    marks = dict(getattr(peft_model, "fisher_kernels_initialized", {}))
    marks[adapter_name] = report.method
    peft_model.fisher_kernels_initialized = marks
