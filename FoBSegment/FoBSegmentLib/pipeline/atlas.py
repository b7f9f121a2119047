"""Several annotated support patients (an atlas) for one query: one run per support, then fusion.

A support patient unlike the query (a spleen as dark as the liver, a kidney seeded on the
spleen) misleads a one-support run; the other supports outvote it.  Each support runs the
whole pipeline on its own (seed, walk, presence decision), so the runs are independent and the
fusion sees complete masks (docs/benchmarks/atlas.md measures 1 vs 3 vs 5 supports).
"""

from __future__ import annotations

import numpy as np

from ..errors import FoBInputError

RULES = {
    "vote": "a voxel is kept where at least half of the supports' masks hold it",
    "consensus": "the one support's mask that agrees best (mean Dice) with the others' is kept whole",
}


def fuse(masks, rule: str = "vote") -> np.ndarray:
    """k masks of the same grid -> one uint8 mask (see :data:`RULES`)."""
    if rule not in RULES:
        raise FoBInputError(f"Unknown atlas fusion rule {rule!r}: use one of {', '.join(RULES)}.")
    masks = [np.asarray(m) > 0 for m in masks]
    if not masks:
        raise FoBInputError("An atlas needs at least one support.")
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise FoBInputError(f"Atlas masks on different grids {sorted(shapes)}: every run must be on the query's grid.")
    if len(masks) == 1:
        return masks[0].astype(np.uint8)
    if rule == "vote":
        count = np.zeros(masks[0].shape, np.uint8)
        for m in masks:
            count += m
        return (2 * count.astype(np.int32) >= len(masks)).astype(np.uint8)
    return masks[int(np.argmax(agreement(masks)))].astype(np.uint8)


def agreement(masks) -> np.ndarray:
    """(k,) each mask's mean Dice with the other k - 1 (a lone outlier scores low)."""
    k = len(masks)
    masks = [np.asarray(m) > 0 for m in masks]
    sums = np.array([int(np.count_nonzero(m)) for m in masks], float)
    score = np.zeros(k)
    for a in range(k):
        for b in range(a + 1, k):
            inter = int(np.count_nonzero(masks[a] & masks[b]))
            d = 1.0 if sums[a] + sums[b] == 0 else 2.0 * inter / (sums[a] + sums[b])
            score[a] += d
            score[b] += d
    return score / max(1, k - 1)


OUTLIER_RATIO = 0.5  # docs/benchmarks/atlas.md: how often a flagged run was the atlas's bad one


def outliers(supports: list, ratio: float = OUTLIER_RATIO) -> list:
    """The supports (numbers as in ``result.supports``) whose run agrees with the fused mask
    less than ``ratio`` x the median of the others': with three or more, a support that is
    unlike the query or the rest of the atlas."""
    if len(supports) < 3:
        return []
    out = []
    for s in supports:
        others = [o["dice_to_fused"] for o in supports if o is not s]
        if s["dice_to_fused"] < ratio * float(np.median(others)):
            out.append(s["support"])
    return out
