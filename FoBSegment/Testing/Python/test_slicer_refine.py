"""The Slicer logic's Refine on a real MRML scene (slicer-core), the model replaced by a stand-in
whose refine returns the corrected mask plus one slice: what is written, when it is refused,
and that a failure or an edit made meanwhile loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from test_module_packaging import _STUB_SLICER, MODULE_DIR

SCENE = textwrap.dedent(
    '''
    import numpy as np
    import threading
    from types import SimpleNamespace
    sys.path.insert(0, MODULE_DIR)
    import FoBSegment
    import FoBSegmentLib
    from FoBSegmentLib import slicer_adapter as sa
    from FoBSegmentLib.errors import FoBInputError
    from FoBSegmentLib.geometry import SliceView, occupied_slices
    from FoBSegmentLib.io import read_volume
    from FoBSegmentLib.pipeline.run import SegmentationResult

    scene = slicer.mrmlScene
    vol, lab = read_volume(CT), read_volume(SEG)
    view = SliceView.for_volume(vol)
    vnode = sa.volume_to_node(vol, scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct"))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "support")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vnode)

    def paint(label, k, name):
        st = view.to_stack(np.rint(lab.array) == label)
        one = np.zeros_like(st)
        one[k] = st[k]
        lm = sa.volume_to_node(vol.with_array(view.from_stack(one).astype(np.uint8)),
                               scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lm"))
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lm, seg)
        scene.RemoveNode(lm)
        sid = seg.GetSegmentation().GetNthSegmentID(seg.GetSegmentation().GetNumberOfSegments() - 1)
        seg.GetSegmentation().GetSegment(sid).SetName(name)
        return sid

    calls, gate = [], threading.Event()
    gate.set()

    class StandIn:
        """segment: the painted slice copied to +-5 slices (within the range); refine: the
        corrected mask with its last slice copied to the next one."""
        backbone = SimpleNamespace(name="litemedsam")

        def segment(self, query, support, mask, support_slices=None, slice_range=None, progress=None,
                    is_cancelled=None):
            st = view.to_stack(mask > 0)
            k = occupied_slices(st)[0]
            lo, hi = slice_range or (0, st.shape[0] - 1)
            out = np.zeros_like(st)
            for i in range(max(lo, k - 5), min(hi, k + 5) + 1):
                out[i] = st[k]
            r = SegmentationResult(view.from_stack(out).astype(np.uint8), slices_segmented=1)
            r.device, r.slices_encoded = "cpu", 0
            return r

        def refine(self, query, previous, corrected, support=None, support_mask=None, slice_range=None,
                   progress=None, is_cancelled=None):
            calls.append(slice_range)
            gate.wait(10)
            st = view.to_stack(np.asarray(corrected) > 0)
            last = occupied_slices(st)[-1]
            if last + 1 < st.shape[0]:
                st[last + 1] = st[last]
            r = SegmentationResult(view.from_stack(st).astype(np.uint8), slices_segmented=1)
            r.slice_info = {last + 1: {"kept": True, "reason": "present"}}
            return r

    FoBSegmentLib.Segmenter = lambda **kw: StandIn()

    def result(sid):
        return view.to_stack(sa.segment_mask_on_volume(seg, sid, vnode) > 0)

    def correct(sid, k):
        """The user erases slice k of a result in the Segment Editor."""
        st = result(sid)
        st[k] = 0
        sa.write_mask_as_segment(view.from_stack(st), vnode, seg, None, None, overwrite_segment_id=sid)
        return st

    def refused(call):
        try:
            call()
        except FoBInputError as exc:
            return str(exc)
        return None
    '''
)


def _run(example_ct, body: str) -> dict:
    pytest.importorskip("slicer_core")
    code = (_STUB_SLICER + f"MODULE_DIR, CT, SEG = {str(MODULE_DIR)!r}, {str(example_ct[0])!r}, "
            f"{str(example_ct[1])!r}\n" + SCENE + textwrap.dedent(body))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(MODULE_DIR))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_refine_keeps_to_the_runs_slice_range_and_needs_a_correction(example_ct):
    out = _run(example_ct, '''
        logic = FoBSegment.FoBSegmentLogic()
        sid = paint(5, 90, "liver")
        rid = logic.process(vnode, seg, sid, sliceRange=(85, 93))[0]
        nothing = refused(logic.refine)
        correct(rid, 93)
        n = logic.refine()
        print(json.dumps({"nothing": nothing, "calls": calls, "n": n,
                          "slices": [int(i) for i in occupied_slices(result(rid))]}))
    ''')
    assert "Nothing was corrected" in out["nothing"]
    assert out["calls"] == [[85, 93]], "refine gets the run's slice range"
    assert out["slices"] == list(range(85, 94)) and out["n"] == 1


def test_refine_edited_meanwhile_is_not_written(example_ct):
    """An edit made in the Segment Editor while Refine runs is kept; the refine is refused."""
    out = _run(example_ct, '''
        logic = FoBSegment.FoBSegmentLogic()
        sid = paint(5, 90, "liver")
        rid = logic.process(vnode, seg, sid)[0]
        correct(rid, 95)
        gate.clear()
        job = logic.startRefine()
        edited = correct(rid, 86)
        gate.set()
        job.wait(30)
        message = refused(lambda: logic.finishRefine(job))
        print(json.dumps({"message": message, "kept": bool(np.array_equal(result(rid), edited))}))
    ''')
    assert "edited while Refine ran" in out["message"] and out["kept"]


def test_refine_that_fails_part_way_puts_every_segment_back(example_ct):
    out = _run(example_ct, '''
        logic = FoBSegment.FoBSegmentLogic()
        liver, spleen = paint(5, 90, "liver"), paint(1, 90, "spleen")
        ids = logic.process(vnode, seg, None, segmentIds=[liver, spleen])
        before = {i: correct(i, 95) for i in ids}
        real, count = sa.write_mask_as_segment, []

        def second_write_fails(*args, **kwargs):
            count.append(1)
            if len(count) == 2:
                raise RuntimeError("disk full")
            return real(*args, **kwargs)

        sa.write_mask_as_segment = second_write_fails
        try:
            logic.refine()
            failed = False
        except RuntimeError:
            failed = True
        sa.write_mask_as_segment = real
        print(json.dumps({"failed": failed, "unchanged": [bool(np.array_equal(result(i), before[i])) for i in ids]}))
    ''')
    assert out["failed"] and out["unchanged"] == [True, True]


def test_panel_failure_text_says_what_to_do(example_ct):
    """The message box of a failed run: an input error as it is; out of memory (host or GPU)
    with what to do; an unexpected error named, never an empty dialog."""
    out = _run(example_ct, '''
        texts = [FoBSegment.failureText(e) for e in (
            FoBInputError("Label 9 is absent."), MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate"),
            RuntimeError(""))]
        print(json.dumps(texts))
    ''')
    assert out[0] == "Label 9 is absent."
    assert all("Out of memory" in t and "CPU device" in t for t in out[1:3])
    assert "RuntimeError" in out[3] and "no message" in out[3] and "report" in out[3]
