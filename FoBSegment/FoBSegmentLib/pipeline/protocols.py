"""Which slices a run visits, and from where it starts.

- :func:`same_volume`: the support was painted on the query itself (clinical use).
- :func:`other_patient`: the support comes from another volume; nothing says where the
  structure is, so a whole-volume seed search finds it first.
- :func:`oracle_slices`: the evaluation protocol EP1, where the slices holding the structure
  are given; nothing is decided.
"""

from __future__ import annotations

import numpy as np

from ..preprocessing import body_columns
from ..settings import WORK_SIZE
from .seed import choose_walk, ranked_seeds, seed_scores, support_agreement, walk_overlap, walked_evidence
from .walk import walk


def oracle_slices(run, support, query_slices) -> None:
    """Segment exactly ``query_slices``: start on the slice of the middle half where the
    structure shows most clearly (the middle slice itself may show a look-alike more clearly:
    docs/benchmarks/benchmark_all_supports_start_search.md), then walk to both ends, each slice
    prompted from its neighbour just segmented.  The seed search is the one of another
    patient's volume (:func:`other_patient`): the support's side of the body, a second seed on
    another structure walked too.  Each slice uses the support at the same relative position of
    the given extent (the 3-chunk protocol)."""
    qs = sorted({int(s) for s in query_slices if run.lo <= int(s) <= run.hi})
    run.total = len(qs)
    if not qs:
        return
    q0, q1 = qs[0], qs[-1]

    def support_at(i):
        return support.nearest_rel(0.5 if q1 == q0 else (i - q0) / (q1 - q0))

    def walk_all(b, mid):
        mid_pos = qs.index(mid)
        for order in (qs[mid_pos - 1::-1] if mid_pos > 0 else [], qs[mid_pos + 1:]):
            prev = b.kept.get(mid)
            for i in order:
                b.segment_slice(i, support_at(i), prev, decide_presence=False)
                prev = b.kept.get(i, prev)

    middle = qs[len(qs) // 4: len(qs) - len(qs) // 4] or qs
    # The seed search of another patient's volume, on the given slices: that every slice holds
    # the structure does not say where on the slice it is (docs/benchmarks/benchmark_all_supports.md).
    anchor, body = support.central(), _body(run)
    if not best_walk(run, anchor, seed_scores(run, anchor, middle, body), walk_all, support_at, given="oracle",
                     body=body, walks=run.settings.seed.walks):
        mid = qs[len(qs) // 2]
        run.segment_slice(mid, support_at(mid), None, decide_presence=False)
        walk_all(run, mid)


def best_walk(run, anchor, scored: dict, walk_from, support_for, given="seed", body=None, walks=1) -> bool:
    """Walk from the best seed of ``scored`` ({(slice, place): (score, mask)}) and, with ``walks`` > 1,
    from the next best ones that lie on another structure.  The clearest seed's walk is kept
    unless another holds ``seed.walk_margin`` times its strength (:func:`choose_walk`: the
    walk's evidence, weighed by the support's agreement with it where it lies on another
    structure).  False where no slice shows the structure."""
    seed_settings = run.settings.seed
    tried = []  # (walk, evidence, agreement, overlap with the first walk)
    for seed, place in ranked_seeds(scored):
        if len(tried) == walks:
            break
        mask = scored[(seed, place)][1]
        if any(seed in b.kept and (mask & b.kept[seed]).sum() >= 0.5 * mask.sum() for b, *_ in tried):
            continue  # a structure already walked
        b = run.branch()
        # The start prompt where the start prompter chose the place, else the place's own mask.
        b.segment_slice(seed, anchor, mask if place else None, decide_presence=False, given=given)
        walk_from(b, seed)
        run.done = b.done  # the next walk's progress goes on from here
        if walks > 1:
            weighed = bool(seed_settings.agreement_weight)  # else neither moves walk_strength
            agree = support_agreement(b, support_for) if weighed else 0.0
            overlap = walk_overlap(b, tried[0][0]) if tried and weighed else 1.0
            tried.append((b, walked_evidence(b, support_for, body), agree, overlap))
        else:
            tried.append((b, 0.0, 0.0, 1.0))
    if tried:
        branches, evidence, agreement, overlap = zip(*tried)
        run.adopt(branches[choose_walk(evidence, agreement, seed_settings, overlap)])
    return bool(tried)


def same_volume(run, support, support_mask: np.ndarray) -> None:
    """The user's annotation is the answer on the painted slices; the gaps between them are
    segmented from their neighbours; then the walk goes outward from the first and the last
    painted slice until the structure ends."""
    user = support.view.to_stack(np.asarray(support_mask) > 0)
    annotated, lo, hi = support.annotated, run.lo, run.hi
    for s in annotated:
        if lo <= s <= hi:
            run.keep_user_slice(s, user[s])
    inside = [i for i in range(max(lo, annotated[0]), min(hi, annotated[-1]) + 1) if i not in run.kept]
    for i in inside:  # gaps between annotated slices: the structure is there
        below = [k for k in run.kept if k < i]
        prev = run.kept.get(max(below)) if below else None
        run.segment_slice(i, support.nearest_index(i), prev, decide_presence=False, given="between_annotations")
    if annotated[0] >= lo:
        walk(run, min(hi, annotated[0]), -1, lo, support.nearest_index)
    if annotated[-1] <= hi:
        walk(run, max(lo, annotated[-1]), +1, hi, support.nearest_index)


def other_patient(run, support) -> None:
    """Find the structure anywhere in the slice range (keeping to the support's side of the
    body), then walk both ways from there; with ``seed.walks`` > 1 also from the next seeds
    on other structures (:func:`best_walk`)."""
    lo, hi = run.lo, run.hi
    body = _body(run)
    anchor = support.central()
    scored = seed_scores(run, anchor, list(range(lo, hi + 1)), body)

    def support_for(i):  # the support at the same relative position of the slice range
        return support.nearest_rel((i - lo) / max(1, hi - lo))

    def walk_both(b, seed):
        walk(b, seed, -1, lo, support_for)
        walk(b, seed, +1, hi, support_for)

    best_walk(run, anchor, scored, walk_both, support_for, body=body, walks=run.settings.seed.walks)


def _body(run) -> tuple | None:
    """(midline, half-width) of the query's body on the work grid, for the side prior; None
    without it."""
    if not run.settings.seed.side_prior:
        return None
    to_sq = WORK_SIZE / max(run.rows, run.cols)
    return tuple(x * to_sq for x in body_columns(run.stack, run.norm))
