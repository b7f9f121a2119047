"""The current default on the two benchmark folds, read from the all-supports runs (no model runs).

    .venv/bin/python benchmarks/fold_default.py [--all-supports docs/benchmarks/benchmark_all_supports.json]

The fold pages (benchmark.md, benchmark_fold2.md) compare the learned generator with the default
on one support and a few queries each. The all-supports page runs the default with every support
on every other case through the same `evaluation.evaluate`, so each fold's default rows are a
subset of its pairs: this prints them beside the rows the fold page recorded, per class and
protocol, as markdown tables to paste under the fold page's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from run_benchmark import FOLDS  # noqa: E402

DATASET_KEYS = {"CHAOS T2-SPIR MRI": "chaos", "MS-CMRSeg bSSFP": "cmr"}
FOLD_ROWS = {"ep1": "default: contrast seed + propagation", "full": "default, full volume (no oracle)"}
FOLD_PAGES = {"1": "benchmark.json", "2": "benchmark_fold2.json"}


def fold_means(runs: dict, support: str, cases: list[str], classes: list[str]) -> dict[str, float]:
    """Per class, the mean 3D Dice over ``cases`` of one support's run (an all-supports entry)."""
    run = runs.get(support)
    if run is None:
        raise SystemExit(f"the all-supports runs have no support {support}: run benchmarks/all_supports.py first")
    means = {}
    for cls in classes:
        per_case = run["classes"][cls]["cases"]
        missing = [c for c in cases if c not in per_case]
        if missing:
            raise SystemExit(f"support {support}, {cls}: no run on case(s) {', '.join(missing)} in the "
                             "all-supports json")
        means[cls] = sum(per_case[c] for c in cases) / len(cases)
    return means


def table(fold: str, name: str, spec: dict, all_runs: dict, recorded: dict) -> list[str]:
    classes = list(spec["classes"])
    lines = [f"### Fold {fold}, {name} (support case {spec['support']}, queries {', '.join(spec['cases'])})", "",
             "| default | protocol | " + " | ".join(classes) + " | mean |",
             "|---|---|" + "---|" * (len(classes) + 1)]
    for protocol, row in FOLD_ROWS.items():
        now = fold_means(all_runs[DATASET_KEYS[name]][protocol], spec["support"], spec["cases"], classes)
        old = recorded.get(f"{name} | {row}")
        if old is not None:
            old_means = [old["classes"][c]["mean_dice"] for c in classes]
            lines.append(f"| as this page recorded | {protocol} | " + " | ".join(f"{v:.3f}" for v in old_means)
                         + f" | {sum(old_means) / len(old_means):.3f} |")
        values = [now[c] for c in classes]
        lines.append(f"| current (all-supports runs) | {protocol} | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | **{sum(values) / len(values):.3f}** |")
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all-supports", default=str(REPO / "docs" / "benchmarks" / "benchmark_all_supports.json"))
    args = ap.parse_args(argv)
    path = Path(args.all_supports)
    if not path.is_file():
        print(f"{path} not found: run benchmarks/all_supports.py first (or give --all-supports)")
        return 2
    all_runs = json.loads(path.read_text())
    for fold, datasets in FOLDS.items():
        page = REPO / "docs" / "benchmarks" / FOLD_PAGES[fold]
        recorded = json.loads(page.read_text()) if page.is_file() else {}
        for name, spec in datasets.items():
            print("\n".join(table(fold, name, spec, all_runs, recorded)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
