"""What a method asks the collector for, and what the collector hands back."""

from __future__ import annotations

import functools
import hashlib
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SingularBasis:
    """One side of a layer's (possibly truncated) thin SVD ``W = U diag(S) Vᵀ``; the other side is
    implied by the weight: ``U = W V / S`` or ``V = Wᵀ U / S``.

    Holding only the smaller side keeps a projection basis at ``min(d_out, d_in)²`` entries
    instead of ``(d_out + d_in) · min(d_out, d_in)``; the collector recovers the projections onto
    the other side from the layer's own weight (one GEMM per batch, the cost of the projection
    it replaces).
    """

    side: str              # "input": vectors are V (d_in, m); "output": vectors are U (d_out, m)
    vectors: torch.Tensor  # (d_in, m) or (d_out, m), orthonormal columns, any float dtype
    values: torch.Tensor   # S (m,) fp32, descending

    def __post_init__(self):
        if self.side not in ("input", "output"):
            raise ValueError(f"side must be 'input' or 'output', got {self.side!r}")

    @property
    def num_candidates(self) -> int:
        return self.vectors.shape[1]

    def nbytes(self) -> int:
        return self.vectors.numel() * self.vectors.element_size() + self.values.numel() * self.values.element_size()

    def floored_values(self) -> torch.Tensor:
        """S with every value raised to at least σ_max · eps(fp32), for dividing by: the other side
        of a zero singular value then comes out zero instead of a division by zero."""
        floor = self.values.max().clamp_min(torch.finfo(torch.float32).tiny) * torch.finfo(torch.float32).eps
        return torch.maximum(self.values, floor)


@dataclass
class StatisticsRequest:
    """Statistics one layer's method consumes; the collector accumulates exactly these.

    Shapes follow ``W (d_out, d_in)``; ``x`` is the layer input, ``g`` the gradient of the
    summed loss at the layer output.
    """

    input_factor: bool = False        # A = Σ x xᵀ / N                 (d_in, d_in)
    output_factor: bool = False       # G = Σ g gᵀ / N                 (d_out, d_out)
    output_factor_diag: bool = False  # diag(G)                        (d_out,)
    gradient: bool = False            # ∇W = Σ g xᵀ / N                (d_out, d_in)
    input_basis: torch.Tensor | None = None   # V (d_in, m): accumulate Σ (Vᵀ x)² / N   (m,)
    output_basis: torch.Tensor | None = None  # U (d_out, m): accumulate Σ (Uᵀ g)² / N  (m,)
    # both projected energies diag(Vᵀ A V) and diag(Uᵀ G U) of a thin SVD held on one side only
    singular_basis: SingularBasis | None = None

    @property
    def needs_output_gradient(self) -> bool:
        return (self.output_factor or self.output_factor_diag or self.gradient or self.output_basis is not None
                or self.singular_basis is not None)

    @property
    def is_empty(self) -> bool:
        return not (self.input_factor or self.input_basis is not None or self.needs_output_gradient)

    @property
    def input_energy_size(self) -> int | None:
        """Length of the input projected energy this request yields (None: not requested)."""
        if self.input_basis is not None:
            return self.input_basis.shape[1]
        return None if self.singular_basis is None else self.singular_basis.num_candidates

    @property
    def output_energy_size(self) -> int | None:
        """Length of the output projected energy this request yields (None: not requested)."""
        if self.output_basis is not None:
            return self.output_basis.shape[1]
        return None if self.singular_basis is None else self.singular_basis.num_candidates

    def nbytes(self, d_out: int, d_in: int) -> int:
        """fp32 bytes the collector holds for this request (shared input factors not deducted)."""
        floats = (d_in * d_in * self.input_factor + d_out * d_out * self.output_factor
                  + d_out * self.output_factor_diag + d_out * d_in * self.gradient)
        floats += (self.input_energy_size or 0) + (self.output_energy_size or 0)
        return 4 * floats

    def missing_in(self, layer: "LayerStatistics") -> list[str]:
        """Names of requested statistics that ``layer`` does not hold."""
        wanted = {"input_factor": self.input_factor, "output_factor": self.output_factor,
                  "output_factor_diag": self.output_factor_diag, "gradient": self.gradient,
                  "input_projected_energy": self.input_energy_size is not None,
                  "output_projected_energy": self.output_energy_size is not None}
        return [key for key, needed in wanted.items() if needed and getattr(layer, key) is None]


@dataclass
class LayerStatistics:
    """Per-layer K-FAC statistics, normalised by the layer's token count ``num_tokens``.

    Attributes are ``None`` when not requested. Input factors of layers that read the same
    input tensor (q/k/v, gate/up) are one shared tensor object.
    """

    num_tokens: int = 0
    input_factor: torch.Tensor | None = None             # (d_in, d_in) fp32, symmetric
    output_factor: torch.Tensor | None = None            # (d_out, d_out) fp32, symmetric
    output_factor_diag: torch.Tensor | None = None       # (d_out,)
    gradient: torch.Tensor | None = None                 # (d_out, d_in) mean gradient (per token, sequence or batch)
    input_projected_energy: torch.Tensor | None = None   # (m,) diag(Vᵀ A V)
    output_projected_energy: torch.Tensor | None = None  # (m,) diag(Uᵀ G U)
    input_factor_shared_with: str | None = None           # owner layer when the input is shared

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("input_factor", "output_factor", "output_factor_diag", "gradient",
                 "input_projected_energy", "output_projected_energy")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass
class KFACStatistics:
    """Statistics of every target layer from one calibration pass."""

    layers: dict[str, LayerStatistics] = field(default_factory=dict)
    num_batches: int = 0
    num_sequences: int = 0
    fisher: str = "empirical"
    token_mask: str = "attention"
    loss_weighting: str = "token"  # see collect_statistics: the loss the gradients are of
    loss_units: int = 0            # counted labels, sequences or batches of that loss
    fingerprint: str | None = None  # of the model (every weight, in full), see model_fingerprint
    data_fingerprint: str | None = None  # of the calibration batches of the pass, in order

    def save(self, path) -> None:
        """Write to a safetensors file (see :mod:`fisher_kernels.statistics.cache`)."""
        from .cache import save_statistics

        save_statistics(self, path)

    @classmethod
    def load(cls, path, model: nn.Module | None = None, device=None) -> "KFACStatistics":
        """Read a safetensors file; with ``model``, refuse statistics of another model or layer set."""
        from .cache import load_statistics

        return load_statistics(path, model=model, device=device)

    def __getitem__(self, name: str) -> LayerStatistics:
        return self.layers[name]

    def nbytes(self) -> int:
        """Bytes held by the statistics (shared input factors counted once)."""
        seen, total = set(), 0
        for layer in self.layers.values():
            for t in layer.tensors().values():
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total


_HASH_CHUNK = 1 << 20
_CACHED_COEFFICIENTS = 1 << 16
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer


def tensor_hash(tensor: torch.Tensor) -> int:
    """A 64-bit hash of a tensor's exact bits, computed where the tensor lives (no host copy):
    ``Σ_i bits_i · c_i`` modulo 2⁶⁴ with an odd pseudo-random ``c_i`` per position, so any change
    of any single entry changes it. Chunked: temporaries of ``2²⁰`` int64 numbers."""
    return int(tensor_hash_on_device(tensor).item()) & (2**64 - 1)


@functools.lru_cache(maxsize=16)
def _hash_coefficients(count: int, device: torch.device) -> torch.Tensor:
    positions = torch.arange(count, dtype=torch.int64, device=device)
    return positions * _GOLDEN + 1442695040888963407 | 1


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
        return flat.to(torch.int64).mul(_hash_coefficients(flat.numel(), flat.device)).sum()
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), _HASH_CHUNK):
        bits = flat[start:start + _HASH_CHUNK].to(torch.int64)
        positions = torch.arange(start, start + bits.numel(), dtype=torch.int64, device=flat.device)
        total += (bits * (positions * _GOLDEN + 1442695040888963407 | 1)).sum()
    return total


def model_fingerprint(model: nn.Module, layer_names: list[str]) -> str:
    """Identifies what statistics were collected on: the model's class, the target layers' names
    and shapes, and the exact values of every parameter and buffer of the model (targets and the
    rest: embeddings, norms and heads shape the statistics too), hashed in full by
    :func:`tensor_hash` on their own device."""
    from ..sharded import is_partitioned, is_sharded, local_part

    digest = hashlib.sha256(type(model).__name__.encode())
    for name in layer_names:
        weight = model.get_submodule(name).weight
        digest.update(f"target {name}:{tuple(weight.shape)}:{weight.dtype}".encode())
    shard_hashes, group = [], None
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.device.type == "meta":
            digest.update(f"{name}:meta".encode())
            continue
        if is_sharded(tensor) or is_partitioned(tensor):  # each rank hashes its part; every rank's hashes count
            shard_hashes.append(tensor_hash(local_part(tensor)))
            group = tensor.device_mesh.get_group() if is_sharded(tensor) else None
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:sharded".encode())
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{tensor_hash(tensor)}".encode())
    if shard_hashes:
        import torch.distributed as dist

        every_rank = [None] * dist.get_world_size(group)
        dist.all_gather_object(every_rank, shard_hashes, group=group)
        digest.update(repr(every_rank).encode())
    return digest.hexdigest()
