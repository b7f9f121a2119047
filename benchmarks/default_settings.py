"""Why the default's seed and walk settings are what they are: each changed alone.

    .venv/bin/python benchmarks/default_settings.py [--only NAME ...] [--resume]

Runs the default method (contrast seed + propagation) on both cross-validation folds of
docs/benchmark.md (CHAOS and MS-CMRSeg, protocols ep1 and full) with the shipped settings,
then with one setting of `FoBSegmentLib.volume_segmenter` changed at a time, and writes
docs/default_settings.md (and .json).  These are the cases the settings were chosen on: the
table shows how sensitive the result is to each choice, not a held-out score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))
sys.path.insert(0, str(REPO / "benchmarks"))

# (name, what it means, module settings changed)
VARIANTS = [
    ("default", "the shipped settings", {}),
    ("one contrast level", "candidates cut at contrast 0 only", {"CONTRAST_LEVELS": (0.0,)}),
    ("no surroundings", "candidates not weighted by their surroundings", {"CONTEXT_WEIGHT": 0.0}),
    ("surroundings weight 6", "", {"CONTEXT_WEIGHT": 6.0}),
    ("surroundings weight 14", "", {"CONTEXT_WEIGHT": 14.0}),
    ("box margin 2 px", "propagated box 2 px around the neighbour (before)", {"PROPAGATE_PAD_PX": 2.0}),
    ("box margin 6 px", "", {"PROPAGATE_PAD_PX": 6.0}),
    ("no box settling", "the propagated box is the neighbour's, not re-fitted to SAM's mask (before)",
     {"PROPAGATE_SETTLE": 0}),
    ("support contrast only", "the walk compares with the support only", {"WALK_NEIGHBOUR_CONTRAST": False}),
    ("middle start", "ep1 walk starts on the middle slice of the extent (before)", {"START_SEARCH": False}),
    ("seed position prior 40 px", "whole-volume seed search discounts regions far from the support's position",
     {"SEED_POSITION_SIGMA_PX": 40.0}),
    ("no side prior", "whole-volume seed search ignores which side of the body's midline a region lies (before)",
     {"SEED_SIDE_PRIOR": False}),
    ("previous rules", "one contrast level, no surroundings, box margin 2 px and support contrast only, "
     "together (the seed search still scans the whole volume)",
     {"CONTRAST_LEVELS": (0.0,), "CONTEXT_WEIGHT": 0.0, "PROPAGATE_PAD_PX": 2.0, "WALK_NEIGHBOUR_CONTRAST": False}),
]


def main(argv=None):
    import torch

    from FoBSegmentLib import volume_segmenter as vs
    from FoBSegmentLib.backbones import create_backbone
    from FoBSegmentLib.evaluation import evaluate
    from run_benchmark import FOLDS

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("FOBSEGMENT_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--cache-dir", default=str(REPO / "runs" / "cache"))
    ap.add_argument("--only", nargs="+", help="variant names to run (default: all)")
    ap.add_argument("--out", default=str(REPO / "docs" / "default_settings.md"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in the JSON next to --out and run only the others")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    data = Path(args.data)
    if not data.is_dir():
        print(f"shared data not found at {data}: nothing to measure (set FOBSEGMENT_SHARED_DATA)")
        return 1
    backbone = create_backbone("litemedsam", "auto")
    shipped = {k: getattr(vs, k) for _, _, change in VARIANTS for k in change}
    out = Path(args.out)
    results = json.loads(out.with_suffix(".json").read_text()) if args.resume and out.with_suffix(".json").is_file() else {}
    wanted = [name for name, _, _ in VARIANTS if not args.only or name in args.only]
    t_all = time.perf_counter()
    for name, _, change in VARIANTS:
        if name not in wanted or name in results:
            continue
        for k, v in {**shipped, **change}.items():
            setattr(vs, k, v)
        row = {}
        for fold, datasets in FOLDS.items():
            for dname, d in datasets.items():
                for protocol in ("ep1", "full"):
                    seg = vs.Segmenter(backbone, cache_dir=args.cache_dir)
                    r = evaluate(data / d["folder"], d["classes"], d["support"], d["cases"], protocol, segmenter=seg)
                    row[f"{dname.split()[0]} {protocol} fold {fold}"] = r["mean_dice"]
        results[name] = row
        print(f"{name:<24} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
        # Written after every row, so a run stopped part-way leaves a valid table (--resume).
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        out.write_text(render(results, time.perf_counter() - t_all, [n for n in wanted if n not in results]))
    for k, v in shipped.items():
        setattr(vs, k, v)
    print(f"wrote {out}")
    return 0


def render(results: dict, seconds: float, missing=()) -> str:
    cols = list(next(iter(results.values())))
    lines = [
        "# The default's settings, each changed alone",
        "",
        "Regenerated by `benchmarks/default_settings.py` (raw numbers in `default_settings.json`).",
        "Default method (background-contrast seed + propagation), LiteMedSAM on the CPU, the two",
        "folds of [benchmark.md](benchmark.md) / [benchmark_fold2.md](benchmark_fold2.md); mean 3D",
        "Dice over queries and classes. The settings were chosen on these very cases, so this",
        "shows how much each choice matters, not a held-out score; the per-support spread is in",
        "[benchmark_all_supports.md](benchmark_all_supports.md).",
        "",
    ]
    notes = {name: (what, change) for name, what, change in VARIANTS}
    lines += ["| variant | change | " + " | ".join(cols) + " | mean |", "|---|---|" + "---|" * (len(cols) + 1)]
    for name, row in results.items():
        what, change = notes[name]
        desc = what or ", ".join(f"`{k} = {v}`" for k, v in change.items())
        vals = list(row.values())
        lines.append(f"| {name} | {desc} | " + " | ".join(f"{v:.3f}" for v in vals)
                     + f" | **{sum(vals) / len(vals):.3f}** |")
    if missing:
        lines += ["", "Not run yet with the current code: " + ", ".join(missing)
                  + " (`benchmarks/default_settings.py --resume` adds them)."]
    lines += ["", f"Time of the last run {seconds / 60:.1f} min (embeddings cached).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
