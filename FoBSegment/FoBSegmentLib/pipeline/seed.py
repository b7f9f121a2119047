"""Where the structure shows most clearly: the slice a walk starts from."""

from __future__ import annotations

from .contrast import seed_score


def seed_scores(run, anchor, candidates: list, body=None) -> dict:
    """Score the ``candidates`` slices -> {slice: (score, SAM's mask on the work grid)}.

    On another patient's volume the candidates are the whole slice range: fields of view
    differ between patients, so the support's relative position says little (CHAOS case 13's
    kidneys lie 10 slices off it).  In a long volume about ``seed.scan_slices`` evenly spaced
    slices are scored, then the neighbours of the best.  A slice's score is SAM's predicted
    IoU x prototype contrast x the likeness of the region's surroundings to the support's
    (:func:`seed_score`), so the spleen and the left kidney, alike in texture, are told apart
    by their neighbours.  ``body`` turns on the side prior."""
    s = run.settings
    stride = max(1, len(candidates) // s.seed.scan_slices)
    scored: dict[int, tuple] = {}

    def score(i):
        if i not in scored:
            emb = run.embedding(i)
            pred = run.segmenter.predictor.predict(emb, anchor, None)
            scored[i] = (seed_score(emb, pred.mask, pred.iou, anchor, s.presence, s.contrast, s.seed, body), pred.mask)
            run.heartbeat()

    for i in candidates[::stride]:
        score(i)
    if stride > 1:
        top = candidates.index(max(scored, key=lambda k: scored[k][0]))
        for i in candidates[max(0, top - stride + 1): top + stride]:
            score(i)
    return scored


def ranked_seeds(scored: dict) -> list:
    """The slices worth starting from (a positive score), best first."""
    return sorted((i for i in scored if scored[i][0] > 0), key=lambda i: -scored[i][0])


def walk_scores(run, support_for, body=None) -> dict:
    """The seed score of every slice a walk kept -> {slice: score}."""
    s = run.settings
    return {i: seed_score(run.embedding(i), m, run.result.slice_info[i]["iou"], support_for(i), s.presence,
                          s.contrast, s.seed, body) for i, m in run.kept.items()}


def walked_evidence(run, support_for, body=None) -> float:
    """The seed score summed over every slice a walk kept: a structure that goes on looking
    like the support for as many slices as it has beats a look-alike that shows clearly on a
    few (the colon below the liver)."""
    return sum(walk_scores(run, support_for, body).values())
