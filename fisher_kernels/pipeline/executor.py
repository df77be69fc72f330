"""Who runs a method's per-layer work (``prepare`` before the pass, ``initialize`` after it).

One interface, four cases, chosen once by :func:`executor_for` from the plan:

==================  ======================================  =========================================
                    whole weights                           sharded weights (FSDP2 / ZeRO-3)
==================  ======================================  =========================================
this process        :class:`Local`                          :class:`Sharded` (every rank gathers
                                                            each layer in turn, all compute it)
split across ranks  :class:`SplitAcrossRanks` (layers dealt :class:`ShardedSplit` (rounds: each
                    to ranks, results broadcast)            rank gathers and computes its own layer)
==================  ======================================  =========================================

Each returns, for a group of layer names, ``{name: prepared}`` and ``{name: LayerInit}`` on every
rank. Every result is checked finite; each layer's statistics and prepared basis are freed as soon
as its result exists.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..distributed.owners import move_units_to_owners
from ..distributed.sharded import GatheredWeights
from ..distributed.split_work import broadcast_results, compute_in_rounds, compute_share, deal
from .plan import Plan


def stage_bar(items, name: str, progress: bool, total: int | None = None):
    """``items`` with a progress bar named after the stage, shown once the stage has taken a second."""
    return tqdm(items, desc=f"fisher_kernels: {name}", unit="layer", total=total, delay=1.0, disable=not progress)


def initialized(method, weights, names, stats, prepared, statistics_given: bool):
    """``(name, LayerInit)`` for ``names``, each checked finite; every layer's statistics and
    prepared basis are freed as soon as its result exists (shared input factors with their last user).
    ``weights``: a dict, or a mapping read one layer at a time (a sharded model's :class:`GatheredWeights`,
    a quantized model's :class:`~fisher_kernels.layers.WeightsOneAtATime`)."""
    subset = weights.restricted(names) if hasattr(weights, "restricted") else {n: weights[n] for n in names}
    for name, init in method.initialize(subset, stats, prepared):
        for key, value in init.tensors().items():
            if not torch.isfinite(value).all():
                raise ValueError(f"layer {name!r}: the computed {key} is not finite")
        prepared.pop(name, None)
        if stats is not None and not statistics_given:
            stats.layers.pop(name)
        yield name, init


def solve_units(names: list[str], stats) -> list[list[str]]:
    """Layers that are initialised together: those sharing one input factor (LoRA-DA solves them
    with one factorisation), else each layer alone; in model order."""
    units: dict[str, list[str]] = {}
    for name in names:
        layer = None if stats is None else stats.layers.get(name)
        key = (layer.input_factor_shared_with if layer is not None else None) or name
        units.setdefault(key, []).append(name)
    return list(units.values())


class Local:
    """Every layer in this process, with a bar per stage."""

    def __init__(self, plan: Plan):
        self.method, self.weights = plan.method, plan.weights
        self.statistics_given = plan.statistics is not None
        self.progress = plan.resources.progress

    def prepare(self, group: list[str]) -> dict:
        if not self.method.prepares:  # reading the weight would unpack a quantized one for nothing
            return {n: None for n in group}
        bar = stage_bar(group, "decomposition", self.progress)
        return {n: self.method.prepare(n, self.weights[n]) for n in bar}

    def solve(self, group: list[str], stats, prepared: dict) -> dict:
        results = initialized(self.method, self.weights, group, stats, prepared, self.statistics_given)
        return dict(stage_bar(results, "initialisation", self.progress, total=len(group)))

    def finish(self) -> None:
        """Nothing to wait for."""


class SplitAcrossRanks(Local):
    """Whole weights on every rank; each rank computes the layers dealt to it, then every rank
    receives every result (:mod:`fisher_kernels.distributed.split_work`)."""

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.rank, self.world = plan.rank, plan.world
        self.device = plan.model.get_submodule(plan.names[0]).weight.device

    def prepare(self, group: list[str]) -> dict:
        owner = deal([[n] for n in group], self.world)
        mine = compute_share(lambda: {n: self.method.prepare(n, self.weights[n]) for n in group
                                      if owner[n] == self.rank}, owner, self.rank)
        return broadcast_results(mine, owner, group, self.device)

    def solve(self, group: list[str], stats, prepared: dict) -> dict:
        owner = deal(solve_units(group, stats), self.world)
        share = [n for n in group if owner[n] == self.rank]
        mine = compute_share(lambda: dict(initialized(self.method, self.weights, share, stats, prepared,
                                                      self.statistics_given)), owner, self.rank)
        return broadcast_results(mine, owner, group, self.device)

    def finish(self) -> None:
        """No rank leaves while another still receives what it sent (gloo aborts then)."""
        dist.barrier()


class Sharded(Local):
    """Sharded weights: every rank takes part in gathering each layer (one at a time), and all
    compute it."""

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.gathered = GatheredWeights(plan.model, plan.names)
        self.device = plan.weights[plan.names[0]].device

    def prepare(self, group: list[str]) -> dict:
        if not self.method.prepares:
            return {n: None for n in group}
        return {n: self.method.prepare(n, self.gathered[n]) for n in group}

    def solve(self, group: list[str], stats, prepared: dict) -> dict:
        return dict(initialized(self.method, self.gathered, group, stats, prepared, self.statistics_given))

    def finish(self) -> None:
        dist.barrier()


class ShardedSplit(Sharded):
    """Sharded weights, work dealt across ranks in rounds: in each round every rank gathers the
    layer it computes (:func:`compute_in_rounds`). With the plan's ``owners`` (a calibration pass),
    each layer's basis stays on its owner (the others hold its shape), the pass sums its statistics
    there, and its owner initialises it (:mod:`fisher_kernels.distributed.owners`)."""

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.owners, self.rank = plan.owners, plan.rank

    def prepare(self, group: list[str]) -> dict:
        if not self.method.prepares:
            return {n: None for n in group}
        return compute_in_rounds([[n] for n in group], self.owners, self.gathered.__getitem__,
                                 functools.partial(_prepared_share, self.method), self.device,
                                 keep_on_owner=self.owners is not None)

    def solve(self, group: list[str], stats, prepared: dict) -> dict:
        units = solve_units(group, stats)
        owner = None
        if self.owners is not None and not self.statistics_given:
            owner = dict(self.owners)
            move_units_to_owners(units, owner, stats, prepared, self.rank)
        gather = self.gathered.__getitem__ if self.method.reads_weights else self.gathered.stand_in  # no collective
        return compute_in_rounds(units, owner, gather,
                                 functools.partial(_initialized_share, self.method, stats, prepared,
                                                   self.statistics_given), self.device)


def _prepared_share(method, weights: dict) -> dict:
    return {n: method.prepare(n, W) for n, W in weights.items()}


def _initialized_share(method, stats, prepared, statistics_given, weights: dict) -> dict:
    """One rank's share of a round (:func:`compute_in_rounds`): the layers of ``weights``."""
    return dict(initialized(method, weights, list(weights), stats, prepared, statistics_given))


def executor_for(plan: Plan) -> Local:
    """The executor of the plan's case (see the module's table)."""
    if plan.sharding:
        return ShardedSplit(plan) if plan.split else Sharded(plan)
    return SplitAcrossRanks(plan) if plan.split else Local(plan)
