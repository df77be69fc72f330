"""Fisher-guided rank allocation: a total rank budget spread over layers by Fisher energy.

FILet scores every candidate direction ``u_i v_iᵀ`` of every layer by its Fisher energy
``e_i = (u_iᵀ G u_i)(v_iᵀ A v_i)`` (or ``σ_i² e_i`` with ``energy="component"``). Under the K-FAC
Fisher, ``½ ε² e_i`` is the second-order change of the calibration loss when the weight moves by
``ε u_i v_iᵀ``: a unit-norm step along one direction is worth the same in every layer, and the
energies of all layers are in the same unit (loss per squared weight change, per token). So the
energies are compared across layers as they are, without a per-layer normalisation: the
allocation maximises the total Fisher energy of the adapter's initial subspace,

    maximise Σ_l Σ_{i ≤ r_l} e_{l,(i)}   subject to   Σ_l r_l = budget,  min_rank ≤ r_l ≤ max_rank,

where ``e_{l,(i)}`` is layer l's i-th largest score. The objective is a sum of per-layer
decreasing sequences, so the greedy choice is exact: every layer first gets ``min_rank``, then
the globally largest remaining scores take the rest of the budget, ``max_rank`` per layer at most.
(A per-layer normalisation, e.g. shares of each layer's total energy, would instead favour layers
whose energy is concentrated, whatever its size.)
"""

from __future__ import annotations

import math

import torch

from .methods import LayerInit


def allocate_ranks(scores: dict[str, torch.Tensor], budget: int, min_rank: int, max_rank: int) -> dict[str, int]:
    """``{layer: rank}`` summing to ``budget`` that maximises the total captured score (see the
    module docstring). ``scores[layer]`` holds every candidate's score; a layer never gets more
    ranks than it has candidates."""
    caps = {name: min(max_rank, s.numel()) for name, s in scores.items()}
    if any(cap < min_rank for cap in caps.values()):
        small = min(caps, key=caps.get)
        raise ValueError(f"min_rank={min_rank} exceeds layer {small!r}'s {caps[small]} candidates")
    if not min_rank * len(scores) <= budget <= sum(caps.values()):
        raise ValueError(f"rank_budget={budget} must lie between {min_rank * len(scores)} (min_rank × {len(scores)} "
                         f"layers) and {sum(caps.values())} (max_rank, or each layer's candidates, summed)")
    ranks = {name: min_rank for name in scores}
    pool = [(value, name) for name, s in scores.items()
            for value in torch.sort(s.float().cpu(), descending=True).values[min_rank:caps[name]].tolist()]
    pool.sort(key=lambda item: item[0], reverse=True)
    for _, name in pool[: budget - min_rank * len(scores)]:
        ranks[name] += 1
    return ranks


def truncated(init: LayerInit, rank: int, scale: float) -> LayerInit:
    """A FILet ``LayerInit`` cut to its ``rank`` highest-scoring directions (its factors come
    ordered by score), the residual base update with them."""
    lora_A, lora_B = init.lora_A[:rank].contiguous(), init.lora_B[:, :rank].contiguous()
    return LayerInit(lora_A, lora_B, (scale * lora_B, lora_A), selected=init.selected[:rank], scores=init.scores)


def rank_patterns(ranks: dict[str, int], scale: float, use_rslora: bool) -> tuple[dict[str, int], dict[str, float]]:
    """PEFT ``rank_pattern`` and ``alpha_pattern`` (exact layer names) keeping every layer's
    scale ``lora_alpha_l / r_l`` (or ``/ √r_l`` with rsLoRA) equal to ``scale``."""
    import re

    rank_pattern = {re.escape(name): r for name, r in ranks.items()}
    alpha_pattern = {re.escape(name): scale * (math.sqrt(r) if use_rslora else r) for name, r in ranks.items()}
    return rank_pattern, alpha_pattern
