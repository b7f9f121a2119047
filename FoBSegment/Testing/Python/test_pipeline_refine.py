"""Correct and refine (pipeline.refine): corrected slices are anchors, the walk is redone from them."""

import numpy as np
import pytest

from conftest import dice, one_slice_support
from FoBSegmentLib import FoBInputError
from FoBSegmentLib.pipeline.refine import agreement, edited_slices


def test_edited_slices_and_agreement():
    a = np.zeros((4, 5, 5), bool)
    b = a.copy()
    b[2, 1, 1] = True
    assert edited_slices(a, b) == [2]
    assert agreement(a[0], a[0]) == 1.0 and agreement(b[2], a[2]) == 0.0


def test_refine_after_one_correction_keeps_the_edit_and_only_decodes(ct, segmenter):
    vol, labels = ct
    gt = labels == 5
    support, k, view = one_slice_support(vol, gt)
    first = segmenter.segment(vol, vol, support)
    st, g = view.to_stack(first.mask > 0), view.to_stack(gt)
    # The user replaces the worst slice of the result by the reference.
    kept = [i for i in range(st.shape[0]) if st[i].any() or g[i].any()]
    worst = min(kept, key=lambda i: dice(st[i], g[i]))
    corrected = st.copy()
    corrected[worst] = g[worst]
    ref = segmenter.refine(vol, first.mask, view.from_stack(corrected))
    out = view.to_stack(ref.mask > 0)
    assert np.array_equal(out[worst], g[worst]), "the user's edit is never overwritten"
    walked = [i for i, v in ref.slice_info.items() if v.get("reason") != "annotated"]
    unseen = {i for i in walked + [worst] if i not in first.slice_info}
    assert ref.slices_encoded <= len(unseen), "refine encodes only slices the first run never reached"
    assert dice(out, g) >= dice(st, g) - 1e-9
    far = [i for i in kept if all(abs(i - w) > 1 for w in walked + [worst])]
    assert all(np.array_equal(out[i], st[i]) for i in far), "slices the new walk never reached are unchanged"
    # Nothing edited: nothing recomputed.
    same = segmenter.refine(vol, first.mask, first.mask)
    assert np.array_equal(same.mask, first.mask) and not same.slice_info


def test_an_erased_slice_removes_the_result_beyond_it(ct, segmenter):
    vol, labels = ct
    support, k, view = one_slice_support(vol, labels == 1)
    first = segmenter.segment(vol, vol, support)
    st = view.to_stack(first.mask > 0)
    occ = [i for i in range(st.shape[0]) if st[i].any()]
    cut = occ[-3]
    corrected = st.copy()
    corrected[cut] = False
    ref = view.to_stack(segmenter.refine(vol, first.mask, view.from_stack(corrected)).mask > 0)
    assert not ref[cut:].any() and np.array_equal(ref[:cut], st[:cut])


def test_refine_rejects_masks_off_the_grid(ct, segmenter):
    vol, _ = ct
    with pytest.raises(FoBInputError, match="query's grid"):
        segmenter.refine(vol, np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))


def test_cli_prepare_then_segment_then_refine(tmp_path, capsys):
    """The command-line loop: prepare a volume, segment (decode only), correct, refine."""
    import SimpleITK as sitk

    from conftest import TEST_DATA
    from FoBSegmentLib import read_support_mask, read_volume, write_result
    from FoBSegmentLib.cli import main
    from FoBSegmentLib.geometry import SliceView

    crop = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(TEST_DATA / "example_ct.nii.gz"))[:, :, 96:106], str(crop))
    lab = tmp_path / "lab.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(TEST_DATA / "example_seg.nii.gz"))[:, :, 96:106], str(lab))
    vol = read_volume(crop)
    view = SliceView.for_volume(vol)
    g = view.to_stack(np.rint(read_volume(lab).array) == 1)
    k = int(np.argmax(g.sum((1, 2))))
    painted = np.zeros_like(g)
    painted[k] = g[k]
    sup = write_result(tmp_path / "sup.seg.nrrd", vol, view.from_stack(painted), name="spleen", color=(0.6, 0, 1))
    cache = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert main(["prepare", "--volume", str(crop), *cache]) == 0
    assert "10 slices encoded" in capsys.readouterr().out
    out = tmp_path / "r.seg.nrrd"
    assert main(["segment", "--volume", str(crop), "--support-mask", str(sup), "--output", str(out), *cache]) == 0
    assert ", 0 encoded" in capsys.readouterr().out, "a prepared volume only decodes"
    first = read_support_mask(out, vol).mask
    st = view.to_stack(first)
    worst = min(range(len(g)), key=lambda i: dice(st[i], g[i]) if (st[i].any() or g[i].any()) else 2.0)
    st[worst] = g[worst]
    fixed = write_result(tmp_path / "fixed.seg.nrrd", vol, view.from_stack(st), name="spleen (FoB)", color=(0.6, 0, 1))
    out2 = tmp_path / "refined.seg.nrrd"
    assert main(["refine", "--volume", str(crop), "--previous", str(out), "--corrected", str(fixed),
                 "--output", str(out2), *cache]) == 0
    assert ", 0 encoded," in capsys.readouterr().out, "a refine of a prepared volume only decodes"
    refined = view.to_stack(read_support_mask(out2, vol).mask)
    assert np.array_equal(refined[worst], g[worst])
    # --within: the refined result kept within a one-slice bound; the corrected slice stays
    from FoBSegmentLib.geometry import occupied_slices

    j = k if k != worst else (k + 1 if k + 1 < len(g) else k - 1)
    one = np.zeros_like(g)
    one[j] = g[j]
    bound = write_result(tmp_path / "bound.nii.gz", vol, view.from_stack(one))
    out3 = tmp_path / "refined_within.seg.nrrd"
    assert main(["refine", "--volume", str(crop), "--previous", str(out), "--corrected", str(fixed),
                 "--within", str(bound), "--output", str(out3), *cache]) == 0
    kept = view.to_stack(read_support_mask(out3, vol).mask)
    assert set(occupied_slices(kept)) == {j, worst} & set(occupied_slices(refined))
    assert np.array_equal(kept[worst], g[worst]) and np.array_equal(kept[j], refined[j])
    assert len(occupied_slices(refined)) > 2, "the bound must have had slices to clear"
