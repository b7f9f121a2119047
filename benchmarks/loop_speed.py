"""The clinician's loop in seconds: prepare -> Apply (decode only) -> correct -> Refine.

    .venv/bin/python benchmarks/loop_speed.py [--case 1]

On a CHAOS MRI (37-38 slices), as the Slicer panel runs it: the volume is prepared in the
background (every slice encoded), then each organ is segmented from one painted slice on a
worker thread (:class:`FoBSegmentLib.worker.BackgroundJob`) and written into a real MRML scene
(slicer-core) on the calling thread; then the worst slice is corrected and Refine runs.
Prints, with the CPU it ran on: preparation seconds, Apply seconds per organ (decode only),
Refine seconds, the longest gap between two progress reports of the worker (the GUI polls
every 0.1 s; a gap is how stale its display can get) and the longest main-thread step
(reading the inputs, writing the result).  Timing figures only; no test asserts on them.
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

    import slicer
    from FoBSegmentLib import Segmenter, read_volume
    from FoBSegmentLib import slicer_adapter as sa
    from FoBSegmentLib.evaluation import dice
    from FoBSegmentLib.geometry import SliceView
    from FoBSegmentLib.worker import BackgroundJob
    from refine_loop import cpu_line

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("FOBSEGMENT_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--case", default="1")
    args = ap.parse_args(argv)
    folder = Path(args.data) / "chaos_t2spir_mri"
    if not folder.is_dir():
        print(f"shared data not found at {folder}: nothing to measure")
        return 1
    torch.set_num_threads(os.cpu_count())
    vol = read_volume(folder / f"image_{args.case}.nii.gz")
    lab = np.rint(read_volume(folder / f"label_{args.case}.nii.gz").array)
    view = SliceView.for_volume(vol)
    print(f"CPU: {cpu_line()}")
    t = time.perf_counter()
    seg = Segmenter("litemedsam", device="cpu")  # memory cache only: as a fresh Slicer session
    print(f"model ready in {time.perf_counter() - t:.2f} s")

    scene = slicer.vtkMRMLScene()
    vnode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "mri")
    sa.volume_to_node(vol, vnode)

    t = time.perf_counter()
    job = BackgroundJob(lambda j: seg.prepare(vol, progress=j.progress, is_cancelled=j.is_cancelled)).start()
    st = job.wait()
    print(f"prepare: {job.result} slices encoded in {time.perf_counter() - t:.1f} s, longest gap between "
          f"reports {st.longest_gap_s:.2f} s")

    main_thread_max = 0.0
    for name, value in (("liver", 1), ("right_kidney", 2), ("left_kidney", 3), ("spleen", 4)):
        gt = lab == value
        g = view.to_stack(gt)
        k = int(np.argmax(g.sum((1, 2))))
        painted = np.zeros_like(g)
        painted[k] = g[k]
        lm = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "painted")
        sa.volume_to_node(vol.with_array(view.from_stack(painted).astype(np.uint8)), lm)
        segnode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lm, segnode)
        scene.RemoveNode(lm)
        sid = segnode.GetSegmentation().GetNthSegmentID(0)

        t0 = time.perf_counter()
        inputs = sa.read_inputs(vnode, segnode, sid)
        t_read = time.perf_counter() - t0
        job = BackgroundJob(lambda j, i=inputs: sa.compute(seg, i, progress=j.progress, is_cancelled=j.is_cancelled))
        st = job.start().wait()
        t_compute = time.perf_counter() - t0 - t_read
        t1 = time.perf_counter()
        run = sa.write_outputs(scene, inputs, job.result)
        t_write = time.perf_counter() - t1
        main_thread_max = max(main_thread_max, t_read, t_write)
        res = job.result[0]
        d0 = dice(res.mask > 0, gt)

        st_res = view.to_stack(res.mask > 0)
        cand = [i for i in range(len(g)) if st_res[i].any() or g[i].any()]
        worst = min(cand, key=lambda i: dice(st_res[i], g[i]))
        fixed = st_res.copy()
        fixed[worst] = g[worst]
        t2 = time.perf_counter()
        ref = seg.refine(vol, res.mask, view.from_stack(fixed))
        t_refine = time.perf_counter() - t2
        print(f"{name:<13} Apply {t_compute:5.2f} s ({res.slices_encoded} encoded, {len(res.slice_info)} slices "
              f"looked at, longest report gap {st.longest_gap_s:.2f} s), read {t_read:.2f} s, write "
              f"{t_write:.2f} s; Dice {d0:.3f} -> {dice(ref.mask > 0, gt):.3f} after one correction, Refine "
              f"{t_refine:.2f} s ({ref.slices_encoded} encoded)", flush=True)
        del run
    print(f"longest main-thread step: {main_thread_max:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
