"""Which walk to keep when the whole-volume seed search is unsure: one walk or several.

    .venv/bin/python benchmarks/seed_walks.py [--datasets chaos cmr] [--classes NAME ...] [--walks 2]
                                              [--score-only]

On another patient's volume (the full protocol) the pipeline walks from the clearest seed
and, with ``seed.walks`` > 1, from the next best seeds that lie on another structure
(``pipeline.protocols.best_walk``).  This runs every (support, query) pair of both datasets
once with ``--walks`` walks, records every walk (its slices, the seed score of each kept slice,
its 3D Dice), then scores each rule for choosing among them offline: the choice is made after
all walks, so one run serves every rule and every number of walks up to ``--walks``.
``first`` is one walk (``seed.walks = 1``); ``oracle`` the best walk by Dice (an upper bound).
Records are kept in ``--records`` (resumable; ``--score-only`` re-scores them). Writes
docs/benchmarks/seed_walks.md and .json.
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

from all_supports import DATASETS, cases_in, head_commit  # noqa: E402


def _margin_rule(measure, margin: float):
    def choose(walks):
        v = [measure(w) for w in walks]
        best = int(np.argmax(v))
        return best if v[best] >= margin * v[0] else 0
    return choose


def _scores(w) -> np.ndarray:
    return np.array(list(w["scores"].values()), float)


def _agreement_rule(weight: float, min_gap: float, same_dice: float = 1.01):
    """The pipeline's own choice (``pipeline.seed.choose_walk``) with these agreement settings;
    None where the records predate what it needs (the agreement, each walk's overlap with the first)."""
    from dataclasses import replace

    from FoBSegmentLib.pipeline.seed import choose_walk
    from FoBSegmentLib.settings import SeedSettings

    seed = replace(SeedSettings(), agreement_weight=weight, agreement_min_gap=min_gap, same_structure_dice=same_dice)

    def choose(walks):
        if any("agreement" not in w or "overlap" not in w for w in walks):
            return None
        return choose_walk([_scores(w).sum() for w in walks], [w["agreement"] for w in walks], seed,
                           [w["overlap"] for w in walks])
    return choose


RULES = {
    "first": lambda walks: 0,
    "most evidence": _margin_rule(lambda w: _scores(w).sum(), 1.0),
    "most evidence, margin 1.5 (default at 2223914)": _margin_rule(lambda w: _scores(w).sum(), 1.5),
    "evidence x exp(4 x agreement gap over 0.05) on another structure, margin 1.5 (default)":
        _agreement_rule(4.0, 0.05, 0.85),
    "evidence x exp(4 x agreement gap) on another structure, margin 1.5": _agreement_rule(4.0, 0.0, 0.85),
    "evidence x exp(4 x agreement gap over 0.05) on another structure (walks' Dice < 0.75), margin 1.5":
        _agreement_rule(4.0, 0.05, 0.75),
    "evidence x exp(4 x agreement gap over 0.05) on another structure (walks' Dice < 0.95), margin 1.5":
        _agreement_rule(4.0, 0.05, 0.95),
    "evidence x exp(4 x agreement gap over 0.05), margin 1.5 (default at c2459c3)": _agreement_rule(4.0, 0.05),
    "evidence x exp(4 x agreement gap), margin 1.5": _agreement_rule(4.0, 0.0),
    "evidence x exp(2 x agreement gap over 0.05), margin 1.5": _agreement_rule(2.0, 0.05),
    "evidence x exp(8 x agreement gap over 0.05), margin 1.5": _agreement_rule(8.0, 0.05),
    "most evidence, margin 2": _margin_rule(lambda w: _scores(w).sum(), 2.0),
    "best 5 slices, margin 1.5": _margin_rule(lambda w: np.sort(_scores(w))[-5:].sum(), 1.5),
    "mean evidence": _margin_rule(lambda w: _scores(w).mean(), 1.0),
    "oracle": lambda walks: int(np.argmax([w["dice"] for w in walks])),
}


def record_pairs(seg, data: Path, key: str, records: dict, save, only=None) -> None:
    """Every support against every other case, every walk recorded (resumable); ``only``:
    the class names to record (default all)."""
    from FoBSegmentLib.evaluation import _load_case, ep1_support_slices
    from FoBSegmentLib.geometry import SliceView
    from FoBSegmentLib.pipeline import protocols
    from FoBSegmentLib.pipeline.seed import choose_walk, walk_scores

    _, folder, classes = DATASETS[key]
    cases = cases_in(data / folder)
    vols = {c: _load_case(data / folder, c) for c in cases}
    current: dict = {}

    def evidence(run, support_for, body=None):
        sc = {int(i): float(v) for i, v in walk_scores(run, support_for, body).items()}
        out, gt = run.out > 0, current["gt"]
        current["walks"].append({"scores": sc, "dice": round(float(2 * (out & gt).sum() / (out.sum() + gt.sum())), 4)})
        return sum(sc.values())

    def choose(evidence, agreement, seed, overlap):
        for walk, a, o in zip(current["walks"], agreement, overlap):
            walk.update(agreement=round(a, 5), overlap=round(o, 4))
        return choose_walk(evidence, agreement, seed, overlap)

    # The same sum and the same choice, with every walk recorded as best_walk weighed it.
    protocols.walked_evidence, protocols.choose_walk = evidence, choose
    for name, value in classes.items():
        if only and name not in only:
            continue
        for s in cases:
            sv, sl = vols[s]
            sup = ep1_support_slices(SliceView.for_volume(sv).to_stack(sl == value))
            for q in cases:
                k = f"{key}|{name}|{s}|{q}"
                if q == s or k in records and all("overlap" in w for w in records[k]["walks"]):
                    continue  # recorded already (records from before the walks' overlap are recorded again)
                qv, ql = vols[q]
                current.update(gt=SliceView.for_volume(qv).to_stack(ql == value), walks=[])
                seg.segment(qv, sv, (sl == value).astype(np.uint8), support_slices=sup)
                records[k] = {"walks": current["walks"]}
                save()
        print(f"{key} {name} recorded", flush=True)


def score(records: dict, max_walks: list) -> dict:
    """{dataset: {walks: {rule: {class: mean Dice over pairs}}}}."""
    out: dict = {}
    for k, r in records.items():
        key, name, _, _ = k.split("|")
        for n in max_walks:
            walks = r["walks"][:n]
            for rule, choose in RULES.items():
                pick = choose(walks) if walks else None
                if walks and pick is None:
                    continue  # records without what the rule needs
                d = walks[pick]["dice"] if walks else 0.0
                out.setdefault(key, {}).setdefault(str(n), {}).setdefault(rule, {}).setdefault(name, []).append(d)
    return {key: {n: {rule: {c: round(float(np.mean(v)), 4) for c, v in per.items()} for rule, per in rules.items()}
                  for n, rules in by_n.items()} for key, by_n in out.items()}


def render(results: dict, meta: dict) -> str:
    lines = ["# Which walk to keep: one seed or several (full protocol)", "",
             f"`.venv/bin/python benchmarks/seed_walks.py` ({meta['version']}, commit {meta['commit']}; raw numbers:",
             "[seed_walks.json](seed_walks.json)). Every (support, query) pair of both datasets, the default",
             "pipeline on the whole query volume (no oracle), every walk recorded; each rule then picks one",
             "walk per pair. 3D Dice, mean over all pairs of a class (not over supports first: same mean",
             "here, every support has the same number of queries). `first` is `seed.walks = 1`;",
             "`oracle` picks the walk with the best Dice, the bound for any rule.", "",
             "The default (`seed.walks` 2, `seed.walk_margin` 1.5) was chosen on CHAOS, where one walk",
             "loses the liver to the colon below it and the left kidney to the spleen; MS-CMRSeg is the",
             "check. The margin keeps the clearest seed's walk unless another one is clearly stronger:",
             "without it a long walk on a look-alike wins (the spleen, the RV). Each walk's evidence is",
             "weighed by the support's agreement with it (`seed.agreement_weight` 4, `seed.agreement_min_gap`",
             "0.05, `seed.walk_strength`) where it lies on another structure than the first walk",
             "(`seed.same_structure_dice` 0.85). Records accumulate over runs (resumable); the time below is",
             "the last run's.", ""]
    for key, by_n in results.items():
        title, _, classes = DATASETS[key]
        cls = list(classes)
        lines += [f"## {title}", "", "| walks | rule | " + " | ".join(cls) + " | mean |", "|---|---|" + "---|" * (len(cls) + 1)]
        for n, rules in by_n.items():
            for rule, per in rules.items():
                if n != "1" and rule == "first" or n == "1" and rule != "first":
                    continue
                vals = [per.get(c) for c in cls]
                mean = f"{np.mean([v for v in vals if v is not None]):.3f}"
                lines.append(f"| {n} | {rule} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals)
                             + f" | {mean} |")
        missing = [c for c in cls if c not in by_n["1"]["first"]]
        if missing:
            lines += ["", f"Not recorded: {', '.join(missing)} (the mean is over the other classes)."]
        lines.append("")
    cpu = meta["cpu"]
    lines += [f"Last run {meta['minutes']:.0f} min on {cpu['model']} ({cpu['cores']} cores; "
              f"{', '.join(cpu['flags'])}), embeddings cached.", ""]
    return "\n".join(lines)


def main(argv=None):
    import torch

    from FoBSegmentLib import Segmenter, __version__
    from FoBSegmentLib.backbones import create_backbone
    from FoBSegmentLib.backbones.cpu_runtime import cpu_description

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("FOBSEGMENT_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    ap.add_argument("--walks", type=int, default=2, help="walks recorded per pair, and the most scored")
    ap.add_argument("--records", default=str(REPO / "runs" / "seed_walks.json"))
    ap.add_argument("--cache-dir", default=str(REPO / "runs" / "cache"))
    ap.add_argument("--classes", nargs="+", help="class names to record (default all)")
    ap.add_argument("--score-only", action="store_true", help="score the records, run nothing")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "seed_walks.md"))
    args = ap.parse_args(argv)
    data, rec_path, out = Path(args.data), Path(args.records), Path(args.out)
    records = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
    t0 = time.perf_counter()
    if not args.score_only:
        if not data.is_dir():
            print(f"shared data not found at {data}: nothing to benchmark (set FOBSEGMENT_SHARED_DATA)")
            return 1
        torch.set_num_threads(os.cpu_count())
        seg = Segmenter(create_backbone("litemedsam", "auto"), cache_dir=args.cache_dir).with_settings(
            **{"seed.walks": args.walks})
        rec_path.parent.mkdir(parents=True, exist_ok=True)

        def save():
            tmp = rec_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(records))
            tmp.replace(rec_path)

        for key in args.datasets:
            record_pairs(seg, data, key, records, save, args.classes)
    if not records:
        print(f"no records in {rec_path}: run without --score-only first")
        return 1
    results = score(records, list(range(1, args.walks + 1)))
    meta = {"version": f"v{__version__}", "commit": head_commit(), "cpu": cpu_description(),
            "minutes": (time.perf_counter() - t0) / 60}
    if args.score_only and out.with_suffix(".json").is_file():  # the recording run's time and machine
        meta.update({k: json.loads(out.with_suffix(".json").read_text())["meta"][k] for k in ("minutes", "cpu")})
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.write_text(render(results, meta))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
