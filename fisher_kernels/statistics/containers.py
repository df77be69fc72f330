"""What a method asks the collector for, and what the collector hands back."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    @property
    def needs_output_gradient(self) -> bool:
        return self.output_factor or self.output_factor_diag or self.gradient or self.output_basis is not None

    @property
    def is_empty(self) -> bool:
        return not (self.input_factor or self.input_basis is not None or self.needs_output_gradient)


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
    gradient: torch.Tensor | None = None                 # (d_out, d_in) mean gradient
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
