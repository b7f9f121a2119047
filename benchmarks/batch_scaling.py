"""Speed-up of the batch engine with 2 local Dask workers over 1, on the machine in hand.

    .venv/bin/python benchmarks/batch_scaling.py [--cases 8]

Builds a manifest of CHAOS cases (one painted liver slice each, same volume), runs it with
``fobsegment batch --engine dask --workers 1`` and then ``--workers 2`` into fresh output
folders (each worker process has its own model and an empty memory cache), and prints the
wall times and their ratio with the CPU it ran on.  On a 2-core machine the ratio stays below
2: each worker gets one core instead of two (the encoder's own threading is lost), both
workers pay the model build, and the two processes share memory bandwidth.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv=None):
    from FoBSegmentLib import read_volume, write_result
    from FoBSegmentLib.batch import run_batch
    from FoBSegmentLib.geometry import SliceView
    from refine_loop import cpu_line

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("FOBSEGMENT_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--cases", type=int, default=8)
    args = ap.parse_args(argv)
    folder = Path(args.data) / "chaos_t2spir_mri"
    if not folder.is_dir():
        print(f"shared data not found at {folder}: nothing to measure")
        return 1
    work = Path(tempfile.mkdtemp(prefix="fobsegment-batch-scaling-"))
    ids = sorted(p.name[6:-7] for p in folder.glob("image_*.nii.gz"))[: args.cases]
    rows = []
    for c in ids:
        vol = read_volume(folder / f"image_{c}.nii.gz")
        lab = np.rint(read_volume(folder / f"label_{c}.nii.gz").array) == 1
        view = SliceView.for_volume(vol)
        g = view.to_stack(lab)
        k = int(np.argmax(g.sum((1, 2))))
        painted = np.zeros_like(g)
        painted[k] = g[k]
        m = write_result(work / f"liver_{c}.seg.nrrd", vol, view.from_stack(painted), name="liver")
        rows.append({"id": c, "query": str(folder / f"image_{c}.nii.gz"), "support_mask": str(m)})
    manifest = work / "cases.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, ["id", "query", "support_mask"])
        w.writeheader()
        w.writerows(rows)
    print(f"CPU: {cpu_line()}; {len(rows)} cases")
    times = {}
    for workers in (1, 2):
        out = work / f"out{workers}"
        out.mkdir()
        t = time.perf_counter()
        totals = run_batch(manifest, out, {"backbone": "litemedsam", "device": "cpu"}, engine="dask",
                           workers=workers)
        times[workers] = time.perf_counter() - t
        print(f"{workers} worker(s): {times[workers]:.1f} s, {totals['ok']} ok, {totals['failed']} failed", flush=True)
    print(f"speed-up of 2 workers over 1: {times[1] / times[2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
