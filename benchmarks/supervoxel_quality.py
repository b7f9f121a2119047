"""Which supervoxel method gives the better self-supervised training signal?

    .venv/bin/python benchmarks/supervoxel_quality.py [--size-mm 30] [--json docs/benchmarks/supervoxels.json]
                                                      [--md docs/benchmarks/supervoxels.md]

Training episodes take one supervoxel's cross-section on two adjacent slices as a
pseudo-organ (docs/method.md section 3).  The signal is realistic when pseudo-organs look like
real organs: supervoxels that follow organ boundaries instead of cutting across them.  This
script measures that on the labelled volumes of ../shared/data, *without* using the labels
for training, for SLIC (3D, spacing-aware) and Felzenszwalb (2D per slice, linked by
overlap), on exactly the grid the trainer uses (prepared volumes):

- ASA (achievable segmentation accuracy): share of organ pixels that fall in a supervoxel
  whose majority is that organ (1.0 = supervoxels never straddle an organ boundary), over
  whole 3D supervoxels and (ASA 2D) over each slice's cross-sections, which is what one
  episode sees;
- best 2D Dice: per organ slice, Dice of the single supervoxel cross-section that best
  matches the organ (how organ-like one episode's pseudo-mask can be), averaged;
- episode candidates per volume and seconds per volume.

Prepared volumes (runs/prepared/*.npz from `fobsegment train`, or created here with the
embedded LiteMedSAM if absent) supply the work-grid images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))
DATA = REPO.parent / "shared" / "data"
SETS = {"chaos_t2spir_mri": (1, 2, 3, 4), "mscmrseg19_bssfp_cmr": (500, 200, 600)}


def label_on_grid(label_path: Path, n_slices: int) -> np.ndarray:
    """Labels in the trainer's slice stack on the 256 work grid (nearest)."""
    from FoBSegmentLib.geometry import SliceView
    from FoBSegmentLib.io import read_volume

    vol = read_volume(label_path, "label")
    stack = SliceView.for_volume(vol).to_stack(np.rint(vol.array).astype(np.int32))
    assert stack.shape[0] == n_slices
    return np.stack([_nearest_square(s) for s in stack])


def _nearest_square(s: np.ndarray, n: int = 256) -> np.ndarray:
    """Nearest-neighbour version of the work-grid resize-and-pad (labels must stay labels)."""
    rows, cols = s.shape
    scale = n / max(rows, cols)
    nr, nc = max(1, round(rows * scale)), max(1, round(cols * scale))
    ri = np.minimum((np.arange(nr) + 0.5) / scale, rows - 1).astype(int)
    ci = np.minimum((np.arange(nc) + 0.5) / scale, cols - 1).astype(int)
    out = np.zeros((n, n), s.dtype)
    out[:nr, :nc] = s[np.ix_(ri, ci)]
    return out


def quality(sv: np.ndarray, gt: np.ndarray, classes) -> dict:
    from FoBSegmentLib.geometry import occupied_slices

    asa, asa2d, best2d = [], [], []
    for c in classes:
        organ = gt == c
        if not organ.any():
            continue
        ids = sv[organ]
        # majority label of each supervoxel touching the organ
        inside = np.bincount(ids, minlength=sv.max() + 1)
        total = np.bincount(sv.ravel(), minlength=sv.max() + 1)
        majority = inside > 0.5 * total
        majority[0] = False
        asa.append(float(inside[majority].sum() / organ.sum()))
        hit2d = 0
        for k in occupied_slices(organ):
            o, s = organ[k], sv[k]
            cnt = np.bincount(s[o], minlength=s.max() + 1)
            cnt[0] = 0
            area = np.bincount(s.ravel(), minlength=s.max() + 1)
            hit2d += int(cnt[cnt > 0.5 * area].sum())
            if cnt.max() == 0:
                best2d.append(0.0)
                continue
            dice = 2 * cnt / (area + o.sum())
            best2d.append(float(dice[1:].max()))
        asa2d.append(hit2d / float(organ.sum()))
    return {"asa": float(np.mean(asa)), "asa_2d": float(np.mean(asa2d)), "best_2d_dice": float(np.mean(best2d))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mm", type=float, default=30.0)
    ap.add_argument("--prepared", default=str(REPO / "runs" / "prepared"))
    ap.add_argument("--json")
    ap.add_argument("--md", help="write the summary table as markdown")
    args = ap.parse_args(argv)
    if not DATA.is_dir():
        print(f"skipped: {DATA} is absent (CHAOS and MS-CMRSeg cannot ship in the repo)")
        return 0
    from FoBSegmentLib.research.training_data import PreparedVolume, prepare_volume, supervoxels

    prepared = Path(args.prepared)
    bb = None
    results = {}
    for ds, classes in SETS.items():
        for img in sorted((DATA / ds).glob("image_*.nii.gz"), key=lambda p: int(p.name.split("_")[1].split(".")[0])):
            hits = sorted(prepared.glob(f"{ds}_{img.name.split('.')[0]}_*.npz"))
            if not hits:
                if bb is None:
                    from FoBSegmentLib.backbones import create_backbone

                    bb = create_backbone("litemedsam", "cpu")
                hits = [prepare_volume(img, bb, prepared)]
            z = np.load(hits[0])
            im, spacing = z["image_sq"].astype(np.float32), tuple(z["spacing"])
            gt = label_on_grid(img.with_name(img.name.replace("image_", "label_")), im.shape[0])
            for method in ("slic", "felzenszwalb"):
                t = time.perf_counter()
                sv = supervoxels(im, spacing, method, args.size_mm)
                sec = time.perf_counter() - t
                pv = PreparedVolume(img.name, z["embeddings"][:0], z["image_sq"], sv, z["slice_index"])
                q = quality(sv, gt, classes)
                q.update(seconds=sec, episodes=len(pv.episodes_candidates()), supervoxels=int(len(np.unique(sv)) - 1))
                results.setdefault(ds, {}).setdefault(method, []).append(q)
            print(f"{ds} {img.name}: " + "  ".join(
                f"{m} ASA {results[ds][m][-1]['asa']:.3f} best2D {results[ds][m][-1]['best_2d_dice']:.3f}"
                for m in ("slic", "felzenszwalb")), flush=True)
    summary = {}
    print(f"\nsupervoxel size {args.size_mm} mm; means over volumes")
    print(f"{'dataset':<22}{'method':<14}{'ASA':>7}{'ASA 2D':>8}{'best 2D Dice':>14}{'episodes/vol':>14}"
          f"{'supervoxels':>13}{'s/vol':>8}")
    for ds, per in results.items():
        for m, rows in per.items():
            s = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            summary.setdefault(ds, {})[m] = s
            print(f"{ds:<22}{m:<14}{s['asa']:>7.3f}{s['asa_2d']:>8.3f}{s['best_2d_dice']:>14.3f}{s['episodes']:>14.0f}"
                  f"{s['supervoxels']:>13.0f}{s['seconds']:>8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"size_mm": args.size_mm, "summary": summary, "volumes": results}, indent=1))
    if args.md:
        lines = ["# Supervoxel pseudo-labels: SLIC vs Felzenszwalb", "",
                 "Regenerated by `benchmarks/supervoxel_quality.py --md docs/benchmarks/supervoxels.md` (raw: `supervoxels.json`).",
                 f"Supervoxel size {args.size_mm:g} mm, on the trainer's 256 grid, all labelled volumes of `../shared/data`;",
                 "the labels are used only to score the pseudo-labels, never for training.", "",
                 "| dataset | method | ASA (3D) | ASA 2D | best 2D Dice | episodes / volume | supervoxels | s / volume |",
                 "|---|---|---|---|---|---|---|---|"]
        for ds, per in summary.items():
            for m, v in per.items():
                lines.append(f"| {ds} | {m} | {v['asa']:.3f} | {v['asa_2d']:.3f} | {v['best_2d_dice']:.3f} | "
                             f"{v['episodes']:.0f} | {v['supervoxels']:.0f} | {v['seconds']:.1f} |")
        Path(args.md).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
