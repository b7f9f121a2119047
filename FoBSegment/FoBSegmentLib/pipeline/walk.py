"""Slice to slice from a kept slice until the structure ends: the presence decision."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..settings import PresenceSettings


def decide(m: np.ndarray, prev_sq, iou: float, contrast: float, min_contrast: float,
           presence: PresenceSettings) -> tuple[bool, str, np.ndarray]:
    """Is the structure on this slice?  -> (kept, reason, cleaned mask).

    Reasons: ``empty``, ``disconnected`` (not touching the neighbour kept before), ``leak``
    (grew into a neighbouring organ), ``low_iou`` (SAM unsure), ``unlike_support`` (the region
    no longer contrasts like the structure), ``present``."""
    area = int(m.sum())
    if area < presence.min_area_px:
        return False, "empty", m
    if prev_sq is not None and prev_sq.any():
        near = ndimage.binary_dilation(prev_sq, iterations=presence.near_px)
        lab, nlab = ndimage.label(m)
        if nlab > 1:  # keep only components touching the neighbour: 3D connectivity
            touching = np.unique(lab[near & m])
            m = np.isin(lab, touching[touching > 0])
            area = int(m.sum())
            if area < presence.min_area_px:
                return False, "disconnected", m
        if (m & near).sum() < presence.min_overlap * area:
            return False, "disconnected", m
        if area > presence.max_growth * prev_sq.sum() + 50:
            return False, "leak", m
    if iou < presence.min_iou:
        return False, "low_iou", m
    if contrast < min_contrast:
        return False, "unlike_support", m
    return True, "present", m


def contrast_floor(slice_info: dict, presence: PresenceSettings) -> float:
    """The contrast a slice needs: a fraction of this structure's typical contrast in this
    run, from walked slices only (the seed was chosen for its high contrast and would set the
    bar too high), and never below the absolute floor."""
    seen = [v["contrast"] for v in slice_info.values() if v.get("kept") and v.get("reason") == "present"]
    if not seen:
        return presence.min_contrast
    return max(presence.min_contrast, presence.rel_contrast * float(np.median(seen)))


def walk(run, start: int, step: int, stop: int, support_for) -> None:
    """From the kept slice ``start``, segment slice after slice in direction ``step`` until
    the structure is judged absent or ``stop`` is passed; ``support_for(i)`` picks the
    support slice for slice ``i``."""
    prev_i = start
    i = start + step
    while (i >= stop if step < 0 else i <= stop):
        if i not in run.kept and not run.segment_slice(i, support_for(i), run.kept.get(prev_i),
                                                       decide_presence=True, prev_i=prev_i):
            break
        prev_i = i
        i += step
