"""``{layer name: weight}`` mappings whose weights are read on access, one layer at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightStandIn:
    """A layer's weight as a method that reads no weight values sees it (``reads_weights = False``):
    its ``shape`` ``(d_out, d_in)``, ``dtype`` and ``device``, without unpacking, reading or gathering
    it (a quantized or sharded weight)."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


class LazyWeights:
    """The mapping part: ``names`` in order, ``self[name]`` read by the subclass on each access
    (never kept), and ``restricted(names)`` for a subset (as :class:`~fisher_kernels.distributed.sharded.GatheredWeights`)."""

    names: list[str]

    def __getitem__(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __contains__(self, name) -> bool:
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def keys(self):
        return list(self.names)

    def items(self):
        return ((n, self[n]) for n in self.names)

    def restricted(self, names: list[str]) -> "LazyWeights":
        subset = object.__new__(type(self))
        subset.__dict__.update(self.__dict__)
        subset.names = list(names)
        return subset
