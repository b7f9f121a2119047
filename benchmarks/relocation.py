"""Relocation: can a start prompter find the structure in another patient's slice?

    .venv/bin/python benchmarks/relocation.py --weights W.pt [W2.pt ...] [--cache-dir DIR] \
        [--json docs/benchmarks/relocation.json] [--md docs/benchmarks/relocation.md]

The seed search of every run starts here: a slice of the query, a support slice of another
patient, and no neighbour to copy from.  For each structure of the held-out fold of the
shipped generator (CHAOS support 2 / cases 3, 5, 8, 20; MS-CMRSeg support 2 / cases 3-9),
the query slices at 1/6, 1/2 and 5/6 of the structure's extent are each prompted from the
support slice at the same relative position by:

- the support's own box (naive: no relocation at all),
- the training-free contrast localisation (the default start prompt),
- each generator given, with the support ring as its position prior (as trained), without a
  prior, and with the ring around the contrast region on the query as its prior (the
  generator refining the training-free localisation),
- the ground-truth box (the ceiling).

LiteMedSAM decodes every prompt; the figure is the 2D Dice of that mask on the 256 work grid
against the ground truth, and the share of prompts whose box centre lies inside the structure.
Several snapshots of one training run (``fobsegment train --snapshot-every``) give a curve.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))

DATASETS = {
    "CHAOS T2-SPIR MRI": dict(folder="chaos_t2spir_mri", support="2", cases=["3", "5", "8", "20"],
                              classes={"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}),
    "MS-CMRSeg bSSFP": dict(folder="mscmrseg19_bssfp_cmr", support="2", cases=[str(i) for i in range(3, 10)],
                            classes={"lv_bp": 500, "lv_myo": 200, "rv": 600}),
}
FRACTIONS = (1 / 6, 1 / 2, 5 / 6)


def episodes(seg, data: Path, d: dict):
    """Yield (class, case, query embedding, ground truth on the work grid, support slice)."""
    from FoBSegmentLib.backbones.base import slice_to_square
    from FoBSegmentLib.evaluation import _load_case, ep1_support_slices
    from FoBSegmentLib.geometry import SliceView, occupied_slices
    from FoBSegmentLib.preprocessing import fit_normalisation

    s_vol, s_lab = _load_case(data / d["folder"], d["support"])
    s_view = SliceView.for_volume(s_vol)
    supports = {}
    for name, value in d["classes"].items():
        supports[name] = seg.prepare_support(s_vol, s_lab == value, ep1_support_slices(s_view.to_stack(s_lab == value)))
    for case in d["cases"]:
        q_vol, q_lab = _load_case(data / d["folder"], case)
        view = SliceView.for_volume(q_vol)
        stack, labels = view.to_stack(q_vol.array), view.to_stack(q_lab)
        norm = fit_normalisation(q_vol.array)
        for name, value in d["classes"].items():
            occ = occupied_slices(labels == value)
            if not occ:
                continue
            picks = sorted({occ[min(len(occ) - 1, int(len(occ) * f))] for f in FRACTIONS})
            embs = seg.embedder.embed(stack, norm, picks)
            for i in picks:
                rel = 0.5 if occ[-1] == occ[0] else (i - occ[0]) / (occ[-1] - occ[0])
                gt = slice_to_square((labels[i] == value).astype(np.float32)) > 0.5
                yield name, case, embs[i], gt, supports[name].nearest_rel(rel)


def score(seg, box, q_emb, gt) -> tuple[float, bool]:
    from FoBSegmentLib.evaluation import dice
    from FoBSegmentLib.pipeline.slice_prompting import SlicePrompt

    logits, _ = seg.predictor.decode(q_emb, SlicePrompt.make(box=np.asarray(box, np.float32)))
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    n = gt.shape[0]
    inside = bool(gt[min(n - 1, max(0, int(cy * n))), min(n - 1, max(0, int(cx * n)))])
    return dice(logits > 0, gt), inside


def default_segmenter(data: Path, cache_dir):
    """The default Segmenter on LiteMedSAM, or None (with the reason printed) without the data."""
    from FoBSegmentLib import Segmenter
    from FoBSegmentLib.backbones import create_backbone

    if not data.is_dir():
        print(f"shared data not found at {data}: nothing to measure (set FOBSEGMENT_SHARED_DATA)")
        return None
    return Segmenter(create_backbone("litemedsam", "auto"), cache_dir=cache_dir)


def main(argv=None) -> int:
    from FoBSegmentLib.backbones.cpu_runtime import cpu_description
    from FoBSegmentLib.pipeline.slice_prompting import box_from_mask
    from FoBSegmentLib.research.generator_prompts import GeneratorPrompter
    from FoBSegmentLib.research.prompt_generator import load_generator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("FOBSEGMENT_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--weights", nargs="+", required=True, help="generator weights (snapshots of one run give a curve)")
    ap.add_argument("--cache-dir", default=str(REPO / "runs" / "cache"))
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args(argv)
    data = Path(args.data)
    seg = default_segmenter(data, args.cache_dir)
    if seg is None:
        return 1
    bb = seg.backbone
    prompters = {}
    for w in args.weights:
        it = load_generator(w)[1].get("iterations", "?")
        for prior, kw in (("support ring", dict(prior="support")),
                          ("none", dict(prior="support", prior_weight=0.0)),
                          ("contrast region's ring", dict(prior="contrast"))):
            prompters[f"{Path(w).name} ({it} it), prior: {prior}"] = GeneratorPrompter(bb, w, "box", **kw)
    rows: dict = {}
    t0 = time.perf_counter()
    for dname, d in DATASETS.items():
        for name, case, q_emb, gt, sup in episodes(seg, data, d):
            boxes = {"support box (naive)": box_from_mask(sup.mask_sq),
                     "contrast localisation (default, training-free)": seg.start_prompter.start_prompt(q_emb, sup)[0].box}
            for label, p in prompters.items():
                boxes[label] = p.start_prompt(q_emb, sup)[0].box
            boxes["ground-truth box (ceiling)"] = box_from_mask(gt)
            for label, box in boxes.items():
                dc, hit = score(seg, box, q_emb, gt)
                rows.setdefault(label, {}).setdefault(dname, {}).setdefault(name, []).append((dc, hit))
        print(f"{dname}: {time.perf_counter() - t0:.0f} s", flush=True)
    summary = {}
    for label, per_ds in rows.items():
        summary[label] = {}
        for dname, per_cls in per_ds.items():
            cls = {c: round(float(np.mean([x[0] for x in v])), 4) for c, v in per_cls.items()}
            allv = [x for v in per_cls.values() for x in v]
            summary[label][dname] = dict(mean_dice=round(float(np.mean(list(cls.values()))), 4),
                                         centre_inside=round(float(np.mean([x[1] for x in allv])), 3),
                                         prompts=len(allv), classes=cls)
        print(f"{label:<60} " + "  ".join(f"{k.split()[0]} {v['mean_dice']:.3f} (centre in {v['centre_inside']:.2f})"
                                           for k, v in summary[label].items()))
    cpu = cpu_description()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(cpu=cpu, rows=summary), indent=1))
    if args.md:
        Path(args.md).write_text(render(summary, args))
    return 0


def render(summary: dict, args) -> str:
    names = list(DATASETS)
    lines = ["| start prompt | " + " | ".join(f"{n}: Dice / centre inside" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for label, per_ds in summary.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{per_ds[n]['mean_dice']:.3f} / {per_ds[n]['centre_inside']:.2f}" if n in per_ds else "-" for n in names) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
