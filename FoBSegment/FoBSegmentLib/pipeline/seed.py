"""Where the structure shows most clearly: the slice a walk starts from."""

from __future__ import annotations

import numpy as np

from .contrast import contrast_regions, prototype_contrast, prototypes, seed_score
from .slice_prompting import SlicePrediction, SlicePrompt, box_from_mask


def seed_scores(run, anchor, candidates: list, body=None) -> dict:
    """Score the ``candidates`` slices -> {(slice, place): (score, SAM's mask on the work grid)}.

    Place 0 is what the start prompter picks on the slice; with ``seed.regions`` > 1 (not the
    default), places 1, 2, ... are the next best contrast regions elsewhere on it
    (:func:`contrast_regions`), each decoded from its box: where a look-alike outscores the
    structure on every slice, the structure is still a seed (CHAOS patient 2's right kidney
    from patient 8's annotation).
    On another patient's volume the candidates are the whole slice range: fields of view
    differ between patients, so the support's relative position says little (CHAOS case 13's
    kidneys lie 10 slices off it).  In a long volume about ``seed.scan_slices`` evenly spaced
    slices are scored, then the neighbours of the best.  A seed's score is SAM's predicted
    IoU x prototype contrast x the likeness of the region's surroundings to the support's
    (:func:`seed_score`), so the spleen and the left kidney, alike in texture, are told apart
    by their neighbours.  ``body`` turns on the side prior."""
    s = run.settings
    predictor = run.segmenter.predictor
    stride = max(1, len(candidates) // s.seed.scan_slices)
    scored: dict[tuple, tuple] = {}
    seen: set = set()

    def score(i):
        if i in seen:
            return
        seen.add(i)
        emb = run.embedding(i)
        preds = [predictor.predict(emb, anchor, None)]
        others = contrast_regions(emb, anchor, s.contrast, s.seed.regions)[1:] if s.seed.regions > 1 else []
        for region in others:
            prompt = SlicePrompt(box=box_from_mask(region, pad_px=s.contrast.box_pad_px))
            preds.append(SlicePrediction(*predictor.decode(emb, prompt), prompt))
        for place, pred in enumerate(preds):
            scored[(i, place)] = (seed_score(emb, pred.mask, pred.iou, anchor, s.presence, s.contrast, s.seed, body),
                                  pred.mask)
        run.heartbeat()

    for i in candidates[::stride]:
        score(i)
    if stride > 1:
        top = candidates.index(max(scored, key=lambda k: scored[k][0])[0])
        for i in candidates[max(0, top - stride + 1): top + stride]:
            score(i)
    return scored


def ranked_seeds(scored: dict) -> list:
    """The (slice, place) seeds worth starting from (a positive score), best first."""
    return sorted((k for k in scored if scored[k][0] > 0), key=lambda k: -scored[k][0])


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


def walk_strength(evidence: float, agreement: float, first_agreement: float, seed, overlap: float = 0.0) -> float:
    """A walk's evidence x exp(``seed.agreement_weight`` x how much more the support agrees with
    it than with the first walk, :func:`support_agreement`).  A gap of ``seed.agreement_min_gap``
    or less leaves the evidence as it is, and so does a walk that lies on the first walk's
    structure (``overlap``, :func:`walk_overlap`, at least ``seed.same_structure_dice``): two
    walks of one structure differ where they end, which moves the slices the support is
    compared with, and the evidence, not the agreement, tells their extents apart.
    exp of the gap, not a ratio of agreements: a support unlike its own kind (CHAOS patient
    15's liver, as dark as the muscle around it) agrees with no walk, the right one included."""
    gap = agreement - first_agreement
    if abs(gap) <= seed.agreement_min_gap or overlap >= seed.same_structure_dice:
        return evidence
    return evidence * float(np.exp(seed.agreement_weight * gap))


def choose_walk(evidence: list, agreement: list, seed, overlap: list) -> int:
    """Which of a run's walks to keep -> its index: the first (the clearest seed's) unless
    another's :func:`walk_strength` holds ``seed.walk_margin`` times the first's.  ``overlap``:
    each walk's :func:`walk_overlap` with the first."""
    strength = [walk_strength(e, a, agreement[0], seed, o) for e, a, o in zip(evidence, agreement, overlap)]
    best = int(np.argmax(strength))
    return best if strength[best] >= seed.walk_margin * strength[0] else 0


def walk_overlap(run, first) -> float:
    """3D Dice of two walks' kept masks on the work grid: near 1 where a second seed's walk
    went back over the first walk's structure, near 0 on another structure."""
    inter = sum(int((m & first.kept[i]).sum()) for i, m in run.kept.items() if i in first.kept)
    total = sum(int(m.sum()) for m in run.kept.values()) + sum(int(m.sum()) for m in first.kept.values())
    return 2.0 * inter / total if total else 0.0


def support_agreement(run, support_for) -> float:
    """The walk checked from the support's side: how much each support slice's annotation looks
    like what the walk found rather than what borders it there (prototype contrast against the
    walk's prototypes on its slice at the support slice's relative position), mean over the
    support slices.  A walk's own evidence asks whether the query region looks like the support;
    a look-alike can, while the support's organ looks less like the look-alike than like its
    border (docs/benchmarks/seed_walks.md)."""
    kept = [i for i in sorted(run.kept) if run.kept[i].any()]
    if not kept:
        return 0.0
    z0, z1 = kept[0], kept[-1]
    values = []
    for sup in support_for(z0).siblings:
        i = min(kept, key=lambda k: abs(k - (z0 + sup.rel * (z1 - z0))))
        values.append(prototype_contrast(sup.embedding, sup.mask_sq, prototypes(run.embedding(i), run.kept[i])))
    return float(np.mean(values)) if values else 0.0
