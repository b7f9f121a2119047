"""Ring-shaped structures (the myocardium around the blood pool): pure functions.

One box or one outer ring of background points cannot describe a wall around a cavity, and
localising the filled structure fails because its prototype mixes wall and cavity (measured).
So the cavity is segmented as its own structure and the wall is drawn around it at the
thickness (mm) measured on the support, its outer edge moved to where the query's image shows
it within a range of that thickness (a patient's wall is not the support's, nor even all round).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import FoBInputError
from ..geometry import occupied_slices

WALLS = ("image", "band")


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


def wall_from_image(image: np.ndarray, cavity: np.ndarray, thickness: float, spacing, spread: float,
                    least: float, most: float) -> np.ndarray:
    """The wall around a 2D ``cavity`` where the query's 2D ``image`` shows it: everything closer
    to the cavity than ``least`` x ``thickness``, and beyond that, out to ``most`` x
    ``thickness``, the connected pixels whose intensity stays within ``spread`` robust standard
    deviations of the wall's inner part (the band within 0.6 x ``thickness``, where the wall
    is whatever its thickness).  The epicardium is then smoothed by an opening of about 2.5 mm,
    so one look-alike pixel does not carry the edge outwards.  Units as in :func:`wall_around`;
    the three numbers are ``RingStructureSettings``' (:func:`draw_wall` passes them)."""
    outside = ~cavity
    d = ndimage.distance_transform_edt(outside, sampling=spacing)
    inner = outside & (d <= 0.6 * thickness)
    if not inner.any():
        return wall_around(cavity, thickness, spacing)
    vals = image[inner].astype(np.float64)
    mid = float(np.median(vals))
    sd = 1.4826 * float(np.median(np.abs(vals - mid)))  # robust: the inner band can touch the blood
    base = outside & (d <= least * thickness)
    like = base | (outside & (d <= most * thickness) & (np.abs(image - mid) <= spread * sd))
    lab, _ = ndimage.label(like)
    wall = np.isin(lab, np.unique(lab[base])) & (lab > 0)
    wall = ndimage.binary_opening(wall) | base
    steps = max(1, int(round(2.5 / float(min(spacing)))))
    epi = ndimage.binary_opening(ndimage.binary_fill_holes(wall | cavity), iterations=steps)
    return ndimage.binary_fill_holes(epi | cavity) & outside


def check_wall_rule(rule: str) -> None:
    """Refuse an unknown ``ring.wall`` before any slice is segmented."""
    if rule not in WALLS:
        raise FoBInputError(f"Unknown wall rule ring.wall={rule!r}: use one of {', '.join(WALLS)}.")


def draw_wall(image: np.ndarray, cavity: np.ndarray, thickness: float, spacing, ring) -> np.ndarray:
    """The wall around a 2D cavity by the rule of ``ring`` (``RingStructureSettings``)."""
    check_wall_rule(ring.wall)
    if ring.wall == "band":
        return wall_around(cavity, thickness, spacing)
    return wall_from_image(image, cavity, thickness, spacing, ring.wall_spread, ring.wall_least, ring.wall_most)
