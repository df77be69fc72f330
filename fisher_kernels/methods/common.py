"""What every initialisation method shares: its result type, the LoRA scale, batched SVDs."""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..layers import row_blocks
from ..statistics import KFACStatistics, SingularBasis, StatisticsRequest


@dataclass
class LayerInit:
    """One layer's initialisation. ``None`` keeps PEFT's default for that tensor.

    The new base weight is never materialised here: ``base_update = (P, Q)`` says
    ``W' = W − P Q`` (rank k, e.g. ``P = s·B``, ``Q = A`` for the residual methods), which
    :func:`init_lora` applies to the layer's weight in place, one layer at a time.
    """

    lora_A: torch.Tensor | None       # (r, d_in)
    lora_B: torch.Tensor | None       # (d_out, r)
    base_update: tuple[torch.Tensor, torch.Tensor] | None = None  # (P (d_out, k), Q (k, d_in)): W' = W − P Q
    selected: torch.Tensor | None = None  # indices of the chosen candidate directions, when meaningful
    scores: torch.Tensor | None = None    # the score each candidate was ranked by (FILet: Fisher energy)
    lora_diag: torch.Tensor | None = None  # (r,) KaSA's trainable singular values: ΔW = s·B diag(d) A

    def new_base_weight(self, W: torch.Tensor) -> torch.Tensor:
        """``W' = W − P Q`` in fp32 for a weight ``W (d_out, d_in)`` (a full-size copy: for
        inspection and tests; the initialisation itself writes ``W'`` in place)."""
        W = W.detach().float()
        if self.base_update is None:
            return W.clone()
        P, Q = self.base_update
        return torch.addmm(W, P.to(W.device, torch.float32), Q.to(W.device, torch.float32), alpha=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this result holds, by name (for finiteness checks)."""
        out = {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_diag": self.lora_diag}
        if self.base_update is not None:
            out["base_update P"], out["base_update Q"] = self.base_update
        return {k: v for k, v in out.items() if v is not None}


def residual_update(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The base update of the residual methods: ``W' = W − s·B A``, so the model is unchanged at step 0."""
    return scale * lora_B, lora_A


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


def selected_triplets(W: torch.Tensor, driver: str, choose) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(idx, U_S, S_S, Vh_S)`` in fp32 for the singular triplets of one weight that
    ``choose(k) -> idx`` picks among the ``k`` candidates (ordered by descending σ).

    ``driver="svd"``: ``torch.linalg.svd`` of an fp32 copy (full U and Vh as temporaries).
    ``"gram"``/``"gram64"``: eigen-decomposition of the smaller Gram matrix (fp32/float64), then
    only the chosen columns of the other side, as ``W V / σ`` in float64: temporaries of
    ``min(d)²`` entries, never a copy of W.
    """
    if driver == "svd":
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        idx = choose(S.shape[0])
        return idx, U[:, idx].contiguous(), S[idx], Vh[idx].contiguous()
    basis = singular_basis(W, driver=driver, dtype=torch.float64 if driver == "gram64" else torch.float32)
    idx = choose(basis.num_candidates)
    return (idx, *complete_triplets(W, basis, idx))


ROWS_PER_BLOCK = 1024  # rows of W widened to float64 at a time


def small_gram(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``WᵀW`` (d_in < d_out) or ``W Wᵀ`` (d_out ≤ d_in) in ``dtype``, accumulated over chunks of
    the long side so that no full-size copy of W in ``dtype`` is made."""
    M = W if W.shape[0] > W.shape[1] else W.T  # (long, short), a view
    gram = torch.zeros(M.shape[1], M.shape[1], dtype=dtype, device=W.device)
    for rows in row_blocks(M.shape[0], ROWS_PER_BLOCK):
        block = M[rows].to(dtype)
        gram.addmm_(block.T, block)
    return gram


def singular_basis(W: torch.Tensor, *, driver: str = "gram64", top: int | None = None,
                   dtype: torch.dtype | None = None) -> SingularBasis:
    """The smaller side of the thin SVD of ``W (d_out, d_in)``: V when ``d_in < d_out``, else U (the
    output side of a square layer, whose input projections the collector can then read off the
    layer's own output).

    The vectors are stored in ``dtype`` (default: the weight's own dtype), the singular values in
    fp32, descending; ``top`` keeps the leading triplets. Drivers as in :func:`batched_svd`:
    ``"gram64"`` (eigen-decomposition of the small Gram matrix in float64), ``"gram"`` (fp32) or
    ``"svd"``. Memory: the small Gram matrix and its eigenvectors, never a copy of W's long side.
    """
    if driver not in ("svd", "gram", "gram64"):
        raise ValueError(f"driver must be 'svd', 'gram' or 'gram64', got {driver!r}")
    side = "input" if W.shape[0] > W.shape[1] else "output"
    dtype = W.dtype if dtype is None else dtype
    if driver == "svd":
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        vectors = Vh.T if side == "input" else U
    else:
        eigenvalues, vectors = torch.linalg.eigh(small_gram(W, torch.float64 if driver == "gram64" else torch.float32))
        S, vectors = eigenvalues.flip(-1).clamp_min(0).sqrt(), vectors.flip(-1)
    k = S.shape[0] if top is None else min(top, S.shape[0])
    return SingularBasis(side, vectors[:, :k].to(dtype).contiguous(), S[:k].float().contiguous())


def complete_triplets(W: torch.Tensor, basis: SingularBasis, idx: torch.Tensor):
    """``(U_S (d_out, r), S_S (r,), Vh_S (r, d_in))`` in fp32 for the candidates ``idx`` of
    ``basis``: the stored side is read, the other one computed as ``W V / σ`` or ``Wᵀ U / σ`` in
    float64, chunk by chunk (σ floored at σ_max · eps(fp32))."""
    vectors = basis.vectors[:, idx].double()  # (d_short, r)
    S = basis.values[idx]
    M = W if basis.side == "input" else W.T  # (long, short): other side = M @ vectors / σ
    other = torch.empty(M.shape[0], vectors.shape[1], dtype=torch.float64, device=W.device)
    for rows in row_blocks(M.shape[0], ROWS_PER_BLOCK):
        torch.mm(M[rows].double(), vectors, out=other[rows])
    other = (other / basis.floored_values()[idx].double()).float()
    vectors = vectors.float()
    return (other, S, vectors.T) if basis.side == "input" else (vectors, S, other.T)


def svd_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scale: float):
    """PiSSA's split of ``U diag(S) Vh`` into LoRA factors with ``s · B A = U diag(S) Vh``."""
    root = torch.sqrt(S / scale)
    return root[:, None] * Vh, U * root[None, :]  # lora_A (r, d_in), lora_B (d_out, r)


class InitMethod:
    """A data-driven (or weight-only) LoRA initialisation.

    The orchestration calls, one layer at a time where it can: ``prepare(name, W)`` (work on the
    weight alone before the calibration pass, e.g. a decomposition; keep what it returns small),
    ``statistics_request(name, prepared)`` (``None`` when the method needs no data; what to collect
    depends on the prepared data, never on the weight, so that a quantized or checkpoint-backed weight
    is not unpacked again for it), then
    ``initialize(weights, stats, prepared)``, which yields ``(name, LayerInit)`` pairs as soon as
    each is ready, so that the caller can write it into the model and free what it used.
    ``W`` is the layer's weight as ``(d_out, d_in)`` in the model's own dtype: a view of the
    parameter, never to be modified. The method never sees how its statistics were computed.
    """

    name: str = ""
    residual_base: bool = False  # base becomes W − s·B₀A₀, so a trained adapter converts to plain LoRA (may be per instance)
    loss_weighting: str = "token"  # how the calibration loss weights tokens, see collect_statistics
    needs_data: bool = False       # True: statistics_request asks for a calibration pass
    holds_layer_inputs: bool = False  # its statistics need each layer's input until the backward pass (∇W)
    shares_input_factor: bool = False  # layers that read the same input share one input factor
    splittable: bool = True  # under torch.distributed, ranks may initialise different layers
    prepares: bool = False  # prepare() uses the weight (a sharded model's is gathered for it only then)
    reads_weights: bool = True  # False: initialize needs only each weight's shape and device (WeightStandIn)

    def __init__(self, r: int, scale: float):
        self.r, self.scale = r, scale

    @classmethod
    def option_names(cls) -> list[str]:
        """The keyword options the method accepts."""
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]

    def held_bytes(self, d_out: int, d_in: int, dtype: torch.dtype) -> int:
        """Bytes this method holds for one layer from ``prepare`` until its initialisation
        (prepared data and fp32 statistics; shared input factors not deducted), for planning."""
        return 0

    def basis_bytes(self, d_out: int, d_in: int, dtype: torch.dtype) -> int:
        """The part of ``held_bytes`` that is prepared data (e.g. FILet's singular vectors), not statistics."""
        return 0

    def temporary_bytes(self, d_out: int, d_in: int, dtype: torch.dtype) -> int:
        """Peak bytes of the temporaries of one layer's ``prepare`` or initialisation, for planning."""
        return 0

    def prepare(self, name: str, W: torch.Tensor):
        return None

    def statistics_request(self, name: str, prepared) -> StatisticsRequest | None:
        return None

    def missing_statistics(self, request: StatisticsRequest, layer) -> list[str]:
        """What ``layer`` (a LayerStatistics, e.g. from a cache) lacks for ``request``."""
        return request.missing_in(layer)

    def initialize(self, weights: dict[str, torch.Tensor], stats: KFACStatistics | None,
                   prepared: dict) -> Iterator[tuple[str, LayerInit]]:
        """Yield ``(name, LayerInit)`` for every layer of ``weights``; by default layer by layer."""
        for name in weights:
            layer_stats = None if stats is None else stats[name]
            yield name, self.initialize_layer(name, self.weight(weights, name), layer_stats, prepared.get(name))

    def weight(self, weights, name: str):
        """``weights[name]``, or for a method that reads no weight values (``reads_weights = False``) its
        :class:`~fisher_kernels.lazy_weights.WeightStandIn` where reading would unpack or gather it."""
        if not self.reads_weights and hasattr(weights, "stand_in"):
            return weights.stand_in(name)
        return weights[name]

    def initialize_layer(self, name: str, W: torch.Tensor, stats, prepared) -> LayerInit:
        raise NotImplementedError
