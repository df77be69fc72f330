"""Sharded models: FSDP2 (``torch.distributed.fsdp.fully_shard``) and DeepSpeed ZeRO-3.

Every rank holds a part of each weight: under FSDP2 a ``DTensor`` split by rows (``Shard(0)``)
over a one-dimensional device mesh, under ZeRO-3 a flat partition (``param.ds_tensor``) with an
empty ``param.data`` outside the module's forward. The calibration pass needs little: both gather a
module's weights for its forward and backward, so the hooks see whole weights and each rank's own
activations, and the statistics are summed over the ranks as for a replicated model; the ranks
only have to run the same forwards and backwards (the collector's lockstep). What reads a whole
weight outside the pass (decompositions, selections) gathers it here, one layer at a time, on
every rank in the same order (gathering is a collective). The base-weight updates ``W ← W − P Q``
go into each rank's own rows (FSDP2), or into the gathered weight, re-partitioned from rank 0
(ZeRO-3). New adapters on an FSDP2 model are plain parameters that FSDP does not manage: their
gradients are averaged over the ranks after every backward, as FSDP does for the weights it
shards. A ZeRO-3 engine's optimizer is fixed at ``deepspeed.initialize``, so there the adapter
must exist before (a ``PeftModel``, as accelerate and TRL make it) and is initialised in place.

Not supported (refused by :func:`sharding_of` with the reason): FSDP1's flat parameters,
tensor-parallel ``DTensor``\\ s outside FSDP, and two-dimensional (HSDP) meshes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import nn

from ..layers import weight_stand_in


@functools.cache
def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover: torch built without distributed
        return ()
    return DTensor


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 shard)."""
    return isinstance(tensor, _dtensor_type())


def is_partitioned(tensor) -> bool:
    """Whether ``tensor`` is a DeepSpeed ZeRO-3 parameter (its ``data`` a partition, gathered on use)."""
    return hasattr(tensor, "ds_id")


def _gathered(params, modifier_rank=None):
    """DeepSpeed's ``GatheredParameters`` (a collective): inside, each parameter's ``data`` is whole;
    with ``modifier_rank``, that rank's values are re-partitioned on exit."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def modify_whole_(param: torch.Tensor, modify) -> None:
    """``modify(whole)`` changes a ZeRO-3 parameter's whole value in place: gathered, changed on
    rank 0 (every rank computes the same change) and re-partitioned from there."""
    import torch.distributed as dist

    with _gathered([param], modifier_rank=0):
        if dist.get_rank() == 0:
            modify(param.data)


def release_after_pass(model: nn.Module) -> None:
    """ZeRO-3 marks a module's weights in use from its forward until its backward has reached the
    module's inputs, which never happens for the first layers of a frozen model (their inputs need
    no gradient): after the calibration pass they are marked free again, so that they can be
    gathered and re-partitioned."""
    for p in model.parameters():
        if is_partitioned(p) and getattr(p, "ds_active_sub_modules", None):
            p.ds_active_sub_modules.clear()


def sharding_of(model: nn.Module, inside_fsdp: bool = False) -> str | None:
    """``"fsdp2"`` when the model's parameters are FSDP2 shards, ``"zero3"`` when they are DeepSpeed
    ZeRO-3 partitions, ``None`` when none is sharded;
    raises ``TypeError`` naming the parameter for shardings that are not supported.
    ``inside_fsdp``: ``model`` is part of a model already checked (e.g. a sharded ``PeftModel``'s
    base model, whose FSDP root lies above it)."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import Shard
    except ImportError:  # pragma: no cover
        FSDPModule, Shard = (), None  # noqa: N806
    managed = {id(p) for m in model.modules() if isinstance(m, FSDPModule) for p in m.parameters()}
    found = None
    for name, p in model.named_parameters():
        if type(p).__name__ == "FlatParameter" or "_fsdp_wrapped_module" in name:
            raise TypeError(f"parameter {name!r} is sharded by FSDP1 (FullyShardedDataParallel), which is not "
                            "supported: use FSDP2 (torch.distributed.fsdp.fully_shard), or initialise the unsharded "
                            "model first and wrap it afterwards")
        if is_partitioned(p):
            found = "zero3"
            continue
        if not is_sharded(p):
            continue
        if id(p) not in managed and not inside_fsdp:
            raise TypeError(f"parameter {name!r} is a DTensor outside FSDP2 (tensor parallel?), which is not "
                            "supported: initialise the model before parallelising it")
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise TypeError(f"parameter {name!r} is sharded as {tuple(p.placements)} over a {p.device_mesh.ndim}-D "
                            "mesh; only FSDP2's row sharding (Shard(0)) over a 1-D mesh is supported (not HSDP)")
        found = "fsdp2"
    return found


def reshard(model: nn.Module) -> None:
    """Free every gathered copy FSDP2 still holds (e.g. a root module's after a forward without
    backward), so that what is written into the shards is what the next forward gathers."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def full_weight(module: nn.Module) -> torch.Tensor:
    """The layer's whole weight as ``(d_out, d_in)``, gathered from the ranks' shards (a
    collective: every rank must call it for the same layers in the same order)."""
    full = whole(module.weight)
    return full if isinstance(module, nn.Linear) else full.T


class GatheredWeights(Mapping):
    """``{layer name: whole weight}`` of a sharded model, gathered on every access: one layer
    at a time in memory when iterated (every rank must access the same layers in the same order)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.model, self.names = model, list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return full_weight(self.model.get_submodule(name))

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def stand_in(self, name: str):
        """Shape, dtype and device of ``self[name]``, without gathering it (no collective)."""
        return weight_stand_in(self.model.get_submodule(name))

    def restricted(self, names: list[str]) -> "GatheredWeights":
        return GatheredWeights(self.model, names)


@torch.no_grad()
def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or a sharded / partitioned one gathered (a collective)."""
    if is_partitioned(tensor):
        with _gathered([tensor]):
            return tensor.data.clone()
    return tensor.detach().full_tensor() if is_sharded(tensor) else tensor.detach()


@torch.no_grad()
def copy_whole_(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)`` for a whole ``value``; a sharded ``param`` takes its own rows."""
    if is_partitioned(param):
        modify_whole_(param, lambda data: data.copy_(value.to(data.device, data.dtype)))
        return
    if not is_sharded(param):
        param.copy_(value.to(param.device, param.dtype))
        return
    from torch.distributed.tensor import distribute_tensor

    value = value.to(param.device, param.dtype).contiguous()
    param.to_local().copy_(distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None).to_local())


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded / partitioned tensor (the tensor itself otherwise), detached."""
    if is_partitioned(tensor):
        return tensor.ds_tensor.detach()
    return tensor.detach().to_local() if is_sharded(tensor) else tensor.detach()


_CHECK_CHUNK = 1 << 20  # entries checked at a time: temporaries of a few MiB, not a weight-sized fp32 copy


def _nonfinite_entries(tensor: torch.Tensor) -> int:
    """NaN/Inf entries of ``tensor``, checked in chunks of ``_CHECK_CHUNK`` entries (``isfinite``
    of a bf16 tensor widens it) with one host sync when all are finite."""
    flat = tensor.reshape(-1)
    chunks = [flat[start:start + _CHECK_CHUNK] for start in range(0, flat.numel(), _CHECK_CHUNK)]
    if not chunks or bool(torch.stack([torch.isfinite(c).all() for c in chunks]).all()):
        return 0
    return sum(int((~torch.isfinite(c)).sum()) for c in chunks)


def count_nonfinite(model: nn.Module, names: list[str]) -> dict[str, int]:
    """NaN/Inf entries of each layer's whole weight: counted in each rank's shard, summed over
    the ranks in one collective."""
    import torch.distributed as dist

    weights = [model.get_submodule(n).weight for n in names]
    counts = torch.tensor([_nonfinite_entries(local_part(w)) for w in weights], dtype=torch.int64,
                          device=weights[0].device if weights else "cpu")
    if any(is_sharded(w) for w in weights):
        dist.all_reduce(counts, group=next(w.device_mesh.get_group() for w in weights if is_sharded(w)))
    elif any(is_partitioned(w) for w in weights):
        dist.all_reduce(counts)
    return {n: int(c) for n, c in zip(names, counts.tolist())}


def local_update_factors(module: nn.Module, P: torch.Tensor, Q: torch.Tensor):
    """``(M, L, R)``: this rank's shard ``M`` of the layer's weight parameter and the factors of
    ``P Q``'s share in it, ``M += alpha · L R`` being ``W += alpha · P Q`` on these rows.
    (A ``Conv1D`` stores ``Wᵀ``: its factors are ``Qᵀ`` and ``Pᵀ``.)"""
    from torch.distributed.tensor import distribute_tensor

    weight = module.weight
    left, right = (P, Q) if isinstance(module, nn.Linear) else (Q.T, P.T)
    left = left.to(weight.device)
    # each rank keeps its own rows of `left`, exactly as the weight is split: no communication
    local_left = distribute_tensor(left.contiguous(), weight.device_mesh, weight.placements, src_data_rank=None)
    return weight.to_local(), local_left.to_local(), right


def average_gradients_over_ranks(parameters, group=None) -> list:
    """After every backward, each of ``parameters`` (replicated, not managed by FSDP) gets its
    gradient averaged over ``group``'s ranks, as FSDP averages the sharded weights' gradients.
    Correct under gradient accumulation too: the average of ``c + g_rank`` with an already
    common ``c`` is ``c`` plus the average. Returns the hook handles."""
    import torch.distributed as dist

    world = dist.get_world_size(group)

    def average(param):
        dist.all_reduce(param.grad, group=group)
        param.grad.div_(world)

    return [p.register_post_accumulate_grad_hook(average) for p in parameters if p.requires_grad]
