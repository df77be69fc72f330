"""``init_lora``: calibration pass, direction selection and PEFT wiring in one call."""

from __future__ import annotations

import contextvars
import functools
import math
import numbers
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .conversion import snapshot_adapter
from .existing_adapter import (check_adapter_config, lora_layers_of, restore_adapter, warn_about_shared_bases,
                               write_adapter)
from .layers import RANK_IS_A_CAP, check_rank_fits, layer_dims, resolve_target_modules, trainable_heads, weight_matrix
from .methods import METHODS, LayerInit, lora_scale
from .options import method_and_options
from .rank_allocation import allocate_ranks, rank_patterns, truncated
from .sharded import (CALLED_MODULE, GatheredWeights, average_gradients_over_ranks, count_nonfinite, is_partitioned,
                      is_sharded, reshard, sharding_of)
from .split_work import broadcast_results, compute_in_rounds, compute_share, deal, rank_and_world
from .peft_wiring import (apply_base_updates, make_lora_config, remove_peft_layers, revert_base_updates,
                          wrap_with_lora)
from . import memory
from .files import write_text_atomically
from ._version import __version__
from .statistics.batches import first_tensor
from .statistics import KFACStatistics, collect_statistics, model_fingerprint
from .statistics.batches import as_batches


@dataclass
class InitReport:
    """What an initialisation did and how long each stage took (seconds).

    ``layers`` maps layer names to their ``LayerInit``: the factors, the low-rank base update
    ``(P, Q)`` with ``W' = W − P Q``, the selected directions and their scores. It holds no
    full-size tensor.
    """

    method: str
    r: int
    scale: float
    target_modules: list[str]
    timings: dict[str, float] = field(default_factory=dict)  # decomposition, statistics, initialization, peft, total
    stats_bytes: int = 0                   # most statistics bytes held at once
    stats_bytes_per_group: list[int] = field(default_factory=list)  # one entry per calibration pass
    residual_base: bool = False            # the base weights became W − s·B₀A₀ (plain-LoRA conversion possible)
    prepared_bytes: int = 0                # most bytes of per-layer bases (FILet's singular vectors) held at once
    memory_plan: str = ""                  # how the layers were split into calibration passes, and why
    num_batches: int = 0
    num_tokens: dict[str, int] = field(default_factory=dict)
    layers: dict[str, LayerInit] = field(default_factory=dict)
    initial_adapter: dict = field(default_factory=dict, repr=False)  # {layer: (lora_A0, lora_B0)}, residual methods
    options: dict = field(default_factory=dict)  # the method options and pass settings it was called with
    ranks: dict[str, int] = field(default_factory=dict)  # per-layer ranks when a rank budget was allocated
    split_ranks: int = 1  # torch.distributed ranks that shared the per-layer work (1: this process did all)

    def to_dict(self) -> dict:
        """A JSON-ready summary: method, options, timings, token counts, and per layer the
        selected directions and every candidate's score (FILet's Fisher energies), so that an
        adapter can say how it was made (``save``) and be plotted (``fisher-kernels plot``)."""
        def plain(value):
            if isinstance(value, torch.Tensor):
                return value.detach().cpu().tolist()
            if isinstance(value, dict):
                return {str(k): plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)

        return {
            "package": "fisher_kernels", "version": __version__, "method": self.method, "r": self.r,
            "scale": self.scale, "options": plain(self.options), "timings": plain(self.timings),
            "num_batches": self.num_batches, "residual_base": self.residual_base, "memory_plan": self.memory_plan,
            "stats_bytes": self.stats_bytes,
            "layers": {name: {"num_tokens": self.num_tokens.get(name),
                              "rank": None if init.lora_A is None else int(init.lora_A.shape[0]),
                              "selected": plain(init.selected), "scores": plain(init.scores)}
                       for name, init in self.layers.items()},
        }

    def save(self, path) -> None:
        """Write :meth:`to_dict` as JSON (e.g. beside a saved adapter), whole or not at all."""
        import json

        write_text_atomically(path, json.dumps(self.to_dict(), indent=1))


def _check_rank(r, name: str = "r") -> int:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"{name} must be a positive integer, got {r!r}")
    return int(r)


# set while an existing PeftModel adapter is initialised: its base layers are the targets then
_EXISTING_ADAPTER = contextvars.ContextVar("fisher_kernels_existing_adapter", default=False)


def _check_model(model) -> str | None:
    """Checks ``model``; returns its sharding (``"fsdp2"``, ``"zero3"`` or ``None``, see :mod:`fisher_kernels.sharded`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sharding = sharding_of(model, inside_fsdp=_EXISTING_ADAPTER.get())
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return sharding
    if not _EXISTING_ADAPTER.get() and any(isinstance(m, LoraLayer) for m in model.modules()):
        raise TypeError("model holds LoRA layers but is not a PeftModel: pass the base model, or the PeftModel "
                        "itself to initialise one of its adapters")
    return sharding


def plan_layer_groups(layer_bytes: dict[str, int], max_stats_memory: int | None) -> list[list[str]]:
    """Consecutive groups of layers whose held bytes (``{name: bytes}``: statistics and bases from
    before the pass until the layer is initialised) fit in ``max_stats_memory`` (all layers in
    one group when no budget is given)."""
    if max_stats_memory is None:
        return [list(layer_bytes)]
    groups, current, used = [], [], 0
    for name, need in layer_bytes.items():
        if need > max_stats_memory:
            raise ValueError(f"layer {name!r} alone needs {need} bytes of statistics, more than "
                             f"max_stats_memory={max_stats_memory}")
        if current and used + need > max_stats_memory:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += need
    groups.append(current)
    return groups


def _initialized(init_method, weights, names, stats, prepared, statistics):
    """``(name, LayerInit)`` for ``names``, each checked finite; every layer's statistics and
    prepared basis are freed as soon as its result exists (shared input factors with their last user).
    ``weights``: a dict, or a sharded model's :class:`GatheredWeights` (gathered one layer at a time)."""
    subset = weights.restricted(names) if isinstance(weights, GatheredWeights) else {n: weights[n] for n in names}
    for name, init in init_method.initialize(subset, stats, prepared):
        for key, value in init.tensors().items():
            if not torch.isfinite(value).all():
                raise ValueError(f"layer {name!r}: the computed {key} is not finite")
        prepared.pop(name, None)
        if stats is not None and statistics is None:
            stats.layers.pop(name)
        yield name, init


def _initialized_dict(*args) -> dict:
    return dict(_initialized(*args))


def _initialized_share(init_method, stats, prepared, statistics, weights: dict) -> dict:
    """One rank's share of a round (:func:`compute_in_rounds`): the layers of ``weights``."""
    return _initialized_dict(init_method, weights, list(weights), stats, prepared, statistics)


def _prepared_share(init_method, weights: dict) -> dict:
    return {n: init_method.prepare(n, W) for n, W in weights.items()}


def _solve_units(names: list[str], stats) -> list[list[str]]:
    """Layers that are initialised together: those sharing one input factor (LoRA-DA solves them
    with one factorisation), else each layer alone; in model order."""
    units: dict[str, list[str]] = {}
    for name in names:
        layer = None if stats is None else stats.layers.get(name)
        key = (layer.input_factor_shared_with if layer is not None else None) or name
        units.setdefault(key, []).append(name)
    return list(units.values())


def _check_statistics(model, statistics: KFACStatistics, requests, init_method) -> None:
    names = list(requests)
    missing_layers = [n for n in names if n not in statistics.layers]
    if missing_layers:
        raise ValueError(f"the statistics hold no entry for layers {missing_layers[:5]}")
    if statistics.fingerprint is not None and statistics.fingerprint != model_fingerprint(model, list(statistics.layers)):
        raise ValueError("the statistics were collected on a different model (other architecture, weights or layer set)")
    if (any(req is not None and req.needs_output_gradient for req in requests.values())
            and statistics.loss_weighting != init_method.loss_weighting):
        raise ValueError(f"the statistics were collected with loss_weighting={statistics.loss_weighting!r}, but method "
                         f"{init_method.name!r} needs gradients of the loss weighted {init_method.loss_weighting!r}; "
                         f"collect them with collect_statistics(..., loss_weighting={init_method.loss_weighting!r})")
    for name, request in requests.items():
        if request is None:
            continue
        lacking = init_method.missing_statistics(request, statistics[name])
        if lacking:
            raise ValueError(f"method {init_method.name!r} needs {lacking} for layer {name!r}, which the given "
                             "statistics do not hold; collect them with full_statistics_requests(...)")


def _resolve_budget(model, names, init_method, max_stats_memory, loader, micro_batch_size) -> tuple[int | None, str]:
    """``max_stats_memory`` in bytes (``"auto"``: planned from free memory) and a sentence saying why."""
    if max_stats_memory is None:
        return None, "one calibration pass: no max_stats_memory given"
    if max_stats_memory != "auto":
        if isinstance(max_stats_memory, bool) or not isinstance(max_stats_memory, numbers.Integral) or max_stats_memory < 1:
            raise ValueError(f"max_stats_memory must be a positive number of bytes or 'auto', got {max_stats_memory!r}")
        return int(max_stats_memory), f"max_stats_memory={int(max_stats_memory)} bytes, as given"
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    free, source = memory.available_memory(device)  # read here, so that a test can stand in for it
    batch_size, seq_len = _batch_shape(loader)
    if micro_batch_size is not None:
        batch_size = min(batch_size, micro_batch_size)
    estimate = memory.estimate_memory(model, method=init_method, r=init_method.r, batch_size=batch_size,
                               seq_len=seq_len, target_modules=names, model_resident=True)
    others = estimate.stages["activations"] + estimate.stages["temporaries"]
    budget = int(AUTO_MARGIN * free) - others
    if budget <= 0:
        raise MemoryError(f"max_stats_memory='auto': {source} reports {free / 2**30:.2f} GiB free, but the calibration "
                          f"pass alone is estimated at {others / 2**30:.2f} GiB (activations and temporaries); use "
                          "smaller calibration batches")
    return budget, (f"max_stats_memory='auto': {budget / 2**30:.2f} GiB = {AUTO_MARGIN:.0%} of the "
                    f"{free / 2**30:.2f} GiB free ({source}) minus {others / 2**30:.2f} GiB estimated for the "
                    "pass's activations and per-layer temporaries")


AUTO_MARGIN = 0.8  # share of the free memory max_stats_memory="auto" plans with


def compute_initialization(
    model: nn.Module,
    loader=None,
    *,
    method: str = "filet",
    r: int = 16,
    scale: float = 1.0,
    target_modules=None,
    num_batches: int | None = None,
    loss_fn=None,
    token_mask: str = "attention",
    fisher: str = "empirical",
    backend: str = "auto",
    progress: bool = True,
    seed: int = 0,
    statistics: KFACStatistics | None = None,
    max_stats_memory: int | str | None = None,
    micro_batch_size: int | None = None,
    distributed: bool | None = None,
    **method_options,
) -> InitReport:
    """Compute every target layer's ``LayerInit`` without touching the model.

    Same arguments as :func:`init_lora` (``scale`` is PEFT's ``lora_alpha / r``). The
    returned report's ``layers`` maps layer names to ``LayerInit(lora_A, lora_B, base_update)``.
    ``statistics`` reuses a :class:`KFACStatistics` from an earlier pass (or a cache file)
    instead of a new one. ``max_stats_memory`` (bytes, or ``"auto"``) splits the target layers
    into groups whose statistics and bases fit, one calibration pass per group; results are
    identical to one pass. Under ``torch.distributed`` the statistics are summed over the ranks
    and the per-layer work is split across them (see :mod:`fisher_kernels.split_work`);
    ``distributed=False`` keeps everything in this process (``None``: whether a process group is
    initialised).

    Memory: the work is streamed. Each group of layers is decomposed one layer at a time (only
    what the method needs through the pass is kept, e.g. FILet's smaller singular basis in the
    weight's dtype), the pass accumulates exactly the requested statistics, and each layer's
    statistics are freed as soon as its initialisation is computed. No copy of the weights is
    made beyond one layer's temporaries.
    """
    sharding = _check_model(model)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale (lora_alpha / r) must be a positive number, got {scale!r}")
    method, method_options = method_and_options(method, method_options)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    r = _check_rank(r)
    names = resolve_target_modules(model, target_modules)
    check_rank_fits(model, names, r)
    for name in names:
        weight = model.get_submodule(name).weight
        if weight.device.type == "meta":
            raise ValueError(f"layer {name!r} has its weight on the meta device: load the weights first "
                             "(fisher_kernels.estimate_memory works on meta models)")
    unknown = sorted(set(method_options) - set(METHODS[method].option_names()))
    if unknown:
        raise TypeError(f"method {method!r} got unexpected options {unknown}; it accepts "
                        f"{METHODS[method].option_names() or 'none'}")
    init_method = METHODS[method](r, scale, **method_options)
    report = InitReport(method=method, r=r, scale=scale, target_modules=names, residual_base=init_method.residual_base,
                        options=dict(method_options, token_mask=token_mask, fisher=fisher, seed=seed,
                                     num_batches=num_batches, micro_batch_size=micro_batch_size))
    # views, no copies (a sharded model's are its shards, gathered one layer at a time where needed)
    weights = {name: weight_matrix(model.get_submodule(name)).detach() for name in names}
    for name, bad in count_nonfinite(model, names).items():
        if bad:
            raise ValueError(f"layer {name!r}: its weight holds {bad} NaN or Inf entries; the model's weights are "
                             "corrupted (nothing was changed)")
    start = time.perf_counter()
    for key in ("decomposition", "statistics", "initialization"):
        report.timings[key] = 0.0

    if statistics is not None:  # the statistics say how they were collected; a call asking otherwise is refused
        for name, asked, default, collected in (("token_mask", token_mask, "attention", statistics.token_mask),
                                                ("fisher", fisher, "empirical", statistics.fisher)):
            if asked != default and asked != collected:
                raise ValueError(f"{name}={asked!r}, but the given statistics were collected with {name}="
                                 f"{collected!r}: collect them again with {name}={asked!r}, or leave {name} out")
        report.options.update(token_mask=statistics.token_mask, fisher=statistics.fisher)
    needs_data = init_method.needs_data
    if needs_data and statistics is None and loader is None:
        raise ValueError(f"method {method!r} needs calibration data: pass a loader")
    loader = as_batches(loader, model)  # a list / Dataset of unbatched examples: padded batches
    passes: list[str | None] = []  # data fingerprint of each calibration pass
    if not needs_data or statistics is not None:
        groups = [names]
        report.memory_plan = "no calibration pass" if not needs_data else "statistics given: no calibration pass"
    else:
        budget, report.memory_plan = _resolve_budget(model, names, init_method, max_stats_memory, loader,
                                                     micro_batch_size)
        layer_bytes = {n: init_method.held_bytes(*layer_dims(model.get_submodule(n)), weights[n].dtype) for n in names}
        groups = plan_layer_groups(layer_bytes, budget)
        if len(groups) > 1 and iter(loader) is loader:
            raise ValueError(f"max_stats_memory={max_stats_memory} needs {len(groups)} passes over the data, "
                             "so the loader must be re-iterable (a DataLoader or a list, not a generator)")
        report.memory_plan += f"; {len(groups)} calibration pass{'es' if len(groups) > 1 else ''}"

    if progress:  # what is about to happen, before the first stage
        count = num_batches if num_batches is not None else (len(loader) if hasattr(loader, "__len__") else None)
        data = (f"{count} calibration batch{'es' if count != 1 else ''}" if count is not None else "calibration data"
                ) if needs_data and statistics is None else "no calibration pass"
        tqdm.write(f"fisher_kernels: {method}, r {r}, {len(names)} layers; {data}; {report.memory_plan}",
                   file=sys.stderr)
    if sharding and distributed is False:
        raise ValueError(f"the model is sharded ({sharding}): every rank holds a part of each weight, so every rank "
                         "must take part; distributed=False is not possible")
    rank, world = rank_and_world() if distributed is not False else (0, 1)
    split = world > 1 and init_method.splittable  # each rank computes its share of the layers
    report.split_ranks = world if split else 1
    gathered = GatheredWeights(model, names) if sharding else None
    device = weights[names[0]].device
    for group in groups:
        t = time.perf_counter()
        if sharding and not init_method.prepares:
            prepared = {n: None for n in group}
        elif sharding and split:
            prepared = compute_in_rounds([[n] for n in group], gathered.__getitem__,
                                         functools.partial(_prepared_share, init_method), device)
        elif sharding:
            prepared = {n: init_method.prepare(n, gathered[n]) for n in group}
        elif split:
            owner = deal([[n] for n in group], world)
            mine = compute_share(lambda: {n: init_method.prepare(n, weights[n]) for n in group if owner[n] == rank},
                                 owner, rank)
            prepared = broadcast_results(mine, owner, group, device)
        else:
            prepared = {n: init_method.prepare(n, weights[n])
                        for n in _stage(group, "decomposition", progress and init_method.prepares)}
        report.prepared_bytes = max(report.prepared_bytes, sum(_nbytes(p) for p in prepared.values()))
        report.timings["decomposition"] += time.perf_counter() - t
        stats = None
        if needs_data:
            requests = {n: init_method.statistics_request(n, weights[n], prepared[n]) for n in group}
            t = time.perf_counter()
            if statistics is not None:
                _check_statistics(model, statistics, requests, init_method)
                stats = statistics
            else:
                stats = collect_statistics(
                    model, loader, requests, loss_fn=loss_fn, token_mask=token_mask, fisher=fisher,
                    num_batches=num_batches, backend=backend, progress=progress, seed=seed,
                    loss_weighting=init_method.loss_weighting, micro_batch_size=micro_batch_size,
                    distributed=distributed, fingerprint=False)  # used here and dropped: nothing to check later
            report.timings["statistics"] += time.perf_counter() - t
            if statistics is None:
                passes.append(stats.data_fingerprint)
                if passes[-1] != passes[0]:
                    raise ValueError(
                        f"the loader gave other batches in calibration pass {len(passes)} than in pass 1 (a shuffled "
                        "DataLoader, or a sampler with a new seed per epoch?): max_stats_memory splits the layers into "
                        "passes that must all see the same data; use shuffle=False or a list of batches")
            report.stats_bytes_per_group.append(stats.nbytes() if statistics is None else
                                                sum(_nbytes(stats[n]) for n in group))
            report.num_batches = stats.num_batches
            report.num_tokens.update({n: stats[n].num_tokens for n in group})
        t = time.perf_counter()
        with torch.no_grad():
            if sharding and split:
                report.layers.update(compute_in_rounds(
                    _solve_units(group, stats), gathered.__getitem__,
                    functools.partial(_initialized_share, init_method, stats, prepared, statistics), device))
            elif sharding:
                report.layers.update(_initialized(init_method, gathered, group, stats, prepared, statistics))
            elif split:
                owner = deal(_solve_units(group, stats), world)
                share = [n for n in group if owner[n] == rank]
                mine = compute_share(functools.partial(_initialized_dict, init_method, weights, share, stats, prepared,
                                                       statistics), owner, rank)
                report.layers.update(broadcast_results(mine, owner, group, device))
            else:
                report.layers.update(_stage(_initialized(init_method, weights, group, stats, prepared, statistics),
                                            "initialisation", progress, total=len(group)))
        report.timings["initialization"] += time.perf_counter() - t
        del stats, prepared
    if split or sharding:  # no rank leaves while another still receives what it sent (gloo aborts then)
        import torch.distributed as dist

        dist.barrier()
    report.stats_bytes = max(report.stats_bytes_per_group, default=0)
    report.timings["total"] = time.perf_counter() - start
    return report


def _stage(items, name: str, progress: bool, total: int | None = None):
    """``items`` with a progress bar named after the stage, shown once the stage has taken a second."""
    return tqdm(items, desc=f"fisher_kernels: {name}", unit="layer", total=total, delay=1.0, disable=not progress)


def _nbytes(value) -> int:
    """Bytes of the tensors in a method's prepared data or a LayerStatistics (0 for None)."""
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if hasattr(value, "nbytes") and callable(value.nbytes):
        return value.nbytes()
    if hasattr(value, "tensors"):
        return sum(_nbytes(t) for t in value.tensors().values())
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def _batch_shape(loader) -> tuple[int, int]:
    """``(batch size, sequence length)`` of the loader's first batch, for memory planning
    (peeks only at re-iterable loaders; a generator gives (1, 1))."""
    if iter(loader) is loader:
        return 1, 1
    batch = next(iter(loader), None)
    tensor = first_tensor(batch)
    if tensor is None or tensor.dim() == 0:
        return 1, 1
    return int(tensor.shape[0]), int(tensor.shape[1]) if tensor.dim() > 1 else 1


def init_lora(
    model: nn.Module,
    loader=None,
    *,
    method: str = "filet",
    r: int | None = None,
    lora_alpha: float | None = None,
    target_modules=None,
    lora_config=None,
    num_batches: int | None = None,
    loss_fn=None,
    backend: str = "auto",
    progress: bool = True,
    token_mask: str = "attention",
    fisher: str = "empirical",
    seed: int = 0,
    statistics: KFACStatistics | None = None,
    max_stats_memory: int | str | None = None,
    micro_batch_size: int | None = None,
    distributed: bool | None = None,
    adapter_name: str = "default",
    rank_budget: int | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    **method_options,
):
    """Initialise LoRA adapters from calibration data and return a ready-to-train ``PeftModel``.

    Args:
        model: a ``transformers`` model or any ``nn.Module``. It is wrapped in place, as
            ``peft.get_peft_model`` does; if anything fails, it is left as it was. It may be
            sharded with FSDP2 (``fully_shard``), or be a ``PeftModel`` partitioned by DeepSpeed
            ZeRO-3 (``engine.module``): every rank then calls ``init_lora`` with its own shard of
            the data (see :mod:`fisher_kernels.sharded`).
        loader: iterable of calibration batches: dicts of tensors with ``labels`` (as
            ``transformers`` models take them), or ``(inputs, targets)`` pairs with ``loss_fn``.
            Not needed by the weight-only methods (``gaussian``, ``pissa``, ``milora``).
        method: ``"filet"`` (default), ``"lora_da"``, ``"lora_ga"``, ``"pissa"``, ``"milora"``,
            ``"kasa"`` or ``"gaussian"``.
        r: LoRA rank (default 16, or ``lora_config.r``).
        lora_alpha: LoRA alpha (default ``r``, so the scale ``s = lora_alpha / r`` is 1).
        target_modules: PEFT-style selector; default every ``nn.Linear`` / ``Conv1D`` except
            the output embedding and task heads.
        lora_config: a ``peft.LoraConfig`` to start from (dropout, rsLoRA, bias, ...); its
            ``r``, ``lora_alpha`` and ``target_modules`` are used unless given here too, in
            which case they must agree.
        num_batches: use at most this many batches.
        loss_fn: ``(outputs, targets) -> summed loss`` (``reduction="sum"``), for models
            without a Hugging Face loss or ``(inputs, targets)`` loaders.
        backend: statistics kernels, ``"auto" | "cuda" | "triton" | "torch"``.
        progress: show a tqdm bar over calibration batches.
        token_mask: ``"attention"`` or ``"labels"`` (only positions that enter the loss).
        fisher: ``"empirical"`` or ``"true"`` (labels sampled from the model, seeded by ``seed``).
        statistics: reuse statistics from :func:`collect_statistics` or
            :meth:`KFACStatistics.load` instead of a new pass (checked against the model).
        max_stats_memory: bytes of statistics (and FILet's bases) to hold at once; layers are
            then processed in groups, one calibration pass each (the loader must be re-iterable).
            ``"auto"`` plans the groups from the free memory of the model's device
            (``torch.cuda.mem_get_info`` or the system's available RAM) with a margin, after
            :func:`estimate_memory`'s figure for the pass's activations; ``report.memory_plan``
            says how many passes it planned and why.
        micro_batch_size: split each calibration batch into forward+backward passes of at most
            this many sequences: identical statistics, activations of one micro-batch at a time
            (the calibration pass is usually the largest memory cost after the model).
        distributed: ``None`` (default): under ``torch.distributed``, statistics summed over the
            ranks and the per-layer work split across them; ``False``: this process alone (not
            for a sharded model).
        adapter_name: when ``model`` is already a ``PeftModel`` (e.g. made by TRL from a
            ``peft_config``), the LoRA adapter of that name is initialised in place: its ``r``,
            ``lora_alpha``, rsLoRA and targets come from its config (``target_modules`` and
            ``lora_config`` must not be given); its ``lora_A``/``lora_B`` parameters are
            overwritten in place, so an optimizer that holds them stays valid; the statistics
            are those of the model with every adapter switched off; other adapters' parameters
            are not touched (a residual method changes the base weights they share: warned).
        rank_budget: FILet only: the total rank over all target layers (e.g. ``r ×`` the number of
            layers keeps the adapter's size), spread across layers by Fisher energy (the globally
            largest candidate energies; see :mod:`fisher_kernels.rank_allocation`), each layer
            between ``min_rank`` (default 1) and ``max_rank`` (default 4 × the mean rank). The
            per-layer ranks go into the config's ``rank_pattern`` (and ``alpha_pattern``, keeping
            every layer's scale), so the saved adapter reloads in plain PEFT; ``r`` (default: the
            budget over the number of layers) and ``lora_alpha`` set the scale.
        **method_options: passed to the method, e.g. ``energy="component"``, ``route="full"``,
            ``candidates=64`` for FILet; ``variance_strength``, ``population_size``,
            ``stable_gamma``, ``damping``, ``solver`` for LoRA-DA.

    Returns:
        ``peft.PeftModel`` whose outputs at step 0 equal the original model's (except for
        floating-point rounding of the residual base weight in bf16/fp16; KaSA changes it by
        design, and LoRA-DA's reference keeps ``W`` so its step-0 model is ``W + s·B₀A₀``).
        Memory: no copy of the weights is held; each layer's base weight is updated in place
        (through an fp32 temporary of that one layer when the model is not fp32), last, after
        everything else succeeded. If that last stage is interrupted, the layers already
        updated are restored as ``W' + P Q`` (exact up to one rounding in the weight's dtype). ``filet``, ``lora_da``, ``lora_ga``, ``pissa`` and ``milora`` store
        ``W' = W − s·B A`` in the base layers, ``kasa`` its truncation of W; save with
        :func:`fisher_kernels.save_residual_model`, or, after training, convert to a plain LoRA
        adapter for the original model with :func:`fisher_kernels.save_as_plain_lora` (not KaSA).
        The report of what was done is at ``peft_model.fisher_kernels_report``.
    """
    from peft import LoraConfig, PeftModel

    method, method_options = method_and_options(method, method_options)
    if isinstance(model, PeftModel):
        if target_modules is not None or lora_config is not None:
            raise ValueError("model is a PeftModel: its adapter's config says what to initialise, so target_modules "
                             "and lora_config must not be given")
        if rank_budget is not None:
            raise ValueError("rank_budget spreads ranks over the layers of an adapter init_lora creates; an existing "
                             "adapter's ranks are fixed by its config: pass the base model instead")
        return _init_existing_adapter(
            model, loader, adapter_name, method, r, lora_alpha, progress,
            dict(num_batches=num_batches, loss_fn=loss_fn, token_mask=token_mask, fisher=fisher, backend=backend,
                 progress=progress, seed=seed, statistics=statistics, max_stats_memory=max_stats_memory,
                 micro_batch_size=micro_batch_size, distributed=distributed, **method_options))
    if adapter_name != "default":
        raise ValueError(f"adapter_name={adapter_name!r} names an adapter of an existing PeftModel; a base model gets "
                         "PEFT's 'default' adapter (wrap it with peft.get_peft_model(model, config, adapter_name=...) "
                         "first to initialise an adapter of another name)")
    if lora_config is not None and not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    if lora_config is not None:
        for arg, value, config_value in (("r", r, lora_config.r), ("lora_alpha", lora_alpha, lora_config.lora_alpha)):
            if value is not None and value != config_value:
                raise ValueError(f"{arg}={value} disagrees with lora_config.{arg}={config_value}")
        r = lora_config.r
        lora_alpha = lora_config.lora_alpha
        if target_modules is None:
            target_modules = lora_config.target_modules
    if _check_model(model) == "zero3":
        name = next(n for n, p in model.named_parameters() if is_partitioned(p))
        raise TypeError(f"parameter {name!r} is partitioned by DeepSpeed ZeRO-3, whose engine's optimizer was fixed "
                        "at deepspeed.initialize: adapters added now would never train. Create the PeftModel first "
                        "(get_peft_model(model, LoraConfig(...)) before deepspeed.initialize, as accelerate and TRL "
                        "do) and pass it (engine.module): init_lora initialises its adapter in place")
    if rank_budget is not None:
        if method != "filet":
            raise ValueError(f"rank_budget needs scores of single directions that compare across layers (FILet's "
                             f"Fisher energies); method {method!r} computes one subspace per layer from statistics "
                             "that give no such score: use method='filet'")
        rank_budget = _check_rank(rank_budget, "rank_budget")
        min_rank = _check_rank(min_rank, "min_rank")
        max_rank = None if max_rank is None else _check_rank(max_rank, "max_rank")
    elif min_rank != 1 or max_rank is not None:
        raise ValueError("min_rank and max_rank bound the per-layer ranks of a rank_budget: pass rank_budget too "
                         "(without it every layer gets r)")
        if r is None:
            r = max(1, round(rank_budget / len(resolve_target_modules(model, target_modules))))
    r = 16 if r is None else r
    _check_rank(r)
    lora_alpha = r if lora_alpha is None else lora_alpha
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    if not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}")
    use_rslora = bool(getattr(lora_config, "use_rslora", False))
    scale = lora_scale(lora_alpha, r, use_rslora)

    with warnings.catch_warnings():
        if getattr(lora_config, "target_parameters", None):  # the config's own warning says what they get
            warnings.filterwarnings("ignore", message=r".*mixture-of-experts weights are fused 3-D parameters")
        names = resolve_target_modules(model, target_modules)
    conv1d = [n for n in names if not isinstance(model.get_submodule(n), nn.Linear)]
    if conv1d and len(conv1d) != len(names):
        raise TypeError("target_modules mixes nn.Linear and Conv1D layers, which one PEFT config cannot express; "
                        f"target them in two calls (Conv1D: {conv1d[:3]}...)")
    # checked before the pass: a config PEFT would refuse must not cost a calibration pass
    config = make_lora_config(names, r, lora_alpha, lora_config, fan_in_fan_out=bool(conv1d), kasa=method == "kasa",
                              heads=trainable_heads(model), method=method)
    names = config.target_modules
    computed_rank = r
    if rank_budget is not None:  # FILet's factors for the most directions any layer may get, then cut
        max_rank = 4 * -(-rank_budget // len(names)) if max_rank is None else max_rank
        # each layer's cap is min(max_rank, its own min(d)), not the smallest layer's
        computed_rank = max(min(max_rank, *layer_dims(model.get_submodule(n))) for n in names)
    token = RANK_IS_A_CAP.set(rank_budget is not None)
    try:
        report = compute_initialization(
            model, loader, method=method, r=computed_rank, scale=scale, target_modules=names, num_batches=num_batches,
            loss_fn=loss_fn, token_mask=token_mask, fisher=fisher, backend=backend, progress=progress, seed=seed,
            statistics=statistics, max_stats_memory=max_stats_memory, micro_batch_size=micro_batch_size,
            distributed=distributed, **method_options,
        )
    finally:
        RANK_IS_A_CAP.reset(token)
    if rank_budget is not None:
        report.ranks = allocate_ranks({n: init.scores for n, init in report.layers.items()}, rank_budget,
                                      min_rank, max_rank)
        report.layers = {n: truncated(init, report.ranks[n], scale) for n, init in report.layers.items()}
        report.r = r
        config.rank_pattern, config.alpha_pattern = rank_patterns(report.ranks, scale, use_rslora)
    return _wire(model, report, config, scale, progress)


def _init_existing_adapter(peft_model, loader, adapter_name, method, r, lora_alpha, progress, options):
    """:func:`init_lora` for one adapter of an existing ``PeftModel`` (see ``fisher_kernels.existing_adapter``)."""
    config = check_adapter_config(peft_model, adapter_name, method, r, lora_alpha)
    layers = lora_layers_of(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA layer in the model")
    scale = lora_scale(config.lora_alpha, config.r, config.use_rslora)
    base = peft_model.get_base_model()
    token = _EXISTING_ADAPTER.set(True)
    called = CALLED_MODULE.set(peft_model if sharding_of(peft_model) else None)  # FSDP's root runs forward
    try:
        with peft_model.disable_adapter():
            report = compute_initialization(base, loader, method=method, r=config.r, scale=scale,
                                            target_modules=[name + ".base_layer" for name in layers], **options)
    finally:
        CALLED_MODULE.reset(called)
        _EXISTING_ADAPTER.reset(token)
    warn_about_shared_bases(layers, adapter_name, report.residual_base)
    t = time.perf_counter()
    previous, written = {}, []
    try:
        previous = write_adapter(peft_model, adapter_name, layers, report.layers, scale)
        if report.residual_base:
            report.initial_adapter = snapshot_adapter(peft_model, adapter_name)  # for save_as_plain_lora
        written = apply_base_updates(base, report.layers, progress=progress)
        report.timings["peft"] = time.perf_counter() - t
        report.timings["total"] += report.timings["peft"]
        _attach_report(peft_model, report, adapter_name)
    except BaseException:
        revert_base_updates(base, written)
        restore_adapter(layers, adapter_name, previous)
        report.initial_adapter = None
        raise
    return peft_model


def _wire(model: nn.Module, report: InitReport, config, scale: float, progress: bool):
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
        written = apply_base_updates(model, report.layers, progress=progress)
        if sharded:  # the new adapters are plain parameters, outside FSDP: their gradients averaged as FSDP's
            mesh = next(p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh"))
            hooks = average_gradients_over_ranks([p for p in model.parameters() if p.requires_grad and not is_sharded(p)],
                                                 group=mesh.get_group())
            peft_model.fisher_kernels_gradient_hooks = hooks
        report.timings["peft"] = time.perf_counter() - t
        report.timings["total"] += report.timings["peft"]
        _attach_report(peft_model, report, "default")
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


def _attach_report(peft_model, report: InitReport, adapter_name: str) -> None:
    """The report on the model, and the adapter marked as initialised (``fisher_kernels_initialized``:
    adapter name -> method), so that a second initialisation of it is refused."""
    peft_model.fisher_kernels_report = report
    marks = dict(getattr(peft_model, "fisher_kernels_initialized", {}))
    marks[adapter_name] = report.method
    peft_model.fisher_kernels_initialized = marks
