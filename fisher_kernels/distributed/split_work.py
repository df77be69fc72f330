"""Splitting the per-layer work (decompositions, selections, solves) across ``torch.distributed``
ranks: each rank computes its share of the layers, then every result is broadcast from the rank
that computed it, so every rank ends with all of them, as one process would.

Units of work are single layers, or groups of layers that must be solved together (LoRA-DA's
layers that share one input factor). Units are dealt round-robin in model order. Every rank
performs the same collectives in the same order whatever happens: a rank whose share failed says
so in one ``all_gather_object`` before any broadcast, and then every rank raises.
"""

from __future__ import annotations

import dataclasses
import functools

import torch


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def deal(units: list[list[str]], world: int) -> dict[str, int]:
    """``{layer: owning rank}``: units dealt round-robin."""
    return {name: index % world for index, unit in enumerate(units) for name in unit}


def rounds(units: list[list[str]], owner: dict[str, int], world: int) -> list[list[list[str]]]:
    """The units in rounds of at most one per rank (each rank's units in model order); every layer
    of a unit has one owner (see :func:`~fisher_kernels.distributed.owners.move_units_to_owners`)."""
    per_rank: list[list[list[str]]] = [[] for _ in range(world)]
    for unit in units:
        per_rank[owner[unit[0]]].append(unit)
    count = max((len(u) for u in per_rank), default=0)
    return [[per_rank[r][k] for r in range(world) if k < len(per_rank[r])] for k in range(count)]


def _moved(value, device):
    """``value`` with every tensor inside (tuples, lists, dicts, dataclasses such as LayerInit and
    SingularBasis) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _moved(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def compute_share(work, owner: dict[str, int], rank: int) -> dict:
    """Run ``work()`` (which returns ``{layer: result}`` for this rank's layers), tell every rank
    whether it succeeded, and raise on every rank if one failed."""
    import torch.distributed as dist

    results, error = {}, None
    try:
        results = work()
    except Exception as err:  # reported to the others before raising here
        error = err
    statuses = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, message) for r, message in enumerate(statuses) if message is not None]
    if failed:
        raise RuntimeError(f"rank {failed[0][0]} failed computing its share of the layers, so this rank stops "
                           f"too: {failed[0][1]}")
    return results


def broadcast_results(results: dict, owner: dict[str, int], names: list[str], device,
                      shapes_only: bool = False) -> dict:
    """Every layer's result, each broadcast from its owner (through the CPU, then to ``device``).
    ``shapes_only``: each result stays on its owner; the other ranks receive its shapes (``meta`` tensors)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    out = {}
    for name in names:
        box = [_moved(results[name], "meta" if shapes_only else "cpu") if owner[name] == rank else None]
        dist.broadcast_object_list(box, src=owner[name])
        out[name] = (results[name] if owner[name] == rank else box[0]) if shapes_only else _moved(box[0], device)
    return out


def compute_in_rounds(units: list[list[str]], owner: dict[str, int] | None, gather, work, device,
                      keep_on_owner: bool = False) -> dict:
    """The split for sharded weights (which must be gathered, a collective, before any work on
    them): units owned as ``owner`` says (``None``: dealt as :func:`deal` does), in rounds of at
    most one unit per rank. In each round every rank gathers the round's layers in model order
    (``gather(name)`` returns the whole weight), keeps its own unit's, computes ``work({name:
    weight})`` for it, and the round's results are broadcast (``keep_on_owner``: each stays on its
    owner, the others get its shapes, see :func:`broadcast_results`). A rank holds one unit's
    gathered weights at a time."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    owner = deal(units, world) if owner is None else owner
    results = {}
    for round_units in rounds(units, owner, world):
        names = [name for unit in round_units for name in unit]
        mine = {}
        for name in names:
            weight = gather(name)
            if owner[name] == rank:
                mine[name] = weight
            del weight
        round_results = compute_share(functools.partial(work, mine), owner, rank)
        del mine
        results.update(broadcast_results(round_results, owner, names, device, shapes_only=keep_on_owner))
    return results
