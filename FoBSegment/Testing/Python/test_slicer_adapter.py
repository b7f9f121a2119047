"""The MRML adapter against real MRML nodes (``slicer-core``, no Qt) built from real data."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Qt-free MRML) is not installed")
if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package named 'slicer'
    pytest.skip("the installed 'slicer' module is not slicer-core", allow_module_level=True)

import vtk  # noqa: E402

from conftest import shared_case  # noqa: E402
from FoBSegmentLib import slicer_adapter as sa  # noqa: E402
from FoBSegmentLib.errors import FoBInputError  # noqa: E402
from FoBSegmentLib.geometry import Volume  # noqa: E402
from FoBSegmentLib.io import read_volume  # noqa: E402

CMR = ("mscmrseg19_bssfp_cmr", 1)
LV_BP = 500
LIVER_CT = 5


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------



def node_from_volume(scene, vol: Volume, name="volume", cls="vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(cls, name)
    sa.volume_to_node(vol, node)
    return node


def node_from_file(scene, path, name="volume"):
    """Read with Slicer's own reader (vtkMRMLVolumeArchetypeStorageNode, ITK inside)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    return node


def segmentation_from_label(scene, label_vol: Volume, volumeNode, value: int, name: str, color=(0.8, 0.3, 0.2)):
    """A segmentation node holding ``label == value`` as one segment, built with Slicer's import."""
    lm = node_from_volume(scene, label_vol.with_array((np.rint(label_vol.array) == value).astype(np.uint8)),
                          "tmp_label", "vtkMRMLLabelMapVolumeNode")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "support")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lm, seg)
    scene.RemoveNode(lm)
    segment_id = seg.GetSegmentation().GetNthSegmentID(0)
    seg.GetSegmentation().GetSegment(segment_id).SetName(name)
    seg.GetSegmentation().GetSegment(segment_id).SetColor(*color)
    return seg, segment_id


def assert_same_geometry(a: Volume, b: Volume, tol=1e-4):
    assert a.array.shape == b.array.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=tol)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-3)
    np.testing.assert_allclose(a.direction, b.direction, atol=tol)


def n_segments(seg):
    return seg.GetSegmentation().GetNumberOfSegments()


# --------------------------------------------------------------------------------------
# (a) node <-> Volume round trip, geometry as SimpleITK reads it
# --------------------------------------------------------------------------------------

def _cases():
    return [pytest.param("cmr", id="mscmrseg-oblique"), pytest.param("ct", id="example-ct")]


def _paths(which, example_ct):
    if which == "cmr":
        return shared_case(*CMR)
    return example_ct


@pytest.mark.parametrize("which", _cases())
def test_round_trip_matches_simpleitk(scene, which, example_ct):
    img_path, lab_path = _paths(which, example_ct)
    ref = read_volume(img_path)  # SimpleITK, LPS
    node = node_from_volume(scene, ref)
    back = sa.volume_from_node(node)
    assert_same_geometry(back, ref)
    assert back.array.dtype == ref.array.dtype
    np.testing.assert_array_equal(back.array, ref.array)
    # the node really holds RAS: the first voxel's RAS position is the LPS origin with x, y negated
    ras0 = sa.ijk_to_ras_points(node, [[0, 0, 0]])[0]
    np.testing.assert_allclose(ras0, [-ref.origin[0], -ref.origin[1], ref.origin[2]], atol=1e-3)
    # and so does a labelmap node
    lab = read_volume(lab_path)
    lab_back = sa.volume_from_node(node_from_volume(scene, lab, "label", "vtkMRMLLabelMapVolumeNode"))
    assert_same_geometry(lab_back, ref)
    np.testing.assert_array_equal(lab_back.array, lab.array)


@pytest.mark.parametrize("which", _cases())
def test_slicer_reader_is_physically_consistent_with_simpleitk(scene, which, example_ct):
    """Slicer's own reader may store the voxels in another order (it makes the left-handed
    MS-CMRSeg grid right-handed by reversing k); the Volume must still put every intensity at the
    same place in patient space as SimpleITK does."""
    img_path, _ = _paths(which, example_ct)
    ref = read_volume(img_path)
    vol = sa.volume_from_node(node_from_file(scene, img_path))
    assert vol.array.size == ref.array.size
    np.testing.assert_allclose(sorted(vol.spacing), sorted(ref.spacing), atol=1e-4)
    # map every voxel of vol into ref's index space: must land exactly on ref voxels with equal values
    k, j, i = np.meshgrid(*[np.arange(s) for s in vol.array.shape], indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    ref_ijk = np.linalg.inv(ref.ijk_to_lps()) @ vol.ijk_to_lps() @ ijk
    idx = np.rint(ref_ijk[:3]).astype(int)
    np.testing.assert_allclose(ref_ijk[:3], idx, atol=1e-3)
    values = ref.array[idx[2], idx[1], idx[0]]
    np.testing.assert_array_equal(values, vol.array.ravel())


def test_vector_volume_is_rejected(scene):
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 4, 2)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    node.SetAndObserveImageData(image)
    with pytest.raises(FoBInputError, match="scalar"):
        sa.volume_from_node(node)
    with pytest.raises(FoBInputError, match="No volume"):
        sa.volume_from_node(None, "volume")


# --------------------------------------------------------------------------------------
# (b) parent transforms
# --------------------------------------------------------------------------------------

def _rigid_ras(angle_deg=20.0, translation=(12.0, -7.5, 30.0)):
    a = np.deg2rad(angle_deg)
    m = np.eye(4)
    m[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    m[:3, 3] = translation
    return m


def test_linear_parent_transform_is_included(scene, example_ct):
    ref = read_volume(example_ct[0])
    node = node_from_volume(scene, ref)
    t_ras = _rigid_ras()
    # two nested transforms: world = outer @ inner
    inner = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "inner")
    outer = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "outer")
    inner_m = _rigid_ras(5.0, (1.0, 2.0, 3.0))
    outer_m = t_ras @ np.linalg.inv(inner_m)
    inner.SetMatrixTransformToParent(sa._np_to_vtk_matrix(inner_m))
    outer.SetMatrixTransformToParent(sa._np_to_vtk_matrix(outer_m))
    inner.SetAndObserveTransformNodeID(outer.GetID())
    node.SetAndObserveTransformNodeID(inner.GetID())

    vol = sa.volume_from_node(node)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    expected_lps = flip @ t_ras @ flip @ ref.ijk_to_lps()
    np.testing.assert_allclose(vol.ijk_to_lps(), expected_lps, atol=1e-6)
    np.testing.assert_array_equal(vol.array, ref.array)
    # the local geometry of the node itself did not change
    node.SetAndObserveTransformNodeID(None)
    assert_same_geometry(sa.volume_from_node(node), ref)


def test_nonlinear_parent_transform_asks_to_harden(scene, example_ct):
    node = node_from_volume(scene, read_volume(example_ct[0]))
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    gt = slicer.vtkOrientedGridTransform()
    disp = vtk.vtkImageData()
    disp.SetDimensions(3, 3, 3)
    disp.SetSpacing(200, 200, 200)
    disp.SetOrigin(-200, -200, -200)
    disp.AllocateScalars(vtk.VTK_DOUBLE, 3)
    disp.GetPointData().GetScalars().Fill(1.5)
    gt.SetDisplacementGridData(disp)
    grid.SetAndObserveTransformFromParent(gt)
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(FoBInputError, match="[Hh]arden"):
        sa.volume_from_node(node)


# --------------------------------------------------------------------------------------
# (c) segment -> mask on the volume grid
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", _cases())
def test_segment_mask_on_volume_is_the_label(scene, which, example_ct):
    img_path, lab_path = _paths(which, example_ct)
    value = LV_BP if which == "cmr" else LIVER_CT
    ref, lab = read_volume(img_path), read_volume(lab_path)
    vnode = node_from_volume(scene, ref)
    seg, sid = segmentation_from_label(scene, lab, vnode, value, "organ")
    n_nodes = scene.GetNumberOfNodes()
    mask = sa.segment_mask_on_volume(seg, sid, vnode)
    assert mask.dtype == bool and mask.shape == ref.array.shape
    expected = np.rint(lab.array) == value
    assert expected.sum() > 100
    np.testing.assert_array_equal(mask, expected)
    assert scene.GetNumberOfNodes() == n_nodes  # temporary labelmap removed


def test_segment_mask_follows_transforms(scene, example_ct):
    """Segmentation and volume under the same transform: still the same voxels."""
    ref, lab = read_volume(example_ct[0]), read_volume(example_ct[1])
    vnode = node_from_volume(scene, ref)
    seg, sid = segmentation_from_label(scene, lab, vnode, LIVER_CT, "liver")
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "t")
    t.SetMatrixTransformToParent(sa._np_to_vtk_matrix(_rigid_ras(15.0)))
    vnode.SetAndObserveTransformNodeID(t.GetID())
    seg.SetAndObserveTransformNodeID(t.GetID())
    np.testing.assert_array_equal(sa.segment_mask_on_volume(seg, sid, vnode), lab.array == LIVER_CT)


def test_unknown_segment_is_a_user_error(scene, example_ct):
    ref, lab = read_volume(example_ct[0]), read_volume(example_ct[1])
    vnode = node_from_volume(scene, ref)
    seg, _ = segmentation_from_label(scene, lab, vnode, LIVER_CT, "liver")
    with pytest.raises(FoBInputError, match="liver"):
        sa.segment_mask_on_volume(seg, "nope", vnode)


# --------------------------------------------------------------------------------------
# (d) writing a result segment, saving it as .seg.nrrd and reading it back
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", _cases())
def test_write_mask_as_segment_and_seg_nrrd_round_trip(scene, which, example_ct, tmp_path):
    img_path, lab_path = _paths(which, example_ct)
    value = LV_BP if which == "cmr" else LIVER_CT
    ref, lab = read_volume(img_path), read_volume(lab_path)
    vnode = node_from_volume(scene, ref, "query")
    mask = np.rint(lab.array) == value
    support, sid = segmentation_from_label(scene, lab, vnode, value, "organ", color=(0.2, 0.4, 0.9))
    support.GetSegmentation().GetSegment(sid).SetTerminology(
        "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~"
        "SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")

    out = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "output")  # empty, no reference geometry
    out.CreateDefaultDisplayNodes()
    n_nodes = scene.GetNumberOfNodes()
    new_id = sa.write_mask_as_segment(mask.astype(np.uint8), vnode, out, "organ (FoB)", (0.2, 0.4, 0.9),
                                      source_segment_id=sid, source_segmentation_node=support)
    assert scene.GetNumberOfNodes() == n_nodes  # temporary labelmap removed
    segment = out.GetSegmentation().GetSegment(new_id)
    assert segment.GetName() == "organ (FoB)"
    np.testing.assert_allclose(segment.GetColor(), (0.2, 0.4, 0.9), atol=1e-6)
    assert "Liver" in segment.GetTerminology()
    assert out.GetNodeReferenceID(out.GetReferenceImageGeometryReferenceRole()) == vnode.GetID()
    # with a real Slicer's conversion rules registered, the geometry value itself must be set
    assert out.GetSegmentation().GetConversionParameter("Reference image geometry").strip()
    np.testing.assert_array_equal(sa.segment_mask_on_volume(out, new_id, vnode), mask)

    # a second, empty result becomes an empty segment (the user sees the outcome)
    empty_id = sa.write_mask_as_segment(np.zeros_like(mask), vnode, out, "nothing (FoB)", (1, 0, 0))
    assert n_segments(out) == 2 and not sa.segment_mask_on_volume(out, empty_id, vnode).any()
    out.GetSegmentation().RemoveSegment(empty_id)

    # save with Slicer's segmentation storage node
    path = tmp_path / "result.seg.nrrd"
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(out), "vtkMRMLSegmentationStorageNode could not write"

    # read back with slicerio (arrays (i, j, k) in LPS)
    import slicerio

    segf = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in segf["segments"]] == ["organ (FoB)"]
    np.testing.assert_allclose(segf["segments"][0]["color"], (0.2, 0.4, 0.9), atol=1e-3)
    extracted = slicerio.extract_segments(segf, [("organ (FoB)", 1)])
    vox = np.asarray(extracted["voxels"])
    lps = np.asarray(segf["ijkToLPS"], float)
    # place the stored extent back into the query grid
    offset_ijk = np.linalg.inv(ref.ijk_to_lps()) @ lps @ np.array([0, 0, 0, 1.0])
    off = np.rint(offset_ijk[:3]).astype(int)
    np.testing.assert_allclose(offset_ijk[:3], off, atol=1e-3)
    np.testing.assert_allclose(lps[:3, :3], ref.ijk_to_lps()[:3, :3], atol=1e-4)
    full = np.zeros(ref.shape_ijk, np.uint8)
    full[off[0]:off[0] + vox.shape[0], off[1]:off[1] + vox.shape[1], off[2]:off[2] + vox.shape[2]] = vox
    np.testing.assert_array_equal(np.transpose(full, (2, 1, 0)) > 0, mask)

    # and with Slicer's storage node into a fresh scene
    scene2 = slicer.vtkMRMLScene()
    v2 = node_from_volume(scene2, ref, "query")
    seg2 = scene2.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    st2 = scene2.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    st2.SetFileName(str(path))
    assert st2.ReadData(seg2)
    names = [seg2.GetSegmentation().GetNthSegment(i).GetName() for i in range(n_segments(seg2))]
    assert names == ["organ (FoB)"]
    sid2 = seg2.GetSegmentation().GetNthSegmentID(0)
    np.testing.assert_array_equal(sa.segment_mask_on_volume(seg2, sid2, v2), mask)


def test_write_on_transformed_volume(scene, example_ct):
    """Result written for a volume under a transform lands on the same voxels."""
    ref, lab = read_volume(example_ct[0]), read_volume(example_ct[1])
    vnode = node_from_volume(scene, ref)
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "t")
    t.SetMatrixTransformToParent(sa._np_to_vtk_matrix(_rigid_ras(30.0)))
    vnode.SetAndObserveTransformNodeID(t.GetID())
    out = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "output")
    out.SetAndObserveTransformNodeID(t.GetID())
    mask = lab.array == LIVER_CT
    new_id = sa.write_mask_as_segment(mask, vnode, out, "liver (FoB)", (1, 0.5, 0))
    np.testing.assert_array_equal(sa.segment_mask_on_volume(out, new_id, vnode), mask)


def test_overwrite_existing_segment(scene, example_ct):
    ref, lab = read_volume(example_ct[0]), read_volume(example_ct[1])
    vnode = node_from_volume(scene, ref)
    seg, sid = segmentation_from_label(scene, lab, vnode, LIVER_CT, "liver")
    spleen = lab.array == 1
    out_id = sa.write_mask_as_segment(spleen, vnode, seg, "ignored", (0, 1, 0), overwrite_segment_id=sid)
    assert out_id == sid and n_segments(seg) == 1
    assert seg.GetSegmentation().GetSegment(sid).GetName() == "liver"
    np.testing.assert_array_equal(sa.segment_mask_on_volume(seg, sid, vnode), spleen)


# --------------------------------------------------------------------------------------
# (e) a failed write leaves the scene unchanged
# --------------------------------------------------------------------------------------

def test_failed_write_leaves_scene_unchanged(scene, example_ct, monkeypatch):
    ref, lab = read_volume(example_ct[0]), read_volume(example_ct[1])
    vnode = node_from_volume(scene, ref)
    seg, sid = segmentation_from_label(scene, lab, vnode, LIVER_CT, "liver")
    out = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "output")
    n_nodes, n_seg, n_out = scene.GetNumberOfNodes(), n_segments(seg), n_segments(out)

    with pytest.raises(FoBInputError, match="shape"):
        sa.write_mask_as_segment(np.ones((3, 4, 5), bool), vnode, seg, "x", (1, 0, 0))
    assert (scene.GetNumberOfNodes(), n_segments(seg)) == (n_nodes, n_seg)

    # a failure in the middle of the write (after the temporary node and segment exist)
    def broken_copy(src, dst):
        raise RuntimeError("boom")

    monkeypatch.setattr(sa, "_copy_terminology", broken_copy)
    with pytest.raises(RuntimeError, match="boom"):
        sa.write_mask_as_segment(lab.array == LIVER_CT, vnode, out, "liver (FoB)", (1, 0, 0))
    assert scene.GetNumberOfNodes() == n_nodes
    assert n_segments(out) == n_out
    assert not out.GetNodeReferenceID(out.GetReferenceImageGeometryReferenceRole())
    with pytest.raises(RuntimeError, match="boom"):
        sa.write_mask_as_segment(lab.array == LIVER_CT, vnode, seg, "liver (FoB)", (1, 0, 0))
    assert (scene.GetNumberOfNodes(), n_segments(seg)) == (n_nodes, n_seg)
    np.testing.assert_array_equal(sa.segment_mask_on_volume(seg, sid, vnode), lab.array == LIVER_CT)


# --------------------------------------------------------------------------------------
# prompts -> markups
# --------------------------------------------------------------------------------------

class _Prompt:
    def __init__(self, slice_index, points_ijk, labels, box_ijk=None):
        self.slice_index, self.points_ijk, self.labels, self.box_ijk = slice_index, points_ijk, labels, box_ijk


def test_prompts_to_markups_in_world_ras(scene):
    img_path, _ = shared_case(*CMR)
    ref = read_volume(img_path)
    vnode = node_from_volume(scene, ref)
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "t")
    t.SetMatrixTransformToParent(sa._np_to_vtk_matrix(_rigid_ras(10.0)))
    vnode.SetAndObserveTransformNodeID(t.GetID())
    prompts = [_Prompt(4, np.array([[100.0, 120.0, 4.0], [10.0, 20.0, 4.0], [240.0, 30.0, 4.0]]), np.array([1, 0, 0])),
               _Prompt(5, np.array([[101.0, 118.0, 5.0]]), np.array([1]))]
    fg, bg = sa.prompts_to_markups(prompts, vnode)
    assert (fg.GetNumberOfControlPoints(), bg.GetNumberOfControlPoints()) == (2, 2)
    np.testing.assert_allclose(fg.GetDisplayNode().GetSelectedColor(), sa.FG_COLOR, atol=1e-6)
    np.testing.assert_allclose(bg.GetDisplayNode().GetSelectedColor(), sa.BG_COLOR, atol=1e-6)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    expected = _rigid_ras(10.0) @ flip @ ref.ijk_to_lps() @ np.array([100.0, 120.0, 4.0, 1.0])
    pos = [0.0, 0.0, 0.0]
    fg.GetNthControlPointPositionWorld(0, pos)
    np.testing.assert_allclose(pos, expected[:3], atol=1e-4)
    assert fg.GetNthControlPointLabel(0) == "+4"
    # a second run replaces the first run's nodes (and their display nodes); boxes -> 4 corners
    n_nodes = scene.GetNumberOfNodes()
    box = np.array([[8.5, 200.5, 5.0], [150.5, 60.5, 5.0]])
    nodes = sa.prompts_to_markups([_Prompt(5, np.zeros((0, 3)), np.zeros(0), box)], vnode)
    assert [n.GetAttribute(sa.PROMPT_NODE_ATTRIBUTE) for n in nodes] == ["box"]
    assert nodes[0].GetNumberOfControlPoints() == 4
    assert scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 1
    assert scene.GetNumberOfNodes() == n_nodes - 2 * 2 + 2
    corners = np.array([nodes[0].GetNthControlPointPosition(n) for n in range(4)])
    expected = sa.ijk_to_ras_points(vnode, [[8.5, 200.5, 5], [150.5, 200.5, 5], [150.5, 60.5, 5], [8.5, 60.5, 5]])
    np.testing.assert_allclose(corners, expected, atol=1e-4)
    assert sa.remove_prompt_markups(scene) == 1
