"""``init_lora``: calibration pass, direction selection and PEFT wiring in one call."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .conversion import snapshot_adapter
from .layers import layer_dims, resolve_target_modules, weight_matrix
from .methods import METHODS, LayerInit, lora_scale
from .peft_wiring import make_lora_config, wrap_with_lora
from .statistics import KFACStatistics, StatisticsRequest, collect_statistics, model_fingerprint


@dataclass
class InitReport:
    """What an initialisation did and how long each stage took (seconds).

    ``layers`` maps layer names to their ``LayerInit``; after :func:`init_lora` it keeps the
    factors, selected directions and scores, while the new base weights live in the model only.
    """

    method: str
    r: int
    scale: float
    target_modules: list[str]
    timings: dict[str, float] = field(default_factory=dict)  # decomposition, statistics, initialization, peft, total
    stats_bytes: int = 0                   # most statistics bytes held at once
    stats_bytes_per_group: list[int] = field(default_factory=list)  # one entry per calibration pass
    num_batches: int = 0
    num_tokens: dict[str, int] = field(default_factory=dict)
    layers: dict[str, LayerInit] = field(default_factory=dict)
    original_weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # fp32 W before init
    initial_adapter: dict = field(default_factory=dict, repr=False)  # {layer: (lora_A0, lora_B0)}, residual methods


def _check_rank(r) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise TypeError("model already holds LoRA layers; pass the base model, not a PeftModel")


def plan_layer_groups(model: nn.Module, requests: dict[str, StatisticsRequest],
                      max_stats_memory: int | None) -> list[list[str]]:
    """Consecutive groups of layers whose requested statistics fit in ``max_stats_memory`` bytes
    (all layers in one group when no budget is given)."""
    if max_stats_memory is None:
        return [list(requests)]
    groups, current, used = [], [], 0
    for name, request in requests.items():
        need = request.nbytes(*layer_dims(model.get_submodule(name)))
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


def _check_statistics(model, statistics: KFACStatistics, requests, init_method) -> None:
    names = list(requests)
    missing_layers = [n for n in names if n not in statistics.layers]
    if missing_layers:
        raise ValueError(f"the statistics hold no entry for layers {missing_layers[:5]}")
    if statistics.fingerprint is not None and statistics.fingerprint != model_fingerprint(model, list(statistics.layers)):
        raise ValueError("the statistics were collected on a different model (other architecture, weights or layer set)")
    for name, request in requests.items():
        lacking = init_method.missing_statistics(request, statistics[name])
        if lacking:
            raise ValueError(f"method {init_method.name!r} needs {lacking} for layer {name!r}, which the given "
                             "statistics do not hold; collect them with full_statistics_requests(...)")


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
    max_stats_memory: int | None = None,
    **method_options,
) -> InitReport:
    """Compute every target layer's ``LayerInit`` without touching the model.

    Same arguments as :func:`init_lora` (``scale`` is PEFT's ``lora_alpha / r``). The
    returned report's ``layers`` maps layer names to ``LayerInit(lora_A, lora_B, base_weight)``.
    ``statistics`` reuses a :class:`KFACStatistics` from an earlier pass (or a cache file)
    instead of a new one. ``max_stats_memory`` (bytes) splits the target layers into groups
    whose statistics fit, one calibration pass per group; results are identical to one pass.
    """
    _check_model(model)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    _check_rank(r)
    names = resolve_target_modules(model, target_modules)
    for name in names:
        d_out, d_in = layer_dims(model.get_submodule(name))
        if r > min(d_out, d_in):
            raise ValueError(f"r={r} is larger than min(d_out, d_in) = {min(d_out, d_in)} of layer {name!r} "
                             f"({d_out}×{d_in})")
    unknown = sorted(set(method_options) - set(METHODS[method].option_names()))
    if unknown:
        raise TypeError(f"method {method!r} got unexpected options {unknown}; it accepts "
                        f"{METHODS[method].option_names() or 'none'}")
    init_method = METHODS[method](r, scale, **method_options)
    report = InitReport(method=method, r=r, scale=scale, target_modules=names)
    start = time.perf_counter()

    weights = {name: weight_matrix(model.get_submodule(name)).detach().float().clone() for name in names}
    prepared = init_method.prepare(weights)
    report.timings["decomposition"] = time.perf_counter() - start

    requests = init_method.statistics_requests(weights, prepared)
    report.timings["statistics"] = report.timings["initialization"] = 0.0
    if not requests:
        t = time.perf_counter()
        with torch.no_grad():
            inits = init_method.initialize(weights, None, prepared)
        report.timings["initialization"] = time.perf_counter() - t
    else:
        if statistics is not None:
            _check_statistics(model, statistics, requests, init_method)
            groups = [list(requests)]
        else:
            if loader is None:
                raise ValueError(f"method {method!r} needs calibration data: pass a loader")
            groups = plan_layer_groups(model, requests, max_stats_memory)
            if len(groups) > 1 and iter(loader) is loader:
                raise ValueError(f"max_stats_memory={max_stats_memory} needs {len(groups)} passes over the data, "
                                 "so the loader must be re-iterable (a DataLoader or a list, not a generator)")
        inits = {}
        for group in groups:
            t = time.perf_counter()
            stats = statistics if statistics is not None else collect_statistics(
                model, loader, {n: requests[n] for n in group}, loss_fn=loss_fn, token_mask=token_mask,
                fisher=fisher, num_batches=num_batches, backend=backend, progress=progress, seed=seed)
            report.timings["statistics"] += time.perf_counter() - t
            report.stats_bytes_per_group.append(stats.nbytes())
            report.num_batches = stats.num_batches
            report.num_tokens.update({n: stats[n].num_tokens for n in group})
            t = time.perf_counter()
            with torch.no_grad():
                inits.update(init_method.initialize({n: weights[n] for n in group}, stats, prepared))
            report.timings["initialization"] += time.perf_counter() - t
            del stats
        report.stats_bytes = max(report.stats_bytes_per_group)

    for name, init in inits.items():
        for key in ("lora_A", "lora_B", "base_weight"):
            value = getattr(init, key)
            if value is not None and not torch.isfinite(value).all():
                raise ValueError(f"layer {name!r}: the computed {key} is not finite")
    report.timings["total"] = time.perf_counter() - start
    report.layers = inits
    report.original_weights = weights
    return report


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
    max_stats_memory: int | None = None,
    **method_options,
):
    """Initialise LoRA adapters from calibration data and return a ready-to-train ``PeftModel``.

    Args:
        model: a ``transformers`` model or any ``nn.Module``. It is wrapped in place, as
            ``peft.get_peft_model`` does; if anything fails before wrapping, it is left untouched.
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
        max_stats_memory: bytes of statistics to hold at once; layers are then processed in
            groups, one calibration pass each (the loader must be re-iterable).
        **method_options: passed to the method, e.g. ``energy="component"``, ``route="full"``,
            ``candidates=64`` for FILet; ``variance_strength``, ``population_size``,
            ``stable_gamma``, ``damping``, ``solver`` for LoRA-DA.

    Returns:
        ``peft.PeftModel`` whose outputs at step 0 equal the original model's (except for
        floating-point rounding of the residual base weight in bf16/fp16; KaSA changes it by
        design). ``filet``, ``lora_da``, ``lora_ga``, ``pissa`` and ``milora`` store
        ``W' = W − s·B A`` in the base layers, ``kasa`` its truncation of W; save with
        :func:`fisher_kernels.save_residual_model`, or, after training, convert to a plain LoRA
        adapter for the original model with :func:`fisher_kernels.save_as_plain_lora` (not KaSA).
        The report of what was done is at ``peft_model.fisher_kernels_report``.
    """
    from peft import LoraConfig

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
    r = 16 if r is None else r
    _check_rank(r)
    lora_alpha = r if lora_alpha is None else lora_alpha
    if not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}")
    use_rslora = bool(getattr(lora_config, "use_rslora", False))
    scale = lora_scale(lora_alpha, r, use_rslora)

    _check_model(model)
    names = resolve_target_modules(model, target_modules)
    conv1d = [n for n in names if not isinstance(model.get_submodule(n), nn.Linear)]
    if conv1d and len(conv1d) != len(names):
        raise TypeError("target_modules mixes nn.Linear and Conv1D layers, which one PEFT config cannot express; "
                        f"target them in two calls (Conv1D: {conv1d[:3]}...)")
    report = compute_initialization(
        model, loader, method=method, r=r, scale=scale, target_modules=names, num_batches=num_batches,
        loss_fn=loss_fn, token_mask=token_mask, fisher=fisher, backend=backend, progress=progress, seed=seed,
        statistics=statistics, max_stats_memory=max_stats_memory, **method_options,
    )
    config = make_lora_config(report.target_modules, r, lora_alpha, lora_config, fan_in_fan_out=bool(conv1d))
    t = time.perf_counter()
    peft_model = wrap_with_lora(model, report.layers, config, scale, report.original_weights)
    report.original_weights = {}  # only needed to undo a failed wiring
    for init in report.layers.values():  # the residual base weights now live in the model: free the copies
        init.base_weight = None
    if METHODS[method].residual_base:
        report.initial_adapter = snapshot_adapter(peft_model)  # for save_as_plain_lora
    report.timings["peft"] = time.perf_counter() - t
    report.timings["total"] += report.timings["peft"]
    peft_model.fisher_kernels_report = report
    return peft_model
