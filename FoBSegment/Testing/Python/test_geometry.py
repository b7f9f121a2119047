"""Slice axis, display orientation and the exact reversibility of the slice view."""

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_case
from FoBSegmentLib.errors import FoBInputError
from FoBSegmentLib.geometry import SliceView, Volume, occupied_slices, slice_axis_ijk, validate_volume
from FoBSegmentLib.io import read_volume


def _rot(axis, deg):
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    m = np.eye(3)
    i, j = [k for k in range(3) if k != axis]
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def test_thick_axis_is_the_slice_axis_whatever_its_index():
    for thick in range(3):
        sp = [1.0, 1.0, 1.0]
        sp[thick] = 5.0
        vol = Volume(np.zeros((4, 5, 6)), sp)
        assert slice_axis_ijk(vol) == thick
        view = SliceView.for_volume(vol)
        assert view.to_stack(vol.array).shape[0] == vol.shape_ijk[thick]


def test_isotropic_volume_follows_file_stacking_order():
    assert slice_axis_ijk(Volume(np.zeros((4, 5, 6)), (2.0, 2.0, 2.0))) == 2


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0]), np.diag([1.0, -1.0, 1.0]),
                                       _rot(2, 90), _rot(0, 20) @ _rot(1, 35)])
def test_view_is_exactly_reversible(direction):
    rng = np.random.default_rng(0)
    vol = Volume(rng.random((7, 9, 11)), (1.0, 1.2, 4.0), (3.0, -2.0, 5.0), direction)
    view = SliceView.for_volume(vol)
    stack = view.to_stack(vol.array)
    assert np.array_equal(view.from_stack(stack), vol.array)


def test_axial_display_orientation_is_patient_consistent():
    """Two encodings of the same anatomy (one with flipped i/j axes) give the same stack."""
    rng = np.random.default_rng(1)
    arr = rng.random((5, 6, 7))
    a = Volume(arr, (1, 1, 3), (0, 0, 0), np.eye(3))
    flipped = arr[:, ::-1, ::-1]
    b = Volume(flipped, (1, 1, 3), (6, 5, 0), np.diag([-1.0, -1.0, 1.0]))
    sa = SliceView.for_volume(a).to_stack(a.array)
    sb = SliceView.for_volume(b).to_stack(b.array)
    assert np.array_equal(sa, sb)


def test_transposed_in_plane_axes_are_put_back():
    rng = np.random.default_rng(2)
    arr = rng.random((5, 6, 7))  # (k, j, i)
    a = Volume(arr, (1, 1, 3), direction=np.eye(3))
    b_arr = np.transpose(arr, (0, 2, 1))  # swap i and j
    b = Volume(b_arr, (1, 1, 3), direction=np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]]))
    assert np.array_equal(SliceView.for_volume(a).to_stack(a.array), SliceView.for_volume(b).to_stack(b.array))


def test_stack_coords_map_back_to_the_voxel():
    rng = np.random.default_rng(3)
    vol = Volume(rng.random((6, 8, 10)), (1, 1, 4), direction=_rot(2, 180) @ np.diag([1.0, -1.0, 1.0]))
    view = SliceView.for_volume(vol)
    stack = view.to_stack(vol.array)
    for s, r, c in [(0, 0, 0), (5, 7, 9), (2, 3, 4)]:
        i, j, k = np.rint(view.stack_coords_to_ijk([(s, r, c)], stack.shape)[0]).astype(int)
        assert vol.array[k, j, i] == stack[s, r, c]


def test_oblique_cardiac_volume_slices_along_its_short_axis():
    img, _ = shared_case("mscmrseg19_bssfp_cmr", 1)
    vol = read_volume(img)
    assert abs(np.linalg.det(vol.direction)) > 0.99 and not np.allclose(np.abs(vol.direction), np.eye(3), atol=0.1)
    view = SliceView.for_volume(vol)
    assert view.slice_axis_ijk == 2  # 7.99 mm between short-axis slices
    assert view.slice_spacing == pytest.approx(7.99, abs=0.01)
    assert np.array_equal(view.from_stack(view.to_stack(vol.array)), vol.array)


def test_validation_rejects_nan_and_wrong_dimensions():
    a = np.zeros((3, 4, 5), np.float32)
    a[1, 2, 3] = np.nan
    with pytest.raises(FoBInputError, match="NaN"):
        validate_volume(Volume(a))
    with pytest.raises(FoBInputError, match="2D"):
        validate_volume(Volume(np.zeros((4, 5))))
    with pytest.raises(FoBInputError, match="4D"):
        validate_volume(Volume(np.zeros((2, 3, 4, 5))))


def test_reading_matches_simpleitk_geometry(example_ct):
    img_path, _ = example_ct
    vol = read_volume(img_path)
    ref = sitk.ReadImage(str(img_path))
    assert vol.array.shape == sitk.GetArrayFromImage(ref).shape
    assert np.allclose(vol.direction.ravel(), ref.GetDirection())
    assert np.allclose(vol.origin, ref.GetOrigin())


def test_occupied_slices_lists_the_slices_with_any_voxel():
    stack = np.zeros((6, 4, 5), bool)
    stack[1, 0, 0] = stack[4, 3, 4] = True
    assert occupied_slices(stack) == [1, 4]
    assert occupied_slices(np.zeros((3, 2, 2))) == []


def test_body_columns_find_the_midline_of_an_off_centre_body():
    from FoBSegmentLib.preprocessing import Normalisation, body_columns

    stack = np.zeros((5, 40, 100), np.float32)
    stack[:, 10:30, 20:61] = 0.5  # body in columns 20..60
    stack[2, 0, 95] = 1.0  # one bright noise voxel in the air is not body
    centre, half = body_columns(stack, Normalisation("MR", 0.0, 1.0))
    assert centre == pytest.approx(40.0) and half == pytest.approx(20.0)
    assert body_columns(np.zeros((3, 8, 10)), Normalisation("MR", 0.0, 1.0)) == (4.5, 5.0)  # all air: the image centre


@pytest.mark.parametrize("src,dst", [((320, 260), (256, 208)), ((122, 101), (256, 212)), ((64, 64), (256, 256)),
                                     ((256, 256), (320, 260)), ((1, 5), (3, 7)), ((256, 256), (256, 256))])
def test_square_grid_resize_samples_as_torch_interpolate(src, dst):
    """Slices, masks and logits are resized in numpy (a run from the exports never imports
    PyTorch); the sampling must stay PyTorch's bilinear one, or the embeddings, hence the
    cache keys and the masks, would change with the runtime."""
    torch = pytest.importorskip("torch")
    from FoBSegmentLib.backbones.base import resize, slice_to_square, square_to_slice

    a = np.random.default_rng(0).random((2, *src), dtype=np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(a)[None], size=dst, mode="bilinear",
                                          align_corners=False)[0].numpy()
    out = resize(a, dst)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert float(np.abs(out - ref).max()) <= 2.5e-7  # float32 rounding, not another sampling
    sq = slice_to_square(a[0] + 1)
    nr, nc = (max(1, round(n * 256 / max(src))) for n in src)
    assert sq.shape == (256, 256) and sq[:nr, :nc].min() >= 1  # the slice, resized: top left
    assert not sq[nr:].any() and not sq[:, nc:].any()  # zero padding: bottom and right
    assert np.allclose(square_to_slice(sq, src), resize(sq[:nr, :nc], src))


def test_within_slices_keeps_a_structure_within_anothers_extent(example_ct):
    from FoBSegmentLib.geometry import within_slices

    vol = read_volume(example_ct[0])
    lab = np.rint(read_volume(example_ct[1]).array)
    view = SliceView.for_volume(vol)
    liver, spleen = view.to_stack(lab == 5), view.to_stack(lab == 1)
    lo, hi = occupied_slices(spleen)[0], occupied_slices(spleen)[-1]
    outside = [i for i in occupied_slices(liver) if not lo <= i <= hi]
    assert len(outside) >= 10  # the liver starts well below the spleen in this CT
    kept, cleared = within_slices(liver, spleen)
    assert cleared == outside
    assert occupied_slices(kept) == [i for i in occupied_slices(liver) if lo <= i <= hi]
    np.testing.assert_array_equal(kept[lo:hi + 1], liver[lo:hi + 1])
    assert liver[outside].any(), "the input is not changed"
    same, none = within_slices(spleen, liver)  # the spleen lies within the liver's extent
    assert none == [] and same is spleen
    untouched, none = within_slices(liver, np.zeros_like(spleen))  # nothing found bounds nothing
    assert none == [] and untouched is liver
    with pytest.raises(ValueError):
        within_slices(liver, spleen[1:])


def test_a_segmentations_grid_on_the_lattice_of_its_image(example_ct):
    """What a Slicer segmentation of an image may store (a part of its grid, an axis reversed as
    a DICOM-to-NIfTI conversion does, an oversampled in-plane grid) is on the image's lattice;
    a shift by part of a voxel, another spacing or a place elsewhere is another image's grid."""
    from FoBSegmentLib import read_volume
    from FoBSegmentLib.geometry import Volume

    ct = read_volume(example_ct[0])
    sp, d, o = np.asarray(ct.spacing), np.asarray(ct.direction), np.asarray(ct.origin)
    a = np.zeros((5, 6, 7))

    def grid(origin_voxels, spacing=sp, direction=d):
        return Volume(a, spacing, o + d @ (sp * np.asarray(origin_voxels, float)), direction)

    on = [grid([0, 0, 0]), grid([3, 4, 5]), grid([0, 0, ct.shape_ijk[2] - 1], direction=d @ np.diag([1, 1, -1])),
          grid([-0.25, -0.25, 0], spacing=sp * np.array([0.5, 0.5, 1]))]
    off = [grid([0.5, 0, 0]), grid([0, 0, 0], spacing=sp * 1.3), grid([5000, 0, 0])]
    assert [g.on_lattice_of(ct) for g in on] == [True] * 4
    assert [g.on_lattice_of(ct) for g in off] == [False] * 3
