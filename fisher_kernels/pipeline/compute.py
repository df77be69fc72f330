"""Stages 2–4 per group of layers: ``prepare`` (each weight → what the pass needs), ``collect`` (one
calibration pass), ``solve`` (statistics → ``LayerInit``); and :func:`compute_initialization`,
which runs ``plan`` and then these, touching nothing in the model."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..settings import Calibration, Resources, grouped
from ..statistics import KFACStatistics, model_fingerprint
from ..statistics.collector import run_calibration_pass
from .executor import executor_for
from .plan import Plan, make_plan
from .report import InitReport


def compute_initialization(
    model: nn.Module,
    loader=None,
    *,
    method="filet",
    r: int = 16,
    scale: float = 1.0,
    target_modules=None,
    statistics: KFACStatistics | None = None,
    calibration: Calibration | None = None,
    resources: Resources | None = None,
    base_weights=None,
    **options,
) -> InitReport:
    """Compute every target layer's ``LayerInit`` without touching the model.

    Same arguments as :func:`fisher_kernels.init_lora` (``scale`` is PEFT's ``lora_alpha / r``;
    ``options``: the method's options, and any field of :class:`~fisher_kernels.Calibration` or
    :class:`~fisher_kernels.Resources` as a keyword). The returned report's ``layers`` maps layer
    names to ``LayerInit(lora_A, lora_B, base_update)``. ``statistics`` reuses a
    :class:`KFACStatistics` from an earlier pass (or a cache file) instead of a new one.

    Memory: the work is streamed. Each group of layers is decomposed one layer at a time (only
    what the method needs through the pass is kept, e.g. FILet's smaller singular basis in the
    weight's dtype), the pass accumulates exactly the requested statistics, and each layer's
    statistics are freed as soon as its initialisation is computed. No copy of the weights is
    made beyond one layer's temporaries.
    """
    calibration, resources, method_options = grouped(options, calibration, resources)
    plan = make_plan(model, loader, method=method, r=r, scale=scale, target_modules=target_modules,
                     method_options=method_options, calibration=calibration, resources=resources,
                     statistics=statistics, base_weights=base_weights)
    return run_stages(plan)


def run_stages(plan: Plan) -> InitReport:
    """``prepare → collect → solve`` for each group of the plan; the report holds every layer's result."""
    report, executor = plan.report, executor_for(plan)
    start = time.perf_counter()
    for key in ("decomposition", "statistics", "initialization"):
        report.timings[key] = 0.0
    passes: list[str | None] = []  # data fingerprint of each calibration pass
    for group in plan.groups:
        t = time.perf_counter()
        prepared = executor.prepare(group)
        report.prepared_bytes = max(report.prepared_bytes, sum(nbytes(p) for p in prepared.values()))
        report.timings["decomposition"] += time.perf_counter() - t
        t = time.perf_counter()
        stats = collect(plan, group, prepared, passes)
        report.timings["statistics"] += time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            report.layers.update(executor.solve(group, stats, prepared))
        report.timings["initialization"] += time.perf_counter() - t
        del stats, prepared
    executor.finish()
    report.stats_bytes = max(report.stats_bytes_per_group, default=0)
    report.timings["total"] = time.perf_counter() - start
    return report


def collect(plan: Plan, group: list[str], prepared: dict, passes: list) -> KFACStatistics | None:
    """Stage 3: the group's statistics, from one calibration pass (or the given statistics, checked)."""
    method, report = plan.method, plan.report
    if not method.needs_data:
        return None
    requests = {n: method.statistics_request(n, prepared[n]) for n in group}
    if plan.statistics is not None:
        check_statistics(plan.model, plan.statistics, requests, method)
        stats = plan.statistics
        report.stats_bytes_per_group.append(sum(nbytes(stats[n]) for n in group))
    else:
        stats = run_calibration_pass(plan.model, plan.loader, requests, plan.calibration, plan.resources,
                                     loss_weighting=method.loss_weighting, fingerprint=False,
                                     forward_module=plan.forward_module,  # used here and dropped: nothing to check
                                     owners=plan.owners)
        passes.append(stats.data_fingerprint)
        if passes[-1] != passes[0]:
            raise ValueError(
                f"the loader gave other batches in calibration pass {len(passes)} than in pass 1 (a shuffled "
                "DataLoader, or a sampler with a new seed per epoch?): max_stats_memory splits the layers into "
                "passes that must all see the same data; use shuffle=False or a list of batches")
        report.stats_bytes_per_group.append(stats.nbytes())
    report.num_batches = stats.num_batches
    report.num_tokens.update({n: stats[n].num_tokens for n in group})
    return stats


def check_statistics(model, statistics: KFACStatistics, requests, method) -> None:
    """Given statistics must hold what the method asks of each layer, from this model, weighted as it needs."""
    names = list(requests)
    missing_layers = [n for n in names if n not in statistics.layers]
    if missing_layers:
        raise ValueError(f"the statistics hold no entry for layers {missing_layers[:5]}")
    if statistics.fingerprint is not None and statistics.fingerprint != model_fingerprint(model, list(statistics.layers)):
        raise ValueError("the statistics were collected on a different model (other architecture, weights or layer set)")
    if (any(req is not None and req.needs_output_gradient for req in requests.values())
            and statistics.loss_weighting != method.loss_weighting):
        raise ValueError(f"the statistics were collected with loss_weighting={statistics.loss_weighting!r}, but method "
                         f"{method.name!r} needs gradients of the loss weighted {method.loss_weighting!r}; "
                         f"collect them with collect_statistics(..., loss_weighting={method.loss_weighting!r})")
    for name, request in requests.items():
        if request is None:
            continue
        lacking = method.missing_statistics(request, statistics[name])
        if lacking:
            raise ValueError(f"method {method.name!r} needs {lacking} for layer {name!r}, which the given "
                             "statistics do not hold; collect them with full_statistics_requests(...)")


def nbytes(value) -> int:
    """Bytes of the tensors in a method's prepared data or a LayerStatistics (0 for None)."""
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        return 0 if value.is_meta else value.numel() * value.element_size()  # meta: another rank's (owners)
    if hasattr(value, "nbytes") and callable(value.nbytes):
        return value.nbytes()
    if hasattr(value, "tensors"):
        return sum(nbytes(t) for t in value.tensors().values())
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 0
