"""The real LiteMedSAM backbone and the volume pipeline on real volumes."""

import numpy as np
import pytest
import slicerio

from conftest import SHARED_DATA, dice, shared_case
from FoBSegmentLib.backbones.base import square_to_slice
from FoBSegmentLib.cli import main
from FoBSegmentLib.errors import CancelledError, FoBInputError
from FoBSegmentLib.geometry import SliceView, occupied_slices
from FoBSegmentLib.io import read_volume
from FoBSegmentLib.preprocessing import fit_normalisation
from FoBSegmentLib.volume_segmenter import Segmenter


@pytest.fixture(scope="module")
def ct(example_ct):
    img, lab = example_ct
    vol = read_volume(img)
    labels = np.rint(read_volume(lab).array).astype(np.int64)
    return vol, labels


@pytest.fixture(scope="module")
def segmenter(litemedsam):
    return Segmenter(litemedsam)


def _one_slice_support(vol, gt, which="middle"):
    view = SliceView.for_volume(vol)
    g = view.to_stack(gt)
    idx = occupied_slices(g)
    k = int(np.argmax(g.sum((1, 2)))) if which == "largest" else int(idx[len(idx) // 2])
    s = np.zeros_like(g)
    s[k] = g[k]
    return view.from_stack(s), k, view


def test_litemedsam_with_ground_truth_box_segments_the_liver(ct, litemedsam):
    vol, labels = ct
    view = SliceView.for_volume(vol)
    stack, gt = view.to_stack(vol.array), view.to_stack(labels == 5)
    k = int(np.argmax(gt.sum((1, 2))))
    x = litemedsam.prepare(fit_normalisation(vol.array).apply(stack[k]))
    emb = litemedsam.encode(x[None])
    assert emb.shape == (1, 256, 64, 64)
    rows, cols = np.nonzero(gt[k])
    L = max(gt[k].shape)
    box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]) / L
    dec = litemedsam.decode(emb[0], box=box)
    pred = square_to_slice(dec.logits, gt[k].shape)[0] > 0
    assert dice(pred, gt[k]) > 0.85
    # A box around empty space must not produce the liver: the model really reads the image.
    wrong = litemedsam.decode(emb[0], box=np.array([0.0, 0.0, 0.1, 0.1]))
    assert dice(square_to_slice(wrong.logits, gt[k].shape)[0] > 0, gt[k]) < 0.1


def test_segment_ct_liver_in_query_geometry(ct, segmenter):
    vol, labels = ct
    gt = labels == 5
    support, k, view = _one_slice_support(vol, gt)
    seen = []
    res = segmenter.segment(vol, vol, support, slice_range=(k - 4, k + 4), progress=lambda d, t: seen.append((d, t)))
    assert res.mask.shape == vol.array.shape and res.mask.dtype == np.uint8
    st, g = view.to_stack(res.mask > 0), view.to_stack(gt)
    assert not st[: k - 4].any() and not st[k + 5:].any(), "nothing outside the requested slice range"
    assert dice(st[k - 4:k + 5], g[k - 4:k + 5]) > 0.85
    assert np.array_equal(st[k], g[k]), "the annotated slice keeps the user's annotation"
    assert seen and seen[-1][0] == seen[-1][1] and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert res.prompts and all(p.points_ijk.shape[1] == 3 for p in res.prompts)


def test_embedding_cache_means_no_slice_is_encoded_twice(ct, segmenter, litemedsam, tmp_path):
    vol, labels = ct
    support, k, _ = _one_slice_support(vol, labels == 5)
    rng = (k - 2, k + 2)
    segmenter.segment(vol, vol, support, slice_range=rng)
    spleen_support, ks, _ = _one_slice_support(vol, labels == 1)
    again = segmenter.segment(vol, vol, support, slice_range=rng)
    assert again.slices_encoded == 0
    # The on-disk cache serves a fresh process (a new Segmenter) too.
    first = Segmenter(litemedsam, cache_dir=tmp_path).segment(vol, vol, support, slice_range=rng)
    assert first.slices_encoded > 0
    assert list(tmp_path.rglob("*.npy"))
    second = Segmenter(litemedsam, cache_dir=tmp_path).segment(vol, vol, support, slice_range=rng)
    assert second.slices_encoded == 0
    assert np.array_equal(first.mask, second.mask)


def test_cancel_raises_and_returns_nothing(ct, segmenter):
    vol, labels = ct
    support, k, _ = _one_slice_support(vol, labels == 5)
    calls = []
    with pytest.raises(CancelledError):
        segmenter.segment(vol, vol, support, slice_range=(k - 6, k + 6), progress=lambda d, t: calls.append(d),
                          is_cancelled=lambda: len(calls) >= 2)
    assert len(calls) == 2


def test_bad_slice_range_is_reported(ct, segmenter):
    vol, labels = ct
    support, k, _ = _one_slice_support(vol, labels == 5)
    with pytest.raises(FoBInputError, match="outside the query image"):
        segmenter.segment(vol, vol, support, slice_range=(100, 500))


def test_oblique_cardiac_case_end_to_end(segmenter, tmp_path):
    img, lab = shared_case("mscmrseg19_bssfp_cmr", 1)
    vol = read_volume(img)
    gt = np.rint(read_volume(lab).array) == 500  # LV blood pool
    support, k, view = _one_slice_support(vol, gt)
    res = segmenter.segment(vol, vol, support, slice_range=(k - 3, k + 3))
    st, g = view.to_stack(res.mask > 0), view.to_stack(gt)
    assert dice(st[k - 3:k + 4], g[k - 3:k + 4]) > 0.8
    # Write through the CLI's writer and check the geometry survives (oblique direction kept).
    from FoBSegmentLib.io import write_result

    out = write_result(tmp_path / "lv.seg.nrrd", vol, res.mask, name="LV blood pool (FoB)", color=(0.9, 0.2, 0.2))
    seg = slicerio.read_segmentation(str(out))
    assert np.allclose(seg["ijkToLPS"], vol.ijk_to_lps(), atol=1e-4)
    assert seg["segments"][0]["name"] == "LV blood pool (FoB)"
    vox = slicerio.extract_segments(seg, [("LV blood pool (FoB)", 1)])["voxels"]
    # slicerio may crop to the segment's extent; compare in physical space via the voxel count.
    assert int(np.asarray(vox).sum()) == int(res.mask.sum())


def test_cli_writes_seg_nrrd_with_name_colour_and_geometry(tmp_path, example_ct):
    img, lab = example_ct
    vol = read_volume(img)
    labels = np.rint(read_volume(lab).array).astype(np.int64)
    support, k, view = _one_slice_support(vol, labels == 1)  # spleen
    from FoBSegmentLib.io import write_result

    sup = write_result(tmp_path / "support.seg.nrrd", vol, support, name="spleen", color=(0.62, 0.0, 1.0))
    out = tmp_path / "result.seg.nrrd"
    code = main(["segment", "--volume", str(img), "--support-mask", str(sup), "--segment", "spleen",
                 "--slices", f"{k - 2}:{k + 2}", "--output", str(out), "--device", "cpu"])
    assert code == 0 and out.is_file()
    seg = slicerio.read_segmentation(str(out))
    s = seg["segments"][0]
    assert s["name"] == "spleen (FoB)"
    assert np.allclose(s["color"], (0.62, 0.0, 1.0), atol=1e-3)
    assert np.allclose(seg["ijkToLPS"], vol.ijk_to_lps(), atol=1e-4)
    res = read_volume(img)  # result in physical space, back on the CT grid
    from FoBSegmentLib.io import read_support_mask

    back = read_support_mask(out, res, segment="spleen (FoB)").mask
    g = view.to_stack(labels == 1)
    assert dice(view.to_stack(back)[k - 2:k + 3], g[k - 2:k + 3]) > 0.8


def test_dicom_series_folder_is_read():
    folder = SHARED_DATA / "totalsegmentator_examples" / "ct_dicom"
    if not folder.is_dir():
        pytest.skip(f"shared DICOM example not available: {folder}")
    vol = read_volume(folder)
    assert vol.array.shape == (20, 512, 512)
    assert vol.spacing[0] == pytest.approx(0.977, abs=0.01)


@pytest.mark.slow
def test_other_patient_support_chaos_liver(segmenter):
    qi, ql = shared_case("chaos_t2spir_mri", 2)
    si, sl = shared_case("chaos_t2spir_mri", 1)
    q, s = read_volume(qi), read_volume(si)
    qgt, sgt = np.rint(read_volume(ql).array) == 1, np.rint(read_volume(sl).array) == 1
    support, _, _ = _one_slice_support(s, sgt)
    res = segmenter.segment(q, s, support)
    # Measured 0.756 with a single support slice of another patient (it was 0.49 when the walk
    # stopped early).  The walk now reaches both ends of the liver; its known weakness is the
    # other way: below the liver's tip it follows a liver-like neighbour for 7 slices.  This
    # guards the cross-patient path (seed search, walk, geometry) against regressions.
    assert dice(res.mask, qgt) > 0.65
    view = SliceView.for_volume(q)
    ref = occupied_slices(view.to_stack(qgt))
    kept = sorted(i for i, v in res.slice_info.items() if v.get("kept"))
    assert kept and kept[0] <= ref[0] + 1 and kept[-1] >= ref[-1] - 1, "the walk must not stop inside the liver"
    assert kept[0] >= ref[0] - 8 and kept[-1] <= ref[-1] + 2, "the walk ran further past the liver than measured"


def test_pipeline_finds_where_the_structure_ends(ct, segmenter):
    """No oracle: from one spleen slice the walk stops near the spleen's ends, so most of the
    112-slice CT is never encoded, and the result matches the reference."""
    vol, labels = ct
    gt = labels == 1
    support, k, view = _one_slice_support(vol, gt)
    res = segmenter.segment(vol, vol, support)
    kept = sorted(i for i, v in res.slice_info.items() if v.get("kept"))
    ref = occupied_slices(view.to_stack(gt))
    assert kept[0] >= ref[0] - 3 and kept[-1] <= ref[-1] + 3
    assert len(res.slice_info) < 0.5 * res.slices_total, "slices beyond the structure must not be processed"
    assert any(v.get("reason") in ("unlike_support", "disconnected", "low_iou", "empty", "leak")
               for v in res.slice_info.values()), "the stop must come from a presence decision"
    assert dice(res.mask > 0, gt) > 0.75


@pytest.mark.slow
def test_demo_main_job(tmp_path):
    from FoBSegmentLib.demo import run_demo

    rep = run_demo(tmp_path, device="cpu", quiet=True)
    assert (tmp_path / "demo_result.seg.nrrd").is_file() and (tmp_path / "demo_figure.png").is_file()
    # measured 0.898 / 0.960 (0.893 / 0.775 before the neighbour contrast and the 4 px box margin)
    assert rep["organs"]["liver"]["dice"] > 0.85 and rep["organs"]["spleen"]["dice"] > 0.9


def test_contrast_seed_tells_the_spleen_from_the_left_kidney(segmenter):
    """The failure that held CHAOS back: on patient 8 the spleen's background contrast also
    lights up the left kidney, and the nearest bright region won.  Cutting candidates at
    several contrast levels and weighing their surroundings against the support's must pick the
    spleen; the old rule (one level, no surroundings) picks the kidney on this very slice."""
    from FoBSegmentLib.backbones.base import slice_to_square
    from FoBSegmentLib.evaluation import ep1_support_slices
    from FoBSegmentLib.volume_segmenter import contrast_region

    si, sl = shared_case("chaos_t2spir_mri", 2)
    qi, ql = shared_case("chaos_t2spir_mri", 8)
    s, q = read_volume(si), read_volume(qi)
    s_lab, q_lab = np.rint(read_volume(sl).array), np.rint(read_volume(ql).array)
    s_view, q_view = SliceView.for_volume(s), SliceView.for_volume(q)
    spleen = s_lab == 4
    supports, _, _ = segmenter.prepare_support(s, spleen, ep1_support_slices(s_view.to_stack(spleen)))
    central = min(supports, key=lambda x: abs(x.rel - 0.5))
    q_spleen, q_kidney = q_view.to_stack(q_lab == 4), q_view.to_stack(q_lab == 3)
    idx = occupied_slices(q_spleen)
    mid = int(idx[len(idx) // 2])
    assert q_kidney[mid].any(), "the test slice must show both organs"
    emb = segmenter.embed(q_view.to_stack(q.array), fit_normalisation(q.array), [mid])[mid]
    on_spleen = slice_to_square(q_spleen[mid]) > 0.5
    on_kidney = slice_to_square(q_kidney[mid]) > 0.5

    region = contrast_region(emb, central)
    assert (region & on_spleen).sum() > 0.5 * region.sum()
    assert not (region & on_kidney).any()
    old = contrast_region(emb, central, levels=(0.0,), context_weight=0.0)
    assert (old & on_kidney).sum() > 0.5 * old.sum()


def test_seed_search_finds_organs_outside_the_supports_relative_position(segmenter):
    """Fields of view differ: patient 13's left kidney lies in slices 1-16 of 36, patient 1's in
    14-29 of 37, and the spleen (same texture) sits where the support says the kidney should be.
    The seed search must scan the whole volume and tell the kidney by its surroundings; a
    search near the support's relative position found the spleen (Dice 0.0 before)."""
    from FoBSegmentLib.evaluation import ep1_support_slices

    si, sl = shared_case("chaos_t2spir_mri", 1)
    qi, ql = shared_case("chaos_t2spir_mri", 13)
    s, q = read_volume(si), read_volume(qi)
    kidney = np.rint(read_volume(sl).array) == 3
    gt = np.rint(read_volume(ql).array) == 3
    res = segmenter.segment(q, s, kidney, support_slices=ep1_support_slices(SliceView.for_volume(s).to_stack(kidney)))
    view = SliceView.for_volume(q)
    ref = occupied_slices(view.to_stack(gt))
    seed = [i for i, v in res.slice_info.items() if v.get("reason") == "seed"]
    assert len(seed) == 1 and ref[0] <= seed[0] <= ref[-1]
    kept = sorted(i for i, v in res.slice_info.items() if v.get("kept"))
    assert ref[0] - 1 <= kept[0] and kept[-1] <= ref[-1] + 1
    assert dice(res.mask, gt) > 0.85  # measured 0.928


def _chaos_ep1_pair(support_case, query_case, label):
    """A CHAOS support/query pair as the standard protocol sees it -> (support image, query
    image, support mask, query ground truth, the three support slices, the query's slices of
    the structure)."""
    from FoBSegmentLib.evaluation import ep1_support_slices

    si, sl = shared_case("chaos_t2spir_mri", support_case)
    qi, ql = shared_case("chaos_t2spir_mri", query_case)
    s, q = read_volume(si), read_volume(qi)
    mask = np.rint(read_volume(sl).array) == label
    gt = np.rint(read_volume(ql).array) == label
    view = SliceView.for_volume(q)
    ref = occupied_slices(view.to_stack(gt))
    sup = ep1_support_slices(SliceView.for_volume(s).to_stack(mask))
    return s, q, mask, gt, sup, ref


def test_ep1_starts_on_the_clearest_slice_not_the_middle_one(segmenter, monkeypatch):
    """Standard protocol (the organ's slices given): patient 8's spleen from patient 5's
    annotation.  On the middle slice the contrast seed picks a look-alike and propagation then
    follows it (Dice 0.00 when starting there); the clearest slice of the middle half starts on
    the spleen."""
    from FoBSegmentLib import volume_segmenter as vs

    s, q, spleen, gt, sup, ref = _chaos_ep1_pair(5, 8, label=4)
    res = segmenter.segment(q, s, spleen, support_slices=sup, query_slices=ref)
    assert dice(res.mask, gt) > 0.8  # measured 0.95
    monkeypatch.setattr(vs, "START_SEARCH", False)
    before = segmenter.segment(q, s, spleen, support_slices=sup, query_slices=ref)
    assert dice(before.mask, gt) < 0.3  # the middle slice's start fails here (measured 0.00)


def test_propagated_box_settles_on_this_slices_organ(segmenter, monkeypatch):
    """Standard protocol, patient 8's liver from patient 13's annotation.  Toward the liver's
    tip each slice's organ is smaller than its neighbour's and SAM fills the neighbour's box:
    the liver spreads into what borders it (1.8x its volume, Dice 0.69, with the neighbour's
    box alone).  Re-fitting the box to SAM's own mask keeps it on this slice's organ."""
    from FoBSegmentLib import volume_segmenter as vs

    s, q, liver, gt, sup, ref = _chaos_ep1_pair(13, 8, label=1)
    res = segmenter.segment(q, s, liver, support_slices=sup, query_slices=ref)
    assert dice(res.mask, gt) > 0.8  # measured 0.853
    assert (res.mask > 0).sum() < 1.4 * gt.sum()  # measured 1.26
    monkeypatch.setattr(vs, "PROPAGATE_SETTLE", 0)
    before = segmenter.segment(q, s, liver, support_slices=sup, query_slices=ref)
    assert dice(before.mask, gt) < 0.75  # measured 0.687
    assert (before.mask > 0).sum() > 1.6 * gt.sum()  # measured 1.82


def test_seed_search_keeps_to_the_supports_side_of_the_body(segmenter, monkeypatch):
    """Real use (whole volume, no oracle), patient 1's right kidney from patient 2's
    annotation.  The seed search scores every slice by how kidney-like its best region is; on
    the slices where patient 1's left kidney shows better, the mirror-image organ wins and the
    walk follows it (Dice 0.00).  The side prior discounts regions across the body's midline
    from where the support's kidney lies."""
    from FoBSegmentLib import volume_segmenter as vs
    from FoBSegmentLib.evaluation import ep1_support_slices

    s, q, kidney, gt, _, _ = _chaos_ep1_pair(2, 1, label=2)
    sup = ep1_support_slices(SliceView.for_volume(s).to_stack(kidney))
    monkeypatch.setattr(vs, "SEED_SIDE_PRIOR", True)
    res = segmenter.segment(q, s, kidney, support_slices=sup)
    assert dice(res.mask, gt) > 0.85  # measured 0.96
    monkeypatch.setattr(vs, "SEED_SIDE_PRIOR", False)
    before = segmenter.segment(q, s, kidney, support_slices=sup)
    left = np.rint(read_volume(shared_case("chaos_t2spir_mri", 1)[1]).array) == 3
    assert dice(before.mask, gt) < 0.1 and (before.mask.astype(bool) & left).sum() > 0.5 * left.sum()
