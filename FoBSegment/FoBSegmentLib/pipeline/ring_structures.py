"""Ring-shaped structures (the myocardium around the blood pool): pure functions.

One box or one outer ring of background points cannot describe a wall around a cavity, and
localising the filled structure fails because its prototype mixes wall and cavity (measured).
So the cavity is segmented as its own structure and the wall is drawn around it at the
thickness (mm) measured on the support.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..geometry import occupied_slices


def split_ring(mask_stack: np.ndarray, hole_ratio: float) -> np.ndarray | None:
    """A support mask stack (slices, rows, cols) -> the stack of its holes when they exceed
    ``hole_ratio`` of the filled area (a ring), else None."""
    filled = mask_stack.copy()
    for i in occupied_slices(mask_stack):  # the annotation covers a few slices of many
        filled[i] = ndimage.binary_fill_holes(mask_stack[i])
    hole = filled & ~mask_stack
    return hole if hole.sum() > hole_ratio * filled.sum() else None


def wall_thickness(mask_stack: np.ndarray, hole: np.ndarray, slices, default_px: float,
                   spacing=(1.0, 1.0)) -> float:
    """Median wall thickness over the given support slices, in the units of ``spacing`` (the
    (row, col) pixel spacing; pixels by default): on each slice, the distance from the cavity
    within which a band has as many pixels as the wall, so the band :func:`wall_around` draws
    has the support's wall area (twice the wall's mean distance from the cavity is that only
    for a straight wall: around a cavity it overstates the thickness and the drawn wall by
    about a quarter).  ``default_px`` pixels where no slice has a wall."""
    thick = []
    for i in slices:
        n = int(mask_stack[i].sum())
        if n:
            d = np.sort(ndimage.distance_transform_edt(~hole[i], sampling=spacing)[~hole[i]])
            thick.append(float(d[min(n, d.size) - 1]))
    return float(np.median(thick)) if thick else default_px * float(np.mean(spacing))


def wall_around(cavity: np.ndarray, thickness: float, spacing=(1.0, 1.0)) -> np.ndarray:
    """The band of ``thickness`` (in the units of ``spacing``, the (row, col) pixel spacing)
    around a 2D cavity mask, the cavity excluded.  Support and query measured in millimetres,
    a wall keeps its thickness between images of different resolution."""
    return (ndimage.distance_transform_edt(~cavity, sampling=spacing) <= thickness) & ~cavity
