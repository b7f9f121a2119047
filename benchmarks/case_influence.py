"""How much of the all-supports figures one patient decides, and whether that patient's images
are unlike the others'.

    .venv/bin/python benchmarks/case_influence.py [--results docs/benchmarks/benchmark_all_supports.json]
                                                  [--json OUT.json]

Part 1 reads the all-supports benchmark (every patient as the support in turn) and, for each
dataset and protocol, recomputes its headline figures (mean over supports, worst support)
with one patient left out, both as the support and as a query, for every patient in turn; the
patient whose absence moves the mean most is the one the figures hinge on.  The per-patient
Dice as a query and as a support are listed beside.

Part 2 needs the shared data: each labelled structure's median intensity, divided by the
volume's 99th percentile, per patient; a structure at less than half or more than twice the
other patients' median of that figure is named.  It tells an image that is unlike
the others (a structure dark where it is bright in every other patient) from a failure of the
pipeline on an ordinary image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))
sys.path.insert(0, str(REPO / "benchmarks"))

from all_supports import DATASETS, cases_in  # noqa: E402  (key -> (title, folder, classes), as its JSON is keyed)

DATA = Path(os.environ.get("FOBSEGMENT_SHARED_DATA", REPO.parent / "shared" / "data"))


def headline(runs: dict, leave_out: str | None = None) -> tuple[float, float]:
    """(mean over supports, worst support) of one dataset and protocol: a support's figure is
    the mean over structures of the mean over query cases, as on the all-supports page;
    ``leave_out``: a patient dropped as the support and as a query."""
    per_support = []
    for support, r in runs.items():
        if support == leave_out:
            continue
        means = []
        for c in r["classes"].values():
            d = [v for q, v in c["cases"].items() if q != leave_out]
            if d:
                means.append(float(np.mean(d)))
        per_support.append(float(np.mean(means)))
    return float(np.mean(per_support)), float(np.min(per_support))


def as_query(runs: dict, case: str) -> float:
    """A patient's mean Dice as a query, over every support and structure."""
    d = [c["cases"][case] for r in runs.values() for c in r["classes"].values() if case in c["cases"]]
    return float(np.mean(d)) if d else float("nan")


def influence(results: dict) -> list[dict]:
    rows = []
    for ds, protocols in results.items():
        for protocol, runs in protocols.items():
            mean, worst = headline(runs)
            cases = sorted({q for r in runs.values() for c in r["classes"].values() for q in c["cases"]} | set(runs),
                           key=lambda c: (len(c), c))
            for case in cases:
                m, w = headline(runs, case)
                rows.append({"dataset": ds, "protocol": protocol, "case": case, "mean": round(mean, 4),
                             "worst": round(worst, 4), "mean_without": round(m, 4), "worst_without": round(w, 4),
                             "as_query": round(as_query(runs, case), 4),
                             "as_support": round(runs[case]["mean_dice"], 4) if case in runs else None})
    return rows


def intensity_outliers(folder: Path, classes: dict, factor: float = 2.0) -> tuple[dict, list]:
    """{case: {structure: median / p99}} and the (case, structure, its figure, that over the
    other patients' median) where that quotient lies beyond ``factor`` either way."""
    from FoBSegmentLib.evaluation import _load_case

    ratios: dict = {}
    for case in cases_in(folder):
        vol, lab = _load_case(folder, case)
        a = vol.array.astype(np.float32)
        p99 = float(np.percentile(a, 99))
        inside = {name: a[lab == v] for name, v in classes.items()}
        ratios[case] = {name: float(np.median(x)) / p99 for name, x in inside.items() if x.size}
    odd = []
    for name in classes:
        vals = {c: r[name] for c, r in ratios.items() if name in r}
        for c, v in vals.items():
            rel = v / max(float(np.median([x for k, x in vals.items() if k != c])), 1e-6)
            if not 1 / factor <= rel <= factor:
                odd.append((c, name, round(v, 3), round(rel, 2)))
    return ratios, odd


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=str(REPO / "docs" / "benchmarks" / "benchmark_all_supports.json"))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    rows = influence(results)
    report = {"influence": rows, "intensity": {}}
    for ds in results:
        for protocol in results[ds]:
            sub = [r for r in rows if r["dataset"] == ds and r["protocol"] == protocol]
            print(f"\n{DATASETS[ds][0]}, {protocol}: mean {sub[0]['mean']:.3f}, worst support {sub[0]['worst']:.3f}")
            print("  left out   mean   worst   as query   as support")
            for r in sorted(sub, key=lambda r: -abs(r["mean_without"] - r["mean"])):
                sup = f"{r['as_support']:.3f}" if r["as_support"] is not None else "  -  "
                print(f"  case {r['case']:<4} {r['mean_without']:.3f}  {r['worst_without']:.3f}    {r['as_query']:.3f}      {sup}")
    if all((DATA / DATASETS[ds][1]).is_dir() for ds in results):
        for ds in results:
            _, folder, classes = DATASETS[ds]
            ratios, odd = intensity_outliers(DATA / folder, classes)
            report["intensity"][ds] = {"ratios": ratios, "outliers": odd}
            print(f"\n{DATASETS[ds][0]}: structure median / volume p99, under half or over twice the other patients':")
            for c, name, v, rel in odd:
                others = sorted(r[name] for k, r in ratios.items() if k != c and name in r)
                print(f"  case {c} {name}: {v:.3f} (others {others[0]:.3f}-{others[-1]:.3f}; {rel:.2f}x their median)")
            if not odd:
                print("  none")
    else:
        print(f"\nintensity part skipped: the shared data (CHAOS, MS-CMRSeg) is not at {DATA}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
