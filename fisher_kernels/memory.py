"""Predicting the memory an initialisation needs, before any weight is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .device_memory import available_memory  # noqa: F401  (the planner's; api reads it from here)
from .layers import check_rank_fits, layer_dims, resolve_target_modules, update_rows, weight_dtype
from .quantized import is_quantized, quantization_of
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
    plan: "MemoryPlan | None" = None  # with device_bytes: what the default settings plan

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in self.stages.items())
        return f"{self.method}: peak {self.peak_bytes / 2**30:.2f} GiB ({parts} GiB; {self.num_layers} layers)"


RUNTIME_BYTES = 16 * 2**20  # first-use buffers of the BLAS/LAPACK and autograd runtimes (measured on CPU)


def estimate_memory(model: nn.Module, *, method="filet", r: int = 16, batch_size: int = 8, seq_len: int = 512,
                    target_modules=None, model_resident: bool = True, rank_is_a_cap: bool = False,
                    quantization: str | None = None, device_bytes: int | None = None, world_size: int = 1,
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

    Quantized models (QLoRA): a model loaded with bitsandbytes is recognised layer by layer; a
    ``meta`` model built in its compute dtype is estimated as if loaded with ``quantization="4bit"``
    (nf4 / fp4, 64-entry blocks, fp32 block scales) or ``"8bit"`` (int8, one fp32 scale a row). The
    target weights then count at their packed size; the temporaries add one layer unpacked, and,
    for a residual method, that layer's fp32 residual and its re-quantized copy.

    ``device_bytes``: the estimate of the run ``init_lora``'s default settings plan on a device of
    that size (``max_stats_memory`` and ``micro_batch_size`` ``"auto"``: the fewest calibration
    passes, then the largest micro-batches, that fit; see :func:`plan_memory`); the plan is in
    ``estimate.plan``. ``MemoryError`` when nothing fits.

    ``world_size``: the peak of one rank of a model sharded with FSDP2 over that many ranks
    (``fully_shard`` on every block of the model's layer list and on the root), each rank with its own
    batches of ``batch_size × seq_len``: its shard of the model; in the pass the parameters outside
    the blocks whole (FSDP2 keeps the root's gathered) and three blocks gathered (the running one, the
    prefetched one and one not yet freed, as measured on CPU); the statistics and bases of the layers it owns (dealt by bytes, as
    ``init_lora`` deals them, see :mod:`fisher_kernels.distributed.owners`); in the pass, one
    layer's update and basis received from or sent to another rank; afterwards one unit's gathered
    weights. With ``device_bytes``, the plan keeps one pass and picks micro-batches (the per-rank
    statistics are not split into passes). Stages then hold ``gathered`` too.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
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
    if quantization not in (None, "4bit", "8bit"):
        raise ValueError(f"quantization must be None, '4bit' or '8bit', got {quantization!r}")
    model_bytes = _module_bytes(model)
    if quantization is not None:  # a full-precision (meta) model estimated as if its targets were quantized
        for name in names:
            module = model.get_submodule(name)
            if not is_quantized(module):
                d_out, d_in = layer_dims(module)
                model_bytes += packed_bytes(d_out, d_in, quantization) - _weight_bytes(model, name)
    activations, shares_input = 0, set()
    if init_method.needs_data:
        activations, shares_input = pass_activation_bytes(model, names, init_method, batch_size, seq_len)
    statistics = bases = temporaries = 0
    for name in names:
        module = model.get_submodule(name)
        d_out, d_in = layer_dims(module)
        dtype = weight_dtype(module)
        basis = init_method.basis_bytes(d_out, d_in, dtype)
        bases += basis
        statistics += init_method.held_bytes(d_out, d_in, dtype) - basis
        if name in shares_input and init_method.shares_input_factor:
            statistics -= 4 * d_in * d_in  # one input factor for the layers that read the same input
        rows = update_rows(d_in, module.weight.device)
        update = 4 * min(d_out, rows) * d_in if dtype.itemsize < 4 else 0  # fp32 rows of the in-place base update
        layer_temporaries = init_method.temporary_bytes(d_out, d_in, dtype)
        kind = quantization_of(module) or quantization
        if kind is not None:  # the layer unpacked (while decomposed); a residual: fp32 W, W − P Q, the new packed one
            unpacked = d_out * d_in * dtype.itemsize
            update = (8 * d_out * d_in + packed_bytes(d_out, d_in, kind)) if init_method.residual_base else 0
            layer_temporaries += unpacked
        temporaries = max(temporaries, layer_temporaries, update)
    stages = {"model": model_bytes, "activations": activations, "statistics": statistics, "bases": bases,
              "temporaries": temporaries, "runtime": RUNTIME_BYTES}
    if world_size > 1:
        stages = _sharded_stages(model, init_method, names, stages, shares_input, world_size)
    estimate = MemoryEstimate(peak_bytes=_peak(stages, model_resident), stages=stages, method=init_method.name,
                              num_layers=len(names))
    if device_bytes is None or not init_method.needs_data:
        return estimate
    planned = plan_memory(model, init_method, names, batch_size=batch_size, seq_len=seq_len,
                          free_bytes=int(device_bytes) - estimate.stages["model"],
                          source=f"a {device_bytes / 2**30:.0f} GiB device", rank_is_a_cap=rank_is_a_cap,
                          quantization=quantization, world_size=world_size)
    if planned.micro_batch_size is not None:
        estimate = estimate_memory(model, method=init_method, r=r, batch_size=planned.micro_batch_size,
                                   seq_len=seq_len, target_modules=names, model_resident=model_resident,
                                   rank_is_a_cap=rank_is_a_cap, quantization=quantization, world_size=world_size)
    stages = dict(estimate.stages)
    if planned.budget is not None and world_size > 1:  # this rank's share of the largest group
        share = sharded_groups(layer_held_bytes(model, init_method, names), world_size, planned.budget)[1]
        stages["statistics"] = max(0, min(share, stages["statistics"] + stages["bases"]) - stages["bases"])
    elif planned.budget is not None:  # one group's statistics and bases at a time
        stages["statistics"] = max(0, min(planned.budget, stages["statistics"] + stages["bases"]) - stages["bases"])
    return MemoryEstimate(peak_bytes=_peak(stages, model_resident), stages=stages, method=init_method.name,
                          num_layers=len(names), plan=planned)


def _peak(stages: dict, model_resident: bool = True) -> int:
    """The peak of the stages: model + bases + statistics + runtime + the larger of the pass
    (activations, and a sharded model's gathered weights) and the temporaries."""
    return int((stages["model"] if model_resident else 0) + stages["bases"] + stages["statistics"]
               + max(stages["activations"] + stages.get("gathered", 0), stages["temporaries"]) + stages["runtime"])


def _sharded_stages(model: nn.Module, method, names: list[str], stages: dict, shares_input: set[str],
                    world: int) -> dict:
    """One FSDP2 rank's stages (see :func:`estimate_memory`'s ``world_size``) from one process's."""
    from .distributed.owners import owners_by_bytes

    blocks = _block_list(model, names)
    in_blocks = sum(_module_bytes(b) for b in blocks)
    largest_block = max((_module_bytes(b) for b in blocks), default=0)
    # in the pass: the root's parameters whole (FSDP2 keeps them gathered) and three blocks (the running one,
    # the prefetched one and one not yet freed: the measured CPU peaks of benchmarks.sharded_statistics)
    out = dict(stages, model=stages["model"] // world,
               gathered=(stages["model"] - in_blocks) + 3 * largest_block if method.needs_data else 0)
    if not method.needs_data:
        out["temporaries"] = stages["temporaries"] + max(_weight_bytes(model, n) for n in names)
        return out
    held = layer_held_bytes(model, method, names)
    owner = owners_by_bytes(held, world)
    statistics, bases = [0] * world, [0] * world
    for name in names:
        d_out, d_in = layer_dims(model.get_submodule(name))
        dtype = weight_dtype(model.get_submodule(name))
        basis = method.basis_bytes(d_out, d_in, dtype)
        own = held[name] - basis
        if name in shares_input and method.shares_input_factor:
            own -= 4 * d_in * d_in
        statistics[owner[name]] += own
        bases[owner[name]] += basis
    rank = max(range(world), key=lambda r: statistics[r] + bases[r])
    out["statistics"], out["bases"] = statistics[rank], bases[rank]
    out["activations"] = stages["activations"] + max(held.values())  # an update for (or a basis from) another rank
    unit, widest = 0, 0
    for name in names if method.reads_weights else []:  # the largest unit's gathered weights (layers sharing
        unit = (unit if name in shares_input and method.shares_input_factor else 0) + _weight_bytes(model, name)
        widest = max(widest, unit)  # an input are solved together); none for a method that reads no weight
    out["temporaries"] = stages["temporaries"] + widest
    return out


def _module_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _weight_bytes(model: nn.Module, name: str) -> int:
    weight = model.get_submodule(name).weight
    return weight.numel() * weight.element_size()


def _block_list(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The model's blocks: the longest ``ModuleList`` holding target layers (empty: none)."""
    best: list[nn.Module] = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and any(
                n.startswith(f"{prefix}.") for n in names):
            best = list(module)
    return best


def packed_bytes(d_out: int, d_in: int, quantization: str) -> int:
    """Bytes of a ``d_out × d_in`` weight quantized by bitsandbytes: 4-bit (two entries a byte, an fp32
    scale per 64-entry block) or 8-bit (a byte an entry, an fp32 scale a row)."""
    n = d_out * d_in
    return n // 2 + 4 * -(-n // 64) if quantization == "4bit" else n + 4 * d_out


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
    alive: list[torch.Tensor] = []  # every tensor whose id is recorded, held (meta: no memory) so no id is reused

    def keep(t):
        base = t._base if t._base is not None else t
        if id(base) not in parameter_ids and t.device.type == "meta":  # parameters (and their views) are the model's
            if id(base) not in seen:
                alive.append(base)
            seen.setdefault(id(base), base.numel() * base.element_size())
        return t

    def layer_hook(name):
        def hook(module, args, output):
            x = args[0]
            if id(x) in inputs_seen:
                shares_input.add(name)
            inputs_seen.add(id(x))
            alive.append(x)
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


PLAN_MARGIN = 0.8  # share of the free memory a plan fills


@dataclass
class MemoryPlan:
    """How a calibration pass is run so that it fits: ``micro_batch_size`` (``None``: whole
    batches), ``budget`` (bytes of statistics and bases held per pass; ``None``: all layers in one
    pass), the estimated peak above what is already resident, and a sentence saying why."""

    micro_batch_size: int | None
    budget: int | None
    peak_bytes: int
    reason: str


def micro_batch_candidates(batch_size: int) -> list[int]:
    """``batch_size``, then halving down to 1 (largest first)."""
    out, m = [], batch_size
    while m >= 1:
        out.append(m)
        m = m // 2 if m > 1 else 0
    return out


def plan_memory(model: nn.Module, method: InitMethod, names: list[str], *, batch_size: int, seq_len: int,
                free_bytes: int, source: str, max_stats_memory="auto", micro_batch_size="auto",
                can_repeat: bool = True, rank_is_a_cap: bool = False, quantization: str | None = None,
                world_size: int = 1) -> MemoryPlan:
    """The fewest calibration passes, then the largest micro-batches, whose estimated peak fits
    ``PLAN_MARGIN`` of ``free_bytes`` (the model already resident). ``max_stats_memory`` /
    ``micro_batch_size``: ``"auto"`` (planned), a number (kept) or ``None`` (one pass / whole
    batches). ``can_repeat=False`` (a loader that is a generator): one pass only. ``quantization``: as
    :func:`estimate_memory`'s, for a meta model estimated as if quantized. ``world_size`` > 1: one
    rank of an FSDP2 model (``free_bytes`` left by its shard), which holds in each pass the layers
    it owns of that pass's group (:func:`sharded_groups`). Raises ``MemoryError`` when even the
    smallest plan does not fit and nothing was fixed by the caller."""
    room_total = int(PLAN_MARGIN * free_bytes)
    held = layer_held_bytes(model, method, names)
    total, largest = sum(held.values()), max(held.values(), default=0)
    if world_size > 1:  # a rank holds the layers it owns in each pass: plan in per-rank bytes
        return _plan_sharded(model, method, names, held, batch_size=batch_size, seq_len=seq_len,
                             free_bytes=free_bytes, source=source, max_stats_memory=max_stats_memory,
                             micro_batch_size=micro_batch_size, can_repeat=can_repeat, rank_is_a_cap=rank_is_a_cap,
                             quantization=quantization, world_size=world_size)
    micro_options = micro_batch_candidates(batch_size) if micro_batch_size == "auto" else [micro_batch_size or batch_size]
    best = None  # (passes, -micro, micro, budget, peak)
    smallest_need = None
    for micro in micro_options:
        estimate = estimate_memory(model, method=method, r=method.r, batch_size=micro, seq_len=seq_len,
                                   target_modules=names, model_resident=False, rank_is_a_cap=rank_is_a_cap,
                                   quantization=quantization)
        others = max(estimate.stages["activations"], estimate.stages["temporaries"]) + estimate.stages["runtime"]
        room = room_total - others
        smallest_need = others + largest if smallest_need is None else min(smallest_need, others + largest)
        if max_stats_memory == "auto":
            if room >= total:
                passes, budget = 1, None
            elif room >= largest and can_repeat:
                budget = room
                passes = len(consecutive_groups(held, budget))
            else:
                continue
        elif max_stats_memory is None:
            if room < total:
                continue
            passes, budget = 1, None
        else:
            if room < min(int(max_stats_memory), total):
                continue
            budget = int(max_stats_memory)
            passes = len(consecutive_groups(held, budget))
        peak = others + (total if budget is None else min(budget, total))
        key = (passes, -micro)
        if best is None or key < best[0]:
            best = (key, micro, budget, peak)
        if passes == 1:
            break  # the largest micro-batch with one pass: nothing better below
    if best is None:
        raise MemoryError(f"the calibration pass does not fit: {source} reports {free_bytes / 2**30:.2f} GiB free, "
                          f"and even micro-batches of {micro_options[-1]} with one layer's statistics per pass are "
                          f"estimated at {smallest_need / 2**30:.2f} GiB (plans use {PLAN_MARGIN:.0%}); use shorter "
                          "sequences, or shard the model")
    _, micro, budget, peak = best
    passes = 1 if budget is None else len(consecutive_groups(held, budget))
    micro_out = None if micro == batch_size else micro
    why = (f"{free_bytes / 2**30:.2f} GiB free ({source}), {PLAN_MARGIN:.0%} planned: "
           f"{'whole batches' if micro_out is None else f'micro-batches of {micro}'}, {passes} calibration "
           f"pass{'es' if passes > 1 else ''}, estimated peak {peak / 2**30:.2f} GiB above the loaded model")
    return MemoryPlan(micro_batch_size=micro_out, budget=budget, peak_bytes=int(peak), reason=why)


def sharded_groups(held: dict[str, int], world: int, budget: int | None) -> tuple[list[list[str]], int]:
    """The calibration groups of a sharded model's pass: consecutive groups whose largest per-rank
    share (each group's layers dealt by bytes, :func:`group_owners`) fits ``budget`` bytes per rank
    (``None``: one group). Returns ``(groups, largest share)``."""
    def share_of(groups):
        owners = group_owners(held, groups, world)
        return max((sum(held[n] for n in group if owners[n] == r) for group in groups for r in range(world)),
                   default=0)

    groups = [list(held)]
    share = share_of(groups)
    total_budget = None if budget is None else budget * world
    while budget is not None and share > budget and total_budget >= max(held.values(), default=0):
        groups = consecutive_groups(held, total_budget)
        share = share_of(groups)
        total_budget = int(total_budget * 0.9)
    return groups, share


def _plan_sharded(model, method, names, held, *, batch_size, seq_len, free_bytes, source, max_stats_memory,
                  micro_batch_size, can_repeat, rank_is_a_cap, quantization, world_size) -> MemoryPlan:
    """:func:`plan_memory` for one rank of an FSDP2 model: budgets are per rank."""
    room_total = int(PLAN_MARGIN * free_bytes)
    micro_options = micro_batch_candidates(batch_size) if micro_batch_size == "auto" else [micro_batch_size or batch_size]
    best, smallest_need = None, None
    for micro in micro_options:
        estimate = estimate_memory(model, method=method, r=method.r, batch_size=micro, seq_len=seq_len,
                                   target_modules=names, model_resident=False, rank_is_a_cap=rank_is_a_cap,
                                   quantization=quantization, world_size=world_size)
        stages = estimate.stages
        others = max(stages["activations"] + stages["gathered"], stages["temporaries"]) + stages["runtime"]
        room = room_total - others
        fixed = None if max_stats_memory in ("auto", None) else int(max_stats_memory)
        budget = fixed if fixed is not None else (None if max_stats_memory is None else room)
        groups, share = sharded_groups(held, world_size, budget)
        smallest_need = others + share if smallest_need is None else min(smallest_need, others + share)
        if share > room or (len(groups) > 1 and not can_repeat):
            continue
        key = (len(groups), -micro)
        if best is None or key < best[0]:
            best = (key, micro, budget if len(groups) > 1 else fixed, others + share, len(groups))
        if len(groups) == 1:
            break
    if best is None:
        raise MemoryError(f"the calibration pass does not fit: {source} reports {free_bytes / 2**30:.2f} GiB free "
                          f"on each of {world_size} ranks, and the smallest plan is estimated at "
                          f"{smallest_need / 2**30:.2f} GiB (plans use {PLAN_MARGIN:.0%}); use shorter sequences, "
                          "or more ranks")
    _, micro, budget, peak, passes = best
    micro_out = None if micro == batch_size else micro
    why = (f"{free_bytes / 2**30:.2f} GiB free per rank ({source}, {world_size} ranks), {PLAN_MARGIN:.0%} planned: "
           f"{'whole batches' if micro_out is None else f'micro-batches of {micro}'}, {passes} calibration "
           f"pass{'es' if passes > 1 else ''}, estimated peak {peak / 2**30:.2f} GiB per rank above its shard")
    return MemoryPlan(micro_batch_size=micro_out, budget=budget, peak_bytes=int(peak), reason=why)


def layer_held_bytes(model: nn.Module, method: InitMethod, names: list[str]) -> dict[str, int]:
    """``{layer: bytes}`` each target layer holds from before the pass until it is initialised
    (statistics and bases, in the layer's compute dtype): what a calibration group's budget counts."""
    return {n: method.held_bytes(*layer_dims(model.get_submodule(n)), weight_dtype(model.get_submodule(n)))
            for n in names}


def plan_layer_groups(layer_bytes: dict[str, int], max_stats_memory: int | None, world: int = 1) -> list[list[str]]:
    """Consecutive groups of layers whose held bytes (``{name: bytes}``: statistics and bases from
    before the pass until the layer is initialised) fit in ``max_stats_memory`` (all layers in
    one group when no budget is given). ``world`` > 1: a sharded pass, ``max_stats_memory`` per rank,
    each group's layers dealt to owner ranks (:func:`sharded_groups`, :func:`group_owners`)."""
    if max_stats_memory is None:
        return [list(layer_bytes)]
    for name, need in layer_bytes.items():
        if need > max_stats_memory:
            raise ValueError(f"layer {name!r} alone needs {need} bytes of statistics, more than "
                             f"max_stats_memory={max_stats_memory}{' (per rank)' if world > 1 else ''}")
    if world > 1:
        return sharded_groups(layer_bytes, world, max_stats_memory)[0]
    return consecutive_groups(layer_bytes, max_stats_memory)


def group_owners(layer_bytes: dict[str, int], groups: list[list[str]], world: int) -> dict[str, int]:
    """``{layer: rank}``: each group's layers dealt by bytes
    (:func:`~fisher_kernels.distributed.owners.owners_by_bytes`)."""
    from .distributed.owners import owners_by_bytes

    owners = {}
    for group in groups:
        owners.update(owners_by_bytes({n: layer_bytes[n] for n in group}, world))
    return owners


def consecutive_groups(layer_bytes: dict[str, int], budget: int) -> list[list[str]]:
    """Layers in order, a new group whenever the next one would take the current past ``budget``."""
    groups, current, used = [], [], 0
    for name, need in layer_bytes.items():
        if current and used + need > budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += need
    groups.append(current)
    return groups
