"""Keeping the ranks of a sharded model in step through a calibration pass.

Every rank of an FSDP2 / ZeRO-3 model must run the same number of forward and backward passes
(each gathers weights collectively), so the ranks agree on every batch's outcome, and on the
pass's end, before any of them goes on or raises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.distributed as dist

if TYPE_CHECKING:
    from .hooks import StatisticsHooks


class Lockstep:
    """Keeps the ranks of a sharded model in step during the calibration pass: FSDP2 and ZeRO-3
    gather the weights in every forward and backward, collectives that every rank must join.
    Before each batch the ranks agree on how many forwards it takes (the most micro-batches any
    rank has); a rank with fewer, or whose data has run out, repeats its last micro-batch with the
    hooks counting nothing and its loss times zero, so nothing is counted twice. After each forward,
    and after each backward, the ranks exchange errors (the hooks keep theirs until then instead of
    raising mid-pass), so that a failing rank makes every rank raise instead of leaving the others
    waiting in a gather. An error raised by the model's own code inside a forward or backward still
    ends in the process group's timeout."""

    def __init__(self, hooks: "StatisticsHooks"):
        self.dist = dist
        hooks.defer_errors = True

    def _exchange(self, status):
        statuses = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(statuses, status)
        return statuses

    def _raise_first(self, statuses, error) -> None:
        if error is not None:
            raise error
        failed = [(rank, status[0]) for rank, status in enumerate(statuses) if status[0] is not None]
        if failed:
            rank, message = failed[0]
            raise RuntimeError(f"rank {rank} failed during the calibration pass, so this rank stops too: {message}")

    def agree_on_batch(self, index: int, parts: int, error: Exception | None, can_repeat: bool) -> int:
        """The number of forwards of batch ``index`` on every rank (0: every rank's data has ended)."""
        statuses = self._exchange((None if error is None else f"{type(error).__name__}: {error}", parts, can_repeat))
        self._raise_first(statuses, error)
        steps = max(status[1] for status in statuses)
        empty = [rank for rank, status in enumerate(statuses) if not status[2]]
        if steps and empty:
            raise ValueError(f"rank {empty[0]} has no calibration batch while others have {steps} micro-batch(es) "
                             f"in batch {index}: with a sharded (FSDP / ZeRO-3) model every rank runs each forward, so each "
                             "rank needs at least one batch of its own")
        return steps

    def agree(self, index: int, error: Exception | None) -> None:
        """Every rank raises if one had an error (after a forward, and after a backward)."""
        statuses = self._exchange((None if error is None else f"{type(error).__name__}: {error}",))
        self._raise_first(statuses, error)


def exchange_pass_status(hooks, error: str | None, first_batch: int) -> None:
    """The one collective every rank performs after its pass, whatever happened in it: each rank's
    error (if it failed), the fingerprint of its first batch and the input sharing its layers saw.
    A rank that failed raises its own error afterwards; the others raise one that names it. Then
    unsharded data is refused, and ranks that saw no data adopt the others' input sharing, so that
    every rank reduces the same tensors in the same order."""
    sharing = {name: layer.shared_with for name, layer in hooks.layers.items() if layer.sharing_decided}
    statuses = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, (error, first_batch, sharing))
    if error is not None:
        return
    failed = [(rank, status[0]) for rank, status in enumerate(statuses) if status[0] is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"rank {rank} failed during the calibration pass, so this rank stops too: {message}")
    seen = [status[1] for status in statuses if status[1]]
    if len(set(seen)) < len(seen):
        raise ValueError(
            "two ranks began with the same calibration batch: the loader is not sharded, so each sample would be "
            "counted once per rank. Give each rank its own part of the data: accelerator.prepare(loader), or a "
            "DataLoader with a DistributedSampler")
    hooks.adopt_sharing([status[2] for status in statuses])


def refuse_padded_shards(loader) -> None:
    """accelerate's ``even_batches=True`` (its default) pads the shorter shards with samples from
    the start of the dataset when the data does not split evenly: those would be counted twice."""
    sampler = getattr(loader, "batch_sampler", None)
    processes = getattr(sampler, "num_processes", 1)
    if not getattr(sampler, "even_batches", False) or processes <= 1 or getattr(sampler, "split_batches", False):
        return
    dataset, batch_size = getattr(loader, "dataset", None), getattr(sampler, "batch_size", None)
    if batch_size is None or not hasattr(dataset, "__len__"):
        return
    if len(dataset) % (batch_size * processes) != 0 and not getattr(sampler, "drop_last", False):
        raise ValueError(
            f"{len(dataset)} calibration samples do not split into {processes} ranks × batches of {batch_size}, and "
            "accelerate's even_batches=True repeats samples to even the shards out, which would count them twice: "
            "prepare the calibration loader with even_batches=False, e.g. Accelerator(dataloader_config="
            "DataLoaderConfiguration(even_batches=False)) (the shards may then differ in length; the statistics are "
            "summed over ranks either way)")


def in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
