"""Several annotated support patients (an atlas) for one query: one run per support, then fusion.

A support patient unlike the query (a spleen as dark as the liver, a kidney seeded on the
spleen) misleads a one-support run; the other supports outvote it.  Each support runs the
whole pipeline on its own (seed, walk, presence decision), so the runs are independent and the
fusion sees complete masks (docs/benchmarks/atlas.md measures 1 vs 3 vs 5 supports).
"""

from __future__ import annotations

import numpy as np

from ..errors import FoBInputError
from ..geometry import SliceView, occupied_slices

RULES = {
    "consensus": "the one support's mask that agrees best (mean Dice) with the others' is kept whole",
    "vote": "a voxel is kept where at least half of the supports' masks hold it",
}


def fuse(masks, rule: str, agree=None) -> np.ndarray:
    """k masks of the same grid -> one uint8 mask (see :data:`RULES`); ``agree``: their
    :func:`agreement`, when already computed."""
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
    return masks[int(np.argmax(agreement(masks) if agree is None else agree))].astype(np.uint8)


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


def check_supports(query, supports, rule: str) -> list:
    """``[(volume, mask[, support slices]), ...]`` -> ``[(volume, mask, slices)]``, every
    support checked before the first run so that a bad one costs no work."""
    from .inputs import check_volume as _check_volume

    if rule not in RULES:
        raise FoBInputError(f"Unknown atlas fusion rule {rule!r}: use one of {', '.join(RULES)}.")
    items = list(supports) if supports is not None else []
    if not items:
        raise FoBInputError("An atlas needs at least one support: pass [(support volume, support mask), ...].")
    out = []
    for j, item in enumerate(items, 1):
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise FoBInputError(f"Atlas support {j} must be (volume, mask) or (volume, mask, support slices), "
                                f"not {type(item).__name__}.")
        vol, mask, slices = (*item, None) if len(item) == 2 else item
        _check_volume(vol, f"support {j} of the atlas")
        if query.is_same_image(vol):
            raise FoBInputError(f"Atlas support {j} is the query itself: an atlas holds other patients' "
                                "annotations. Segment with segment() to use the query's own painting.")
        m = np.asarray(mask)
        if m.shape != vol.array.shape:
            raise FoBInputError(f"Atlas support {j}: the mask has shape {m.shape} but its image has "
                                f"{vol.array.shape}; the mask must be drawn on its own support image's grid.")
        if not m.any():
            raise FoBInputError(f"Atlas support {j}: the support mask is empty; paint the structure on at "
                                "least one slice of that support image, or leave it out of the atlas.")
        out.append((vol, m, slices))
    return out


def fused_result(query, runs: list, rule: str, settings):
    """The supports' results -> one SegmentationResult: the fused mask, the prompts of the run
    that agrees best with the others, per slice how many runs kept it, per support its run's
    Dice to the fused mask and whether it is unlike the others (``settings.outlier_ratio``)."""
    from ..evaluation import dice
    from .run import SegmentationResult

    n = len(runs)
    agree = agreement([r.mask for r in runs]) if n > 1 else np.ones(1)
    fused = fuse([r.mask for r in runs], rule, agree)
    best = runs[int(np.argmax(agree))]
    view = SliceView.for_volume(query)
    fused_st = view.to_stack(fused)
    kept = [view.to_stack(r.mask > 0).reshape(fused_st.shape[0], -1).any(1) for r in runs]
    res = SegmentationResult(fused, prompts=best.prompts, backbone=best.backbone, device=best.device,
                             prompt_strategy=best.prompt_strategy, prompt_source=best.prompt_source,
                             slices_total=best.slices_total)
    for i in range(fused_st.shape[0]):
        votes = int(sum(k[i] for k in kept))
        if votes:
            res.slice_info[i] = {"kept": bool(fused_st[i].any()), "reason": "atlas", "votes": votes, "of": n}
    res.supports = [{"support": j + 1, "dice_to_fused": round(dice(r.mask, fused), 4),
                     "agreement": round(float(a), 4), "slices_segmented": r.slices_segmented}
                    for j, (r, a) in enumerate(zip(runs, agree))]
    odd = outliers(res.supports, settings.outlier_ratio)
    for s in res.supports:
        s["unlike_others"] = s["support"] in odd
    res.slices_segmented = len(occupied_slices(fused_st))
    return res


def outliers(supports: list, ratio: float) -> list:
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
