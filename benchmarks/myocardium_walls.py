"""How the myocardium's wall is drawn around the segmented blood pool, every MS-CMRSeg pair.

    .venv/bin/python benchmarks/myocardium_walls.py [--step N] [--json J] [--md M]

The myocardium is a ring: the pipeline segments the blood pool inside it and draws the wall
around that cavity (``pipeline.ring_structures``).  For every (support, query) pair of
MS-CMRSeg (the support's three ep1 slices, the query's slices that hold the myocardium: ep1),
this runs the segmenter once per wall rule and scores the myocardium (3D Dice).  The rows on
the reference blood pool separate the wall rule from the cavity's errors; the best thickness
per slice chosen with the reference is a bound no rule without it can pass.  ``--step N``
takes every N-th pair.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))
sys.path.insert(0, str(REPO / "benchmarks"))

MYO, CAVITY = 200, 500
# (name, settings changed by dotted name)
RULES = [
    ("support's thickness all round (band)", {"ring.wall": "band"}),
    ("edge from the image, 48 sectors, 0.6-1.4 x thickness, 1.5 sd, median over 7 sectors each side (default)", {}),
    ("edge from the image, spread 1.25 sd", {"ring.wall_spread": 1.25}),
    ("edge from the image, spread 2.0 sd", {"ring.wall_spread": 2.0}),
    ("edge from the image, nearest 0.8, farthest 1.3 x thickness", {"ring.wall_least": 0.8, "ring.wall_most": 1.3}),
    ("edge from the image, each sector its own edge (no median)", {"ring.wall_smooth": 0}),
]


def main(argv=None):
    import torch

    from all_supports import cases_in
    from FoBSegmentLib import Segmenter, read_volume
    from FoBSegmentLib.backbones import create_backbone
    from FoBSegmentLib.evaluation import dice, ep1_support_slices
    from FoBSegmentLib.geometry import SliceView, occupied_slices
    from FoBSegmentLib.pipeline.ring_structures import draw_wall, split_ring, wall_around, wall_thickness
    from FoBSegmentLib.settings import DEFAULT_SETTINGS

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("FOBSEGMENT_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--cache-dir", default=str(REPO / "runs" / "cache"))
    ap.add_argument("--step", type=int, default=1)
    ap.add_argument("--json", default=str(REPO / "docs" / "benchmarks" / "myocardium.json"))
    ap.add_argument("--md", default=str(REPO / "docs" / "benchmarks" / "myocardium.md"))
    args = ap.parse_args(argv)
    folder = Path(args.data) / "mscmrseg19_bssfp_cmr"
    if not folder.is_dir():
        print(f"MS-CMRSeg not found at {folder}: nothing to benchmark (set FOBSEGMENT_SHARED_DATA)")
        return 1
    torch.set_num_threads(os.cpu_count())
    backbone = create_backbone("litemedsam", "auto")
    shared = Segmenter(backbone, cache_dir=args.cache_dir)  # one cache: the blood pool is decoded once per pair
    segs = [(name, shared.with_settings(**change)) for name, change in RULES]
    cases = cases_in(folder)
    vols = {}
    for c in cases:
        v = read_volume(folder / f"image_{c}.nii.gz")
        vols[c] = (v, np.rint(read_volume(folder / f"label_{c}.nii.gz").array).astype(int))
    pairs = [(s, q) for s, q in itertools.product(cases, cases) if s != q][::args.step]
    scores: dict = {name: [] for name, _ in RULES}
    ref_rows = ["reference blood pool, band", "reference blood pool, edge from the image (default rule)",
                "reference blood pool, best thickness per slice (bound)"]
    scores.update({r: [] for r in ref_rows})
    t0 = time.perf_counter()
    for n, (s, q) in enumerate(pairs):
        sv, sl = vols[s]
        qv, ql = vols[q]
        s_view, q_view = SliceView.for_volume(sv), SliceView.for_volume(qv)
        ms, gt = s_view.to_stack(sl == MYO), q_view.to_stack(ql == MYO)
        sup, qs = ep1_support_slices(ms), occupied_slices(gt)
        for name, seg in segs:
            res = seg.segment(qv, sv, sl == MYO, support_slices=sup, query_slices=qs)
            scores[name].append(dice(q_view.to_stack(np.asarray(res.mask) > 0), gt))
        ring = DEFAULT_SETTINGS.ring
        hole = split_ring(ms, ring.hole_ratio)
        t = wall_thickness(ms, hole, [i for i in sup if hole[i].any()], ring.default_thickness_px, s_view.pixel_spacing)
        cav, img, sp = q_view.to_stack(ql == CAVITY), q_view.to_stack(qv.array), q_view.pixel_spacing
        walls = [np.zeros(gt.shape, bool) for _ in ref_rows]
        for i in occupied_slices(cav):
            walls[0][i] = wall_around(cav[i], t, sp)
            walls[1][i] = draw_wall(img[i], cav[i], t, sp, ring)
            walls[2][i] = max((wall_around(cav[i], x, sp) for x in np.arange(2.0, 20.0, 0.5)),
                              key=lambda m: dice(m, gt[i]))
        for r, w in zip(ref_rows, walls):
            scores[r].append(dice(w, gt))
        print(f"{n + 1}/{len(pairs)} support {s} query {q}: " + "  ".join(f"{v[-1]:.3f}" for v in scores.values()),
              flush=True)
    seconds = time.perf_counter() - t0
    Path(args.json).write_text(json.dumps({"pairs": pairs, "dice": scores}, indent=1))
    Path(args.md).write_text(render(scores, pairs, seconds))
    print(f"wrote {args.md}")
    return 0


def render(scores: dict, pairs, seconds: float) -> str:
    from all_supports import _version

    base = np.asarray(scores[RULES[0][0]])
    lines = [
        "# The myocardium: how the wall is drawn around the blood pool",
        "",
        f"`.venv/bin/python benchmarks/myocardium_walls.py` (FoBSegment {_version()}; {len(pairs)} MS-CMRSeg",
        f"(support, query) pairs, ep1; {seconds / 60:.0f} min; raw: [myocardium.json](myocardium.json)).",
        "",
        "The pipeline segments the blood pool inside the myocardium and draws the wall around it",
        "(`pipeline.ring_structures`). The first rows run the segmenter once per wall rule",
        "(`ring.wall`, `ring.wall_spread`, `ring.wall_most`, `ring.wall_least`, `ring.wall_smooth`); the last rows draw",
        "the wall around the reference blood pool instead, to separate the rule from the cavity's",
        "errors. The best thickness per slice is chosen with the reference myocardium: a bound that",
        "no rule of one thickness all round can pass. The last column compares each row with the",
        "first, pair by pair.",
        "",
        "| wall rule | myocardium Dice (mean over pairs) | min | pairs better / worse than the band by > 0.01 |",
        "|---|---|---|---|",
    ]
    for name, v in scores.items():
        v = np.asarray(v)
        lines.append(f"| {name} | {v.mean():.4f} | {v.min():.3f} | {(v > base + 0.01).sum()} / {(v < base - 0.01).sum()} |")
    lines += [
        "",
        "The image rule looks along each of 48 directions from the cavity for the first distance",
        "where the image leaves the wall's intensity, and takes the median of those edges over the",
        "neighbouring directions. It gains where a patient's wall is thicker or thinner than the",
        "support's, or uneven; it loses where the tissue beyond the wall is as dark as the wall (it",
        "then runs to the farthest edge allowed) and where the wall's outer part is brighter than its",
        "inner part, which sets the wall's intensity (patient 6: the edge is found too soon). The",
        "rule it replaced (every connected wall-like pixel out to 1.3x the thickness, commit",
        "bf98111) scored 0.7903 on these pairs and 0.8537 on",
        "the reference blood pool. Most of what is left is the blood pool's: the same rule scores",
        "more on the reference blood pool than on the segmented one, the worst slices lying at the",
        "base, where the reference cuts the blood pool at the valve plane and the wall is open, and",
        "at the apex, where the segmented cavity takes in part of the wall.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
