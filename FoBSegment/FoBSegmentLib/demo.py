"""``fobsegment demo``: the main job on the embedded default, offline, CPU only.

One annotated slice each of the liver and the spleen of the TotalSegmentator example CT
(Apache-2.0, shipped in the repository) is the support; the whole volume is segmented with
LiteMedSAM and the training-free background-contrast prompts; the result is written as a ``.seg.nrrd`` with a PNG
figure, and the Dice against the reference labels is printed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .errors import FoBInputError

REPO_DATA = Path(__file__).resolve().parents[1] / "Testing" / "Data"
ORGANS = (("liver", 5, (0.87, 0.51, 0.31)), ("spleen", 1, (0.62, 0.0, 1.0)))


def run_demo(output_dir="fobsegment_demo", volume=None, labels=None, backbone="litemedsam", device="auto",
             cache_dir=None, quiet=False, figure_name="demo_figure.png", with_3d=False) -> dict:
    from .evaluation import dice, one_slice_support
    from .geometry import SliceView, occupied_slices
    from .io import read_volume, write_segments
    from .pipeline.segmenter import Segmenter

    if bool(volume) != bool(labels):
        raise FoBInputError("The demo needs --volume and --labels together (a CT and its TotalSegmentator label "
                            "map), or neither for the shipped example.")
    volume = Path(volume) if volume else REPO_DATA / "example_ct.nii.gz"
    labels = Path(labels) if labels else REPO_DATA / "example_seg.nii.gz"
    if not volume.is_file() or not labels.is_file():
        raise FoBInputError(
            f"Demo data not found ({volume}). Run the demo from a FoBSegment repository checkout, or pass "
            "--volume and --labels (a CT and its TotalSegmentator label map)."
        )
    say = (lambda *a: None) if quiet else print
    q = read_volume(volume, "demo volume")
    lab_vol = read_volume(labels, "demo labels")
    if not lab_vol.same_grid(q):
        raise FoBInputError(f"The demo labels {labels.name} are not on the grid of {volume.name}: give the label map "
                            "made for that CT.")
    lab = np.rint(lab_vol.array).astype(np.int64)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from .io import check_output_path

    check_output_path(out / "demo_result.seg.nrrd")  # writable, not write-protected: before the work
    seg = Segmenter(backbone, device, cache_dir=cache_dir)
    say(f"FoBSegment demo: {volume.name} {q.shape_ijk}, backbone {seg.backbone.name} on {seg.backbone.device}, "
        f"prompts {seg.prompt_source}/{seg.start_prompter.strategy}")
    view = SliceView.for_volume(q)
    results, refs, names, sups, colors, report = [], [], [], [], [], {}
    t0 = time.perf_counter()
    for name, value, color in ORGANS:
        ref = lab == value
        sm, s = one_slice_support(view, ref)
        res = seg.segment(q, q, sm)
        d = dice(res.mask > 0, ref)
        ref_slices = len(occupied_slices(view.to_stack(ref)))
        say(f"  {name:<7} support slice {s}: Dice {d:.3f} vs reference, {res.slices_segmented} slices kept "
            f"(reference: {ref_slices}), {res.slices_encoded} encoded, {res.seconds:.1f} s")
        report[name] = {"dice": round(d, 4), "support_slice": s, "slices_kept": res.slices_segmented,
                        "reference_slices": ref_slices, "slices_encoded": res.slices_encoded,
                        "seconds": round(res.seconds, 1)}
        results.append(res), refs.append(ref), names.append(name), sups.append(s), colors.append(color)
    seg_path = write_segments(out / "demo_result.seg.nrrd", q,
                              [(r.mask, f"{n} (FoB)", c, v) for r, n, c, (_, v, _) in zip(results, names, colors, ORGANS)])
    from .figures import result_figure

    fig = result_figure(out / figure_name, q, results, refs, names, sups, colors, with_3d=with_3d,
                        title=f"FoBSegment one-shot demo ({seg.backbone.name}, {seg.prompt_source}/{seg.start_prompter.strategy})")
    total = time.perf_counter() - t0
    say(f"wrote {seg_path} and {fig} in {total:.0f} s; mean Dice {np.mean([r['dice'] for r in report.values()]):.3f}")
    return {"organs": report, "seconds": round(total, 1), "result": str(seg_path), "figure": str(fig)}


def cmd_demo(args) -> int:
    run_demo(args.output_dir, args.volume, args.labels, args.backbone, args.device, args.cache_dir)
    return 0
