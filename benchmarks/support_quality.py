"""Which supports fail, and can the support alone warn the user before the run?

    .venv/bin/python benchmarks/support_quality.py [--results docs/benchmarks/benchmark_all_supports.json]
                                                   [--json OUT.json]

Reads the all-supports benchmark (every patient as the support in turn, EP1) and, for every
support patient and structure, lists the mean Dice over the queries.  It then computes two
signals from the support alone, on its EP1 support slices, as the pipeline sees them:

- ``distinct``: 1 - cos(structure prototype, surroundings prototype) of the support slice's
  embedding: how unlike its surroundings the structure looks to the encoder;
- ``self_iou``: the IoU between the annotation and SAM's mask from the annotation's own box on
  the support slice: whether SAM can reproduce the structure there at all.

and prints the rank correlation of each with the Dice, and for each signal the threshold that
would flag the failing structure-supports (mean Dice < ``--fail``), with its hits and false
alarms.  Needs the shared data (CHAOS, MS-CMRSeg).
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

from all_supports import DATASETS  # noqa: E402  (key -> (title, folder, classes), as its JSON is keyed)
DATA = Path(os.environ.get("FOBSEGMENT_SHARED_DATA", REPO.parent / "shared" / "data"))


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def support_signals(seg, folder: Path, case: str, value: int, slices: list[int]) -> dict:
    from FoBSegmentLib.io import read_volume
    from FoBSegmentLib.pipeline.contrast import cosine
    from FoBSegmentLib.pipeline.slice_prompting import box_from_mask, choose_mask

    vol = read_volume(folder / f"image_{case}.nii.gz")
    mask = np.rint(read_volume(folder / f"label_{case}.nii.gz").array) == value
    sup = seg.prepare_support(vol, mask, slices)
    distinct, self_iou = [], []
    for s in sup.slices:
        distinct.append(1.0 - cosine(s.proto_fg, s.proto_bg))
        dec = seg.backbone.decode(s.embedding, box=box_from_mask(s.mask_sq))
        logits, _ = choose_mask(dec.logits, dec.iou)
        pred = logits > 0
        inter, union = (pred & s.mask_sq).sum(), (pred | s.mask_sq).sum()
        self_iou.append(float(inter / max(union, 1)))
    return {"distinct": float(np.mean(distinct)), "self_iou": float(np.mean(self_iou))}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=str(REPO / "docs" / "benchmarks" / "benchmark_all_supports.json"))
    ap.add_argument("--fail", type=float, default=0.70, help="mean Dice below which a structure-support fails")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not all((DATA / f).is_dir() for _, f, _ in DATASETS.values()):
        print(f"skipped: the shared data (CHAOS, MS-CMRSeg) is not at {DATA}")
        return 0
    from FoBSegmentLib import Segmenter

    results = json.loads(Path(args.results).read_text())
    seg = Segmenter("litemedsam", cache_dir=None)
    rows = []
    for ds, (_, folder, classes) in DATASETS.items():
        for support, r in results[ds]["ep1"].items():
            for name, c in r["classes"].items():
                sig = support_signals(seg, DATA / folder, support, classes[name], c["support_slices"])
                worst = min(c["cases"], key=c["cases"].get)
                rows.append({"dataset": ds, "support": support, "structure": name, "mean_dice": c["mean_dice"],
                             "worst_case": worst, "worst_dice": c["cases"][worst], **sig})
                print(f"{ds:<6} support {support:<3} {name:<13} mean Dice {c['mean_dice']:.3f} (worst: case {worst} "
                      f"{c['cases'][worst]:.3f})  distinct {sig['distinct']:.3f}  self IoU {sig['self_iou']:.3f}",
                      flush=True)
    print(f"\nfailing structure-supports (mean Dice < {args.fail}):")
    for r in rows:
        if r["mean_dice"] < args.fail:
            print(f"  {r['dataset']} support {r['support']} {r['structure']}: {r['mean_dice']:.3f}")
    report = {"rows": rows, "signals": {}}
    for key in ("distinct", "self_iou"):
        for ds in DATASETS:
            sub = [r for r in rows if r["dataset"] == ds]
            rho = spearman([r[key] for r in sub], [r["mean_dice"] for r in sub])
            print(f"{key:<9} {ds:<6} Spearman rho with mean Dice {rho:+.2f} (n={len(sub)})")
            report["signals"][f"{key}/{ds}"] = round(rho, 3)
        # Per structure the scales differ (a myocardium ring is never as distinct as a kidney):
        # a threshold relative to that structure's median across supports.
        flagged = []
        for r in rows:
            same = [x[key] for x in rows if x["dataset"] == r["dataset"] and x["structure"] == r["structure"]]
            r[f"{key}_rel"] = r[key] / max(float(np.median(same)), 1e-6)
        fails = {id(r) for r in rows if r["mean_dice"] < args.fail}
        best = None
        for t in sorted({round(r[f"{key}_rel"], 3) for r in rows}):
            flagged = {id(r) for r in rows if r[f"{key}_rel"] <= t}
            hits, alarms = len(flagged & fails), len(flagged - fails)
            if best is None or hits - alarms > best[1] - best[2]:
                best = (t, hits, alarms)
        if best and fails:
            print(f"{key:<9} flag <= {best[0]:.3f} x the structure's median: {best[1]} of {len(fails)} failures "
                  f"flagged, {best[2]} false alarms of {len(rows) - len(fails)}")
            report["signals"][f"{key}/threshold"] = {"relative": best[0], "hits": best[1], "failures": len(fails),
                                                     "false_alarms": best[2]}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
