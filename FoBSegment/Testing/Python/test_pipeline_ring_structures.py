"""Ring-shaped structures (pipeline.ring_structures) and the myocardium end to end."""

import numpy as np
import pytest

from conftest import dice, one_slice_support, shared_case
from FoBSegmentLib.io import read_volume
from FoBSegmentLib.pipeline.ring_structures import split_ring, wall_around, wall_thickness


def _annulus(n=64, r_in=8, r_out=14):
    yy, xx = np.mgrid[:n, :n]
    d2 = (yy - 32) ** 2 + (xx - 32) ** 2
    return (d2 <= r_out ** 2) & (d2 > r_in ** 2), d2 <= r_in ** 2


def test_split_ring_finds_the_cavity_and_the_wall_thickness():
    ring, cavity = _annulus()
    stack = np.zeros((3, 64, 64), bool)
    stack[1] = ring
    hole = split_ring(stack, 0.1)
    assert hole is not None and np.array_equal(hole[1], cavity) and not hole[0].any()
    assert wall_thickness(stack, hole, [1], 5.0) == pytest.approx(6.0, abs=0.5)  # the band of the wall's area
    disk = np.zeros_like(stack)
    disk[1] = ring | cavity
    assert split_ring(disk, 0.1) is None  # a filled structure is not a ring
    wall = wall_around(cavity, 6.0)
    assert not (wall & cavity).any() and dice(wall, ring) > 0.85


def test_myocardium_is_drawn_around_the_blood_pool(segmenter):
    img, lab = shared_case("mscmrseg19_bssfp_cmr", 2)
    vol = read_volume(img)
    labels = np.rint(read_volume(lab).array)
    myo = labels == 200
    support, k, view = one_slice_support(vol, myo, which="largest")
    res = segmenter.segment(vol, vol, support, slice_range=(k - 2, k + 2))
    assert res.prompt_strategy.endswith("+ring")
    st, g = view.to_stack(res.mask > 0), view.to_stack(myo)
    assert np.array_equal(st[k], g[k])
    assert dice(st[k - 2:k + 3], g[k - 2:k + 3]) > 0.6
    assert not (st & view.to_stack(labels == 500)).sum() > 0.2 * st.sum(), "the cavity is not part of the wall"


def test_wall_keeps_its_thickness_in_millimetres_across_resolutions():
    """A 6 mm wall measured on a 1 mm grid, drawn around the same cavity on a 2 mm grid: still
    6 mm (3 pixels), not 6 pixels."""
    ring, cavity = _annulus(128, 16, 28)  # 1 mm pixels: cavity radius 16 mm, wall 12 mm
    stack = np.zeros((1, 128, 128), bool)
    stack[0] = ring
    t_mm = wall_thickness(stack, split_ring(stack, 0.1), [0], 5.0, (1.0, 1.0))
    assert t_mm == pytest.approx(12.0, abs=2.0)
    coarse_ring, coarse_cavity = ring[::2, ::2], cavity[::2, ::2]
    wall = wall_around(coarse_cavity, t_mm, (2.0, 2.0))
    assert dice(wall, coarse_ring) > 0.85
    assert dice(wall_around(coarse_cavity, t_mm), coarse_ring) < 0.7  # the same number taken as pixels
    assert wall_thickness(stack, split_ring(stack, 0.1), [], 5.0, (1.5, 1.5)) == 7.5  # default: 5 px


def test_myocardium_of_a_coarser_query_keeps_the_supports_thickness(segmenter):
    """Support: patient 2 at 1.25 mm; query: patient 3 resampled to 2.5 mm pixels.  The drawn
    wall's thickness in millimetres stays the support's (in pixels it would double)."""
    from FoBSegmentLib.geometry import SliceView, Volume
    from FoBSegmentLib.pipeline.ring_structures import split_ring as ring_of

    s_img, s_lab = shared_case("mscmrseg19_bssfp_cmr", 2)
    q_img, q_lab = shared_case("mscmrseg19_bssfp_cmr", 3)
    s, q = read_volume(s_img), read_volume(q_img)
    myo_s = np.rint(read_volume(s_lab).array) == 200
    coarse = Volume(np.ascontiguousarray(q.array[:, ::2, ::2]), (2 * q.spacing[0], 2 * q.spacing[1], q.spacing[2]),
                    q.origin, q.direction)
    support, k, s_view = one_slice_support(s, myo_s, which="largest")
    mid = q.array.shape[0] // 2
    res = segmenter.segment(coarse, s, support, query_slices=list(range(mid - 1, mid + 2)))
    assert res.prompt_strategy.endswith("+ring")
    st_s, q_view = s_view.to_stack(support), SliceView.for_volume(coarse)
    st_q = q_view.to_stack(res.mask > 0)
    t_sup = wall_thickness(st_s, ring_of(st_s, 0.1), [k], 5.0, s_view.pixel_spacing)
    t_out = wall_thickness(st_q, ring_of(st_q, 0.1), [mid], 5.0, q_view.pixel_spacing)
    assert 0.75 < t_out / t_sup < 1.33
