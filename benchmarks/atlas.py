"""Several support patients (an atlas) against one: 1 vs 3 vs 5 supports, every combination.

    .venv/bin/python benchmarks/atlas.py [--datasets chaos cmr] [--protocols ep1 full]
                                         [--runs-dir runs/atlas] [--sizes 1 3 5]

An atlas run (``Segmenter.segment_atlas``) segments the query once per support patient and
fuses the masks (:func:`FoBSegmentLib.pipeline.atlas.fuse`).  So the benchmark runs every
(support, query) pair once with the default pipeline, keeping the segmentations under
``--runs-dir`` (the same command resumes: finished pairs are verified and skipped), then fuses
the kept masks for every set of k support patients drawn from the other cases of the dataset,
with each fusion rule, and scores 3D Dice per query.  The figures for k = 1 are the
all-supports benchmark's (docs/benchmarks/benchmark_all_supports.md).  Writes
docs/benchmarks/atlas.md and .json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))
sys.path.insert(0, str(REPO / "benchmarks"))

from all_supports import DATASETS, WITHIN, cases_in, head_commit  # noqa: E402

MAX_SETS = 300  # combinations per query and size beyond which a fixed random sample is scored


def run_pairs(seg, data: Path, key: str, protocol: str, runs: Path) -> None:
    """Every support case against every other case, segmentations kept (resumable)."""
    from FoBSegmentLib.evaluation import evaluate

    _, folder, classes = DATASETS[key]
    cases = cases_in(data / folder)
    for support in cases:
        out = runs / key / protocol / f"support_{support}"
        out.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        r = evaluate(data / folder, classes, support, [c for c in cases if c != support], protocol,
                     segmenter=seg, output_dir=out, within=WITHIN.get(key))
        print(f"{key:<6} {protocol:<5} support {support:<3} mean {r['mean_dice']} "
              f"({time.perf_counter() - t:.0f} s, {r['slices_encoded']} slices encoded)", flush=True)
    # The page names the code that ran the pairs, which a later --score-only does not know; a
    # runs folder resumed at another commit holds pairs of both.
    record = runs / key / protocol / "pairs.json"
    commits = pair_commits(json.loads(record.read_text())) if record.is_file() else []
    commits += [c for c in [head_commit() or "?"] if c not in commits]
    record.write_text(json.dumps({"commits": commits, "within": WITHIN.get(key)}))


def pair_commits(record: dict) -> list[str]:
    """The commits a runs folder's pairs were run at (``pairs.json``; older ones name one)."""
    return list(record.get("commits") or [record.get("commit", "?")])


def load_masks(data: Path, key: str, protocol: str, runs: Path):
    """-> (cases, {(class, query): reference bool array}, {(class, query, support): bool array},
    {query: its SliceView}); every mask as its stack of acquisition slices."""
    from FoBSegmentLib.evaluation import _load_case
    from FoBSegmentLib.geometry import SliceView
    from FoBSegmentLib.io import read_support_mask

    _, folder, classes = DATASETS[key]
    cases = cases_in(data / folder)
    refs, masks, vols, views = {}, {}, {}, {}
    for q in cases:
        vols[q], lab = _load_case(data / folder, q)
        views[q] = SliceView.for_volume(vols[q])
        for name, value in classes.items():
            if (lab == value).any():
                refs[(name, q)] = views[q].to_stack(lab == value)
    for s in cases:
        for (name, q) in refs:
            if q == s:
                continue
            f = runs / key / protocol / f"support_{s}" / f"{name}_{q}.seg.nrrd"
            if f.is_file():
                masks[(name, q, s)] = views[q].to_stack(read_support_mask(f, vols[q]).mask)
    # Scoring thousands of sets: crop each (class, query) to the box holding every mask and the
    # reference (Dice and slice differences are unchanged).
    for key, ref in refs.items():
        mine = [k for k in masks if k[:2] == key]
        union = ref.copy()
        for k in mine:
            union |= masks[k]
        box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(union))
        refs[key] = np.ascontiguousarray(ref[box])
        for k in mine:
            masks[k] = np.ascontiguousarray(masks[k][box])
    return cases, refs, masks


def support_sets(cases, refs, masks, name: str, k: int, rng):
    """For each query holding class ``name``: every set of k support patients among the other
    cases (a fixed random sample of MAX_SETS where there are more)."""
    for q in cases:
        if (name, q) not in refs:
            continue
        others = [s for s in cases if s != q and (name, q, s) in masks]
        sets = list(itertools.combinations(others, k))
        if not sets:  # fewer than k supports' runs kept for this query (a run still under way)
            continue
        if len(sets) > MAX_SETS:
            sets = [sets[i] for i in sorted(rng.choice(len(sets), MAX_SETS, replace=False))]
        yield q, sets


def score(cases, refs, masks, classes, sizes, rules, rng) -> dict:
    """Mean 3D Dice over support sets, per query, class, size and rule."""
    from FoBSegmentLib.evaluation import dice
    from FoBSegmentLib.pipeline.atlas import fuse

    out = {}
    for rule in rules:
        for k in sizes:
            per_class = {}
            for name in classes:
                per_query = {}
                for q, sets in support_sets(cases, refs, masks, name, k, rng):
                    d, ends = [], []
                    for st in sets:
                        fused = fuse([masks[(name, q, s)] for s in st], rule)
                        d.append(dice(fused, refs[(name, q)]))
                        ends.extend(end_errors(fused, refs[(name, q)]))
                    per_query[q] = {"mean": round(float(np.mean(d)), 4), "min": round(float(np.min(d)), 4),
                                    "sets": len(d), "end_error": round(float(np.mean(np.abs(ends))), 3) if ends else None,
                                    "short": round(float(np.mean([e < 0 for e in ends])), 3) if ends else None,
                                    "over": round(float(np.mean([e > 0 for e in ends])), 3) if ends else None}
                per_class[name] = per_query
            out.setdefault(rule, {})[str(k)] = per_class
    return out


BAD_RUN = 0.5  # a support's own run below this Dice is one the user should be warned about


def warnings_check(cases, refs, masks, classes, k: int, rng) -> dict:
    """Does :func:`outliers` (the run-time warning, on the default fusion) name the atlas
    members whose own run is bad (Dice < BAD_RUN)?  Over every set of k supports of every
    query and class."""
    from FoBSegmentLib.evaluation import dice
    from FoBSegmentLib.pipeline.atlas import fuse, outliers
    from FoBSegmentLib.settings import DEFAULT_SETTINGS

    own = {key: dice(m, refs[key[:2]]) for key, m in masks.items()}
    flagged = flagged_bad = bad = members = 0
    for name in classes:
        for q, sets in support_sets(cases, refs, masks, name, k, rng):
            for st in sets:
                ms = [masks[(name, q, s)] for s in st]
                fused = fuse(ms, DEFAULT_SETTINGS.atlas.fusion)
                rows = [{"support": j + 1, "dice_to_fused": dice(m, fused)} for j, m in enumerate(ms)]
                odd = set(outliers(rows, DEFAULT_SETTINGS.atlas.outlier_ratio))
                for j, s in enumerate(st):
                    members += 1
                    is_bad = own[(name, q, s)] < BAD_RUN
                    bad += is_bad
                    if j + 1 in odd:
                        flagged += 1
                        flagged_bad += is_bad
    return {"k": k, "members": members, "bad": bad, "flagged": flagged,
            "precision": round(flagged_bad / flagged, 3) if flagged else None,
            "recall": round(flagged_bad / bad, 3) if bad else None}


def end_errors(mask_st: np.ndarray, ref_st: np.ndarray) -> list:
    """Slices by which the result's two ends miss the reference's (negative: stopped short,
    positive: ran past); [] when the result is empty."""
    got = np.nonzero(mask_st.reshape(mask_st.shape[0], -1).any(1))[0]
    ref = np.nonzero(ref_st.reshape(ref_st.shape[0], -1).any(1))[0]
    if got.size == 0:
        return []
    return [int(ref[0] - got[0]), int(got[-1] - ref[-1])]


def summarise(per_class: dict) -> dict:
    """Per class: mean over queries of the mean over sets; worst query; and over classes."""
    cls = {}
    for name, per_query in per_class.items():
        means = [v["mean"] for v in per_query.values()]
        ends = [v["end_error"] for v in per_query.values() if v.get("end_error") is not None]
        cls[name] = {"mean": round(float(np.mean(means)), 4), "worst_query": round(float(np.min(means)), 4),
                     "end_error": round(float(np.mean(ends)), 2) if ends else None}
    ends = [v["end_error"] for v in cls.values() if v["end_error"] is not None]
    return {"classes": cls, "mean": round(float(np.mean([v["mean"] for v in cls.values()])), 4),
            "end_error": round(float(np.mean(ends)), 2) if ends else None}


def render(results: dict, meta: dict, warn: dict) -> str:
    from FoBSegmentLib.pipeline.atlas import RULES
    from FoBSegmentLib.settings import DEFAULT_SETTINGS

    lines = ["# Several support patients: 1 vs 3 vs 5", "",
             "Regenerated by `benchmarks/atlas.py` (raw numbers in atlas.json; each table says at which",
             "commit its pairs were run).",
             "Backbone `litemedsam` on the CPU, the default pipeline, the three ep1 support slices of each",
             "support patient. Every (support, query) pair is segmented once; an atlas of k support",
             "patients fuses the k masks of a query (`Segmenter.segment_atlas`). For each query, every set",
             f"of k patients among the other cases is scored (a fixed random sample of {MAX_SETS} where there",
             "are more); the table gives 3D Dice averaged over sets, then over queries, then over classes;",
             "*worst* is the worst query's mean over sets; *end error* (full protocol) is the mean number",
             "of slices by which the result's first and last slice miss the reference's (the presence",
             "decision's error). k = 1 is the all-supports benchmark. Where a dataset's labels state that",
             "one structure lies within another's slices (all_supports.py's `WITHIN`: MS-CMRSeg's RV within",
             "the blood pool), each pair's result is kept within them before fusion, as on the all-supports",
             "page; a table whose pairs were run without it says so.",
             "",
             "Fusion rules: " + "; ".join(f"`{r}`: {d}" for r, d in RULES.items()) + ".", ""]
    for key, per_protocol in results.items():
        title, _, classes = DATASETS[key]
        cls = list(classes)
        lines += [f"## {title}", ""]
        for protocol in per_protocol:
            run = meta.get("runs", {}).get(key, {}).get(protocol, {})
            bound = run.get("within") or {}
            commits = pair_commits(run)
            lines.append(f"{protocol}: pairs run at commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}"
                         + (", " + ", ".join(f"`{a}` kept within `{b}`" for a, b in bound.items()) if bound
                            else (", without the RV's bound" if key in WITHIN else "")) + ".")
        lines += ["", "| protocol | rule | supports | " + " | ".join(cls)
                  + " | mean | worst query | end error (slices) |", "|---|---|---|" + "---|" * (len(cls) + 3)]
        for protocol, per_rule in per_protocol.items():
            for rule, per_k in per_rule.items():
                for k, per_class in per_k.items():
                    s = summarise(per_class)
                    worst = min(v["worst_query"] for v in s["classes"].values())
                    end = "" if protocol == "ep1" or s["end_error"] is None else f"{s['end_error']:.2f}"
                    lines.append(f"| {protocol} | {rule} | {k} | "
                                 + " | ".join(f"{s['classes'][c]['mean']:.3f}" for c in cls)
                                 + f" | **{s['mean']:.3f}** | {worst:.3f} | {end} |")
        lines.append("")
        if warn.get(key):
            ratio = DEFAULT_SETTINGS.atlas.outlier_ratio
            lines += [f"Run-time warning (a support whose run agrees with the fused mask, default fusion "
                      f"`{DEFAULT_SETTINGS.atlas.fusion}`, less than {ratio} x the others' median), against the truth (a support's own run below Dice {BAD_RUN}):", "",
                      "| protocol | supports | members | bad runs | flagged | flagged that were bad | bad that were flagged |",
                      "|---|---|---|---|---|---|---|"]
            for protocol, rows in warn[key].items():
                for w in rows:
                    lines.append(f"| {protocol} | {w['k']} | {w['members']} | {w['bad']} | {w['flagged']} | "
                                 f"{_share(w['precision'])} | {_share(w['recall'])} |")
            lines.append("")
    lines += [f"Scoring took {meta['seconds']:.0f} s; the pair runs are cached under the runs folder.", ""]
    return "\n".join(lines)


def _share(x) -> str:
    """A share, or a dash where nothing was flagged (or nothing was bad) to take it of."""
    return "-" if x is None else str(x)


def main(argv=None):
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("FOBSEGMENT_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    ap.add_argument("--protocols", nargs="+", choices=["ep1", "full"], default=["ep1", "full"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 3, 5])
    ap.add_argument("--runs-dir", default=str(REPO / "runs" / "atlas"))
    ap.add_argument("--cache-dir", default=str(REPO / "runs" / "cache"))
    ap.add_argument("--score-only", action="store_true", help="fuse what the runs folder holds, run nothing")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "atlas.md"))
    args = ap.parse_args(argv)
    data, runs = Path(args.data), Path(args.runs_dir)
    if not data.is_dir():
        print(f"shared data not found at {data}: nothing to benchmark (set FOBSEGMENT_SHARED_DATA)")
        return 1
    from FoBSegmentLib.pipeline.atlas import RULES

    if not args.score_only:
        from FoBSegmentLib import Segmenter
        from FoBSegmentLib.backbones import create_backbone

        torch.set_num_threads(os.cpu_count())
        seg = Segmenter(create_backbone("litemedsam", "auto"), cache_dir=args.cache_dir)
        for key in args.datasets:
            for protocol in args.protocols:
                run_pairs(seg, data, key, protocol, runs)
    t0 = time.perf_counter()
    out = Path(args.out)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    results, warn = old.get("results", {}), old.get("warnings", {})
    old_meta = old.get("meta", {})
    pair_runs = old_meta.get("runs") or {k: {p: {"commit": old_meta.get("commit", "?")} for p in v}
                                         for k, v in results.items()}
    for key in args.datasets:
        _, _, classes = DATASETS[key]
        for protocol in args.protocols:
            cases, refs, masks = load_masks(data, key, protocol, runs)
            if not masks:
                print(f"{key} {protocol}: no kept segmentations under {runs}; run without --score-only first")
                continue
            rng = np.random.default_rng(0)
            r = score(cases, refs, masks, classes, args.sizes, list(RULES), rng)
            results.setdefault(key, {})[protocol] = r
            record = runs / key / protocol / "pairs.json"
            pair_runs.setdefault(key, {})[protocol] = (json.loads(record.read_text()) if record.is_file()
                                                       else {"commit": "?"})
            warn.setdefault(key, {})[protocol] = [warnings_check(cases, refs, masks, classes, k, rng)
                                                  for k in args.sizes if k >= 3]
            print(key, protocol, "warnings", warn[key][protocol], flush=True)
            for rule, per_k in r.items():
                print(key, protocol, rule, " ".join(f"k={k}: {summarise(v)['mean']:.3f}" for k, v in per_k.items()),
                      flush=True)
    meta = {"runs": pair_runs, "seconds": time.perf_counter() - t0}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results, "warnings": warn}, indent=1))
    out.write_text(render(results, meta, warn))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
