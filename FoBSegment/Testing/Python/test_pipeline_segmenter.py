"""The Segmenter end to end on real volumes: geometry, cache, cancel, ranges, writing."""

import numpy as np
import pytest
import slicerio

from conftest import SHARED_DATA, dice, one_slice_support, shared_case
from FoBSegmentLib import CancelledError, FoBInputError, Segmenter, read_volume, write_result
from FoBSegmentLib.backbones.base import square_to_slice
from FoBSegmentLib.cli import main
from FoBSegmentLib.geometry import SliceView, occupied_slices
from FoBSegmentLib.preprocessing import fit_normalisation


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
    support, k, view = one_slice_support(vol, gt)
    seen = []
    res = segmenter.segment(vol, vol, support, slice_range=(k - 4, k + 4), progress=lambda d, t: seen.append((d, t)))
    assert res.mask.shape == vol.array.shape and res.mask.dtype == np.uint8
    st, g = view.to_stack(res.mask > 0), view.to_stack(gt)
    assert not st[: k - 4].any() and not st[k + 5:].any(), "nothing outside the requested slice range"
    assert dice(st[k - 4:k + 5], g[k - 4:k + 5]) > 0.85
    assert np.array_equal(st[k], g[k]), "the annotated slice keeps the user's annotation"
    assert seen and seen[-1][0] == seen[-1][1] and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert res.prompts
    for p in res.prompts:  # each recorded box lies on its slice, over the structure there
        lo = np.clip(np.floor(p.box_ijk.min(0)).astype(int), 0, None)
        hi = np.ceil(p.box_ijk.max(0)).astype(int)
        box = np.zeros(vol.array.shape, bool)
        box[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = True
        on = view.to_stack(box)
        assert occupied_slices(on) == [p.slice_index], "a box prompt is drawn on its own slice only"
        assert (on[p.slice_index] & g[p.slice_index]).sum() > 0.8 * g[p.slice_index].sum()


def test_recorded_prompts_are_what_the_box_trained_decoder_received(ct, segmenter):
    """LiteMedSAM is box-trained and gets boxes only: no background points may be recorded
    (markups and figures showed ring points the decoder never saw)."""
    vol, labels = ct
    support, k, _ = one_slice_support(vol, labels == 5)
    res = segmenter.segment(vol, vol, support, slice_range=(k - 3, k + 3))
    assert res.prompts and all(len(p.points_ijk) == 0 and p.box_ijk is not None for p in res.prompts)
    assert res.prompt_strategy == "box" and res.prompt_source == "contrast"


def test_embedding_cache_means_no_slice_is_encoded_twice(ct, segmenter, litemedsam, tmp_path):
    vol, labels = ct
    support, k, _ = one_slice_support(vol, labels == 5)
    rng = (k - 2, k + 2)
    segmenter.segment(vol, vol, support, slice_range=rng)
    again = segmenter.segment(vol, vol, support, slice_range=rng)
    assert again.slices_encoded == 0
    # The on-disk cache serves a fresh process (a new Segmenter) too, with the same masks.
    first = Segmenter(litemedsam, cache_dir=tmp_path).segment(vol, vol, support, slice_range=rng)
    assert first.slices_encoded > 0 and list(tmp_path.rglob("*.emb"))
    second = Segmenter(litemedsam, cache_dir=tmp_path).segment(vol, vol, support, slice_range=rng)
    assert second.slices_encoded == 0
    assert np.array_equal(first.mask, second.mask) and np.array_equal(first.mask, again.mask)


def test_a_repeated_run_decodes_nothing_and_gives_the_same_mask(ct, litemedsam, tmp_path, monkeypatch, capsys):
    """The decoder's answers are cached with the embeddings: the same run again (a new process:
    a new Segmenter on the same cache folder) decodes nothing; another structure decodes."""
    from FoBSegmentLib.settings import DEFAULT_SETTINGS

    vol, labels = ct
    liver, k, _ = one_slice_support(vol, labels == 5)
    spleen, ks, _ = one_slice_support(vol, labels == 1)
    calls = []
    decode = litemedsam.decode
    monkeypatch.setattr(litemedsam, "decode", lambda *a, **kw: calls.append(1) or decode(*a, **kw))

    def run(support, rng, **settings):
        n = len(calls)
        seg = Segmenter(litemedsam, cache_dir=tmp_path, settings=DEFAULT_SETTINGS.with_changes(**settings))
        return seg.segment(vol, vol, support, slice_range=rng), len(calls) - n

    first, n_first = run(liver, (k - 2, k + 2))
    again, n_again = run(liver, (k - 2, k + 2))
    other, n_other = run(spleen, (ks - 2, ks + 2))
    uncached, n_uncached = run(liver, (k - 2, k + 2), decode_cache=False)
    assert n_first >= 3 and n_again == 0 and n_other >= 3 and n_uncached == n_first
    assert np.array_equal(first.mask, again.mask) and np.array_equal(first.mask, uncached.mask)
    assert first.mask.any() and other.mask.any() and not np.array_equal(first.mask, other.mask)
    assert len(list(tmp_path.rglob("*.dec"))) == n_first + n_other
    from FoBSegmentLib.cli import main

    assert main(["info", "--cache-dir", str(tmp_path)]) == 0  # says what the cache folder holds
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cached:"))
    n_emb = len(list(tmp_path.rglob("*.emb")))
    assert f"decoded masks {n_first + n_other} (" in line and f"embeddings {n_emb} (" in line and n_emb > 0


def test_decoder_identity_names_how_it_decodes(litemedsam, monkeypatch):
    """A mask decoded by eager PyTorch is never handed out for the exported graph (they agree
    to 2e-5, not bit for bit), nor one of other weights; a decoder that fell back to eager
    PyTorch says so."""
    from FoBSegmentLib.backbones import onnx_runtime
    from FoBSegmentLib.backbones.litemedsam import LiteMedSAMBackbone

    eager = LiteMedSAMBackbone("cpu")
    eager.runtime = "torch"
    exported = LiteMedSAMBackbone("cpu")
    if exported.runtime == "torch":
        pytest.skip("no ONNX export on this machine: only eager decoding to compare")
    assert eager.decoder_id() != exported.decoder_id()
    assert eager.decoder_id().startswith(litemedsam.weights_id())

    def unloadable(*_a, **_k):
        raise RuntimeError("simulated: the decoder's session cannot be created")

    fell_back = LiteMedSAMBackbone("cpu")
    monkeypatch.setattr(onnx_runtime, "onnx_model", unloadable)
    fell_back.decode(np.zeros((256, 64, 64), np.float32), box=np.array([0.2, 0.2, 0.6, 0.6]))
    assert fell_back.decoder_id() == eager.decoder_id()


def test_cancel_raises_and_returns_nothing(ct, segmenter):
    vol, labels = ct
    support, k, _ = one_slice_support(vol, labels == 5)
    calls = []
    with pytest.raises(CancelledError):
        segmenter.segment(vol, vol, support, slice_range=(k - 6, k + 6), progress=lambda d, t: calls.append(d),
                          is_cancelled=lambda: len(calls) >= 2)
    assert len(calls) == 2


def test_bad_inputs_are_reported(ct, segmenter):
    vol, labels = ct
    support, k, _ = one_slice_support(vol, labels == 5)
    with pytest.raises(FoBInputError, match="outside the query image"):
        segmenter.segment(vol, vol, support, slice_range=(100, 500))
    with pytest.raises(FoBInputError, match="runs backwards"):
        segmenter.segment(vol, vol, support, slice_range=(30, 5))
    with pytest.raises(FoBInputError, match="read_volume"):
        segmenter.segment(vol.array, None, support)
    with pytest.raises(FoBInputError, match="SegmenterSettings"):
        Segmenter(segmenter.backbone, settings={"walk": 1})


def test_what_a_console_caller_passes_is_checked_before_any_work(ct, segmenter):
    """Arguments of the wrong kind or out of range are input errors before a slice is encoded,
    and a label map of several structures is not silently united into one."""
    from scipy import ndimage

    vol, labels = ct
    support, k, view = one_slice_support(vol, labels == 5)
    before = segmenter.encoded_count
    cases = [
        (dict(query_slices=[500]), "outside the query"),
        (dict(query_slices=[]), "query_slices is empty"),
        (dict(support_slices=6), "list of slice numbers"),
        (dict(support_slices=[6.7]), "whole slice numbers"),
        (dict(slice_range=(3,)), r"\(first, last\)"),
        (dict(slice_range="3:8"), r"\(first, last\)"),
    ]
    for kw, message in cases:
        with pytest.raises(FoBInputError, match=message):
            segmenter.segment(vol, None, support, **kw)
    with pytest.raises(FoBInputError, match="several labels"):
        segmenter.segment(vol, None, np.rint(labels).astype(np.int16) * (view.from_stack(view.to_stack(labels > 0)) > 0))
    with pytest.raises(FoBInputError, match="No support mask"):
        segmenter.segment(vol, None, None)
    with pytest.raises(FoBInputError, match="bool voxels"):
        segmenter.segment(vol.with_array(vol.array > 0), None, support)
    with pytest.raises(FoBInputError, match="must be a FoBSegmentLib Volume"):
        segmenter.refine(vol, support, support, support=vol.array, support_mask=support)
    unchanged = segmenter.refine(vol, support, support, support=vol, support_mask=None)  # corrections as support
    assert np.array_equal(unchanged.mask > 0, support > 0)
    # a ring (a wall around a cavity): its support slices are checked as a compact structure's
    st = view.to_stack(labels == 5)
    ring = np.zeros_like(st)
    ring[k] = st[k] & ~ndimage.binary_erosion(st[k], iterations=4)
    with pytest.raises(FoBInputError, match="out of range"):
        segmenter.segment(vol, None, view.from_stack(ring), support_slices=[500])
    with pytest.raises(FoBInputError, match="carry no annotation"):
        segmenter.segment(vol, None, view.from_stack(ring), support_slices=[k + 1])
    assert segmenter.encoded_count == before, "refused before any slice was encoded"


def test_oblique_cardiac_case_end_to_end(segmenter, tmp_path):
    img, lab = shared_case("mscmrseg19_bssfp_cmr", 1)
    vol = read_volume(img)
    gt = np.rint(read_volume(lab).array) == 500  # LV blood pool
    support, k, view = one_slice_support(vol, gt)
    res = segmenter.segment(vol, vol, support, slice_range=(k - 3, k + 3))
    st, g = view.to_stack(res.mask > 0), view.to_stack(gt)
    assert dice(st[k - 3:k + 4], g[k - 3:k + 4]) > 0.8
    out = write_result(tmp_path / "lv.seg.nrrd", vol, res.mask, name="LV blood pool (FoB)", color=(0.9, 0.2, 0.2))
    seg = slicerio.read_segmentation(str(out))
    assert np.allclose(seg["ijkToLPS"], vol.ijk_to_lps(), atol=1e-4)
    assert seg["segments"][0]["name"] == "LV blood pool (FoB)"
    vox = slicerio.extract_segments(seg, [("LV blood pool (FoB)", 1)])["voxels"]
    assert int(np.asarray(vox).sum()) == int(res.mask.sum())


def test_cli_writes_seg_nrrd_with_name_colour_and_geometry(tmp_path, example_ct, ct):
    img, _ = example_ct
    vol, labels = ct
    support, k, view = one_slice_support(vol, labels == 1)  # spleen
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
    from FoBSegmentLib.io import read_support_mask

    back = read_support_mask(out, vol, segment="spleen (FoB)").mask
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
def test_demo_main_job(tmp_path):
    from FoBSegmentLib.demo import run_demo

    rep = run_demo(tmp_path, device="cpu", quiet=True)
    assert (tmp_path / "demo_result.seg.nrrd").is_file() and (tmp_path / "demo_figure.png").is_file()
    # measured 0.898 / 0.960
    assert rep["organs"]["liver"]["dice"] > 0.85 and rep["organs"]["spleen"]["dice"] > 0.9


def test_public_api_is_lazy_and_complete():
    """``import FoBSegmentLib`` must not import torch (Slicer start-up), and every name of the
    public API must resolve."""
    import subprocess
    import sys

    code = ("import sys, FoBSegmentLib; assert 'torch' not in sys.modules, 'torch imported';"
            "[getattr(FoBSegmentLib, n) for n in FoBSegmentLib.__all__]; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_pipeline_modules_stay_small_and_hold_no_tuning_state():
    """One job per module: no pipeline module over ~250 lines, no module-level tuning numbers."""
    import ast
    from pathlib import Path

    import FoBSegmentLib.pipeline as pkg

    for f in Path(pkg.__file__).parent.glob("*.py"):
        text = f.read_text()
        assert len(text.splitlines()) <= 260, f"{f.name} has grown past one job"
        for node in ast.parse(text).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                assert all(n.isupper() and n.startswith("BAND_") for n in names), f"{f.name}: tunable {names}"


def test_cli_keeps_a_result_within_another_structures_slices(tmp_path, example_ct, ct, capsys):
    """``segment --within FILE``: the spleen walked over five slices keeps only the slices
    from the first to the last of a given result (here three of them), unchanged on those;
    a missing bound file is refused before any work."""
    img, _ = example_ct
    vol, labels = ct
    support, k, view = one_slice_support(vol, labels == 1)
    sup = write_result(tmp_path / "support.seg.nrrd", vol, support, name="spleen", color=(0.62, 0.0, 1.0))
    bound_stack = np.zeros_like(view.to_stack(labels == 1))
    bound_stack[k - 1:k + 2] = view.to_stack(labels == 1)[k - 1:k + 2]
    bound = write_result(tmp_path / "bound.nii.gz", vol, view.from_stack(bound_stack))
    args = ["segment", "--volume", str(img), "--support-mask", str(sup), "--segment", "spleen",
            "--slices", f"{k - 2}:{k + 2}", "--device", "cpu"]
    assert main(args + ["--output", str(tmp_path / "free.seg.nrrd")]) == 0
    assert main(args + ["--within", str(bound), "--output", str(tmp_path / "kept.seg.nrrd")]) == 0
    assert "2 slices outside bound.nii.gz's cleared" in capsys.readouterr().out
    from FoBSegmentLib.geometry import occupied_slices
    from FoBSegmentLib.io import read_support_mask

    free = view.to_stack(read_support_mask(tmp_path / "free.seg.nrrd", vol).mask)
    kept = view.to_stack(read_support_mask(tmp_path / "kept.seg.nrrd", vol).mask)
    assert occupied_slices(free) == list(range(k - 2, k + 3)) and occupied_slices(kept) == [k - 1, k, k + 1]
    np.testing.assert_array_equal(kept[k - 1:k + 2], free[k - 1:k + 2])
    missing = tmp_path / "missing.seg.nrrd"
    assert main(args + ["--within", str(missing), "--output", str(tmp_path / "no.seg.nrrd")]) == 2
    assert "missing.seg.nrrd does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no.seg.nrrd").exists()


def test_keep_within_never_clears_a_painted_slice(ct):
    """A slice the user painted outside the bound stays; the rest outside is cleared and the
    review says why."""
    from FoBSegmentLib.geometry import occupied_slices
    from FoBSegmentLib.pipeline.run import SegmentationResult
    from FoBSegmentLib.review import review_rows

    vol, labels = ct
    view = SliceView.for_volume(vol)
    liver, spleen = view.to_stack(labels == 5), view.to_stack(labels == 1)
    lo, hi = occupied_slices(spleen)[0], occupied_slices(spleen)[-1]
    outside = [i for i in occupied_slices(liver) if not lo <= i <= hi]
    painted = outside[len(outside) // 2]
    res = SegmentationResult(view.from_stack(liver.astype(np.uint8)), slices_segmented=len(occupied_slices(liver)),
                             slice_info={painted: {"kept": True, "reason": "annotated"}})
    assert res.keep_within(view.from_stack(spleen), vol) == len(outside) - 1
    got = view.to_stack(res.mask)
    assert occupied_slices(got) == sorted([painted] + [i for i in occupied_slices(liver) if lo <= i <= hi])
    np.testing.assert_array_equal(got[painted], liver[painted])
    rows = {r["slice"]: r for r in review_rows(res)}
    assert rows[painted]["kept"] and all(not rows[i]["kept"] for i in outside if i != painted)
