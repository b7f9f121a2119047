"""Regenerate docs/benchmarks/benchmark.md: FoB variants and baselines side by side on the same runs.

    .venv/bin/python benchmarks/run_benchmark.py [--weights W.pt] [--cache-dir runs/cache] [--quick]

Held-out fold (the generator never saw these images, not even unlabelled): CHAOS cases
2, 3, 5, 8, 20 (support 2) and MS-CMRSeg cases 2-9 (support 2).  The shipped weights were
trained self-supervised on the images of the other cases (see the model card).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))

FOLDS = {
    # fold 1: the shipped weights' held-out cases
    "1": {
        "CHAOS T2-SPIR MRI": dict(folder="chaos_t2spir_mri", support="2", cases=["3", "5", "8", "20"],
                                  classes={"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}),
        "MS-CMRSeg bSSFP": dict(folder="mscmrseg19_bssfp_cmr", support="2", cases=[str(i) for i in range(3, 10)],
                                classes={"lv_bp": 500, "lv_myo": 200, "rv": 600}),
    },
    # fold 2: the other way round (generator trained on fold 1's images: runs/fob_litemedsam_fold2.pt)
    "2": {
        "CHAOS T2-SPIR MRI": dict(folder="chaos_t2spir_mri", support="1", cases=["10", "13", "15", "19"],
                                  classes={"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}),
        "MS-CMRSeg bSSFP": dict(folder="mscmrseg19_bssfp_cmr", support="1", cases=[str(i) for i in range(10, 16)],
                                classes={"lv_bp": 500, "lv_myo": 200, "rv": 600}),
    },
}
DATASETS = FOLDS["1"]

# (row label, method, protocol, start prompter options: see evaluation.build_segmenter)
RUNS = [
    ("default: contrast seed + propagation", "pipeline", "ep1", dict()),
    ("FoB generator box + propagation", "pipeline", "ep1", dict(prompt_source="fob", prompt="box")),
    ("FoB generator box+points + propagation", "pipeline", "ep1", dict(prompt_source="fob", prompt="box+points")),
    ("coarse prototype mask of the generator (no SAM)", "coarse", "ep1", dict(prompt_source="fob")),
    ("support box reused (naive)", "support_box", "ep1", dict()),
    ("ground-truth box (ceiling)", "gt_box", "ep1", dict()),
    ("default, full volume (no oracle)", "pipeline", "full", dict()),
    ("FoB generator box + propagation, full volume", "pipeline", "full", dict(prompt_source="fob", prompt="box")),
]


def main(argv=None):
    import torch

    from FoBSegmentLib.backbones import create_backbone
    from FoBSegmentLib import Segmenter
    from FoBSegmentLib.evaluation import evaluate
    from FoBSegmentLib.pipeline.segmenter import default_weights
    from FoBSegmentLib.research.generator_prompts import GeneratorPrompter

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("FOBSEGMENT_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--weights", default=None)
    ap.add_argument("--cache-dir", default=str(REPO / "runs" / "cache"))
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "benchmark.md"))
    ap.add_argument("--quick", action="store_true", help="default rows and baselines only")
    ap.add_argument("--fold", choices=sorted(FOLDS), default="1",
                    help="1: held-out cases of the shipped weights; 2: the reverse (give --weights)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not data.is_dir():
        print(f"shared data not found at {data}: nothing to benchmark (set FOBSEGMENT_SHARED_DATA)")
        return 1
    global DATASETS
    DATASETS = FOLDS[args.fold]
    if args.fold != "1" and not args.weights:
        print("fold 2 needs --weights: a generator trained on fold 1's images (see docs/benchmarks/benchmark_fold2.md)")
        return 2
    if args.fold != "1" and args.out == str(REPO / "docs" / "benchmarks" / "benchmark.md"):
        args.out = str(REPO / "docs" / "benchmarks" / f"benchmark_fold{args.fold}.md")
    weights = Path(args.weights) if args.weights else default_weights("litemedsam")
    backbone = create_backbone("litemedsam", "auto")
    runs = [r for r in RUNS if not args.quick or "points" not in r[0]]
    results = {}
    t_all = time.perf_counter()
    for dname, d in DATASETS.items():
        for label, method, protocol, opts in runs:
            prompter = None
            if opts.get("prompt_source") == "fob":
                prompter = GeneratorPrompter(backbone, weights, opts.get("prompt", "auto"))
            seg = Segmenter(backbone, cache_dir=args.cache_dir, start_prompter=prompter)
            t = time.perf_counter()
            r = evaluate(data / d["folder"], d["classes"], d["support"], d["cases"], protocol, segmenter=seg,
                         method=method)
            results[(dname, label)] = r
            per = " ".join(f"{k}={v['mean_dice']}" for k, v in r["classes"].items())
            print(f"{dname:<18} {label:<34} mean {r['mean_dice']}  {per}  ({time.perf_counter() - t:.0f} s, "
                  f"{r['slices_encoded']} encoded)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = {f"{k[0]} | {k[1]}": v for k, v in results.items()}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    out.write_text(render(results, runs, weights, time.perf_counter() - t_all, backbone, out.with_suffix(".json").name))
    print(f"wrote {out}")
    return 0


def _trained_on(meta) -> str:
    """'CHAOS 1, 10 and MS-CMRSeg 2, 3' from the image paths recorded in the weights."""
    names = {"chaos_t2spir_mri": "CHAOS", "mscmrseg19_bssfp_cmr": "MS-CMRSeg"}
    per = {}
    for img in meta.get("images", []):
        p = Path(img)
        per.setdefault(names.get(p.parent.name, p.parent.name), []).append(p.name.split("_")[1].split(".")[0])
    return " and ".join(f"{k} {', '.join(sorted(v, key=lambda c: int(c) if c.isdigit() else 0))}"
                        for k, v in per.items()) or "unknown images"


def render(results, runs, weights, seconds, backbone, json_name="benchmark.json") -> str:
    from FoBSegmentLib.research.prompt_generator import load_generator

    meta = load_generator(weights)[1] if weights else {}
    lines = [
        "# FoBSegment benchmark",
        "",
        f"Regenerated by `benchmarks/run_benchmark.py` (raw numbers in `{json_name}`). 3D Dice per query",
        "volume, mean over query volumes, then over classes. Backbone `litemedsam` on "
        f"`{backbone.device}`; generator weights `{Path(weights).name if weights else 'none'}` "
        f"({meta.get('iterations', '?')} iterations, seed {meta.get('seed', '?')}).",
        "",
        "- **ep1**: the standard protocol (SSL-ALPNet EP1, as FoB reports): support slices at 1/6, 1/2, 5/6",
        "  of the support case's labelled extent; only the query slices that contain the class are",
        "  segmented (oracle), each from the support at the same relative position.",
        "- **full**: the same supports; the whole query volume is processed and the pipeline decides",
        "  where the structure is (no oracle).",
        "- Held-out fold: the generator never saw these volumes (it was trained self-supervised on",
        f"  the images of {_trained_on(meta)}). Two folds (the other in",
        "  `benchmark.md` / `benchmark_fold2.md`), not the paper's 5-fold cross-validation (CPU budget).",
        "",
    ]
    for dname, d in DATASETS.items():
        cls = list(d["classes"])
        lines += [f"## {dname} (support case {d['support']}, queries {', '.join(d['cases'])})", "",
                  "| method | protocol | " + " | ".join(cls) + " | mean |",
                  "|---|---|" + "---|" * (len(cls) + 1)]
        for label, _m, protocol, _o in runs:
            r = results.get((dname, label))
            if r is None:
                continue
            vals = [r["classes"][c]["mean_dice"] for c in cls]
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(f"| {label} | {protocol} | " + " | ".join(fmt(v) for v in vals) + f" | **{fmt(r['mean_dice'])}** |")
        lines.append("")
    lines.append(f"Total benchmark time {seconds / 60:.1f} min (embeddings cached).")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
