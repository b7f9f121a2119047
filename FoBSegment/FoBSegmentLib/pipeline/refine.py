"""Correct and refine: the user's corrected slices become fixed anchors and the walk is redone
from them, reusing every cached embedding.

From each slice the user changed, the pipeline walks outward in both directions, each slice
prompted from its neighbour, until its mask agrees again with the previous result (the
correction has been absorbed, or SAM is surer of the previous mask there than of the new
one), the presence decision says the structure ends (the previous result from there on is
kept: a wrong stop must not delete good slices) or the next corrected slice is reached.  A slice the user erased says the structure is not there: the previous
result on its thinner side is removed.  Slices the user edited are never overwritten.
"""

from __future__ import annotations

import numpy as np

from ..errors import FoBInputError
from ..geometry import SliceView


def edited_slices(previous: np.ndarray, corrected: np.ndarray) -> list[int]:
    """Stack indices where the corrected stack differs from the previous one."""
    return [i for i in range(previous.shape[0]) if not np.array_equal(previous[i], corrected[i])]


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def refine_run(run, support, prev_stack: np.ndarray, corr_stack: np.ndarray, anchors: list[int],
               agree: float) -> list[int]:
    """Redo the walk from ``anchors`` on ``run`` (whose output starts as the corrected stack).
    Returns the slices whose mask was recomputed or removed."""
    changed = []
    anchor_set = set(anchors)
    for a in anchors:
        if corr_stack[a].any():
            run.keep_user_slice(a, corr_stack[a])
    for a in anchors:
        if not corr_stack[a].any():
            changed += _clear_thinner_side(run, prev_stack, a, anchor_set)
            continue
        for step in (-1, +1):
            prev_i, i = a, a + step
            while run.lo <= i <= run.hi and i not in anchor_set:
                kept = run.segment_slice(i, support.nearest_index(i), run.kept.get(prev_i),
                                         decide_presence=True, prev_i=prev_i)
                if not kept:
                    # The new walk would stop here; one doubtful decision must not wipe out the
                    # previous result beyond, so that stays (the user erases a slice to cut it).
                    break
                if prev_stack[i].any() and _previous_is_surer(run, i, prev_stack[i]):
                    # SAM is surer of the previous mask on this slice than of the walked one: the
                    # correction has been absorbed; keep the previous result from here on.
                    run.out[i] = prev_stack[i]
                    run.result.slice_info[i].update(reason="kept_previous")
                    break
                changed.append(i)
                if agreement(run.out[i] > 0, prev_stack[i]) >= agree:
                    break
                prev_i, i = i, i + step
    return sorted(set(changed))


def _previous_is_surer(run, i: int, prev2d: np.ndarray) -> bool:
    """Decode the previous mask's own box on slice ``i``: is SAM's predicted IoU for it higher
    than for the mask the new walk produced?"""
    from ..backbones.base import slice_to_square
    from .slice_prompting import SlicePrompt, box_from_mask

    prev_sq = slice_to_square(prev2d) > 0.5
    if not prev_sq.any():
        return False
    emb = run.embedding(i)
    pad = run.settings.walk.pad_px
    _, iou_prev = run.segmenter.predictor.decode(emb, SlicePrompt(box=box_from_mask(prev_sq, pad_px=pad)))
    run.heartbeat()
    return iou_prev > run.result.slice_info[i]["iou"]


def _clear_run(run, prev_stack, start, step, anchor_set) -> list[int]:
    """Remove the previous result's contiguous slices from ``start`` in direction ``step``."""
    out, i = [], start
    while run.lo <= i <= run.hi and i not in anchor_set and prev_stack[i].any():
        run.out[i] = 0
        run.result.slice_info[i] = {"kept": False, "reason": "removed_by_refine"}
        out.append(i)
        i += step
    return out


def _clear_thinner_side(run, prev_stack, a, anchor_set) -> list[int]:
    """An erased slice: the side of it with less of the previous result is outside the structure."""
    run.result.slice_info[a] = {"kept": False, "reason": "corrected"}

    def mass(step):
        i, m = a + step, 0
        while run.lo <= i <= run.hi and i not in anchor_set and prev_stack[i].any():
            m += int(prev_stack[i].sum())
            i += step
        return m

    below, above = mass(-1), mass(+1)
    if below == above == 0:
        return []
    return _clear_run(run, prev_stack, a - 1, -1, anchor_set) if below < above else \
        _clear_run(run, prev_stack, a + 1, +1, anchor_set)


def support_from_corrections(corr_stack: np.ndarray, anchors: list[int]) -> np.ndarray:
    """The support when none is given: the corrected slices that hold the structure, else every
    slice of the corrected result."""
    sup = np.zeros_like(corr_stack)
    for a in anchors:
        sup[a] = corr_stack[a]
    if not sup.any():
        sup = corr_stack.copy()
    if not sup.any():
        raise FoBInputError("The corrected result is empty: nothing to refine. Paint the structure on a slice "
                            "and segment it first.")
    return sup


def to_stacks(query, previous, corrected):
    view = SliceView.for_volume(query)
    prev, corr = np.asarray(previous) > 0, np.asarray(corrected) > 0
    if prev.shape != query.array.shape or corr.shape != query.array.shape:
        raise FoBInputError(
            f"The previous result {prev.shape} and the corrected one {corr.shape} must be on the query's grid "
            f"{query.array.shape}.")
    return view, view.to_stack(prev), view.to_stack(corr)
