"""The clinical use: one painted slice (the largest cross-section) of a volume, the whole same
volume segmented without an oracle.  Prints 3D Dice per structure and the mean per dataset.

    .venv/bin/python benchmarks/same_volume.py [--cases chaos:1,10,13 cmr:1,10,12]

The default cases are the training-fold cases on which the presence thresholds were chosen,
so these figures are not held out; pass other cases (e.g. chaos:2,3,5 cmr:2,3,4) for a
held-out reading.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))

DATASETS = {
    "chaos": ("chaos_t2spir_mri", {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}),
    "cmr": ("mscmrseg19_bssfp_cmr", {"lv_bp": 500, "rv": 600, "lv_myo": 200}),
}


def main(argv=None):
    import torch

    from FoBSegmentLib.evaluation import dice, one_slice_support
    from FoBSegmentLib.geometry import SliceView
    from FoBSegmentLib.io import read_volume
    from FoBSegmentLib import Segmenter

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("FOBSEGMENT_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--cases", nargs="+", default=["chaos:1,10,13", "cmr:1,10,12"])
    ap.add_argument("--cache-dir", default=str(REPO / "runs" / "cache"))
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    seg = Segmenter("litemedsam", cache_dir=args.cache_dir)
    for spec in args.cases:
        key, ids = spec.split(":")
        folder, classes = DATASETS[key]
        scores = []
        for case in ids.split(","):
            q = read_volume(Path(args.data) / folder / f"image_{case}.nii.gz")
            lab = np.rint(read_volume(Path(args.data) / folder / f"label_{case}.nii.gz").array).astype(int)
            view = SliceView.for_volume(q)
            for name, value in classes.items():
                r = seg.segment(q, q, one_slice_support(view, lab == value)[0])
                d = dice(r.mask > 0, lab == value)
                scores.append(d)
                print(f"{key} case {case:<3} {name:<13} Dice {d:.3f}  {r.slices_segmented} slices kept, "
                      f"{r.slices_encoded} encoded", flush=True)
        print(f"{key}: mean Dice {np.mean(scores):.3f} over {len(scores)} structures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
