"""Training signal of SLIC vs Felzenszwalb pseudo-labels, measured by training.

    .venv/bin/python benchmarks/supervoxel_training.py [--iterations 400] [--threads 2]

Trains one generator per supervoxel method with identical settings and seed on the images
of fold 1's training cases (the shipped weights' training images), then evaluates each with
its own prompts on the held-out cases (ep1, generator box on every slice, no propagation, so
the generator alone decides where the organ is).  Runs are resumable (`runs/sv_<method>.pt`).
The other measure of the same question, without training, is benchmarks/supervoxel_quality.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=400)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    args = ap.parse_args(argv)
    data = Path(args.data)
    if not data.is_dir():
        print(f"skipped: {data} is absent (CHAOS and MS-CMRSeg cannot ship in the repo)")
        return 0
    import torch

    from FoBSegmentLib.backbones import create_backbone
    from FoBSegmentLib.evaluation import evaluate
    from FoBSegmentLib import Segmenter
    from FoBSegmentLib.research.generator_prompts import GeneratorPrompter
    from run_benchmark import FOLDS

    images = [str(data / "chaos_t2spir_mri" / f"image_{c}.nii.gz") for c in (1, 10, 13, 15, 19)]
    images += [str(data / "mscmrseg19_bssfp_cmr" / f"image_{c}.nii.gz") for c in (1, 10, 11, 12, 13, 14, 15)]
    results = {}
    for method in ("slic", "felzenszwalb"):
        out = REPO / "runs" / f"sv_{method}.pt"
        if not out.is_file():
            cmd = [sys.executable, "-m", "FoBSegmentLib.cli", "train", "--images", *images, "--output", str(out),
                   "--cache-dir", str(REPO / "runs"), "--iterations", str(args.iterations), "--batch", "8",
                   "--lr", "5e-4", "--seed", "0", "--threads", str(args.threads), "--save-every", "50",
                   "--supervoxel", method]
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "FoBSegment")})
            if r.returncode != 0:
                print(f"{method}: training failed\n{r.stderr[-2000:]}")
                return 1
            last = [ln for ln in r.stdout.splitlines() if ln.startswith("it ")][-1:]
            print(f"{method}: final training log line: {last[0] if last else '(none)'}")
        torch.set_num_threads(args.threads)
        bb = create_backbone("litemedsam", "cpu")
        for dname, d in FOLDS["1"].items():
            seg = Segmenter(bb, cache_dir=REPO / "runs" / "cache", start_prompter=GeneratorPrompter(bb, out, "box"))
            r = evaluate(data / d["folder"], d["classes"], d["support"], d["cases"], "ep1", segmenter=seg)
            results[(method, dname)] = r
            per = " ".join(f"{k}={v['mean_dice']}" for k, v in r["classes"].items())
            print(f"{method:<13} {dname:<18} ep1 generator box + propagation: mean {r['mean_dice']}  {per}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
