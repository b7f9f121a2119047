"""The learned generator as evidence in the walk's presence decision (its stop rule).

    .venv/bin/python benchmarks/walk_stop_evidence.py [--weights W.pt] [--cache-dir DIR] \
        [--json docs/benchmarks/walk_stop_evidence.json]

The full protocol (no oracle) on the held-out fold of the shipped generator (CHAOS support 2 /
cases 3, 5, 8, 20; MS-CMRSeg support 2 / cases 3-9), the default pipeline unchanged.  Every
slice the walk decides on is recorded with what the decision used (SAM's predicted IoU, the
prototype contrast, the reason) and with what the generator says when given the neighbour
just kept as its support: the adjacent-slice episode it was trained on.  Its evidence is the
mean foreground probability of its coarse mask under SAM's mask (``generator_in``) and the Dice
between the two (``generator_agree``).

Printed: how well each signal tells slices that hold the structure from slices that do not
(ROC AUC over every decided slice, and over the slices the walk kept, where an overshoot is a
slice kept without the structure), and what a stop rule on the generator's evidence would
remove at a threshold that loses at most 5 % of the correctly kept slices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))
sys.path.insert(0, str(REPO / "benchmarks"))

from relocation import DATASETS, default_segmenter  # noqa: E402  (the same held-out fold)

SIGNALS = ("iou", "contrast", "generator_in", "generator_agree")


def auc(pos, neg) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return round(float(greater + 0.5 * ties), 3)


def trace_runs(seg, prompter, data: Path):
    """Run the full protocol on every structure-case and yield one record per decided slice."""
    from FoBSegmentLib.backbones.base import slice_to_square
    from FoBSegmentLib.evaluation import _load_case, dice, ep1_support_slices
    from FoBSegmentLib.geometry import SliceView
    from FoBSegmentLib.pipeline import run as run_module

    records, current = [], {}
    predict = seg.predictor.predict

    def remember(q_emb, sup, prev_sq):
        pred = predict(q_emb, sup, prev_sq)
        current["mask"] = pred.mask
        return pred

    seg.predictor.predict = remember
    original = run_module.QueryRun.segment_slice

    def traced(self, i, sup, prev_sq, decide_presence, prev_i=None, given="oracle"):
        kept = original(self, i, sup, prev_sq, decide_presence, prev_i, given)
        if decide_presence and prev_sq is not None and prev_i is not None:
            m = current["mask"]
            neighbour = SimpleNamespace(embedding=self.embedding(prev_i), mask_sq=prev_sq)
            fg = prompter.output(self.embedding(i), neighbour).fg_prob[0].float().numpy()
            gt = slice_to_square(current["gt"][i].astype(np.float32)) > 0.5
            info = self.result.slice_info[i]
            records.append(dict(**current["case"], slice=int(i), present=bool(current["gt"][i].any()),
                                kept=bool(kept), reason=info["reason"], iou=info["iou"], contrast=info["contrast"],
                                generator_in=round(float(fg[m].mean()) if m.any() else 0.0, 4),
                                generator_agree=round(dice(m, fg > 0.5), 4), slice_dice=round(dice(m, gt), 4)))
        return kept

    run_module.QueryRun.segment_slice = traced
    try:
        for dname, d in DATASETS.items():
            s_vol, s_lab = _load_case(data / d["folder"], d["support"])
            s_view = SliceView.for_volume(s_vol)
            for case in d["cases"]:
                q_vol, q_lab = _load_case(data / d["folder"], case)
                q_view = SliceView.for_volume(q_vol)
                for name, value in d["classes"].items():
                    if not (q_lab == value).any():
                        continue
                    current.update(gt=q_view.to_stack(q_lab == value), case=dict(dataset=dname, structure=name, case=case))
                    res = seg.segment(q_vol, s_vol, s_lab == value,
                                      support_slices=ep1_support_slices(s_view.to_stack(s_lab == value)))
                    print(f"{dname} {name} {case}: Dice {dice(res.mask, q_lab == value):.3f}", flush=True)
    finally:
        run_module.QueryRun.segment_slice = original
        seg.predictor.predict = predict
    return records


def combined_auc(rows, signals) -> float | None:
    """ROC AUC of a logistic regression on ``signals``, each query case scored by a model
    fitted on the others (does a signal add to the ones the rule already uses?)."""
    y = np.array([r["present"] for r in rows], float)
    if y.min() == y.max():
        return None
    x = np.array([[r[s] for s in signals] for r in rows], float)
    groups = [(r["dataset"], r["case"]) for r in rows]
    score = np.zeros(len(rows))
    for g in sorted(set(groups)):
        test = np.array([k == g for k in groups])
        mu, sd = x[~test].mean(0), x[~test].std(0) + 1e-9
        z = np.c_[(x[~test] - mu) / sd, np.ones((~test).sum())]
        w = np.zeros(z.shape[1])
        for _ in range(3000):  # plain gradient descent: a handful of features, a few hundred rows
            w -= 0.5 * z.T @ (1 / (1 + np.exp(-z @ w)) - y[~test]) / len(z)
        score[test] = np.c_[(x[test] - mu) / sd, np.ones(test.sum())] @ w
    return auc(score[y == 1], score[y == 0])


def summarise(records) -> dict:
    out = {}
    kept = [r for r in records if r["kept"]]
    for subset, rows in (("decided", records), ("kept", kept)):
        pos = [r for r in rows if r["present"]]
        neg = [r for r in rows if not r["present"]]
        out[subset] = dict(slices=len(rows), with_structure=len(pos), without=len(neg),
                           auc={s: auc([r[s] for r in pos], [r[s] for r in neg]) for s in SIGNALS},
                           auc_combined={"iou + contrast": combined_auc(rows, ["iou", "contrast"]),
                                         "iou + contrast + generator": combined_auc(
                                             rows, ["iou", "contrast", "generator_in", "generator_agree"])})
    good = [r for r in kept if r["present"]]
    over = [r for r in kept if not r["present"]]
    rules = {}
    for s in ("generator_in", "generator_agree"):
        if not good:
            continue
        tau = float(np.quantile([r[s] for r in good], 0.05))
        rules[s] = dict(threshold=round(tau, 4), overshoot_removed=sum(r[s] < tau for r in over),
                        overshoot=len(over), correct_removed=sum(r[s] < tau for r in good), correct=len(good))
    out["rule_at_5pct_loss"] = rules
    out["stopped_with_structure"] = sum(1 for r in records if not r["kept"] and r["present"])
    return out


def main(argv=None) -> int:
    from FoBSegmentLib.backbones.cpu_runtime import cpu_description
    from FoBSegmentLib.research.generator_prompts import GeneratorPrompter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("FOBSEGMENT_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--weights", help="generator weights (default: the shipped ones)")
    ap.add_argument("--cache-dir", default=str(REPO / "runs" / "cache"))
    ap.add_argument("--json")
    ap.add_argument("--from-json", help="summarise the records of an earlier run instead of running")
    args = ap.parse_args(argv)
    if args.from_json:
        print(json.dumps(summarise(json.loads(Path(args.from_json).read_text())["records"]), indent=1))
        return 0
    data = Path(args.data)
    seg = default_segmenter(data, args.cache_dir)
    if seg is None:
        return 1
    prompter = GeneratorPrompter(seg.backbone, args.weights, "box")
    t0 = time.perf_counter()
    records = trace_runs(seg, prompter, data)
    summary = summarise(records)
    print(json.dumps(summary, indent=1))
    print(f"{len(records)} decided slices in {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(cpu=cpu_description(), summary=summary, records=records), indent=0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
