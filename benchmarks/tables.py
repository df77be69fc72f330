"""The README's and docs' result tables, rendered from the committed raw results, so that they
cannot drift from them.

    python -m benchmarks.tables            # rewrite every marked table in README.md and docs/*.md
    python -m benchmarks.tables --check    # exit 1 if any marked table differs from its raw results

A table sits between ``<!-- table: NAME -->`` and ``<!-- /table -->``; ``NAME`` is a key of
:data:`TABLES`, each a function of the repository root that returns the markdown.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .quality_core import best_rates, markdown, summarise, with_int_steps

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md", "docs/benchmarks.md", "docs/usage.md", "docs/distributed.md"]
MARKER = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def pass_cost(root: Path) -> str:
    """``benchmarks/results/pass_cost.json`` (``python -m benchmarks.pass_cost --json ...``)."""
    report = json.loads((root / "benchmarks/results/pass_cost.json").read_text())
    train = report["training"]
    lines = [f"| method | operator calls per batch | × training fwd+bwd | host syncs per batch (the model's own "
             f"{train['syncs']} included) |", "| --- | ---: | ---: | ---: |"]
    for row in report["methods"]:
        lines.append(f"| {row['method']} | {row['calls']:,.0f} | {row['calls'] / train['calls']:.2f}× | "
                     f"{row['syncs']:g} |")
    return "\n".join(lines)


def quality_siqa(root: Path) -> str:
    """``benchmarks/results/quality_siqa/quality_siqa.json`` (the causal-LM benchmark)."""
    data = json.loads((root / "benchmarks/results/quality_siqa/quality_siqa.json").read_text())
    runs, args = [with_int_steps(r) for r in data["runs"]], data["args"]
    table = markdown(summarise(runs, args["eval_steps"]), args["eval_steps"], args["seeds"], header="").strip()
    return f"{table}\n\nBest learning rates (seed 0): {best_rates(runs)}."


def _quality(path: Path) -> str:
    data = json.loads(path.read_text())
    runs, args = [with_int_steps(r) for r in data["runs"]], data["args"]
    return markdown(summarise(runs, args["eval_steps"]), args["eval_steps"], args["seeds"], header="").strip()


def quality_bbc(root: Path) -> str:
    """``benchmarks/results/quality/quality.json`` (the encoder benchmark at one learning rate)."""
    return _quality(root / "benchmarks/results/quality/quality.json")


def quality_bbc_sweep(root: Path) -> str:
    """``benchmarks/results/quality_sweep/quality.json`` (the encoder benchmark, best of two rates)."""
    return _quality(root / "benchmarks/results/quality_sweep/quality.json")


def memory_estimates(root: Path) -> str:
    """``benchmarks/results/memory_estimates.json`` (``python -m benchmarks.memory_estimates --json ...``)."""
    from .memory_estimates import table

    return table(json.loads((root / "benchmarks/results/memory_estimates.json").read_text()))


def qlora_fit(root: Path) -> str:
    """``benchmarks/results/qlora_fit.json`` (``python -m benchmarks.qlora_fit --json ...``)."""
    from .qlora_fit import table

    return table(json.loads((root / "benchmarks/results/qlora_fit.json").read_text()))


def qlora_routes(root: Path) -> str:
    """``benchmarks/results/qlora_routes.json`` (``python -m benchmarks.qlora_routes --json ...``)."""
    from .qlora_routes import table

    return table(json.loads((root / "benchmarks/results/qlora_routes.json").read_text()))


def sharded_statistics(root: Path) -> str:
    """``benchmarks/results/sharded_statistics.json`` (``python -m benchmarks.sharded_statistics --out ...``)."""
    from .sharded_statistics import table

    return table(json.loads((root / "benchmarks/results/sharded_statistics.json").read_text()))


TABLES = {"pass-cost": pass_cost, "quality-siqa": quality_siqa, "quality-bbc": quality_bbc,
          "quality-bbc-sweep": quality_bbc_sweep, "memory-estimates": memory_estimates, "qlora-fit": qlora_fit,
          "qlora-routes": qlora_routes, "sharded-statistics": sharded_statistics}


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every marked table replaced by its rendering."""
    def table(match):
        name = match.group("name")
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r}; known: {sorted(TABLES)}")
        return f"{match.group(1)}{TABLES[name](root)}\n{match.group(4)}"

    return MARKER.sub(table, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report documents whose tables differ")
    args = parser.parse_args(argv)
    stale = []
    for name in DOCUMENTS:
        path = ROOT / name
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(name)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"tables out of date in {', '.join(stale)}: run python -m benchmarks.tables")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
