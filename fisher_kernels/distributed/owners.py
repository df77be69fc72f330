"""Statistics held by one owner rank per layer (a sharded model's calibration pass).

Under FSDP2 / ZeRO-3 every rank runs its own data through the whole model, so every rank computes
an update of every layer's statistics in every batch. Summing whole statistics over the ranks at
the end (what a replicated model does) keeps every layer's statistics, and FILet's bases, whole on
every rank. Here each layer has one **owner** (layers dealt by held bytes, :func:`owners_by_bytes`):
only the owner keeps the layer's accumulators and bases; the other ranks hold their shapes on the
``meta`` device. In the hooks, :class:`OwnerOps` stands in for the statistics kernels: a rank that
does not own the accumulator computes its update into a temporary, the updates are summed into the
owner's accumulator (``reduce``, one collective per update, as FSDP reduce-scatters gradients), and
a basis held by its owner is broadcast to the others for the update that reads it, then freed. Each
rank thus holds its own layers' statistics and bases (about ``1/N`` of them) and one layer's
temporaries; the layers are then initialised by their owners and the (small) results broadcast.

Every rank runs the same hooks in the same order (the lockstep keeps the ranks' forwards and
backwards in step), so they issue the same collectives in the same order. A rank whose kernel
failed goes on taking part with zero updates until the ranks exchange errors; an error elsewhere in
a hook (not in a kernel) ends, like an error in the model's own code, in the process group's timeout.
"""

from __future__ import annotations

import torch

from .split_work import _moved


def owners_by_bytes(layer_bytes: dict[str, int], world: int) -> dict[str, int]:
    """``{layer: rank}``: each layer, largest first, to the rank holding the fewest bytes so far
    (ties: the lower rank, then model order), so that every rank holds about ``1/world`` of the bytes."""
    load = [0] * world
    owner = {}
    for name in sorted(layer_bytes, key=lambda n: -layer_bytes[n]):  # stable: model order among equals
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += layer_bytes[name]
    return {name: owner[name] for name in layer_bytes}


class OwnerOps:
    """The statistics kernels (``ops``) of a pass whose accumulators live on their owners.

    ``owner_of(tensor)`` names the rank that owns an accumulator or a basis; ``failed()`` says
    whether this rank has a kept error, in which case it computes nothing but still takes part in
    every collective. A kernel's error is raised after its collective, so no rank is left waiting."""

    def __init__(self, ops, rank: int, owner_of, failed):
        import torch.distributed as dist

        self.ops, self.rank, self.owner_of, self.failed, self.dist = ops, rank, owner_of, failed, dist

    def _update(self, op, acc: torch.Tensor, device, *args) -> None:
        """``op(acc, *args)`` on the owner; elsewhere into a zero temporary, summed into the owner's ``acc``."""
        target = acc if not acc.is_meta else torch.zeros(acc.shape, dtype=acc.dtype, device=device)
        error = None
        if not self.failed():
            try:
                op(target, *args)
            except Exception as err:  # raised once this rank has taken part in the reduction
                error = err
                if acc.is_meta:
                    target.zero_()
        self.dist.reduce(target, dst=self.owner_of(acc))
        if error is not None:
            raise error

    def basis(self, basis: torch.Tensor, device) -> torch.Tensor:
        """A basis held by its owner, on every rank: broadcast from the owner (16-bit floats as
        16-bit integers, which every backend carries) into a temporary on the others."""
        whole = basis if not basis.is_meta else torch.empty(basis.shape, dtype=basis.dtype, device=device)
        carried = whole.view(torch.int16) if whole.dtype in (torch.bfloat16, torch.float16) else whole
        self.dist.broadcast(carried, src=self.owner_of(basis))
        return whole

    def masked_syrk_(self, acc, x, mask):
        self._update(self.ops.masked_syrk_, acc, x.device, x, mask)

    def masked_column_sumsq_(self, acc, g, mask):
        self._update(self.ops.masked_column_sumsq_, acc, g.device, g, mask)

    def masked_outer_(self, acc, g, x, mask):
        self._update(self.ops.masked_outer_, acc, g.device, g, x, mask)

    def masked_projected_energy_(self, acc, z, basis, mask):
        basis = self.basis(basis, z.device)
        self._update(self.ops.masked_projected_energy_, acc, z.device, z, basis, mask)


def move_units_to_owners(units: list[list[str]], owner: dict[str, int], stats, prepared: dict, rank: int) -> None:
    """Layers solved together (sharing one input factor) whose statistics ended on different owners:
    each such layer's statistics and prepared data go to the owner of the unit's first layer (one
    broadcast per moved layer, in unit order on every rank); ``owner`` is updated."""
    import torch.distributed as dist

    for unit in units:
        source = next((n for n in unit if stats.layers[n].input_factor_shared_with is None), unit[0])
        home = owner[source]  # the owner of the shared input factor
        for name in [n for n in unit if owner[n] != home]:
            held = owner[name] == rank
            box = [_moved((stats.layers[name], prepared.get(name)), "cpu") if held else None]
            dist.broadcast_object_list(box, src=owner[name])
            if rank == home:
                device = next((t.device for t in stats.layers[source].tensors().values()), torch.device("cpu"))
                stats.layers[name], prepared[name] = _moved(box[0], device)
                stats.layers[name].input_factor = stats.layers[source].input_factor  # one shared tensor again
            elif held:
                stats.layers[name], prepared[name] = stats.layers[name].without_tensors(), None
            owner[name] = home
