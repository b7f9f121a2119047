"""Background ring geometry: the band just outside an organ and the ring of background points.

Pure numpy / scipy / scikit-image (no torch except in :func:`gaussian_heatmaps_torch`, which is
imported lazily).

Conventions (see :mod:`FoBSegmentLib.backbones.base`)
------------------------------------------------------
Masks live on the ``WORK_SIZE`` (256) square grid, indexed ``[row, col]``.  Points are
normalised ``(x, y) = ((col + 0.5) / 256, (row + 0.5) / 256)``: ``0`` is the left/top edge of
the square, ``1`` its right/bottom edge, pixel centres sit at half-integers.  Radii are in
pixels of the 256 grid.

Canonical ring order: points are sorted by increasing ``atan2(y - cy, x - cx)`` taken in
``[0, 2*pi)`` around the mask centroid ``(cx, cy)``, in image coordinates (rows go down, so the
order runs clockwise on screen starting from the +x direction).  Point ``i`` of a support ring
therefore corresponds to point ``i`` of the query ring.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import measure

from .settings import RING_INNER_PX as DEFAULT_INNER
from .settings import RING_OUTER_PX as DEFAULT_OUTER

DEFAULT_SIGMA = 4.0
_DENSE_STEP = 0.25  # px: contour resampling step before the arc-length placement


def _as_mask(mask) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a 2D mask, got shape {m.shape}")
    return m > 0.5 if m.dtype.kind == "f" else m.astype(bool)


def ring_band(mask, outer_radius: float = DEFAULT_OUTER, inner_radius: float = DEFAULT_INNER) -> np.ndarray:
    """The band outside the organ: ``dilate(mask, outer) & ~dilate(mask, inner)``.

    Dilation is Euclidean (disk structuring element): a pixel is in the dilation by ``r`` when
    its centre lies within ``r`` px of a mask pixel centre.

    mask: (H, W) bool/0-1 array -> (H, W) bool array.  An empty mask gives an empty band.
    """
    m = _as_mask(mask)
    if not m.any():
        return np.zeros_like(m)
    dist = ndimage.distance_transform_edt(~m)
    return (dist <= outer_radius) & (dist > inner_radius)


def largest_component_filled(mask) -> np.ndarray:
    """Largest 8-connected component of the mask with its holes filled.  (H, W) bool."""
    m = _as_mask(mask)
    lab, n = ndimage.label(m, structure=np.ones((3, 3), bool))
    if n == 0:
        raise ValueError("empty mask: cannot place a background ring")
    if n > 1:
        sizes = np.bincount(lab.ravel())[1:]
        m = lab == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(m)


def _polygon_area(rc: np.ndarray) -> float:
    r, c = rc[:, 0], rc[:, 1]
    return 0.5 * abs(float(np.dot(c, np.roll(r, -1)) - np.dot(r, np.roll(c, -1))))


def _densify(rc: np.ndarray, step: float = _DENSE_STEP) -> np.ndarray:
    """Resample a closed polyline (first point == last point) at ~``step`` px spacing."""
    seg = np.linalg.norm(np.diff(rc, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    total = cum[-1]
    if total <= 0:
        return rc[:1].copy()
    n = max(8, int(np.ceil(total / step)))
    s = np.linspace(0.0, total, n, endpoint=False)
    return np.stack([np.interp(s, cum, rc[:, 0]), np.interp(s, cum, rc[:, 1])], axis=1)


def _place_by_arclength(pts: np.ndarray, seg_len: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Points at arc lengths ``targets`` along the polyline ``pts[k] -> pts[k+1]`` with
    (effective) segment lengths ``seg_len`` (zero for skipped segments)."""
    cum = np.concatenate([[0.0], np.cumsum(seg_len)])
    out = np.empty((len(targets), 2))
    for i, t in enumerate(targets):
        k = int(np.searchsorted(cum, t, side="right")) - 1
        k = min(max(k, 0), len(seg_len) - 1)
        # skip zero-length (excluded) segments so the point lands on a counted segment
        while seg_len[k] <= 0 and k + 1 < len(seg_len):
            k += 1
        f = 0.0 if seg_len[k] <= 0 else min(max((t - cum[k]) / seg_len[k], 0.0), 1.0)
        out[i] = pts[k] + f * (pts[k + 1] - pts[k])
    return out


def ring_points(
    mask,
    n_points: int = 10,
    outer_radius: float = DEFAULT_OUTER,
    inner_radius: float = DEFAULT_INNER,
) -> np.ndarray:
    """``n_points`` background points on the ring just outside the organ.

    The ring is the level set at the mean radius ``(outer + inner) / 2`` of the Euclidean
    distance to the (largest, hole-filled) mask component, i.e. the middle of
    :func:`ring_band`; only its outer contour is used.  Points are spread evenly by arc length
    along the part of that contour that lies inside the image (a mask touching the border
    gives an open arc), then sorted canonically by angle around the mask centroid.

    mask: (H, W) bool/0-1 array (H = W = 256 for the work grid).
    Returns (n_points, 2) float64 normalised (x, y), clipped to pixel centres inside the image.
    Raises ValueError on an empty mask.
    """
    if n_points < 1:
        raise ValueError("n_points must be >= 1")
    m = largest_component_filled(mask)
    h, w = m.shape
    radius = 0.5 * (float(outer_radius) + float(inner_radius))
    pad = int(np.ceil(radius)) + 3
    dist = ndimage.distance_transform_edt(~np.pad(m, pad))
    contours = measure.find_contours(dist, radius)
    closed = [c for c in contours if len(c) > 3 and np.allclose(c[0], c[-1])]
    if not closed:  # cannot happen with the padding, but stay safe
        closed = [np.vstack([c, c[:1]]) for c in contours if len(c) > 2]
    if not closed:
        raise ValueError("could not trace a ring around the mask")
    outer = max(closed, key=_polygon_area) - pad  # back to image (row, col) pixel coordinates

    rows, cols = np.nonzero(m)
    cy, cx = rows.mean(), cols.mean()
    pts = _densify(outer)  # (K, 2) row, col; closed implicitly (last -> first)
    inside = (pts[:, 0] >= -0.5) & (pts[:, 0] <= h - 0.5) & (pts[:, 1] >= -0.5) & (pts[:, 1] <= w - 0.5)

    if inside.all() or not inside.any():
        # closed ring (or ring completely outside the image: fall back to the whole ring and
        # clip): start at the contour sample with the smallest angle for determinism
        ang = np.mod(np.arctan2(pts[:, 0] - cy, pts[:, 1] - cx), 2 * np.pi)
        pts = np.roll(pts, -int(np.argmin(ang)), axis=0)
        loop = np.vstack([pts, pts[:1]])
        seg = np.linalg.norm(np.diff(loop, axis=0), axis=1)
        total = seg.sum()
        targets = np.arange(n_points) * total / n_points
    else:
        # open arc(s): start just after an outside sample so inside runs are contiguous, count
        # only segments with both ends inside the image
        start = int(np.argmin(inside))  # first outside sample
        pts = np.roll(pts, -start, axis=0)
        ins = np.roll(inside, -start)
        loop = np.vstack([pts, pts[:1]])
        ins_loop = np.concatenate([ins, ins[:1]])
        seg = np.linalg.norm(np.diff(loop, axis=0), axis=1) * (ins_loop[:-1] & ins_loop[1:])
        total = seg.sum()
        if total <= 0:
            seg = np.linalg.norm(np.diff(loop, axis=0), axis=1)
            total = seg.sum()
        targets = (np.arange(n_points) + 0.5) * total / n_points
    rc = _place_by_arclength(loop, seg, targets)

    ang = np.mod(np.arctan2(rc[:, 0] - cy, rc[:, 1] - cx), 2 * np.pi)
    rc = rc[np.argsort(ang, kind="stable")]
    xy = np.stack([(rc[:, 1] + 0.5) / w, (rc[:, 0] + 0.5) / h], axis=1)
    xy[:, 0] = np.clip(xy[:, 0], 0.5 / w, (w - 0.5) / w)
    xy[:, 1] = np.clip(xy[:, 1], 0.5 / h, (h - 0.5) / h)
    return xy


def gaussian_heatmaps(points, size: int = 256, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """One Gaussian per point on a ``size`` x ``size`` grid (peak 1 at the point).

    points: (n, 2) normalised (x, y); sigma in pixels of that grid.
    Returns (n, size, size) float32.
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    g = (np.arange(size) + 0.5) / size
    dx = (g[None, :] - p[:, 0:1]) * size  # (n, size) over columns
    dy = (g[None, :] - p[:, 1:2]) * size  # (n, size) over rows
    ex = np.exp(-(dx**2) / (2 * sigma**2))
    ey = np.exp(-(dy**2) / (2 * sigma**2))
    return (ey[:, :, None] * ex[:, None, :]).astype(np.float32)


def gaussian_heatmaps_torch(points, size: int = 256, sigma: float = DEFAULT_SIGMA):
    """Differentiable torch version: points (B, N, 2) normalised (x, y) -> (B, N, size, size).

    Separable: exp(-dx^2 / 2s^2) * exp(-dy^2 / 2s^2), peak 1; gradients flow to ``points``.
    """
    import torch

    g = (torch.arange(size, device=points.device, dtype=points.dtype) + 0.5) / size
    dx = (g.view(1, 1, size) - points[..., 0:1]) * size  # (B, N, size)
    dy = (g.view(1, 1, size) - points[..., 1:2]) * size
    ex = torch.exp(-dx.pow(2) / (2 * sigma**2))
    ey = torch.exp(-dy.pow(2) / (2 * sigma**2))
    return ey.unsqueeze(-1) * ex.unsqueeze(-2)


def ring_to_box(points, margin_px: float = 8.5, size: int = 256) -> np.ndarray:
    """Box prompt from a ring: the points' bounding box shrunk by ``margin_px`` on each side.

    The ring sits ~7-10 px outside the organ, so the shrunk box approximates the organ's box.
    If shrinking would invert an axis, that axis collapses to the centre.  Returns (4,) float64
    normalised (x0, y0, x1, y1), clipped to [0, 1].
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(p) == 0:
        raise ValueError("ring_to_box needs at least one point")
    m = margin_px / size
    lo, hi = p.min(axis=0), p.max(axis=0)
    a, b = lo + m, hi - m
    centre = 0.5 * (lo + hi)
    inv = a > b
    a[inv] = centre[inv]
    b[inv] = centre[inv]
    return np.clip(np.array([a[0], a[1], b[0], b[1]]), 0.0, 1.0)
