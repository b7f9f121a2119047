"""The default method with every case of a dataset as the support, every other case as a query.

    .venv/bin/python benchmarks/all_supports.py [--datasets chaos cmr] [--protocols ep1 full] [--supports 3 5]

The default (background-contrast seed + propagation) learns nothing from the data, so its
cross-validation is over the choice of support patient: which patient the clinician happens
to have annotated.  This runs the standard protocol (ep1) and the real-use one (full) for each
support case against all the others and reports the mean over queries per support, and the
mean and spread over supports.  Writes docs/benchmarks/benchmark_all_supports.md and .json; the results
of earlier runs in that .json are kept unless this run redoes them, so datasets and protocols
can be run separately.
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
sys.path.insert(0, str(REPO / "benchmarks"))

DATASETS = {
    "chaos": ("CHAOS T2-SPIR MRI", "chaos_t2spir_mri", {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}),
    "cmr": ("MS-CMRSeg bSSFP", "mscmrseg19_bssfp_cmr", {"lv_bp": 500, "lv_myo": 200, "rv": 600}),
}
# Anatomy the user states: on a cardiac short-axis stack the right ventricle's labels never pass
# the left ventricle's blood pool (both ends, all 15 MS-CMRSeg patients), so its result is kept
# within the blood pool's result, as `fobsegment evaluate --within rv:lv_bp` does.
WITHIN = {"cmr": {"rv": "lv_bp"}}


def cases_in(folder: Path) -> list[str]:
    ids = [p.name[len("image_"):-len(".nii.gz")] for p in folder.glob("image_*.nii.gz")]
    return sorted((c for c in ids if (folder / f"label_{c}.nii.gz").is_file()),
                  key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))


def main(argv=None):
    import torch

    from FoBSegmentLib import Segmenter
    from FoBSegmentLib.backbones import create_backbone
    from FoBSegmentLib.evaluation import evaluate

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("FOBSEGMENT_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    ap.add_argument("--protocols", nargs="+", choices=["ep1", "full"], default=["ep1", "full"])
    ap.add_argument("--supports", nargs="+", help="run these support cases only (default every case); the "
                    "others' rows are kept from earlier runs")
    ap.add_argument("--cache-dir", default=str(REPO / "runs" / "cache"))
    ap.add_argument("--out", default=None, help="default docs/benchmarks/benchmark_all_supports[_VARIANT].md")
    ap.add_argument("--variant", default="default",
                    help="settings of benchmarks/default_settings.py, e.g. 'shape prior', to see whether a "
                         "choice made on two support patients holds for the others")
    args = ap.parse_args(argv)
    from default_settings import VARIANTS

    changes = {name: change for name, _, change in VARIANTS}
    if args.variant not in changes:
        print(f"unknown variant {args.variant!r}: use one of {', '.join(changes)}")
        return 2
    slug = "" if args.variant == "default" else "_" + args.variant.replace(" ", "_")
    args.out = args.out or str(REPO / "docs" / "benchmarks" / f"benchmark_all_supports{slug}.md")
    torch.set_num_threads(os.cpu_count())
    data = Path(args.data)
    if not data.is_dir():
        print(f"shared data not found at {data}: nothing to benchmark (set FOBSEGMENT_SHARED_DATA)")
        return 1
    backbone = create_backbone("litemedsam", "auto")
    seg = Segmenter(backbone, cache_dir=args.cache_dir).with_settings(**changes[args.variant])
    out = Path(args.out)
    results: dict = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    unknown = set(args.supports or ()) - {c for key in args.datasets for c in cases_in(data / DATASETS[key][1])}
    if unknown:
        print(f"--supports {' '.join(sorted(unknown))}: no such case in {', '.join(args.datasets)}")
        return 2
    t_all = time.perf_counter()
    for key in args.datasets:
        title, folder, classes = DATASETS[key]
        cases = cases_in(data / folder)
        for protocol in args.protocols:
            for support in (c for c in cases if not args.supports or c in args.supports):
                t = time.perf_counter()
                r = evaluate(data / folder, classes, support, [c for c in cases if c != support], protocol,
                             segmenter=seg, within=WITHIN.get(key))
                results.setdefault(key, {}).setdefault(protocol, {})[support] = r
                out.with_suffix(".json").write_text(json.dumps(results, indent=1))
                per = " ".join(f"{k}={v['mean_dice']}" for k, v in r["classes"].items())
                print(f"{key:<6} {protocol:<5} support {support:<3} mean {r['mean_dice']}  {per}  "
                      f"({time.perf_counter() - t:.0f} s)", flush=True)
    out.write_text(render(results, time.perf_counter() - t_all, args.variant))
    print(f"wrote {out}")
    return 0


def head_commit() -> str:
    """The short hash of the checked-out commit ('' outside a git checkout): the code a page's
    figures came from."""
    import subprocess

    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def _version() -> str:
    from FoBSegmentLib import __version__

    commit = head_commit()
    return f"v{__version__}, commit {commit}" if commit else f"v{__version__}"


def render(results: dict, seconds: float, variant: str = "default") -> str:
    title = "# The default method with every support patient"
    command = "benchmarks/all_supports.py"
    if variant != "default":
        title += f", settings '{variant}' of `benchmarks/default_settings.py`"
        command += f" --variant '{variant}'"
    lines = [
        title,
        "",
        f"Regenerated by `{command}` (raw numbers in the .json of the same name).",
        "Backbone `litemedsam` on the CPU, the default (training-free) background-contrast seed and",
        "propagation. For each support case, the three ep1 support slices of that case are used and",
        "every other case of the dataset is a query: 3D Dice per query volume, mean over queries,",
        "then over classes. The last rows give the mean and the spread (standard deviation, minimum)",
        "over support patients.",
        "",
        f"Measured with FoBSegment {_version()}. Where a protocol was run at another commit, the",
        "CHANGELOG says so; earlier settings over the same supports:",
        "[one walk, no split](benchmark_all_supports_one_walk_no_split.md) (commit e0b87e0),",
        "[previous rules](benchmark_all_supports_previous_rules.md),",
        "[before box settling](benchmark_all_supports_start_search.md),",
        "[seed position prior 40 px](benchmark_all_supports_seed_position_prior_40_px.md).",
        "The full protocol of the current default on every pair: [seed_walks.md](seed_walks.md).",
        "",
    ]
    for key, per_protocol in results.items():
        title, _, classes = DATASETS[key]
        cls = list(classes)
        lines += [f"## {title}", "", "| protocol | support | " + " | ".join(cls) + " | mean |",
                  "|---|---|" + "---|" * (len(cls) + 1)]
        for protocol, per_support in per_protocol.items():
            means = []
            for support, r in per_support.items():
                vals = [r["classes"][c]["mean_dice"] for c in cls]
                lines.append(f"| {protocol} | {support} | " + " | ".join(f"{v:.3f}" for v in vals)
                             + f" | {r['mean_dice']:.3f} |")
                means.append([*vals, r["mean_dice"]])
            m = np.array(means, float)
            lines.append(f"| **{protocol}** | **mean over {len(m)} supports** | "
                         + " | ".join(f"**{v:.3f}**" for v in m.mean(0)) + " |")
            lines.append(f"| {protocol} | sd / min | "
                         + " | ".join(f"{s:.3f} / {lo:.3f}" for s, lo in zip(m.std(0), m.min(0))) + " |")
        for name, bound in WITHIN.get(key, {}).items():
            lines += ["", f"`{name}` is kept within the first to last slice of `{bound}`'s result on each query",
                      f"(`fobsegment evaluate --within {name}:{bound}`; the anatomy of the dataset's labels)."]
        missing = [p for p in ("ep1", "full") if p not in per_protocol]
        if missing:
            lines += ["", f"Not run yet: {', '.join(missing)} (`--datasets {key} --protocols {' '.join(missing)}`)."]
        lines.append("")
    lines += [f"Time of the last run {seconds / 60:.1f} min (embeddings cached after the first run).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
