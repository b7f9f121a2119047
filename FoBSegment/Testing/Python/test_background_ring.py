"""Geometry of the background ring (FoBSegmentLib.background_ring)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from FoBSegmentLib.background_ring import (
    gaussian_heatmaps,
    gaussian_heatmaps_torch,
    ring_band,
    ring_points,
    ring_to_box,
)

N = 256


def disk(cx, cy, r):
    yy, xx = np.mgrid[:N, :N]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


def rect(r0, r1, c0, c1):
    m = np.zeros((N, N), bool)
    m[r0:r1, c0:c1] = True
    return m


def l_shape():
    m = rect(50, 150, 50, 80)
    m[120:150, 50:150] = True
    return m


def dist_to_mask(mask, pts):
    """Euclidean distance (px) from the pixel holding each normalised point to the mask."""
    d = ndimage.distance_transform_edt(~mask)
    rc = np.clip(np.floor(pts[:, ::-1] * N).astype(int), 0, N - 1)
    return d[rc[:, 0], rc[:, 1]]


def angles(mask, pts):
    rows, cols = np.nonzero(mask)
    return np.mod(np.arctan2(pts[:, 1] * N - 0.5 - rows.mean(), pts[:, 0] * N - 0.5 - cols.mean()), 2 * np.pi)


SHAPES = {"disk": disk(100, 128, 30), "rect": rect(80, 120, 60, 160), "L": l_shape()}


def test_ring_band_outside_organ():
    m = SHAPES["disk"]
    band = ring_band(m, 10, 7)
    d = ndimage.distance_transform_edt(~m)
    assert band.any() and not (band & m).any()
    assert d[band].min() > 7 and d[band].max() <= 10
    assert not ring_band(np.zeros((N, N), bool)).any()


@pytest.mark.parametrize("name", list(SHAPES))
def test_points_on_ring_evenly_and_angle_ordered(name):
    m = SHAPES[name]
    pts = ring_points(m, n_points=10)
    assert pts.shape == (10, 2)
    d = dist_to_mask(m, pts)
    assert d.min() >= 7.0 and d.max() <= 10.5, d
    a = angles(m, pts)
    assert np.all(np.diff(a) > 0), a
    assert np.array_equal(pts, ring_points(m, n_points=10))  # deterministic
    if name != "L":  # convex: chord spacing ~ arc spacing
        gaps = np.linalg.norm(np.diff(np.vstack([pts, pts[:1]]), axis=0), axis=1)
        assert gaps.std() / gaps.mean() < (0.02 if name == "disk" else 0.1)


def test_arc_length_spacing_on_l_shape():
    m = SHAPES["L"]
    pts = ring_points(m, n_points=10) * N - 0.5  # (x, y) pixel coordinates
    # arc length of each point along the level-8.5 contour, measured on a fine polyline
    from skimage import measure

    c = max(measure.find_contours(ndimage.distance_transform_edt(~m), 8.5), key=len)[:, ::-1]
    cum = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(c, axis=0), axis=1))])
    s = np.sort([cum[np.argmin(np.linalg.norm(c - p, axis=1))] for p in pts])
    gaps = np.diff(np.concatenate([s, [s[0] + cum[-1]]]))
    assert gaps.std() / gaps.mean() < 0.05


def test_mask_touching_border():
    m = rect(100, 140, 0, 30)
    pts = ring_points(m)
    assert np.all((pts > 0) & (pts < 1))
    assert dist_to_mask(m, pts).min() >= 7.0
    pair = np.linalg.norm(pts[:, None] - pts[None], axis=-1) * N + np.eye(len(pts)) * 1e9
    assert pair.min() > 3.0  # not bunched up on the border
    corner = ring_points(rect(0, 40, 0, 40))
    assert dist_to_mask(rect(0, 40, 0, 40), corner).min() >= 7.0


def test_tiny_mask():
    m = np.zeros((N, N), bool)
    m[10, 10:13] = True
    pts = ring_points(m)
    assert pts.shape == (10, 2)
    d = dist_to_mask(m, pts)
    assert d.min() >= 7.0 and d.max() <= 10.5
    assert np.all(np.diff(angles(m, pts)) > 0)


def test_largest_component_and_holes():
    annulus = disk(128, 128, 40) & ~disk(128, 128, 25)
    extra = rect(10, 13, 10, 13)
    pts = ring_points(annulus | extra)
    filled = disk(128, 128, 40)
    d = dist_to_mask(filled, pts)
    assert d.min() >= 7.0 and d.max() <= 10.5  # outside the outer wall, none near the speck


def test_empty_mask_raises():
    with pytest.raises(ValueError):
        ring_points(np.zeros((N, N), bool))


def test_box_from_rectangle_ring():
    r0, r1, c0, c1 = 80, 120, 60, 160
    box = ring_to_box(ring_points(rect(r0, r1, c0, c1))) * N
    assert np.allclose(box, [c0, r0, c1, r1], atol=2.0), box


def test_box_never_inverted():
    pts = np.array([[0.5, 0.5], [0.51, 0.52], [0.49, 0.5]])
    box = ring_to_box(pts)
    assert box[0] <= box[2] and box[1] <= box[3]
    assert np.all((box >= 0) & (box <= 1))


def test_heatmaps_peak_at_points():
    import torch

    pts = ring_points(SHAPES["disk"])
    h = gaussian_heatmaps(pts, size=N, sigma=4.0)
    assert h.shape == (10, N, N)
    for i, (x, y) in enumerate(pts):
        r, c = np.unravel_index(np.argmax(h[i]), h[i].shape)
        assert abs(c - (x * N - 0.5)) <= 0.5 and abs(r - (y * N - 0.5)) <= 0.5
    t = torch.tensor(pts, dtype=torch.float64)[None].requires_grad_()
    ht = gaussian_heatmaps_torch(t, size=N, sigma=4.0)
    assert ht.shape == (1, 10, N, N)
    assert np.allclose(ht.detach().numpy()[0], h, atol=1e-5)
    (ht * torch.rand_like(ht)).sum().backward()
    assert t.grad.abs().sum() > 0
