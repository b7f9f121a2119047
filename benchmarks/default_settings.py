"""Why the default's seed and walk settings are what they are: each changed alone.

    .venv/bin/python benchmarks/default_settings.py [--only NAME ...] [--resume]

Runs the default method (contrast seed + propagation) on both cross-validation folds of
docs/benchmarks/benchmark.md (CHAOS and MS-CMRSeg, protocols ep1 and full) with the shipped settings,
then with one field of `FoBSegmentLib.settings.SegmenterSettings` changed at a time, and writes
docs/benchmarks/default_settings.md (and .json).  These are the cases the settings were chosen on: the
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

# (name, what it means, settings changed by dotted name: SegmenterSettings.with_changes)
VARIANTS = [
    ("default", "the shipped settings", {}),
    ("one contrast level", "candidates cut at contrast 0 only", {"contrast.levels": (0.0,)}),
    ("no surroundings", "candidates not weighted by their surroundings", {"contrast.context_weight": 0.0}),
    ("surroundings weight 6", "", {"contrast.context_weight": 6.0}),
    ("surroundings weight 14", "", {"contrast.context_weight": 14.0}),
    ("box margin 2 px", "propagated box 2 px around the neighbour", {"walk.pad_px": 2.0}),
    ("box margin 6 px", "", {"walk.pad_px": 6.0}),
    ("no box settling", "the propagated box is the neighbour's, not re-fitted to SAM's mask",
     {"walk.max_settle_prompts": 0}),
    ("no side prior", "whole-volume seed search ignores which side of the body's midline a region lies",
     {"seed.side_prior": False}),
    ("one walk no split", "start regions of two touching look-alikes kept whole, one walk from the clearest seed",
     {"contrast.split_fraction": None, "seed.walks": 1}),
    ("two places per slice", "the seed search also scores the next best contrast region of each slice",
     {"seed.regions": 2}),
    ("shape prior", "a seed's score x the likeness of its mask's solidity to the support's (width 0.15)",
     {"seed.shape_width": 0.15, "seed.shape_max_solidity": 1.01}),
    ("no shape prior", "seeds not weighted by their shape, not even for a support that is a crescent on every slice",
     {"seed.shape_width": 0.0}),
    ("no support agreement", "a walk's evidence not weighed by the support's agreement with it (before)",
     {"seed.agreement_weight": 0.0}),
]
# Measured worse and removed from the code (rows kept from the last run that had them).
REMOVED = {
    "support contrast only": "the walk compares with the support only (removed)",
    "middle start": "ep1 walk starts on the middle slice of the extent (removed)",
    "seed position prior 40 px": "whole-volume seed search discounts regions far from the support's position (removed)",
    "previous rules": "one contrast level, no surroundings, box margin 2 px and support contrast only, together (removed)",
}


def main(argv=None):
    import torch

    from FoBSegmentLib import Segmenter
    from FoBSegmentLib.backbones import create_backbone
    from FoBSegmentLib.evaluation import evaluate
    from run_benchmark import FOLDS

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("FOBSEGMENT_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--cache-dir", default=str(REPO / "runs" / "cache"))
    ap.add_argument("--only", nargs="+", help="variant names to run (default: all)")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "default_settings.md"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in the JSON next to --out and run only the others")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    data = Path(args.data)
    if not data.is_dir():
        print(f"shared data not found at {data}: nothing to measure (set FOBSEGMENT_SHARED_DATA)")
        return 1
    backbone = create_backbone("litemedsam", "auto")
    base = Segmenter(backbone, cache_dir=args.cache_dir)
    out = Path(args.out)
    results = json.loads(out.with_suffix(".json").read_text()) if args.resume and out.with_suffix(".json").is_file() else {}
    wanted = [name for name, _, _ in VARIANTS if not args.only or name in args.only]
    t_all = time.perf_counter()
    for name, _, change in VARIANTS:
        if name not in wanted or name in results:
            continue
        seg = base.with_settings(**change)
        row = {}
        for fold, datasets in FOLDS.items():
            for dname, d in datasets.items():
                for protocol in ("ep1", "full"):
                    r = evaluate(data / d["folder"], d["classes"], d["support"], d["cases"], protocol, segmenter=seg)
                    row[f"{dname.split()[0]} {protocol} fold {fold}"] = r["mean_dice"]
        results[name] = row
        print(f"{name:<24} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
        # Written after every row, so a run stopped part-way leaves a valid table (--resume).
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        out.write_text(render(results, time.perf_counter() - t_all, [n for n in wanted if n not in results]))
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
    notes.update({name: (what, {}) for name, what in REMOVED.items()})
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
