"""Predicting the memory an initialisation needs, before any weight is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .device_memory import available_memory  # noqa: F401  (the planner's; api reads it from here)
from .layers import check_rank_fits, layer_dims, resolve_target_modules, update_rows
from .methods import METHODS, InitMethod, lora_scale
from .statistics.losses import loss_row_chunks, output_logits, weighted_cross_entropy
from .statistics.hooks import WEIGHT_ROWS


@dataclass
class MemoryEstimate:
    """Predicted peak memory of :func:`fisher_kernels.init_lora` on one device, in bytes.

    ``stages``: ``model`` (parameters and buffers), ``activations`` (what the calibration pass
    keeps for its backward pass, the loss's gradient and the hooks' per-batch temporaries),
    ``statistics`` (the fp32 accumulators of the largest calibration group), ``bases`` (what the
    method keeps from before the pass to the layer's initialisation, e.g. FILet's singular
    vectors) and ``temporaries`` (the largest one-layer temporaries of decomposition,
    initialisation or the in-place base update) and ``runtime`` (first-use buffers of the
    linear-algebra and autograd runtimes). ``peak_bytes`` = model + bases + statistics + runtime +
    the larger of activations and temporaries.
    """

    peak_bytes: int
    stages: dict[str, int] = field(default_factory=dict)
    method: str = ""
    num_layers: int = 0

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in self.stages.items())
        return f"{self.method}: peak {self.peak_bytes / 2**30:.2f} GiB ({parts} GiB; {self.num_layers} layers)"


RUNTIME_BYTES = 16 * 2**20  # first-use buffers of the BLAS/LAPACK and autograd runtimes (measured on CPU)


def estimate_memory(model: nn.Module, *, method="filet", r: int = 16, batch_size: int = 8, seq_len: int = 512,
                    target_modules=None, model_resident: bool = True, rank_is_a_cap: bool = False,
                    **method_options) -> MemoryEstimate:
    """Predict the peak memory of ``init_lora(model, loader, method=..., r=...)`` for calibration
    batches of ``batch_size × seq_len`` tokens, without running it.

    Works on a model on the ``meta`` device (``with torch.device("meta"): model = ...``): no
    weight is allocated. The activations are measured by running the model's forward on meta
    tensors with the calibration pass's autograd set-up (frozen parameters, the hooks' held
    inputs, which layers share an input) and adding up what autograd saves; the other stages
    come from the layer shapes and the method's own accounting, plus ``runtime``, a constant for
    the first-use buffers of the linear-algebra and autograd runtimes. The model's parameters
    count in ``model`` (``model_resident=False`` leaves them out of ``peak_bytes``). Checked
    against measured CPU peaks (fp32 and bf16) within 15 % by the tests. ``rank_is_a_cap``: ``r``
    is a rank budget's per-layer cap (each layer takes ``min(r, its min(d))``), not a rank every
    layer must fit.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if isinstance(method, InitMethod):
        init_method = method
    else:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
        init_method = METHODS[method](r, lora_scale(r, r), **method_options)
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    names = resolve_target_modules(model, target_modules)
    if not rank_is_a_cap:
        check_rank_fits(model, names, r)
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    activations, shares_input = 0, set()
    if init_method.needs_data:
        activations, shares_input = pass_activation_bytes(model, names, init_method, batch_size, seq_len)
    statistics = bases = temporaries = 0
    for name in names:
        module = model.get_submodule(name)
        d_out, d_in = layer_dims(module)
        dtype = module.weight.dtype
        basis = init_method.basis_bytes(d_out, d_in, dtype)
        bases += basis
        statistics += init_method.held_bytes(d_out, d_in, dtype) - basis
        if name in shares_input and init_method.shares_input_factor:
            statistics -= 4 * d_in * d_in  # one input factor for the layers that read the same input
        rows = update_rows(d_in, module.weight.device)
        update = 4 * min(d_out, rows) * d_in if dtype.itemsize < 4 else 0  # fp32 rows of the in-place base update
        temporaries = max(temporaries, init_method.temporary_bytes(d_out, d_in, dtype), update)
    stages = {"model": model_bytes, "activations": activations, "statistics": statistics, "bases": bases,
              "temporaries": temporaries, "runtime": RUNTIME_BYTES}
    peak = (model_bytes if model_resident else 0) + bases + statistics + max(activations, temporaries) + RUNTIME_BYTES
    return MemoryEstimate(peak_bytes=int(peak), stages=stages, method=init_method.name, num_layers=len(names))


def pass_activation_bytes(model: nn.Module, names: list[str], init_method, batch_size: int,
                          seq_len: int) -> tuple[int, set[str]]:
    """Bytes the calibration pass holds at its peak besides statistics (tensors autograd saves
    for the backward pass and the inputs the hooks keep for the mean gradient, measured on meta
    tensors; the gradient of the logits; the hooks' largest per-batch temporaries), and the names
    of the layers that read the same input tensor as an earlier one."""
    tokens = batch_size * seq_len
    saved, shares_input = _saved_tensor_bytes(model, names, batch_size, seq_len,
                                              hold_inputs=init_method.holds_layer_inputs)
    dtype_size = next((p.element_size() for p in model.parameters()), 4)
    hook = 0
    for name in names:
        d_out, d_in = layer_dims(model.get_submodule(name))
        weight_copy = 4 * min(d_out, WEIGHT_ROWS) * d_in if dtype_size < 4 else 0
        # x (or g) in fp32, its product with W, and the projection onto the basis
        hook = max(hook, weight_copy + 4 * tokens * (d_in + d_out + min(d_out, d_in)))
    return saved + hook, shares_input


def _saved_tensor_bytes(model: nn.Module, names: list[str], batch_size: int, seq_len: int,
                        hold_inputs: bool = False) -> tuple[int, set[str]]:
    """Run the model's forward on meta tensors as the calibration pass does (parameters frozen,
    target layer outputs requiring grad, the weighted cross-entropy on its logits) and add up
    the bytes of every distinct tensor autograd saves (and, with ``hold_inputs``, the target
    layers' inputs), plus the logits and their gradient (the loss computes the gradient in its
    forward sweep, while the logits are still alive) and the loss's largest fp32 chunk
    temporary. Also returns the layers whose input is the same tensor as an earlier target
    layer's."""
    from torch.func import functional_call


    meta = {n: torch.empty_like(t, device="meta") for n, t in [*model.named_parameters(), *model.named_buffers()]}
    parameter_ids = {id(t) for t in meta.values()}
    seen: dict[int, int] = {}
    inputs_seen: set[int] = set()
    shares_input: set[str] = set()

    def keep(t):
        base = t._base if t._base is not None else t
        if id(base) not in parameter_ids and t.device.type == "meta":  # parameters (and their views) are the model's
            seen.setdefault(id(base), base.numel() * base.element_size())
        return t

    def layer_hook(name):
        def hook(module, args, output):
            x = args[0]
            if id(x) in inputs_seen:
                shares_input.add(name)
            inputs_seen.add(id(x))
            if hold_inputs:
                keep(x)
            if isinstance(output, torch.Tensor) and not output.requires_grad:
                output.requires_grad_(True)
        return hook

    handles = [model.get_submodule(name).register_forward_hook(layer_hook(name)) for name in names]
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.enable_grad():
            outputs = functional_call(model, meta, args=(), kwargs={"input_ids": ids})
            logits = output_logits(outputs)
            flat = logits.reshape(-1, logits.shape[-1])
            weighted_cross_entropy(flat, torch.zeros(flat.shape[0], dtype=torch.long, device="meta"),
                                   torch.ones(flat.shape[0], device="meta"))
            logits_bytes = logits.numel() * logits.element_size()
            held = 0 if id(logits._base if logits._base is not None else logits) in seen else logits_bytes
            chunk_bytes = 4 * flat.shape[-1] * max(rows.stop - rows.start for rows in loss_row_chunks(flat))
    finally:
        for handle in handles:
            handle.remove()
    return sum(seen.values()) + held + logits_bytes + chunk_bytes, shares_input
