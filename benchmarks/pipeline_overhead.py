"""Pipeline overhead over the bare encoder, inside one process, printed as ratios.

    .venv/bin/python benchmarks/pipeline_overhead.py [--threads N]

1. pipeline overhead: a whole `segment` run / bare encoding of the slices it encoded, two ways:
   re-encoding them after the run (alternated three times), and the time the run itself spent
   inside the encoder (with the run split into encoder, mask decoder and everything else);
2. work avoided: slices encoded / slices in the volume;
3. the same segmentation run again on the same Segmenter: first run time / re-run time
   (embeddings cached, every prompt decoded again).

Runtimes, start-up, separate processes and memory: ``benchmarks/speed_memory.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv=None):
    import torch

    from FoBSegmentLib.backbones import create_backbone
    from FoBSegmentLib.evaluation import one_slice_support
    from FoBSegmentLib.geometry import SliceView
    from FoBSegmentLib.io import read_volume
    from FoBSegmentLib.preprocessing import fit_normalisation
    from FoBSegmentLib import Segmenter
    from FoBSegmentLib.settings import DEFAULT_SETTINGS

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = REPO / "FoBSegment" / "Testing" / "Data"
    q = read_volume(data / "example_ct.nii.gz")
    lab = np.rint(read_volume(data / "example_seg.nii.gz").array).astype(int)
    bb = create_backbone("litemedsam", "auto")
    view = SliceView.for_volume(q)
    from refine_loop import cpu_line

    print(f"machine: {cpu_line()}, torch threads {args.threads}, device {bb.device}")
    # Part of loading the model, like reading the weights: in Slicer it happens once per
    # session (the ONNX export itself once per machine), not on every Apply.
    t = time.perf_counter()
    print(f"runtime: {bb.runtime}, set up in {time.perf_counter() - t:.1f} s (once per process)")

    sup, k = one_slice_support(view, lab == 1)  # spleen
    stack, norm = view.to_stack(q.array), fit_normalisation(q.array)
    # Overhead = whole run / bare encoding of the same slices, measured in alternation three
    # times (a fresh Segmenter, hence an empty cache, each time): on a shared 2-core machine
    # single timings drift by +-5 %, as much as the margin being measured.
    ratios, per_slices, splits = [], [], []
    spent = {"encode": 0.0, "decode": 0.0, "calls": 0}
    encode, decode = bb.encode, bb.decode

    def timed(fn, what):
        def call(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[what] += time.perf_counter() - t0
                spent["calls"] += what == "decode"
        return call

    for _ in range(3):
        # Decoding is part of what is measured: no answer comes from the decoded-mask cache.
        seg = Segmenter(bb, settings=DEFAULT_SETTINGS.with_changes(decode_cache=False))
        spent.update(encode=0.0, decode=0.0, calls=0)
        bb.encode, bb.decode = timed(encode, "encode"), timed(decode, "decode")
        t = time.perf_counter()
        r1 = seg.segment(q, q, sup)
        t_run = time.perf_counter() - t
        bb.encode, bb.decode = encode, decode
        splits.append((t_run, dict(spent)))
        idx = sorted(i for i, v in r1.slice_info.items() if v.get("reason") != "annotated")[: max(1, r1.slices_encoded)]
        t = time.perf_counter()
        for i in idx:
            bb.encode(bb.prepare(norm.apply(stack[i]))[None])
        per_slices.append((time.perf_counter() - t) / len(idx))
        ratios.append(t_run / (per_slices[-1] * max(1, r1.slices_encoded)))
    per_slice = float(np.median(per_slices))
    print(f"encoder: {per_slice:.2f} s per slice (LiteMedSAM, {bb.precision}, {bb.runtime})")
    print(f"pipeline overhead: segment run / bare encoding of its {r1.slices_encoded} encoded slices = "
          f"{np.median(ratios):.3f}x median of 3 (" + ", ".join(f"{x:.3f}" for x in ratios) + ")")
    for t_run, sp in splits:
        rest = t_run - sp["encode"] - sp["decode"]
        print(f"  in-run split: {t_run:.2f} s = encoder {sp['encode']:.2f} s + mask decoder {sp['decode']:.2f} s "
              f"({sp['calls']} calls, {1000 * sp['decode'] / max(1, sp['calls']):.1f} ms each) + the rest {rest:.2f} s; "
              f"run / its encoder time = {t_run / sp['encode']:.3f}x")
    print("pipeline overhead, run / its own encoder time: "
          f"{np.median([t / sp['encode'] for t, sp in splits]):.3f}x median of 3")
    print(f"work avoided: {r1.slices_encoded} slices encoded of {r1.slices_total} in the volume "
          f"({r1.slices_encoded / r1.slices_total:.2f})")
    t = time.perf_counter()
    r2 = seg.segment(q, q, sup)
    t_rerun = time.perf_counter() - t
    print(f"re-run (same organ, cached embeddings, decoded again): {r2.slices_encoded} slices encoded, "
          f"first/re-run = {t_run / max(t_rerun, 1e-9):.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
