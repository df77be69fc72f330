"""What every initialisation method shares: its result type, the LoRA scale, batched SVDs."""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..statistics import KFACStatistics, StatisticsRequest


@dataclass
class LayerInit:
    """One layer's initialisation. ``None`` keeps PEFT's default for that tensor."""

    lora_A: torch.Tensor | None       # (r, d_in)
    lora_B: torch.Tensor | None       # (d_out, r)
    base_weight: torch.Tensor | None  # (d_out, d_in): W' replacing W, or None to keep W
    selected: torch.Tensor | None = None  # indices of the chosen candidate directions, when meaningful
    scores: torch.Tensor | None = None    # the score each candidate was ranked by (FILet: Fisher energy)


def lora_scale(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's scaling ``s``: ``lora_alpha / r``, or ``lora_alpha / √r`` with rsLoRA."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def group_by_shape(tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names grouped by tensor shape, each group in insertion order."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, t in tensors.items():
        groups[tuple(t.shape)].append(name)
    return list(groups.values())


def batched_svd(weights: dict[str, torch.Tensor], top: int | None = None, driver: str = "svd"):
    """Thin SVD ``W = U diag(S) Vh`` of every weight, one batched call per shape.

    ``driver="svd"``: ``torch.linalg.svd``. ``driver="gram"``: eigen-decomposition of the smaller
    Gram matrix (``WᵀW`` or ``W Wᵀ``) in the weights' precision, then the other factor as
    ``W V / σ``: 2–3× faster on CPU and as accurate for the leading directions, but a direction's
    error grows like ``eps · (σ_max / σ)²``: use it where small-σ directions are not chosen.
    ``driver="gram64"``: the same in float64, as accurate as an fp32 SVD, about 1.6× faster.

    Returns ``{name: (U (d_out, k), S (k,), Vh (k, d_in))}`` with singular values descending,
    keeping the first ``top`` triplets when given.
    """
    if driver not in ("svd", "gram", "gram64"):
        raise ValueError(f"driver must be 'svd', 'gram' or 'gram64', got {driver!r}")
    out = {}
    for names in group_by_shape(weights):
        stacked = torch.stack([weights[n] for n in names])
        if driver == "svd":
            U, S, Vh = torch.linalg.svd(stacked, full_matrices=False)
        else:
            U, S, Vh = (t.to(stacked.dtype) for t in _gram_svd(stacked.double() if driver == "gram64" else stacked))
        for i, name in enumerate(names):
            k = S.shape[-1] if top is None else min(top, S.shape[-1])
            out[name] = (U[i, :, :k], S[i, :k], Vh[i, :k, :])
    return out


def _gram_svd(W: torch.Tensor):
    """Thin SVD of a batch (b, m, n) through the eigen-decomposition of the smaller Gram matrix."""
    wide = W.shape[-2] < W.shape[-1]
    M = W.mT if wide else W                          # (b, long, short)
    eigenvalues, V = torch.linalg.eigh(M.mT @ M)     # ascending
    eigenvalues, V = eigenvalues.flip(-1), V.flip(-1)
    S = eigenvalues.clamp_min(0).sqrt()
    floor = S[..., :1] * torch.finfo(W.dtype).eps
    U = (M @ V) / torch.maximum(S, floor)[..., None, :]
    return (V, S, U.mT) if wide else (U, S, V.mT)


def svd_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scale: float):
    """PiSSA's split of ``U diag(S) Vh`` into LoRA factors with ``s · B A = U diag(S) Vh``."""
    root = torch.sqrt(S / scale)
    return root[:, None] * Vh, U * root[None, :]  # lora_A (r, d_in), lora_B (d_out, r)


class InitMethod:
    """A data-driven (or weight-only) LoRA initialisation.

    The orchestration calls, in order: ``prepare(weights)`` (work on weights alone, e.g. a
    decomposition), ``statistics_requests(weights, prepared)`` (empty when the method needs no
    data), then ``initialize(weights, stats, prepared)``. ``weights`` maps layer names to
    fp32 ``W (d_out, d_in)``. The method never sees how its statistics were computed.
    """

    name: str = ""
    residual_base: bool = False  # base becomes W − s·B₀A₀, so a trained adapter converts to plain LoRA

    def __init__(self, r: int, scale: float):
        self.r, self.scale = r, scale

    @classmethod
    def option_names(cls) -> list[str]:
        """The keyword options the method accepts."""
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]

    def prepare(self, weights: dict[str, torch.Tensor]):
        return None

    def statistics_requests(self, weights, prepared) -> dict[str, StatisticsRequest]:
        return {}

    def missing_statistics(self, request: StatisticsRequest, layer) -> list[str]:
        """What ``layer`` (a LayerStatistics, e.g. from a cache) lacks for ``request``."""
        return request.missing_in(layer)

    def initialize(self, weights, stats: KFACStatistics | None, prepared) -> dict[str, LayerInit]:
        raise NotImplementedError
