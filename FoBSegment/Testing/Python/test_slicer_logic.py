"""The node-level pipeline that ``FoBSegmentLogic.process`` runs (``slicer_adapter.run_on_nodes``),
on real MRML nodes (``slicer-core``) and real MR volumes.

The fast tests use a stand-in segmenter with the ``Segmenter.segment`` signature to check the
node plumbing; the slow ones run the real LiteMedSAM ``Segmenter`` on the CPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Qt-free MRML) is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' module is not slicer-core", allow_module_level=True)

from conftest import dice, shared_case  # noqa: E402
from FoBSegmentLib import slicer_adapter as sa  # noqa: E402
from FoBSegmentLib.errors import CancelledError, FoBInputError  # noqa: E402
from FoBSegmentLib.geometry import SliceView  # noqa: E402
from FoBSegmentLib.io import read_volume  # noqa: E402
from test_slicer_adapter import _rigid_ras, node_from_volume  # noqa: E402

CHAOS = ("chaos_t2spir_mri", 1)
LIVER_MR = 1
CMR = ("mscmrseg19_bssfp_cmr", 1)
LV_BP = 500
LIVER_COLOR = (0.87, 0.51, 0.31)




def support_segmentation(scene, volumeNode, mask_kji, name, color):
    """A segmentation (as the Segment Editor leaves it) with one painted segment."""
    lm = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "painted")
    sa.volume_to_node(sa.volume_from_node(volumeNode).with_array(mask_kji.astype(np.uint8)), lm)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lm, seg)
    scene.RemoveNode(lm)
    sid = seg.GetSegmentation().GetNthSegmentID(seg.GetSegmentation().GetNumberOfSegments() - 1)
    seg.GetSegmentation().GetSegment(sid).SetName(name)
    seg.GetSegmentation().GetSegment(sid).SetColor(*color)
    return seg, sid


def paint_slices(label_vol, value, slices):
    """The reference label on the given acquisition-axis slices only (what a user paints)."""
    view = SliceView.for_volume(label_vol)
    ref = np.rint(label_vol.array) == value
    stack = view.to_stack(ref)
    painted = np.zeros_like(stack)
    painted[list(slices)] = stack[list(slices)]
    return view.from_stack(painted), ref, view


def n_segments(seg):
    return seg.GetSegmentation().GetNumberOfSegments()


# --------------------------------------------------------------------------------------
# plumbing, with a stand-in segmenter
# --------------------------------------------------------------------------------------

class _Result:
    def __init__(self, mask, prompts=()):
        self.mask = mask
        self.prompts = list(prompts)
        self.device = "cpu"
        self.slices_segmented = self.slices_encoded = 0


class FakeSegmenter:
    """Returns a fixed answer (default: the support mask dilated to every slice it covers)."""

    def __init__(self, answer=None):
        self.answer = answer
        self.calls = []

    def segment(self, query, support, support_mask, support_slices=None, slice_range=None, progress=None,
                is_cancelled=None):
        self.calls.append(dict(query=query, support=support, support_mask=support_mask, slice_range=slice_range))
        total = 3
        for d in range(1, total + 1):
            if progress:
                progress(d, total)
            if is_cancelled and is_cancelled():
                raise CancelledError()
        mask = self.answer if self.answer is not None else support_mask
        from types import SimpleNamespace

        k = int(np.argmax(mask.any(axis=(1, 2))))
        prompt = SimpleNamespace(slice_index=k, points_ijk=np.array([[10.0, 10.0, k], [0.0, 0.0, k]]),
                                 labels=np.array([1, 0]), box_ijk=None)
        return _Result(np.asarray(mask, np.uint8), [prompt])


    def segment_atlas(self, query, supports, rule="vote", slice_range=None, progress=None, is_cancelled=None):
        self.calls.append(dict(query=query, supports=supports, rule=rule, slice_range=slice_range))
        return self.segment(query, supports[0][0], supports[0][1], slice_range=slice_range, progress=progress,
                            is_cancelled=is_cancelled)


@pytest.fixture
def ct_nodes(scene, example_ct):
    vol, lab = read_volume(example_ct[0]), read_volume(example_ct[1])
    vnode = node_from_volume(scene, vol, "ct")
    return vol, lab, vnode


def test_run_on_nodes_writes_one_segment_per_support(scene, ct_nodes):
    vol, lab, vnode = ct_nodes
    liver, spleen = lab.array == 5, lab.array == 1
    seg, liver_id = support_segmentation(scene, vnode, liver, "liver", LIVER_COLOR)
    _, spleen_id = support_segmentation_into(scene, seg, vnode, spleen, "spleen", (0.6, 0.0, 1.0))
    fake = FakeSegmenter()
    ticks = []
    run = sa.run_on_nodes(scene, vnode, seg, None, None, fake, segmentIds=[liver_id, spleen_id],
                          slice_range=(3, 40), progress=lambda d, t: ticks.append((d, t)), show_prompts=True)
    assert run.output_node is seg and not run.created_output_node  # support painted on the query
    assert len(run.segment_ids) == 2 and n_segments(seg) == 4
    names = [seg.GetSegmentation().GetSegment(s).GetName() for s in run.segment_ids]
    assert names == ["liver (FoB)", "spleen (FoB)"]
    got = seg.GetSegmentation().GetSegment(run.segment_ids[0]).GetColor()
    np.testing.assert_allclose(got, sa.result_color(LIVER_COLOR))
    assert np.abs(np.subtract(got, LIVER_COLOR)).max() > 0.15, "the result must not look like the painted support"
    np.testing.assert_array_equal(sa.segment_mask_on_volume(seg, run.segment_ids[1], vnode), spleen)
    # the results overlap the painted supports completely: the supports must survive intact
    np.testing.assert_array_equal(sa.segment_mask_on_volume(seg, liver_id, vnode), liver)
    np.testing.assert_array_equal(sa.segment_mask_on_volume(seg, spleen_id, vnode), spleen)
    # the query is passed as its own support (same object: the pipeline keeps the painted slices)
    assert fake.calls[0]["support"] is fake.calls[0]["query"] and fake.calls[0]["slice_range"] == (3, 40)
    assert ticks == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]
    assert [n.GetAttribute(sa.PROMPT_NODE_ATTRIBUTE) for n in run.prompt_nodes] == ["foreground", "background"]


def support_segmentation_into(scene, seg, volumeNode, mask, name, color):
    lm = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "painted")
    sa.volume_to_node(sa.volume_from_node(volumeNode).with_array(mask.astype(np.uint8)), lm)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lm, seg)
    scene.RemoveNode(lm)
    sid = seg.GetSegmentation().GetNthSegmentID(n_segments(seg) - 1)
    seg.GetSegmentation().GetSegment(sid).SetName(name)
    seg.GetSegmentation().GetSegment(sid).SetColor(*color)
    return seg, sid


def test_support_on_another_volume_goes_to_a_new_segmentation(scene, ct_nodes):
    vol, lab, vnode = ct_nodes
    other = node_from_volume(scene, vol, "support volume")
    seg, sid = support_segmentation(scene, other, lab.array == 5, "liver", LIVER_COLOR)
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "t")
    t.SetMatrixTransformToParent(sa._np_to_vtk_matrix(_rigid_ras(25.0)))
    vnode.SetAndObserveTransformNodeID(t.GetID())
    answer = lab.array == 2
    run = sa.run_on_nodes(scene, vnode, seg, sid, None, FakeSegmenter(answer), supportVolumeNode=other)
    assert run.created_output_node and run.output_node is not seg
    assert run.output_node.GetParentTransformNode() is t
    assert n_segments(seg) == 1 and n_segments(run.output_node) == 1
    np.testing.assert_array_equal(sa.segment_mask_on_volume(run.output_node, run.segment_ids[0], vnode), answer)


def test_all_segments_skips_results_and_empty_segments(scene, ct_nodes):
    """'All segments' on a segmentation that already holds a result and an empty segment runs
    the painted supports only (no 'liver (FoB) (FoB)', no abort)."""
    vol, lab, vnode = ct_nodes
    seg, liver_id = support_segmentation(scene, vnode, lab.array == 5, "liver", LIVER_COLOR)
    fake = FakeSegmenter()
    first = sa.run_on_nodes(scene, vnode, seg, liver_id, None, fake)
    empty = seg.GetSegmentation().AddEmptySegment("", "kidney", [0.5, 0.5, 0.5])
    every = [seg.GetSegmentation().GetNthSegmentID(i) for i in range(n_segments(seg))]
    assert set(every) == {liver_id, first.segment_ids[0], empty}
    run = sa.run_on_nodes(scene, vnode, seg, None, None, fake, segmentIds=every)
    assert [seg.GetSegmentation().GetSegment(s).GetName() for s in run.segment_ids] == ["liver (FoB)"]
    assert sorted(n for n, _ in run.skipped) == ["kidney", "liver (FoB)"]
    with pytest.raises(FoBInputError, match="None of the segments"):
        sa.run_on_nodes(scene, vnode, seg, None, None, fake, segmentIds=[empty, first.segment_ids[0]])


def test_a_segment_kept_within_another_segments_slices(scene, ct_nodes):
    """``within`` {name: name}: after every segment is computed, the first's result keeps only
    the slices from the second's first to its last; names outside the run are refused before
    any work."""
    from FoBSegmentLib.geometry import occupied_slices
    from FoBSegmentLib.pipeline.run import SegmentationResult

    class Whole(FakeSegmenter):  # the painted organ on all its slices, as a real result object
        def segment(self, query, support, support_mask, **kw):
            mask = np.asarray(support_mask, np.uint8)
            return SegmentationResult(mask, slices_segmented=len(occupied_slices(mask)))

    vol, lab, vnode = ct_nodes
    liver, spleen = lab.array == 5, lab.array == 1
    seg, liver_id = support_segmentation(scene, vnode, liver, "liver", LIVER_COLOR)
    _, spleen_id = support_segmentation_into(scene, seg, vnode, spleen, "spleen", (0.6, 0.0, 1.0))
    run = sa.run_on_nodes(scene, vnode, seg, None, None, Whole(), segmentIds=[liver_id, spleen_id],
                          within={"liver": "spleen"})
    view = SliceView.for_volume(vol)
    got = view.to_stack(sa.segment_mask_on_volume(seg, run.segment_ids[0], vnode))
    liver_st, spleen_st = view.to_stack(liver), view.to_stack(spleen)
    lo, hi = occupied_slices(spleen_st)[0], occupied_slices(spleen_st)[-1]
    assert occupied_slices(got) == [i for i in occupied_slices(liver_st) if lo <= i <= hi] != occupied_slices(liver_st)
    np.testing.assert_array_equal(got[lo:hi + 1], liver_st[lo:hi + 1])
    np.testing.assert_array_equal(sa.segment_mask_on_volume(seg, run.segment_ids[1], vnode), spleen)
    assert run.results[0].slices_segmented == len(occupied_slices(got))
    from FoBSegmentLib.review import review_rows

    cleared = [r["slice"] for r in review_rows(run.results[0]) if not r["kept"]]
    assert cleared == [i for i in occupied_slices(liver_st) if not lo <= i <= hi]
    assert all("outside the bounding segment" in r["status"] for r in review_rows(run.results[0]))
    before = n_segments(seg)
    with pytest.raises(FoBInputError, match="'kidney'.*not among the segments"):
        sa.run_on_nodes(scene, vnode, seg, None, None, Whole(), segmentIds=[liver_id, spleen_id],
                        within={"liver": "kidney"})
    with pytest.raises(FoBInputError, match="not itself kept within"):
        sa.read_inputs(vnode, seg, None, segmentIds=[liver_id, spleen_id],
                       within={"liver": "spleen", "spleen": "liver"})
    assert n_segments(seg) == before


def test_scene_closed_during_the_run_writes_nothing(scene, ct_nodes):
    vol, lab, vnode = ct_nodes
    seg, sid = support_segmentation(scene, vnode, lab.array == 5, "liver", LIVER_COLOR)
    inputs = sa.read_inputs(vnode, seg, sid)
    results = sa.compute(FakeSegmenter(), inputs)
    scene.RemoveNode(vnode)  # what closing the scene mid-run does to the input
    with pytest.raises(FoBInputError, match="removed from the scene"):
        sa.write_outputs(scene, inputs, results)
    assert n_segments(seg) == 1


def test_empty_support_segment_is_a_user_error(scene, ct_nodes):
    vol, lab, vnode = ct_nodes
    seg, sid = support_segmentation(scene, vnode, lab.array == 5, "liver", LIVER_COLOR)
    empty = seg.GetSegmentation().AddEmptySegment("", "kidney", [0.5, 0.5, 0.5])
    with pytest.raises(FoBInputError, match="kidney.*empty"):
        sa.run_on_nodes(scene, vnode, seg, empty, None, FakeSegmenter())
    with pytest.raises(FoBInputError, match="No support segment"):
        sa.run_on_nodes(scene, vnode, seg, None, None, FakeSegmenter())


def test_cancel_or_failure_writes_nothing(scene, ct_nodes, monkeypatch):
    vol, lab, vnode = ct_nodes
    seg, sid = support_segmentation(scene, vnode, lab.array == 5, "liver", LIVER_COLOR)
    out = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    out.CreateDefaultDisplayNodes()
    n_nodes = scene.GetNumberOfNodes()
    calls = []

    def cancel_after_two():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CancelledError):
        sa.run_on_nodes(scene, vnode, seg, sid, out, FakeSegmenter(), is_cancelled=cancel_after_two)
    assert (n_segments(seg), n_segments(out), scene.GetNumberOfNodes()) == (1, 0, n_nodes)

    # the second of two writes fails: the first one is rolled back too
    real_write = sa.write_mask_as_segment
    written = []

    def flaky_write(*args, **kwargs):
        if written:
            raise RuntimeError("disk on fire")
        written.append(real_write(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(sa, "write_mask_as_segment", flaky_write)
    with pytest.raises(RuntimeError, match="disk on fire"):
        sa.run_on_nodes(scene, vnode, seg, None, out, FakeSegmenter(), segmentIds=[sid, sid])
    assert written and (n_segments(seg), n_segments(out), scene.GetNumberOfNodes()) == (1, 0, n_nodes)


def test_output_removed_during_the_run_writes_nothing(scene, ct_nodes):
    """The output segmentation (chosen, or the support's) deleted while the run computed: an
    input error, no segment written anywhere."""
    vol, lab, vnode = ct_nodes
    seg, sid = support_segmentation(scene, vnode, lab.array == 5, "liver", LIVER_COLOR)
    out = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    inputs = sa.read_inputs(vnode, seg, sid)
    results = sa.compute(FakeSegmenter(), inputs)
    scene.RemoveNode(out)
    with pytest.raises(FoBInputError, match="output segmentation was removed"):
        sa.write_outputs(scene, inputs, results, out)
    scene.RemoveNode(seg)
    with pytest.raises(FoBInputError, match="support's.*removed"):
        sa.write_outputs(scene, inputs, results)
    assert n_segments(out) == 0 and n_segments(seg) == 1


def test_failed_run_leaves_no_node_and_keeps_the_earlier_prompts(scene, ct_nodes, monkeypatch):
    """A run that made its own output segmentation and then failed removes it with its display
    node; prompts of an earlier run are replaced only once the new ones exist."""
    vol, lab, vnode = ct_nodes
    other = node_from_volume(scene, vol, "support volume")
    seg, sid = support_segmentation(scene, other, lab.array == 5, "liver", LIVER_COLOR)
    first = sa.run_on_nodes(scene, vnode, seg, sid, None, FakeSegmenter(), supportVolumeNode=other, show_prompts=True)
    prompts = [n.GetID() for n in first.prompt_nodes]
    n_nodes = scene.GetNumberOfNodes()

    def fails(*args, **kwargs):
        raise RuntimeError("markups failed")

    monkeypatch.setattr(sa, "_new_markups", fails)
    with pytest.raises(RuntimeError, match="markups failed"):
        sa.run_on_nodes(scene, vnode, seg, sid, None, FakeSegmenter(), supportVolumeNode=other, show_prompts=True)
    assert scene.GetNumberOfNodes() == n_nodes, "no segmentation or display node left behind"
    assert prompts and all(scene.GetNodeByID(i) is not None for i in prompts), "the earlier prompts are kept"


# --------------------------------------------------------------------------------------
# the real pipeline: LiteMedSAM on the CPU
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from FoBSegmentLib import Segmenter
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return Segmenter(backbone="litemedsam", device="cpu", cache_dir=tmp_path_factory.mktemp("fob_cache"))


@pytest.mark.slow
def test_chaos_liver_end_to_end(scene, segmenter):
    img, lab_path = shared_case(*CHAOS)
    vol, lab = read_volume(img), read_volume(lab_path)
    vnode = node_from_volume(scene, vol, "chaos T2")
    painted, ref, view = paint_slices(lab, LIVER_MR, [26])
    seg, sid = support_segmentation(scene, vnode, painted, "liver", LIVER_COLOR)
    lo, hi = 24, 28
    ticks = []
    run = sa.run_on_nodes(scene, vnode, seg, sid, None, segmenter, slice_range=(lo, hi),
                          progress=lambda d, t: ticks.append((d, t)), show_prompts=True)
    assert run.output_node is seg and len(run.segment_ids) == 1
    segment = seg.GetSegmentation().GetSegment(run.segment_ids[0])
    assert segment.GetName() == "liver (FoB)"
    np.testing.assert_allclose(segment.GetColor(), sa.result_color(LIVER_COLOR), atol=1e-6)
    out = sa.segment_mask_on_volume(seg, run.segment_ids[0], vnode)
    assert out.shape == vol.array.shape
    np.testing.assert_array_equal(out, run.results[0].mask > 0)  # written voxel for voxel
    out_stack, ref_stack = view.to_stack(out), view.to_stack(ref)
    assert not out_stack[:lo].any() and not out_stack[hi + 1:].any()
    d = dice(out_stack[lo:hi + 1], ref_stack[lo:hi + 1])
    assert d > 0.6, f"Dice {d:.3f} on slices {lo}-{hi}"
    assert ticks and ticks[-1][0] == ticks[-1][1]
    assert run.results[0].device == "cpu"
    assert run.prompt_nodes and all(n.GetNumberOfControlPoints() > 0 for n in run.prompt_nodes)


@pytest.mark.slow
def test_oblique_cmr_under_transform_end_to_end(scene, segmenter):
    """Oblique short-axis MR under a parent transform, result in a separate segmentation."""
    img, lab_path = shared_case(*CMR)
    vol, lab = read_volume(img), read_volume(lab_path)
    vnode = node_from_volume(scene, vol, "cmr")
    painted, ref, view = paint_slices(lab, LV_BP, [6])
    seg, sid = support_segmentation(scene, vnode, painted, "LV blood pool", (0.86, 0.21, 0.21))
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    t.SetMatrixTransformToParent(sa._np_to_vtk_matrix(_rigid_ras(12.0, (5.0, -3.0, 8.0))))
    for node in (vnode, seg):
        node.SetAndObserveTransformNodeID(t.GetID())
    out = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "results")
    out.SetAndObserveTransformNodeID(t.GetID())
    lo, hi = 4, 8
    run = sa.run_on_nodes(scene, vnode, seg, sid, out, segmenter, slice_range=(lo, hi))
    assert run.output_node is out and n_segments(out) == 1 and n_segments(seg) == 1
    assert out.GetSegmentation().GetSegment(run.segment_ids[0]).GetName() == "LV blood pool (FoB)"
    assert out.GetNodeReferenceID(out.GetReferenceImageGeometryReferenceRole()) == vnode.GetID()
    result = sa.segment_mask_on_volume(out, run.segment_ids[0], vnode)
    d = dice(view.to_stack(result)[lo:hi + 1], view.to_stack(ref)[lo:hi + 1])
    assert d > 0.6, f"Dice {d:.3f} on slices {lo}-{hi}"


@pytest.mark.slow
def test_cancel_during_real_run(scene, segmenter):
    img, lab_path = shared_case(*CHAOS)
    vol, lab = read_volume(img), read_volume(lab_path)
    vnode = node_from_volume(scene, vol, "chaos T2")
    painted, _, _ = paint_slices(lab, LIVER_MR, [26])
    seg, sid = support_segmentation(scene, vnode, painted, "liver", LIVER_COLOR)
    n_nodes, ticks = scene.GetNumberOfNodes(), []
    with pytest.raises(CancelledError):
        sa.run_on_nodes(scene, vnode, seg, sid, None, segmenter, slice_range=(20, 32),
                        progress=lambda d, t: ticks.append(d), is_cancelled=lambda: len(ticks) >= 1)
    assert n_segments(seg) == 1 and scene.GetNumberOfNodes() == n_nodes
    assert len(ticks) == 1  # stopped at the first slice, not after the whole range


def test_worker_hands_back_after_every_slice_of_every_phase(scene, ct_nodes, litemedsam):
    """The panel's path: inputs read on the main thread, the real pipeline on a worker thread,
    the result written on the main thread.  The worker reports after every encoded or decoded
    slice (seed search, support preparation and walk included), counted here."""
    from FoBSegmentLib import Segmenter
    from FoBSegmentLib.worker import BackgroundJob

    from conftest import one_slice_support

    vol, lab, vnode = ct_nodes
    painted, k, _ = one_slice_support(vol, lab.array == 1)
    seg, sid = support_segmentation(scene, vnode, painted, "spleen", (0.6, 0.0, 1.0))
    inputs = sa.read_inputs(vnode, seg, sid)
    other = Segmenter(litemedsam)  # its own cache: every slice is encoded in this run
    job = BackgroundJob(lambda j: sa.compute(other, inputs, slice_range=(k - 4, k + 4), progress=j.progress,
                                             is_cancelled=j.is_cancelled))
    state = job.start().wait(600)
    assert state.finished and state.error is None
    res = job.result[0]
    decoded = sum(1 for v in res.slice_info.values() if v.get("reason") != "annotated")
    assert decoded >= 1
    assert state.reports >= res.slices_encoded + decoded, "one report per encoded and per decoded slice"
    run = sa.write_outputs(scene, inputs, job.result)
    assert len(run.segment_ids) == 1
    # A cancel is honoured within one slice: requested after the 3rd report, at most one more
    # slice is encoded.
    fresh = Segmenter(litemedsam)
    at_cancel = []

    def progress(d, t):
        job2.progress(d, t)
        if not at_cancel and job2.snapshot().reports >= 3:
            at_cancel.append(fresh.encoded_count)
            job2.cancel()

    job2 = BackgroundJob(lambda j: sa.compute(fresh, inputs, progress=progress, is_cancelled=j.is_cancelled))
    state2 = job2.start().wait(600)
    assert isinstance(state2.error, sa.CancelledError) and state2.cancelled
    assert fresh.encoded_count <= at_cancel[0] + 1


def test_atlas_of_other_patients_writes_one_fused_segment(scene, ct_nodes):
    vol, lab, vnode = ct_nodes
    atlas = []
    for n, organ in enumerate((5, 5, 5), 1):
        other = node_from_volume(scene, vol.with_array(vol.array.copy()), f"patient {n}")
        seg, sid = support_segmentation(scene, other, lab.array == organ, "liver", LIVER_COLOR)
        atlas.append((other, seg, sid))
    answer = lab.array == 5
    fake = FakeSegmenter(answer)
    inputs = sa.read_atlas_inputs(vnode, atlas, "consensus")
    run = sa.write_outputs(scene, inputs, sa.compute(fake, inputs, slice_range=(2, 50)))
    assert run.created_output_node and all(run.output_node is not a[1] for a in atlas)
    assert [run.output_node.GetSegmentation().GetSegment(s).GetName() for s in run.segment_ids] == ["liver (FoB)"]
    np.testing.assert_array_equal(sa.segment_mask_on_volume(run.output_node, run.segment_ids[0], vnode), answer)
    call = fake.calls[0]
    assert call["rule"] == "consensus" and call["slice_range"] == (2, 50) and len(call["supports"]) == 3
    for (v, m), (node, seg, sid) in zip(call["supports"], atlas):
        np.testing.assert_array_equal(m, sa.segment_mask_on_volume(seg, sid, node))
    assert all(n_segments(a[1]) == 1 for a in atlas), "the supports' segmentations are left as they were"


def test_atlas_inputs_are_refused_before_any_work(scene, ct_nodes):
    vol, lab, vnode = ct_nodes
    other = node_from_volume(scene, vol.with_array(vol.array.copy()), "patient 1")
    seg, sid = support_segmentation(scene, other, lab.array == 5, "liver", LIVER_COLOR)
    own, own_id = support_segmentation(scene, vnode, lab.array == 5, "liver", LIVER_COLOR)
    empty, empty_id = support_segmentation(scene, other, lab.array == 5, "e", LIVER_COLOR)
    empty.GetSegmentation().GetSegment(empty_id).GetRepresentation("Binary labelmap").Initialize()
    nodes = scene.GetNumberOfNodes()
    for atlas, msg in (([(other, seg, sid), (vnode, own, own_id)], "input volume itself"),
                       ([], "atlas is empty"),
                       ([(other, seg, sid), (other, empty, empty_id)], "is empty on"),
                       ([(other, seg, "nope")], "nope")):
        with pytest.raises(FoBInputError, match=msg):
            sa.read_atlas_inputs(vnode, atlas)
    with pytest.raises(FoBInputError, match="Unknown atlas fusion rule"):
        sa.read_atlas_inputs(vnode, [(other, seg, sid)], "mean")
    assert scene.GetNumberOfNodes() == nodes


def test_atlas_cancelled_after_one_support_writes_nothing(scene, ct_nodes, litemedsam, monkeypatch):
    """The real ``Segmenter.segment_atlas`` (its loop over supports and its fusion), each
    support's run stood in for: a cancel during the second support's run reaches the caller and
    the scene is as before, though the first support's run had finished."""
    from FoBSegmentLib import Segmenter

    vol, lab, vnode = ct_nodes
    other = node_from_volume(scene, vol.with_array(vol.array.copy()), "patient 1")
    seg, sid = support_segmentation(scene, other, lab.array == 5, "liver", LIVER_COLOR)
    inputs = sa.read_atlas_inputs(vnode, [(other, seg, sid), (other, seg, sid)])
    real, fake, runs = Segmenter(litemedsam), FakeSegmenter(), []

    def one_support(query, support, mask, **kw):
        runs.append(1)
        if len(runs) == 2:
            raise CancelledError("cancelled by the user")
        return fake.segment(query, support, mask, slice_range=kw.get("slice_range"))

    monkeypatch.setattr(real, "segment", one_support)
    nodes, segments = scene.GetNumberOfNodes(), n_segments(seg)
    with pytest.raises(CancelledError):
        results = sa.compute(real, inputs)
        sa.write_outputs(scene, inputs, results)
    assert len(runs) == 2 and scene.GetNumberOfNodes() == nodes and n_segments(seg) == segments
