"""Fingerprints: exact-bit hashes of tensors, of a model (every weight, in full) and, in the
calibration pass, of its batches; computed where the tensors live."""

from __future__ import annotations

import functools
import hashlib
import itertools

import torch
import torch.distributed as dist
from torch import nn

from ..distributed.sharded import is_partitioned, is_sharded, local_part

_HASH_CHUNK = 1 << 20
_CACHED_COEFFICIENTS = 1 << 16
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer


def tensor_hash(tensor: torch.Tensor) -> int:
    """A 64-bit hash of a tensor's exact bits, computed where the tensor lives (no host copy):
    ``Σ_i bits_i · c_i`` modulo 2⁶⁴ with an odd pseudo-random ``c_i`` per position, so any change
    of any single entry changes it. Chunked: temporaries of ``2²⁰`` int64 numbers."""
    return int(tensor_hash_on_device(tensor).item()) & (2**64 - 1)


def _coefficients(start: int, count: int, device) -> torch.Tensor:
    """The odd pseudo-random multiplier of each position ``start .. start + count``."""
    positions = torch.arange(start, start + count, dtype=torch.int64, device=device)
    return positions * _GOLDEN + 1442695040888963407 | 1


@functools.lru_cache(maxsize=16)
def _cached_coefficients(count: int, device: torch.device) -> torch.Tensor:
    return _coefficients(0, count, device)


def tensor_hash_on_device(tensor: torch.Tensor) -> torch.Tensor:
    """:func:`tensor_hash` as a 0-dim int64 tensor on the tensor's device, not read back (reading
    it stalls the host until the device is idle): collect several, read them together. A tensor of
    at most ``2¹⁶`` entries (a batch of token ids) costs one multiply and one sum (its coefficients
    are cached, 512 KiB at most each)."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if flat.is_floating_point() or flat.is_complex():
        flat = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    if flat.numel() <= _CACHED_COEFFICIENTS:
        return flat.to(torch.int64).mul(_cached_coefficients(flat.numel(), flat.device)).sum()
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), _HASH_CHUNK):
        bits = flat[start:start + _HASH_CHUNK].to(torch.int64)
        total += (bits * _coefficients(start, bits.numel(), flat.device)).sum()
    return total


def model_fingerprint(model: nn.Module, layer_names: list[str]) -> str:
    """Identifies what statistics were collected on: the model's class, the target layers' names
    and shapes, and the exact values of every parameter and buffer of the model (targets and the
    rest: embeddings, norms and heads shape the statistics too), hashed in full by
    :func:`tensor_hash` on their own device and read back together (one read per device)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name in layer_names:
        weight = model.get_submodule(name).weight
        digest.update(f"target {name}:{tuple(weight.shape)}:{weight.dtype}".encode())
    described, hashes, shard_hashes, group = [], [], [], None
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.device.type == "meta":
            described.append((f"{name}:meta", None))
            continue
        if is_sharded(tensor) or is_partitioned(tensor):  # each rank hashes its part; every rank's hashes count
            shard_hashes.append(tensor_hash_on_device(local_part(tensor)))
            group = tensor.device_mesh.get_group() if is_sharded(tensor) else None
            described.append((f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:sharded", None))
            continue
        described.append((f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:", len(hashes)))
        hashes.append(tensor_hash_on_device(tensor))
    values = _read(hashes)
    for text, index in described:
        digest.update((text if index is None else f"{text}{values[index]}").encode())
    if shard_hashes:
        every_rank = [None] * dist.get_world_size(group)
        dist.all_gather_object(every_rank, _read(shard_hashes), group=group)
        digest.update(repr(every_rank).encode())
    return digest.hexdigest()


def _read(hashes: list[torch.Tensor]) -> list[int]:
    """Unsigned 64-bit values of on-device hashes, one read per device."""
    return [value & (2**64 - 1) for value in read_together(hashes)]


def read_together(values: list[torch.Tensor | int]) -> list[int]:
    """0-dim integer tensors (and ints) as ints, read back with one transfer per device holding any
    (each read stalls the host until the device has drained its queue)."""
    out: list[int] = [v if isinstance(v, int) else 0 for v in values]
    by_device: dict[torch.device, list[int]] = {}
    for i, value in enumerate(values):
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append(i)
    for indices in by_device.values():
        for i, value in zip(indices, torch.stack([values[i].to(torch.int64) for i in indices]).tolist()):
            out[i] = value
    return out
