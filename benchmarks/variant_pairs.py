"""Settings changed on some (support, query) pairs, against the all-supports page's figures.

    .venv/bin/python benchmarks/variant_pairs.py --set presence.rel_contrast=0.35 \\
        [--dataset chaos] [--protocol full] [--supports 1 2 3] [--classes liver spleen] [--out runs/v.json]

A cheaper look at a setting than a full all-supports run: the default pipeline with the
settings given by dotted name (``SegmenterSettings.with_changes``), every query of each chosen
support, and per structure the mean 3D Dice of the same pairs on
docs/benchmarks/benchmark_all_supports.json (which must be of the current default: the page
says at which commit), with the pairs that move by more than 0.05.  ``--out`` keeps each
pair's Dice and resumes.  Needs the shared data.
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

from all_supports import DATASETS, WITHIN, cases_in  # noqa: E402

PAGE = REPO / "docs" / "benchmarks" / "benchmark_all_supports.json"


def parse_set(items: list) -> dict:
    """``["a.b=0.3", "c.d=[0, 0.1]"]`` -> {"a.b": 0.3, "c.d": (0, 0.1)} (values read as JSON)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE, e.g. presence.rel_contrast=0.35")
        try:
            v = json.loads(value)
        except json.JSONDecodeError:
            raise SystemExit(f"--set {item!r}: the value must be a number, true/false, null, a quoted string or a list")
        out[name] = tuple(v) if isinstance(v, list) else v
    return out


def run_pairs(seg, data: Path, key: str, protocol: str, supports, classes, done: dict, out: Path | None) -> dict:
    """Each support's queries through ``evaluate``, as the all-supports page runs them (its
    support slices, oracle slices and bound); a support already in ``done`` for a class is
    not run again for it (its bounding class is, to bound it)."""
    from FoBSegmentLib.evaluation import evaluate

    _, folder, labels = DATASETS[key]
    bound_by = WITHIN.get(key, {})
    cases = cases_in(data / folder)
    for s in supports:
        todo = [c for c in classes if not any(k.startswith(f"{c}|{s}|") for k in done)]
        todo += [bound_by[c] for c in todo if c in bound_by and bound_by[c] not in todo]
        if not todo:
            continue
        r = evaluate(data / folder, {c: labels[c] for c in todo}, s, [c for c in cases if c != s], protocol,
                     segmenter=seg, within={c: b for c, b in bound_by.items() if c in todo})
        for name in todo:
            for q, d in r["classes"][name]["cases"].items():
                done[f"{name}|{s}|{q}"] = d
        if out is not None:
            out.write_text(json.dumps(done))
    return done


def compare(done: dict, page: dict, key: str, protocol: str) -> list[str]:
    lines, by = [], {}
    for k, v in done.items():
        name, s, q = k.split("|")
        by.setdefault(name, []).append((page[key][protocol][s]["classes"][name]["cases"][q], v, s, q))
    for name, rows in by.items():
        base, var = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
        lines.append(f"{name:<14} pairs {len(rows):>3}  default {base.mean():.4f}  variant {var.mean():.4f}  "
                     f"({var.mean() - base.mean():+.4f}; {int((var - base > 0.01).sum())} up, "
                     f"{int((base - var > 0.01).sum())} down by more than 0.01)")
        for b, v, s, q in sorted(rows, key=lambda r: r[1] - r[0]):
            if abs(v - b) > 0.05:
                lines.append(f"    support {s} -> {q}: {b:.3f} -> {v:.3f}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", nargs="+", required=True, metavar="NAME=VALUE")
    ap.add_argument("--data", default=os.environ.get("FOBSEGMENT_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="chaos")
    ap.add_argument("--protocol", choices=["ep1", "full"], default="full")
    ap.add_argument("--supports", nargs="+", help="default: every case")
    ap.add_argument("--classes", nargs="+", help="default: every class of the dataset")
    ap.add_argument("--cache-dir", default=str(REPO / "runs" / "cache"))
    ap.add_argument("--out", help="keep each pair's Dice here (JSON) and resume from it")
    args = ap.parse_args(argv)
    changes = parse_set(args.set)
    data = Path(args.data)
    _, folder, labels = DATASETS[args.dataset]
    if not (data / folder).is_dir():
        print(f"shared data not found at {data / folder}: nothing to benchmark (set FOBSEGMENT_SHARED_DATA)")
        return 1
    cases = cases_in(data / folder)
    supports, classes = args.supports or cases, args.classes or list(labels)
    unknown = [s for s in supports if s not in cases] + [c for c in classes if c not in labels]
    if unknown:
        print(f"not in {args.dataset}: {', '.join(unknown)} (cases {', '.join(cases)}; classes {', '.join(labels)})")
        return 2
    unbounded = [f"{c} (within {b})" for c, b in WITHIN.get(args.dataset, {}).items()
                 if c in classes and b not in classes]
    if unbounded:
        print(f"--classes: {', '.join(unbounded)} is scored within its bound, as on the all-supports page: "
              "add the bounding class")
        return 2
    from FoBSegmentLib.settings import DEFAULT_SETTINGS

    try:  # the settings check each value's kind and range: refused before a model is built
        settings = DEFAULT_SETTINGS.with_changes(**changes)
    except (ValueError, TypeError) as e:
        print(f"--set: {e}")
        return 2
    import torch

    from FoBSegmentLib import Segmenter
    from FoBSegmentLib.backbones import create_backbone

    torch.set_num_threads(os.cpu_count())
    seg = Segmenter(create_backbone("litemedsam", "auto"), cache_dir=args.cache_dir, settings=settings)
    out = Path(args.out) if args.out else None
    done = json.loads(out.read_text()) if out is not None and out.is_file() else {}
    run_pairs(seg, data, args.dataset, args.protocol, supports, classes, done, out)
    print(f"{args.dataset} {args.protocol}, {' '.join(args.set)}, supports {' '.join(supports)}:")
    print("\n".join(compare(done, json.loads(PAGE.read_text()), args.dataset, args.protocol)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
