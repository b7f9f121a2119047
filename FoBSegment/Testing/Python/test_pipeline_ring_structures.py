"""Ring-shaped structures (pipeline.ring_structures) and the myocardium end to end."""

import numpy as np
import pytest

from conftest import dice, one_slice_support, shared_case
from FoBSegmentLib.io import read_volume
from FoBSegmentLib.errors import FoBInputError
from FoBSegmentLib.geometry import SliceView, occupied_slices
from FoBSegmentLib.pipeline.ring_structures import draw_wall, split_ring, wall_around, wall_thickness
from FoBSegmentLib.settings import DEFAULT_SETTINGS

RING = DEFAULT_SETTINGS.ring  # the default wall rule: the edge from the image


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


def test_wall_edge_follows_the_image_within_its_range():
    """A wall 6 px thick on one side (fat beyond it, brighter) and 10 px on the other (lung,
    darker), with wall-like tissue touching it below: drawn at the mean thickness it is wrong on
    both sides; from the image each side gets its own edge, and the look-alike stops at
    ``most`` x the thickness."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    r = np.hypot(yy - 48, xx - 48)
    cavity = r <= 14
    outer = np.where(xx < 48, 20.0, 24.0)
    truth = ~cavity & (r <= outer)
    image = np.where(xx < 48, 150.0, 20.0)
    image[yy > 70] = 80.0  # tissue as dark as the wall below it
    image[truth] = 80.0
    image[cavity] = 220.0
    image += rng.normal(0, 4, image.shape)
    t = 8.0
    wall = draw_wall(image, cavity, t, (1.0, 1.0), RING)
    band = wall_around(cavity, t)
    assert dice(wall, truth) > dice(band, truth) + 0.05 and dice(wall, truth) > 0.85
    d = np.hypot(yy - 48, xx - 48) - 14
    assert not (wall & cavity).any()
    assert d[wall].max() <= RING.wall_most * t + 1.5, "the look-alike below is cut at the farthest edge"
    assert (wall | cavity)[d <= RING.wall_least * t - 1].all(), "never thinner than the nearest edge"


def test_a_vessel_against_the_wall_does_not_notch_it():
    """A bright vessel lying on the wall's outer edge in one direction: the edge there is the
    median of the sectors around it, so the wall keeps its thickness under the vessel instead of
    stopping where the vessel begins."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:96, :96]
    r = np.hypot(yy - 48, xx - 48)
    cavity, truth = r <= 14, (r > 14) & (r <= 22)
    image = np.full(r.shape, 150.0)
    image[truth] = 80.0
    image[cavity] = 220.0
    vessel = np.hypot(yy - 48, xx - (48 + 20)) <= 2.5
    image[vessel] = 220.0
    image += rng.normal(0, 4, image.shape)
    wall = draw_wall(image, cavity, 8.0, (1.0, 1.0), RING)
    assert (wall | cavity)[r <= 21].all(), "no notch under the vessel"
    assert dice(wall, truth) > 0.97


def test_wall_from_the_image_beats_the_supports_thickness_on_other_patients():
    """MS-CMRSeg: the thickness of patient 2's largest slice, drawn around every other patient's
    reference blood pool.  Following each query's image is closer to its myocardium than the
    support's thickness all round (measured: 0.876 against 0.846 mean Dice over 14 patients)."""
    s_img, s_lab = shared_case("mscmrseg19_bssfp_cmr", 2)
    sup = np.rint(read_volume(s_lab).array) == 200
    view = SliceView.for_volume(read_volume(s_img))
    ms = view.to_stack(sup)
    k = int(np.argmax(ms.sum((1, 2))))
    t = wall_thickness(ms, split_ring(ms, RING.hole_ratio), [k], RING.default_thickness_px, view.pixel_spacing)
    band, image = [], []
    for q in [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]:
        q_img, q_lab = shared_case("mscmrseg19_bssfp_cmr", q)
        vol = read_volume(q_img)
        qv = SliceView.for_volume(vol)
        lab = qv.to_stack(np.rint(read_volume(q_lab).array))
        img, gt, cav = qv.to_stack(vol.array), lab == 200, lab == 500
        a, b = np.zeros_like(gt), np.zeros_like(gt)
        for i in occupied_slices(cav):
            a[i] = wall_around(cav[i], t, qv.pixel_spacing)
            b[i] = draw_wall(img[i], cav[i], t, qv.pixel_spacing, RING)
        band.append(dice(a, gt))
        image.append(dice(b, gt))
    assert np.mean(image) > np.mean(band) + 0.01
    assert sum(x > y for x, y in zip(image, band)) >= 10


def test_an_unknown_wall_rule_or_unusable_sectors_are_refused_before_any_slice_is_segmented(litemedsam, ct):
    """Checked on a ring drawn on the example CT (no shared data needed): settings out of range
    are refused when made; a wall rule the ring code does not know, or more smoothing than
    sectors, when the ring is segmented, before any slice is encoded."""
    from scipy import ndimage

    from FoBSegmentLib import Segmenter

    vol, labels = ct
    support, k, view = one_slice_support(vol, labels == 5)
    st = view.to_stack(support > 0)
    ring = np.zeros_like(st)
    ring[k] = st[k] & ~ndimage.binary_erosion(st[k], iterations=4)
    support = view.from_stack(ring)
    seg = Segmenter(litemedsam, settings=DEFAULT_SETTINGS.with_changes(**{"ring.wall": "thick"}))
    with pytest.raises(FoBInputError, match="ring.wall='thick'.*image, band"):
        seg.segment(vol, vol, support)
    assert seg.encoded_count == 0
    for bad in ({"ring.wall_sectors": 0}, {"ring.wall_smooth": -1}):
        with pytest.raises(FoBInputError, match="at least"):
            DEFAULT_SETTINGS.with_changes(**bad)
    seg = Segmenter(litemedsam, settings=DEFAULT_SETTINGS.with_changes(**{"ring.wall_smooth": 48}))
    with pytest.raises(FoBInputError, match="at least 4 sectors"):
        seg.segment(vol, vol, support)
    assert seg.encoded_count == 0


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
