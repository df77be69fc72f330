"""Figures of an initialisation report (``fisher-kernels plot``): one summary figure by default,
the per-layer detail and the ranks chart on request or when they say something.

The summary shows, per layer (block × module), where the chosen directions sit in the weight's
spectrum (the median chosen index over the number of candidates: 0 is the largest singular value,
1 the smallest), and how much of the layer's Fisher energy the chosen directions carry against
PiSSA's top-r (the r largest singular values) of the same layer.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

_BLOCK = re.compile(r"\.(\d+)\.")


def _block_and_module(name: str) -> tuple[int, str]:
    """``model.layers.3.self_attn.q_proj(.base_layer)`` -> ``(3, "self_attn.q_proj")``."""
    name = name.removesuffix(".base_layer")
    match = _BLOCK.search(name)
    if match is None:
        return 0, name
    return int(match.group(1)), name[match.end():]


def layer_summaries(report: dict) -> list[dict]:
    """Per layer with candidate scores: block, module, spectral position of the chosen directions and
    the energy fractions (chosen, PiSSA's top-r)."""
    rows = []
    for name, info in report["layers"].items():
        scores, chosen = info.get("scores") or [], info.get("selected") or []
        if not scores or not chosen:
            continue
        total = sum(scores) or 1.0
        r = len(chosen)
        block, module = _block_and_module(name)
        ordered = sorted(chosen)
        rows.append({"name": name, "block": block, "module": module, "r": r,
                     "position": ordered[len(ordered) // 2] / max(1, len(scores) - 1),
                     "chosen_energy": sum(scores[i] for i in chosen) / total,
                     "top_r_energy": sum(scores[:r]) / total})
    return rows


def summary_figure(report: dict, path: Path) -> Path:
    rows = layer_summaries(report)
    modules = list(dict.fromkeys(row["module"] for row in rows))
    blocks = sorted({row["block"] for row in rows})
    grid = [[float("nan")] * len(blocks) for _ in modules]
    for row in rows:
        grid[modules.index(row["module"])][blocks.index(row["block"])] = row["position"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.35 * len(modules) + 3.2),
                                      gridspec_kw={"width_ratios": [1.6, 1]})
    image = left.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    left.set_yticks(range(len(modules)), modules, fontsize=8)
    step = max(1, len(blocks) // 16)
    left.set_xticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]], fontsize=8)
    left.set_xlabel("block")
    left.set_title("where the chosen directions sit in each weight's spectrum\n(median index: 0 = largest "
                   "singular value, 1 = smallest)", fontsize=9)
    fig.colorbar(image, ax=left, fraction=0.04, pad=0.02)
    for i, module in enumerate(modules):
        mine = [row for row in rows if row["module"] == module]
        right.scatter([row["top_r_energy"] for row in mine], [row["chosen_energy"] for row in mine], s=14,
                      label=module, color=f"C{i % 10}")
    limit = min(1.0, 1.1 * max(max(row["chosen_energy"], row["top_r_energy"]) for row in rows))
    right.plot([0, limit], [0, limit], color="0.6", lw=0.8, ls="--")
    right.set_xlim(0, limit)
    right.set_ylim(0, limit)
    right.set_xlabel("Fisher energy of PiSSA's top-r (fraction of the layer's)")
    right.set_ylabel(f"Fisher energy of {report['method']}'s choice")
    right.set_title("energy captured, one point per layer", fontsize=9)
    right.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{report['method']}, r = {report.get('r')}, {len(rows)} layers", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def detail_figure(report: dict, path: Path) -> Path:
    """Every layer's candidate scores over the singular-value index, the chosen ones marked."""
    layers = {name: info for name, info in report["layers"].items() if info.get("scores")}
    columns = min(4, len(layers))
    rows = -(-len(layers) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.6 * rows), squeeze=False)
    for ax, (name, info) in zip(axes.flat, layers.items()):
        scores = info["scores"]
        ax.semilogy(range(len(scores)), [max(s, 1e-30) for s in scores], lw=0.8, color="0.4")
        chosen = info.get("selected") or []
        ax.scatter(chosen, [max(scores[i], 1e-30) for i in chosen], s=10, color="C3", zorder=3)
        ax.set_title(name, fontsize=7)
        ax.set_xlabel("singular-value index", fontsize=7)
        ax.set_ylabel("score", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ranks_figure(report: dict, path: Path) -> Path | None:
    """The rank of each layer, or None when every layer has the same rank (nothing to show)."""
    ranks = {name: info["rank"] for name, info in report["layers"].items() if info.get("rank")}
    if len(set(ranks.values())) <= 1:
        return None
    fig, ax = plt.subplots(figsize=(min(16, max(4, 0.12 * len(ranks))), 3))
    ax.bar(range(len(ranks)), list(ranks.values()), color="C0")
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("rank")
    ax.set_title(f"rank per layer ({sum(ranks.values())} in all)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
