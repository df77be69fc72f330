"""What both quality benchmarks share: FILet's option variants, the summary over seeds (mean and
sample standard deviation), the markdown table and the learning-curve plot."""

from __future__ import annotations

import statistics

import torch

# benchmark names of FILet's option variants (both tasks)
FILET_VARIANTS = {"filet_component": {"energy": "component"}, "filet_uniform": {"magnitude": "uniform"}}
KASA = ("kasa", "peft_kasa")  # trained with KaSA's regulariser added to the loss, as the paper does


def with_int_steps(run: dict) -> dict:
    """A run read back from JSON (whose object keys are strings) with its curve keyed by step again."""
    return dict(run, curve={int(k): v for k, v in run["curve"].items()})


def best_rates(runs: list[dict]) -> str:
    """``"method rate, ..."``: each method's learning rate (its first run's, the first seed's best)."""
    return ", ".join(f"{m} {next(r['lr'] for r in runs if r['method'] == m):g}"
                     for m in dict.fromkeys(r["method"] for r in runs))


def spread(values: list[float]) -> float:
    """The sample standard deviation (0 for a single run)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs, eval_steps):
    """Per method: mean init time and, per evaluated step, (mean loss, its sample SD, mean accuracy, its SD)."""
    rows = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        row = {"init_seconds": statistics.mean(r["init_seconds"] for r in mine)}
        for s in [0] + list(eval_steps):
            losses = [r["curve"][s]["loss"] for r in mine]
            accs = [r["curve"][s]["accuracy"] for r in mine]
            row[s] = (statistics.mean(losses), spread(losses), statistics.mean(accs), spread(accs))
        rows[method] = row
    return rows


def markdown(rows, eval_steps, seeds, header) -> str:
    steps = [0] + list(eval_steps)
    lines = [header, "",
             "| method | init (s) | " + " | ".join(f"eval loss @ {s}" for s in steps) + " | "
             + " | ".join(f"accuracy @ {s}" for s in steps[1:]) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in steps) + " | " + " | ".join("---:" for _ in steps[1:]) + " |"]
    for method, row in rows.items():
        losses = " | ".join(f"{row[s][0]:.3f} ± {row[s][1]:.3f}" for s in steps)
        accs = " | ".join(f"{row[s][2]:.1%} ± {row[s][3]:.1%}" for s in steps[1:])
        lines.append(f"| {method} | {row['init_seconds']:.1f} | {losses} | {accs} |")
    lines.append("")
    lines.append(f"Mean ± sample standard deviation over seeds {seeds}.")
    return "\n".join(lines)


def plot(runs, eval_steps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [0] + list(eval_steps)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab20").colors  # one color a method for up to 20 methods
    for i, method in enumerate(dict.fromkeys(r["method"] for r in runs)):
        mine = [r for r in runs if r["method"] == method]
        for ax, key in zip(axes, ("loss", "accuracy")):
            values = torch.tensor([[r["curve"][s][key] for s in steps] for r in mine])
            mean, std = values.mean(0), values.std(0) if len(mine) > 1 else torch.zeros(len(steps))
            color = colors[(2 * i) % 20 + (2 * i) // 20 % 2]
            ax.plot(steps, mean, marker="o", label=method, color=color)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.12, color=color)
    axes[0].set_yscale("log")  # a method that starts far off (KaSA's truncation) would flatten the rest
    axes[0].set_ylabel("evaluation loss (log scale)")
    axes[1].set_ylabel("evaluation accuracy")
    for ax in axes:
        ax.set_xlabel("training step")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
