"""Does re-fitting the propagated box to SAM's own mask help, and what does it cost?

    .venv/bin/python benchmarks/settle_box.py [--settings 1:0,3:3,1:3] [--classes liver,spleen]
        [--supports 1,13] [--dataset chaos|cmr]

Each setting is TOLERANCE_PX:RE_PROMPTS (settings walk.settle_tolerance_px and
PROPAGATE_SETTLE; 0 re-prompts = the neighbour's box alone).  Standard protocol (ep1: the
structure's slices given), each support case against every other case of the dataset.
Prints the 3D Dice of every pair, the mean per class, and the mask-decoder calls each setting
makes relative to no settling (the cost: one decoder call is ~15 ms on the CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv=None):
    import torch

    from all_supports import DATASETS, cases_in
    from FoBSegmentLib import Segmenter
    from FoBSegmentLib.backbones import create_backbone
    from FoBSegmentLib.evaluation import _load_case, dice, ep1_support_slices
    from FoBSegmentLib.geometry import SliceView, occupied_slices
    from FoBSegmentLib.settings import DEFAULT_SETTINGS

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("FOBSEGMENT_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="chaos")
    ap.add_argument("--settings", default="1:0,3:3,1:3")
    ap.add_argument("--classes", default="liver,spleen")
    ap.add_argument("--supports", default="1,13")
    ap.add_argument("--cache-dir", default=str(REPO / "runs" / "cache"))
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    _, folder, classes = DATASETS[args.dataset]
    data = Path(args.data) / folder
    if not data.is_dir():
        print(f"shared data not found at {data}: nothing to measure (set FOBSEGMENT_SHARED_DATA)")
        return 1
    # Decoder calls are what is counted: none may come from the decoded-mask cache.
    base = Segmenter(create_backbone("litemedsam", "auto"), cache_dir=args.cache_dir,
                     settings=DEFAULT_SETTINGS.with_changes(decode_cache=False))
    calls = [0]
    decode = base.backbone.decode

    def counted(*a, **k):
        calls[0] += 1
        return decode(*a, **k)

    base.backbone.decode = counted
    settings = [tuple(float(x) for x in s.split(":")) for s in args.settings.split(",")]
    cases = cases_in(data)
    vols = {c: _load_case(data, c) for c in cases}
    dices: dict = {}
    n_calls = {s: 0 for s in settings}
    for name in args.classes.split(","):
        value = classes[name]
        for sc in args.supports.split(","):
            s_vol, s_lab = vols[sc]
            sm = s_lab == value
            sup = ep1_support_slices(SliceView.for_volume(s_vol).to_stack(sm))
            for c in cases:
                if c == sc:
                    continue
                q_vol, q_lab = vols[c]
                view = SliceView.for_volume(q_vol)
                g = view.to_stack(q_lab == value)
                qs = occupied_slices(g)
                line = []
                for s in settings:
                    seg = base.with_settings(**{"walk.settle_tolerance_px": s[0], "walk.max_settle_prompts": int(s[1])})
                    calls[0] = 0
                    r = seg.segment(q_vol, s_vol, sm, sup, query_slices=qs)
                    n_calls[s] += calls[0]
                    d = dice(view.to_stack(r.mask > 0), g)
                    dices.setdefault(name, {}).setdefault(s, []).append(d)
                    line.append(f"{_label(s)} {d:.3f}")
                print(f"{name} {sc} -> {c}: " + "  ".join(line), flush=True)
        print(f"MEAN {name}: " + "  ".join(f"{_label(s)} {np.mean(v):.3f}" for s, v in dices[name].items()))
    base = n_calls[settings[0]]
    print("decoder calls relative to the first setting: " + "  ".join(
        f"{_label(s)} {n / max(1, base):.2f}" for s, n in n_calls.items()))
    return 0


def _label(s) -> str:
    return f"{s[0]:g}px x{int(s[1])}"


if __name__ == "__main__":
    raise SystemExit(main())
