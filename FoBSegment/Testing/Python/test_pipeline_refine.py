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
