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
    assert wall_thickness(stack, hole, [1], 5.0) == pytest.approx(6.0, abs=1.5)  # mean-distance estimate
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
