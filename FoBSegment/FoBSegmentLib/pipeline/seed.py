"""Where the structure shows most clearly: the slice a walk starts from."""

from __future__ import annotations

from .contrast import seed_score


def find_seed(run, anchor, candidates: list, given: str = "seed", body=None) -> int | None:
    """Score the ``candidates`` slices, segment the best one (recorded with reason ``given``)
    and return its index; None when the structure shows nowhere.

    On another patient's volume the candidates are the whole slice range: fields of view
    differ between patients, so the support's relative position says little (CHAOS case 13's
    kidneys lie 10 slices off it).  In a long volume about ``seed.scan_slices`` evenly spaced
    slices are scored, then the neighbours of the best.  A slice's score is SAM's predicted
    IoU x prototype contrast x the likeness of the region's surroundings to the support's
    (:func:`seed_score`), so the spleen and the left kidney, alike in texture, are told apart
    by their neighbours.  ``body`` turns on the side prior."""
    s = run.settings
    stride = max(1, len(candidates) // s.seed.scan_slices)
    scores: dict[int, float] = {}

    def score(i):
        if i not in scores:
            emb = run.embedding(i)
            pred = run.segmenter.predictor.predict(emb, anchor, None)
            scores[i] = seed_score(emb, pred.mask, pred.iou, anchor, s.presence, s.contrast, s.seed, body)
            run.heartbeat()
        return scores[i]

    for i in candidates[::stride]:
        score(i)
    if stride > 1:
        top = candidates.index(max(scores, key=scores.get))
        for i in candidates[max(0, top - stride + 1): top + stride]:
            score(i)
    best = max(scores, key=scores.get)
    if scores[best] <= 0:
        return None
    run.segment_slice(best, anchor, None, decide_presence=False, given=given)
    return best
