"""The learned FoB generator as the walk's prompt, against the neighbour's box + settling.

    .venv/bin/python benchmarks/walk_generator.py [--weights W.pt] [--cache-dir DIR] [--json OUT.json]

A walked slice's support is its neighbour just segmented: the adjacent-slice episodes the
generator was trained on.  Same runs, same start (the default contrast seed / the oracle
slices), only the prompt of a walked slice differs:

- ``default``: the neighbour's box, padded, then box settling (the shipped default);
- ``generator box``: the box enclosed by the generator's background ring, with the neighbour
  (its embedding and kept mask) as the support, then the same settling;
- ``generator box+ring``: that box plus the ring as background points and the generator's
  foreground points, no settling (the prompt FoB gives a point-and-box model).

Held-out fold of the shipped weights: CHAOS support 2 / cases 3, 5, 8, 20 and MS-CMRSeg
support 2 / cases 3-9, protocols ep1 and full.  Needs the shared data.
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

from run_benchmark import FOLDS  # noqa: E402  (the held-out fold of the shipped weights)

FOLD = FOLDS["1"]
DATA = Path(os.environ.get("FOBSEGMENT_SHARED_DATA", REPO.parent / "shared" / "data"))


def generator_walk(predictor, generator, strategy: str):
    """Wrap ``predictor.predict`` so a slice with a segmented neighbour is prompted by the
    generator, the neighbour as its support (the run passes the neighbour's index in)."""
    from FoBSegmentLib.pipeline.slice_prompting import SlicePrediction, SlicePrompt
    from FoBSegmentLib.pipeline.support import SupportSlice
    from FoBSegmentLib.pipeline.contrast import prototypes

    default = predictor.predict

    def predict(q_emb, sup, prev_sq):
        neighbour = getattr(predictor, "neighbour_embedding", None)
        if prev_sq is None or not prev_sq.any() or neighbour is None:
            return default(q_emb, sup, prev_sq)
        nsup = SupportSlice(-1, 0.5, neighbour, prev_sq, *prototypes(neighbour, prev_sq))
        prompt, fg_prob = generator.start_prompt(q_emb, nsup)
        if strategy == "box":
            prompt = SlicePrompt(box=prompt.box)
        logits, iou = predictor.decode(q_emb, prompt)
        pred = SlicePrediction(logits, iou, prompt)
        return predictor.settle_box(q_emb, pred) if strategy == "box" else pred

    predictor.predict = predict


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights")
    ap.add_argument("--cache-dir")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not all((DATA / d["folder"]).is_dir() for d in FOLD.values()):
        print(f"skipped: the shared data (CHAOS, MS-CMRSeg) is not at {DATA}")
        return 0
    from FoBSegmentLib import Segmenter
    from FoBSegmentLib.backbones import create_backbone
    from FoBSegmentLib.evaluation import evaluate
    from FoBSegmentLib.pipeline import run as run_module
    from FoBSegmentLib.research.generator_prompts import GeneratorPrompter

    bb = create_backbone("litemedsam", "auto")
    generator = GeneratorPrompter(bb, args.weights, "box+points")
    segment_slice = run_module.QueryRun.segment_slice

    def with_neighbour(self, i, sup, prev_sq, decide_presence, prev_i=None, given="oracle"):
        # The walk passes prev_i only when deciding presence; otherwise the neighbour is i -/+ 1.
        j = prev_i if prev_i is not None else next((k for k in (i - 1, i + 1) if k in self.kept), None)
        self.segmenter.predictor.neighbour_embedding = self.embedding(j) if j in self.kept else None
        return segment_slice(self, i, sup, prev_sq, decide_presence, prev_i, given)

    run_module.QueryRun.segment_slice = with_neighbour
    results = {}
    for variant in ("default", "generator box", "generator box+ring"):
        seg = Segmenter(bb, cache_dir=args.cache_dir)
        if variant != "default":
            generator_walk(seg.predictor, generator, "box" if variant == "generator box" else "box+points")
        results[variant] = {}
        for name, d in FOLD.items():
            for protocol in ("ep1", "full"):
                r = evaluate(DATA / d["folder"], d["classes"], d["support"], d["cases"], protocol, segmenter=seg)
                results[variant][f"{name} {protocol}"] = {
                    "mean_dice": r["mean_dice"], "classes": {c: v["mean_dice"] for c, v in r["classes"].items()},
                    "cases": {c: v["cases"] for c, v in r["classes"].items()}}
                per = ", ".join(f"{c} {v['mean_dice']:.3f}" for c, v in r["classes"].items())
                print(f"{variant:<20} {name:<10} {protocol:<4} mean {r['mean_dice']:.4f} ({per})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    base = results["default"]
    for variant in results:
        if variant != "default":
            deltas = [results[variant][k]["mean_dice"] - base[k]["mean_dice"] for k in base]
            print(f"{variant}: change of the mean against the default, per fold and protocol: "
                  + ", ".join(f"{k} {d:+.4f}" for k, d in zip(base, deltas)) + f"; mean {np.mean(deltas):+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
