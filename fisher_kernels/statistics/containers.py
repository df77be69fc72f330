"""What a method asks the collector for, and what the collector hands back."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import cache


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
        """Bytes held here (0 for another rank's basis, whose shapes alone are on ``meta``)."""
        return sum(0 if t.is_meta else t.numel() * t.element_size() for t in (self.vectors, self.values))

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

    def without_tensors(self) -> "LayerStatistics":
        """The counts and the sharing, no tensor: what a rank that does not own the layer keeps
        (see :mod:`fisher_kernels.distributed.owners`)."""
        return LayerStatistics(num_tokens=self.num_tokens, input_factor_shared_with=self.input_factor_shared_with)


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
        cache.write_statistics(self, path)

    @classmethod
    def load(cls, path, model: nn.Module | None = None, device=None) -> "KFACStatistics":
        """Read a safetensors file written by :meth:`save`, verifying every tensor's checksum; with
        ``model``, refuse statistics of another model or layer set. Every refusal is one
        ``ValueError`` line that names the file."""
        header, layers = cache.read_statistics(path, model=model, device=device)
        stats = {name: LayerStatistics(**fields) for name, fields in layers.items()}
        for name, layer in stats.items():
            if layer.input_factor_shared_with:
                layer.input_factor = stats[layer.input_factor_shared_with].input_factor
        return cls(layers=stats, **header)

    def __getitem__(self, name: str) -> LayerStatistics:
        return self.layers[name]

    def nbytes(self) -> int:
        """Bytes held by the statistics (shared input factors counted once)."""
        seen, total = set(), 0
        for layer in self.layers.values():
            for t in layer.tensors().values():
                if id(t) not in seen and not t.is_meta:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total


def save_statistics(stats: KFACStatistics, path) -> None:
    """``stats.save(path)``."""
    stats.save(path)


def load_statistics(path, model: nn.Module | None = None, device=None) -> KFACStatistics:
    """``KFACStatistics.load(path, model, device)``."""
    return KFACStatistics.load(path, model=model, device=device)
