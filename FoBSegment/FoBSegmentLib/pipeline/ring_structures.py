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
from ..geometry import SliceView, occupied_slices

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


def wall_from_image(image: np.ndarray, cavity: np.ndarray, thickness: float, spacing, ring) -> np.ndarray:
    """The wall around a 2D ``cavity`` where the query's 2D ``image`` shows it.  Around the
    cavity, in each of ``ring.wall_sectors`` angular sectors, the median intensity at each
    distance from the cavity is compared with the wall's inner part (the band within 0.6 x
    ``thickness``, where the wall is whatever its thickness): the outer edge is the first
    distance beyond ``wall_least`` x ``thickness`` whose median lies more than ``wall_spread``
    robust standard deviations from it, else ``wall_most`` x ``thickness`` (tissue as dark as
    the wall beyond it).  The edges are smoothed by a running median over ``wall_smooth``
    sectors each side, so a vessel or a look-alike in one direction does not move the edge.
    Units as in :func:`wall_around`."""
    outside = ~cavity
    d = ndimage.distance_transform_edt(outside, sampling=spacing)
    inner = outside & (d <= 0.6 * thickness)
    if not inner.any() or not cavity.any():
        return wall_around(cavity, thickness, spacing)
    vals = image[inner].astype(np.float64)
    mid = float(np.median(vals))
    sd = 1.4826 * float(np.median(np.abs(vals - mid))) + 1e-6  # robust: the inner band can touch the blood
    n = int(ring.wall_sectors)
    cy, cx = ndimage.center_of_mass(cavity)
    yy, xx = np.indices(cavity.shape)
    angle = np.arctan2((yy - cy) * spacing[0], (xx - cx) * spacing[1])
    sector = np.minimum(((angle + np.pi) / (2 * np.pi) * n).astype(int), n - 1)
    step = 0.5 * float(min(spacing))
    radii = np.arange(ring.wall_least * thickness, ring.wall_most * thickness + step, step)
    nearest = np.rint((d - radii[0]) / step).astype(int)
    # a distance's median is taken within one step either side: enough pixels on a ray
    reach = outside & (nearest >= -2) & (nearest <= radii.size + 1)
    reach_sector, reach_d, reach_val = sector[reach], d[reach], image[reach]
    edges = np.full(n, ring.wall_most * thickness)
    for s in range(n):
        mine = reach_sector == s
        dist, val = reach_d[mine], reach_val[mine]
        for r in radii:
            near = np.abs(dist - r) <= step
            if near.any() and abs(float(np.median(val[near])) - mid) > ring.wall_spread * sd:
                edges[s] = r
                break
    smooth = ndimage.median_filter(edges, size=2 * int(ring.wall_smooth) + 1, mode="wrap")
    wall = outside & (d <= smooth[sector])
    return ndimage.binary_fill_holes(wall | cavity) & outside


def check_wall_rule(ring) -> None:
    """Refuse an unknown ``ring.wall``, or sectors the image rule cannot use, before any slice
    is segmented (``ring``: ``RingStructureSettings``)."""
    if ring.wall not in WALLS:
        raise FoBInputError(f"Unknown wall rule ring.wall={ring.wall!r}: use one of {', '.join(WALLS)}.")
    if ring.wall == "image" and not (int(ring.wall_sectors) >= 4 and 0 <= int(ring.wall_smooth) < ring.wall_sectors):
        raise FoBInputError(f"ring.wall_sectors={ring.wall_sectors} and ring.wall_smooth={ring.wall_smooth} cannot "
                            "describe a wall: use at least 4 sectors and smooth over fewer sectors than there are "
                            f"(the default: {type(ring)().wall_sectors} and {type(ring)().wall_smooth}).")


def draw_wall(image: np.ndarray, cavity: np.ndarray, thickness: float, spacing, ring) -> np.ndarray:
    """The wall around a 2D cavity by the rule of ``ring`` (``RingStructureSettings``)."""
    check_wall_rule(ring)
    if ring.wall == "band":
        return wall_around(cavity, thickness, spacing)
    return wall_from_image(image, cavity, thickness, spacing, ring)


def draw_walls(query, cavities, thickness: float, ring) -> tuple[SliceView, np.ndarray]:
    """The wall around each kept slice's cavity of ``cavities`` (a SegmentationResult on
    ``query``) -> (the query's SliceView, the walls as a stack of slices)."""
    view = SliceView.for_volume(query)
    inner, image = view.to_stack(cavities.mask > 0), view.to_stack(query.array)
    out = np.zeros(inner.shape, np.uint8)
    for i, info in cavities.slice_info.items():
        if info.get("kept") and inner[i].any():
            out[i] = draw_wall(image[i], inner[i], thickness, view.pixel_spacing, ring)
    return view, out
