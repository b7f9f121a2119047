"""MRML nodes <-> FoBSegmentLib data, without Qt.

Everything here uses only MRML and VTK, so it runs inside 3D Slicer and, for the tests, with
the Qt-free ``slicer-core`` wheel.  The Slicer module (``FoBSegment.py``) is a thin GUI over
:func:`run_on_nodes`.

Conventions
-----------
Slicer stores a volume's geometry as an IJK-to-RAS matrix (plus an optional parent transform);
:class:`~FoBSegmentLib.geometry.Volume` uses ITK's LPS convention with the array indexed
``(k, j, i)``.  RAS -> LPS negates the first two rows of the direction matrix and the first two
origin components.  The parent transform, when linear, is folded into the geometry (the world
IJK-to-RAS); non-linear transforms must be hardened first.

Nothing here imports torch, Qt or ``slicer.util``; ``slicer`` and ``vtk`` are imported lazily
so that importing this module is cheap and side-effect free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .errors import CancelledError, FoBInputError
from .geometry import Volume, check_within, validate_volume

log = logging.getLogger(__name__)

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

#: Attribute set on the markups nodes created by :func:`prompts_to_markups`.
PROMPT_NODE_ATTRIBUTE = "FoBSegment.Prompts"
#: Suffix of the result segments' names.
RESULT_SUFFIX = " (FoB)"

_GEOMETRY_PARAMETER = "Reference image geometry"

FG_COLOR = (0.1, 0.85, 0.1)
BG_COLOR = (0.95, 0.1, 0.1)
BOX_COLOR = (0.95, 0.85, 0.1)


def _mrml():
    """The module that holds the MRML classes: ``slicer`` in Slicer and in slicer-core."""
    import slicer

    return slicer


def _vtk():
    import vtk

    return vtk


def _vtk_to_np_matrix(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def _np_to_vtk_matrix(a: np.ndarray):
    m = _vtk().vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def _node_label(node) -> str:
    try:
        return repr(node.GetName())
    except Exception:  # pragma: no cover - defensive
        return "the node"


# ----------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------

def parent_to_world_matrix(node) -> np.ndarray:
    """4 x 4 matrix from the node's local RAS to world RAS (identity without a transform).

    Raises :class:`FoBInputError` when the parent transform (or one above it) is not linear."""
    tn = node.GetParentTransformNode()
    if tn is None:
        return np.eye(4)
    if not tn.IsTransformToWorldLinear():
        raise FoBInputError(
            f"{_node_label(node)} is under a non-linear transform ({tn.GetName()!r}). FoBSegment "
            "works on the voxel grid, so harden the transform first (Data module: right-click the "
            "node > Harden transform) or remove it, then run again."
        )
    m = _vtk().vtkMatrix4x4()
    tn.GetMatrixTransformToWorld(m)
    return _vtk_to_np_matrix(m)


def ijk_to_world_ras(volumeNode) -> np.ndarray:
    """4 x 4 IJK-to-RAS of the volume in world coordinates (parent transform included)."""
    m = _vtk().vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return parent_to_world_matrix(volumeNode) @ _vtk_to_np_matrix(m)


def _geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray):
    a = ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(a, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(a)):
        raise FoBInputError("The volume has a degenerate IJK-to-RAS matrix (zero spacing); check its header.")
    direction_ras = a / spacing[None, :]
    direction_lps = _RAS_TO_LPS @ direction_ras
    origin_lps = _RAS_TO_LPS @ ijk_to_ras[:3, 3]
    return tuple(spacing), tuple(origin_lps), direction_lps


def volume_from_node(volumeNode, what: str = "volume") -> Volume:
    """A scalar volume node -> :class:`Volume` in world geometry (LPS, array ``(k, j, i)``).

    The voxels are copied, so later edits of the node do not change the returned volume."""
    if volumeNode is None:
        raise FoBInputError(f"No {what} selected. Choose a volume.")
    image = volumeNode.GetImageData()
    if image is None:
        raise FoBInputError(f"The {what} {_node_label(volumeNode)} has no voxels (empty volume node).")
    n_comp = image.GetNumberOfScalarComponents()
    if n_comp != 1:
        raise FoBInputError(
            f"The {what} {_node_label(volumeNode)} has {n_comp} components per voxel (colour or vector "
            "volume); FoBSegment needs a scalar (grey-level) volume. Convert it with the Vector to "
            "Scalar Volume module first."
        )
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    if scalars is None or min(dims) < 1:
        raise FoBInputError(f"The {what} {_node_label(volumeNode)} has no voxels (empty volume node).")
    from vtk.util import numpy_support

    array = numpy_support.vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0]).copy()
    spacing, origin, direction = _geometry_from_ijk_to_ras(ijk_to_world_ras(volumeNode))
    vol = Volume(array, spacing, origin, direction, volumeNode.GetName() or "")
    validate_volume(vol, what)
    return vol


def ijk_to_ras_points(volumeNode, points_ijk) -> np.ndarray:
    """(N, 3) voxel coordinates (i, j, k) -> (N, 3) world RAS millimetres."""
    pts = np.asarray(points_ijk, dtype=float).reshape(-1, 3)
    h = np.c_[pts, np.ones(len(pts))]
    return (ijk_to_world_ras(volumeNode) @ h.T).T[:, :3]


# ----------------------------------------------------------------------------------------
# Segments
# ----------------------------------------------------------------------------------------

def _node_ids(scene) -> set:
    return {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}


def _remove_nodes_added_since(scene, ids_before: set, keep=()) -> None:
    """Remove the nodes created since ``ids_before`` (temporary nodes and the display, storage
    and colour nodes that MRML creates for them), except singletons and ``keep`` ids."""
    added = [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())]
    for node in added:
        if node is None or node.GetID() in ids_before or node.GetID() in keep or node.GetSingletonTag():
            continue
        if scene.IsNodePresent(node):
            scene.RemoveNode(node)


def _segment_ids(segmentationNode) -> list:
    seg = segmentationNode.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def _require_segment(segmentationNode, segmentId, what="support segmentation"):
    if segmentationNode is None:
        raise FoBInputError(f"No {what} selected. Choose the segmentation that holds the painted slice(s).")
    if not segmentId or segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
        names = [segmentationNode.GetSegmentation().GetSegment(s).GetName() for s in _segment_ids(segmentationNode)]
        raise FoBInputError(
            f"Segment {segmentId!r} is not in {_node_label(segmentationNode)} (it holds {names}). "
            "Choose one of its segments."
        )
    return segmentationNode.GetSegmentation().GetSegment(segmentId)


def segment_mask_on_volume(segmentationNode, segmentId, volumeNode) -> np.ndarray:
    """The segment as a boolean ``(k, j, i)`` mask on the voxel grid of ``volumeNode``.

    Uses Slicer's own export (which resamples and follows transforms) with the volume as
    reference geometry; the temporary labelmap node is removed again."""
    _require_segment(segmentationNode, segmentId)
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise FoBInputError("No volume to export the segment onto; choose a volume.")
    scene = segmentationNode.GetScene() or volumeNode.GetScene()
    mrml, vtk = _mrml(), _vtk()
    nodes_before = _node_ids(scene)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__FoBSegment_export_tmp")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentId)
        ok = mrml.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, ids, labelmap, volumeNode)
        if not ok:
            raise RuntimeError(f"Exporting segment {segmentId!r} onto {volumeNode.GetName()!r} failed")
        image = labelmap.GetImageData()
        dims = volumeNode.GetImageData().GetDimensions()
        shape = (dims[2], dims[1], dims[0])
        if image is None or image.GetPointData().GetScalars() is None:
            return np.zeros(shape, bool)
        from vtk.util import numpy_support

        ldims = image.GetDimensions()
        arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ldims[2], ldims[1], ldims[0])
        if arr.shape != shape:  # pragma: no cover - the export uses the reference extent
            raise RuntimeError(f"exported labelmap has shape {arr.shape}, expected {shape}")
        return arr != 0
    finally:
        _remove_nodes_added_since(scene, nodes_before)


def _normalise_color(color) -> tuple:
    c = tuple(float(x) for x in (color if color is not None else (1.0, 0.0, 0.0)))[:3]
    if len(c) != 3:
        raise FoBInputError(f"A colour needs three components, got {color!r}.")
    if max(c) > 1.0:
        c = tuple(x / 255.0 for x in c)
    return tuple(min(1.0, max(0.0, x)) for x in c)


def _copy_terminology(src_segment, dst_segment) -> None:
    if src_segment is None:
        return
    try:
        if hasattr(src_segment, "GetTerminology"):
            term = src_segment.GetTerminology()
            if term:
                dst_segment.SetTerminology(term)
        else:
            log.warning("FoBSegment: this Slicer's segments have no GetTerminology; the result's terminology "
                        "was not copied from the support (set it in the Segment Editor if needed).")
    except Exception:  # terminology is cosmetic: never fail a write because of it
        log.debug("could not copy the terminology tag", exc_info=True)


def _labelmap_node_from_mask(scene, mask: np.ndarray, volumeNode, name: str):
    from vtk.util import numpy_support

    vtk = _vtk()
    k, j, i = mask.shape
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    flat = np.ascontiguousarray(mask, dtype=np.uint8).ravel()
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    labelmap.SetAndObserveImageData(image)
    labelmap.CopyOrientation(volumeNode)  # origin, spacing, directions of the query
    tn = volumeNode.GetParentTransformNode()
    if tn is not None:
        labelmap.SetAndObserveTransformNodeID(tn.GetID())
    return labelmap


def write_mask_as_segment(mask, volumeNode, segmentationNode, name, color, source_segment_id=None,
                          overwrite_segment_id=None, source_segmentation_node=None) -> str:
    """Write a ``(k, j, i)`` mask on the grid of ``volumeNode`` into ``segmentationNode``.

    By default a **new** segment is created (named ``name``, coloured ``color``, terminology
    copied from ``source_segment_id`` of ``source_segmentation_node`` (default: the same
    segmentation) when it has one) and its id is returned.  With ``overwrite_segment_id`` the
    voxels of that existing segment are replaced instead (name and colour kept).

    All or nothing: on any failure the scene is left as it was (no new node, no new segment,
    reference geometry and overwritten voxels restored) and the exception propagates.
    """
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise FoBInputError("No volume to write the result on; choose a volume.")
    if segmentationNode is None:
        raise FoBInputError("No output segmentation selected.")
    dims = volumeNode.GetImageData().GetDimensions()
    shape = (dims[2], dims[1], dims[0])
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise FoBInputError(
            f"The result mask has shape {mask.shape} but the volume {volumeNode.GetName()!r} has "
            f"{shape} voxels (k, j, i); the mask must be on the volume's grid."
        )
    mrml = _mrml()
    logic = mrml.vtkSlicerSegmentationsModuleLogic
    parent_to_world_matrix(volumeNode)  # non-linear transform -> clear error before touching anything
    parent_to_world_matrix(segmentationNode)
    if overwrite_segment_id is not None:
        _require_segment(segmentationNode, overwrite_segment_id, what="output segmentation")
    scene = segmentationNode.GetScene() or volumeNode.GetScene()
    segmentation = segmentationNode.GetSegmentation()
    color = _normalise_color(color)
    src_node = source_segmentation_node or segmentationNode
    src_segment = src_node.GetSegmentation().GetSegment(source_segment_id) if source_segment_id else None

    ids_before = _segment_ids(segmentationNode)
    nodes_before = _node_ids(scene)
    ref_role = segmentationNode.GetReferenceImageGeometryReferenceRole()
    old_ref_id = segmentationNode.GetNodeReferenceID(ref_role)
    old_params = segmentation.SerializeAllConversionParameters() or ""
    # A real Slicer's conversion rules always list the parameter (with a description): only
    # its value says whether the segmentation has a geometry.
    listed = f"{_GEOMETRY_PARAMETER}|" in old_params  # asking for an unlisted one logs an error
    value = segmentation.GetConversionParameter(_GEOMETRY_PARAMETER) if listed else ""
    has_geometry = bool(old_ref_id) or bool((value or "").strip())
    old_labelmap = None
    try:
        if not has_geometry:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        labelmap = _labelmap_node_from_mask(scene, mask > 0, volumeNode, "__FoBSegment_result_tmp")
        if overwrite_segment_id is not None:
            old_labelmap = mrml.vtkOrientedImageData()
            logic.GetSegmentBinaryLabelmapRepresentation(segmentationNode, overwrite_segment_id, old_labelmap)
            image = logic.CreateOrientedImageDataFromVolumeNode(labelmap, segmentationNode.GetParentTransformNode())
            ok = logic.SetBinaryLabelmapToSegment(image, segmentationNode, overwrite_segment_id,
                                                 logic.MODE_REPLACE)
            if not ok:
                raise RuntimeError(f"Could not write the result into segment {overwrite_segment_id!r}")
            new_id = overwrite_segment_id
        else:
            if mask.any():
                if not logic.ImportLabelmapToSegmentationNode(labelmap, segmentationNode):
                    raise RuntimeError("Importing the result labelmap into the segmentation failed")
                new_ids = [s for s in _segment_ids(segmentationNode) if s not in ids_before]
                if len(new_ids) != 1:
                    raise RuntimeError(f"Expected one new segment from the import, got {len(new_ids)}")
                new_id = new_ids[0]
            else:  # an empty result still gets a (visible, empty) segment so the user sees the outcome
                new_id = segmentation.AddEmptySegment("", name, list(color))
                if not new_id:
                    raise RuntimeError("Could not add an empty segment")
            segment = segmentation.GetSegment(new_id)
            segment.SetName(name)
            segment.SetColor(*color)
            if hasattr(segment, "SetNameAutoGenerated"):
                segment.SetNameAutoGenerated(False)
                segment.SetColorAutoGenerated(False)
            _copy_terminology(src_segment, segment)
        keep = {segmentationNode.GetNthDisplayNodeID(n) for n in range(segmentationNode.GetNumberOfDisplayNodes())}
        _remove_nodes_added_since(scene, nodes_before, keep)
        return new_id
    except BaseException:
        # Roll back: new segments, temporary node, reference geometry, overwritten voxels.
        try:
            for sid in _segment_ids(segmentationNode):
                if sid not in ids_before:
                    segmentation.RemoveSegment(sid)
            _remove_nodes_added_since(scene, nodes_before)
            if old_labelmap is not None:
                logic.SetBinaryLabelmapToSegment(old_labelmap, segmentationNode, overwrite_segment_id,
                                                 logic.MODE_REPLACE)
            if not has_geometry:
                segmentationNode.RemoveNodeReferenceIDs(ref_role)
                segmentation.SetConversionParameter(_GEOMETRY_PARAMETER, "")
                if old_params:
                    segmentation.DeserializeConversionParameters(old_params)
        except Exception:  # pragma: no cover - keep the original error
            log.exception("FoBSegment: rollback after a failed write was incomplete")
        raise


# ----------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------

def _prompt_markups(scene) -> list:
    """The prompt markup nodes in ``scene``."""
    if scene is None:
        return []
    nodes = scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode")
    return [nodes.GetItemAsObject(n) for n in range(nodes.GetNumberOfItems())
            if nodes.GetItemAsObject(n).GetAttribute(PROMPT_NODE_ATTRIBUTE)]


def remove_prompt_markups(scene, doomed=None) -> int:
    """Remove the prompt markups left by earlier runs (or the nodes ``doomed``); returns how
    many nodes were removed."""
    if scene is None:
        return 0
    doomed = _prompt_markups(scene) if doomed is None else doomed
    remove_node_and_displays(scene, doomed)
    return len(doomed)


def _new_markups(scene, name, color, kind):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.SetAttribute(PROMPT_NODE_ATTRIBUTE, kind)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*color)
        display.SetColor(*color)
        if hasattr(display, "SetActiveColor"):
            display.SetActiveColor(*color)
        display.SetTextScale(0.0)  # points only; labels would clutter the slice views
    if hasattr(node, "SetLocked"):
        node.SetLocked(True)
    return node


def _box_corners_ijk(box_ijk) -> np.ndarray:
    """The 4 corners of a prompt box given by two opposite corners on one slice."""
    b = np.asarray(box_ijk, dtype=float).reshape(2, 3)
    varying = [a for a in range(3) if abs(b[0, a] - b[1, a]) > 1e-9]
    if len(varying) != 2:
        return b
    u, v = varying
    corners = []
    for cu, cv in ((0, 0), (1, 0), (1, 1), (0, 1)):
        c = b[0].copy()
        c[u], c[v] = b[cu, u], b[cv, v]
        corners.append(c)
    return np.array(corners)


def prompts_to_markups(prompts, volumeNode, scene=None, name="FoB prompts", replace=True, show_boxes=True):
    """Prompts (voxel ``(i, j, k)`` of ``volumeNode``) -> locked fiducial nodes in world RAS:
    foreground points (green), background points (red) and, with ``show_boxes``, the corners
    of the box prompts (yellow).  Returns the list of created nodes (empty kinds are skipped).

    ``prompts`` is an iterable of objects with ``slice_index``, ``points_ijk``, ``labels`` and
    ``box_ijk`` (``SlicePrompts``).  With ``replace`` the prompt nodes of earlier runs are
    removed first."""
    scene = scene or volumeNode.GetScene()
    parent_to_world_matrix(volumeNode)  # non-linear transform -> clear error first
    points = {"foreground": [], "background": [], "box": []}
    for p in prompts or []:
        pts = np.asarray(p.points_ijk, dtype=float).reshape(-1, 3)
        labels = np.asarray(p.labels).reshape(-1)
        for xyz, lab in zip(ijk_to_ras_points(volumeNode, pts) if len(pts) else [], labels):
            kind = "foreground" if int(lab) == 1 else "background"
            points[kind].append((xyz, f"{'+' if kind == 'foreground' else '-'}{int(p.slice_index)}"))
        box = getattr(p, "box_ijk", None)
        if show_boxes and box is not None:
            for xyz in ijk_to_ras_points(volumeNode, _box_corners_ijk(box)):
                points["box"].append((xyz, f"box {int(p.slice_index)}"))
    colors = {"foreground": FG_COLOR, "background": BG_COLOR, "box": BOX_COLOR}
    earlier = _prompt_markups(scene) if replace else []  # removed once the new ones exist
    created = []
    try:
        vtk = _vtk()
        for kind, pts in points.items():
            if not pts:
                continue
            node = _new_markups(scene, f"{name} ({kind})", colors[kind], kind)
            created.append(node)
            for xyz, label in pts:
                idx = node.AddControlPoint(vtk.vtkVector3d(*map(float, xyz)), label)
                if hasattr(node, "SetNthControlPointLocked"):
                    node.SetNthControlPointLocked(idx, True)
    except BaseException:
        remove_node_and_displays(scene, created)
        raise
    if earlier:
        remove_prompt_markups(scene, earlier)
    return created


def remove_node_and_displays(scene, nodes) -> None:
    """Remove ``nodes`` and their display nodes (which the scene keeps otherwise, and saves)."""
    for node in nodes:
        displays = [node.GetNthDisplayNode(n) for n in range(node.GetNumberOfDisplayNodes())]
        scene.RemoveNode(node)
        for display in displays:
            if display is not None and scene.IsNodePresent(display):
                scene.RemoveNode(display)


# ----------------------------------------------------------------------------------------
# The node-level pipeline (what the Slicer logic runs)
# ----------------------------------------------------------------------------------------

@dataclass
class NodeRun:
    """What :func:`run_on_nodes` did."""

    segment_ids: list  # new (or overwritten) segment ids, one per support segment
    output_node: object  # the segmentation node written to
    results: list = field(default_factory=list)  # the Segmenter results, same order
    prompt_nodes: list = field(default_factory=list)
    created_output_node: bool = False
    skipped: list = field(default_factory=list)  # (segment name, why) of segments not used
    slice_range: tuple | None = None  # the run's (first, last) slice, which Refine keeps to


@dataclass
class NodeInputs:
    """Everything a run needs from the scene, read on the main thread; the computation
    (:func:`compute`) then touches no MRML node and can run on any thread."""

    volumeNode: object
    supportSegmentationNode: object
    supportNode: object  # the volume the support was painted on
    segment_ids: list
    names: list
    colors: list
    masks: list  # (k, j, i) bool on the support volume's grid
    query: Volume
    support: Volume
    same_volume: bool
    skipped: list = field(default_factory=list)
    atlas: list = field(default_factory=list)  # [(Volume, mask)] of other patients: one fused result
    atlas_rule: str | None = None  # None: the Segmenter's settings.atlas.fusion
    within: dict = field(default_factory=dict)  # index of a result -> index of the result bounding its slices


def _segment_color(segment) -> tuple:
    c = segment.GetColor()
    return tuple(float(x) for x in c)


def result_color(color) -> tuple:
    """The result's colour: the support's hue, visibly lighter or darker, so the painted slice
    and the result can be told apart and still read as the same structure."""
    import colorsys

    h, s_, v = colorsys.rgb_to_hsv(*_normalise_color(color))
    v2 = v - 0.35 if v > 0.55 else min(1.0, v + 0.35)
    s2 = min(1.0, s_ * 0.8 + 0.1) if s_ > 0.05 else s_
    return tuple(float(c) for c in colorsys.hsv_to_rgb(h, s2, v2))


def _same_node(a, b) -> bool:
    return a is b or bool(a.GetID() and a.GetID() == b.GetID())


def read_inputs(volumeNode, supportSegmentationNode, segmentId=None, supportVolumeNode=None,
                segmentIds=None, within=None) -> NodeInputs:
    """Read the query, the support and the painted masks from the scene (main thread).

    With several ``segmentIds`` (the panel's "all segments"), earlier results
    (``"<name> (FoB)"``) and empty segments are skipped and listed in ``skipped``; a single
    segment that is empty is an error.  ``within``: ``{segment name: segment name}``, the
    first's result kept within the second's first to last slice (both painted, both run)."""
    if volumeNode is None:
        raise FoBInputError("No input volume selected. Choose the volume to segment.")
    ids = list(segmentIds) if segmentIds else ([segmentId] if segmentId else [])
    if not ids:
        raise FoBInputError("No support segment selected. Paint the structure on one slice and choose its segment.")
    several = len(ids) > 1
    segments = [_require_segment(supportSegmentationNode, sid) for sid in ids]
    same_volume = supportVolumeNode is None or _same_node(supportVolumeNode, volumeNode)
    query = volume_from_node(volumeNode, "input volume")
    support = query if same_volume else volume_from_node(supportVolumeNode, "support volume")
    support_node = volumeNode if same_volume else supportVolumeNode
    keep_ids, names, colors, masks, skipped = [], [], [], [], []
    for sid, segment in zip(ids, segments):
        name = segment.GetName()
        if several and name.endswith(RESULT_SUFFIX):
            skipped.append((name, "a FoBSegment result, not a painted support"))
            continue
        m = segment_mask_on_volume(supportSegmentationNode, sid, support_node)
        if not m.any():
            if several:
                skipped.append((name, f"empty on {support_node.GetName()!r}"))
                continue
            raise FoBInputError(
                f"Segment {name!r} is empty on {support_node.GetName()!r}. Paint the structure on "
                "at least one slice of that volume (Segment Editor), then run again."
            )
        keep_ids.append(sid)
        names.append(name)
        colors.append(_segment_color(segment))
        masks.append(m)
    if not keep_ids:
        raise FoBInputError("None of the segments is a painted support: "
                            + "; ".join(f"{n!r} is {why}" for n, why in skipped)
                            + ". Paint a structure on one slice, then run again.")
    return NodeInputs(volumeNode, supportSegmentationNode, support_node, keep_ids, names, colors, masks, query,
                      support, bool(same_volume), skipped, within=_within_indices(within, names))


def _within_indices(within, names: list) -> dict:
    """``{segment name: bounding segment name}`` -> ``{result index: bounding result index}``."""
    within = dict(within or {})
    check_within(within, names, "'Keep within'", f"not among the segments being run ({', '.join(names)}): paint "
                 "it and run it in the same Apply.")
    return {names.index(name): names.index(bound) for name, bound in within.items()}


def read_atlas_inputs(volumeNode, atlas, rule: str | None = None) -> NodeInputs:
    """The query and an atlas of other patients' painted segments (main thread).

    ``atlas``: ``[(support volume node, segmentation node, segment id), ...]``; the result is
    one segment named after the first support's segment.  Every support is read and checked
    here, before any work."""
    from .pipeline.atlas import RULES

    if volumeNode is None:
        raise FoBInputError("No input volume selected. Choose the volume to segment.")
    if rule is not None and rule not in RULES:
        raise FoBInputError(f"Unknown atlas fusion rule {rule!r}: use one of {', '.join(RULES)}.")
    items = list(atlas or [])
    if not items:
        raise FoBInputError("The atlas is empty: give (support volume, segmentation, segment id) for each "
                            "annotated patient.")
    query = volume_from_node(volumeNode, "input volume")
    supports, first = [], None
    for n, item in enumerate(items, 1):
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise FoBInputError(f"Atlas entry {n} must be (support volume node, segmentation node, segment id).")
        vnode, seg_node, sid = item
        if vnode is None or _same_node(vnode, volumeNode):
            raise FoBInputError(f"Atlas entry {n}: its support volume is the input volume itself; an atlas holds "
                                "other patients. Use Apply (or process()) for a segment painted on this volume.")
        segment = _require_segment(seg_node, sid)
        m = segment_mask_on_volume(seg_node, sid, vnode)
        if not m.any():
            raise FoBInputError(f"Atlas entry {n}: segment {segment.GetName()!r} is empty on {vnode.GetName()!r}. "
                                "Paint it there, or leave that patient out of the atlas.")
        supports.append((volume_from_node(vnode, f"support volume {n}"), m))
        if first is None:
            first = (vnode, seg_node, sid, segment)
    vnode, seg_node, sid, segment = first
    return NodeInputs(volumeNode, seg_node, vnode, [sid], [segment.GetName()], [_segment_color(segment)],
                      [supports[0][1]], query, supports[0][0], False, atlas=supports, atlas_rule=rule)


def compute(segmenter, inputs: NodeInputs, slice_range=None, support_slices=None, progress=None,
            is_cancelled=None) -> list:
    """Run the segmenter on every support mask, or once on the atlas (any thread: no MRML access)."""
    if inputs.atlas:
        res = segmenter.segment_atlas(inputs.query, inputs.atlas, rule=inputs.atlas_rule, slice_range=slice_range,
                                      progress=progress, is_cancelled=is_cancelled)
        if is_cancelled is not None and is_cancelled():
            raise CancelledError()
        return [res]
    n = len(inputs.masks)
    results = []
    for index, mask in enumerate(inputs.masks):
        if is_cancelled is not None and is_cancelled():
            raise CancelledError()

        def _progress(done, total, _index=index):
            if progress is not None:
                progress(_index * total + done, n * total)

        results.append(segmenter.segment(inputs.query, inputs.support, mask, support_slices=support_slices,
                                         slice_range=slice_range, progress=_progress, is_cancelled=is_cancelled))
    if is_cancelled is not None and is_cancelled():
        raise CancelledError()
    return keep_within(inputs, results)


def keep_within(inputs: NodeInputs, results: list) -> list:
    """Each result that ``inputs.within`` bounds, kept within its bound's slices (after a run
    or a refine; the painted slices stay)."""
    for index, bound in inputs.within.items():
        results[index].keep_within(results[bound].mask, inputs.query)
    return results


def write_outputs(scene, inputs: NodeInputs, results: list, outputSegmentationNode=None,
                  show_prompts: bool = False) -> NodeRun:
    """Write one new segment per result (main thread); all or nothing."""
    volumeNode = inputs.volumeNode
    if volumeNode.GetScene() is None or (scene is not None and not scene.IsNodePresent(volumeNode)):
        raise FoBInputError("The input volume was removed from the scene (closed?) during the run; "
                            "nothing was written.")
    scene = scene or volumeNode.GetScene()
    for node, what in ((outputSegmentationNode, "output segmentation"),
                       (inputs.supportSegmentationNode if inputs.same_volume and outputSegmentationNode is None
                        else None, "segmentation the result goes into (the support's)")):
        if node is not None and not scene.IsNodePresent(node):
            raise FoBInputError(f"The {what} was removed from the scene during the run; nothing was written. "
                                "Choose an output segmentation and Apply again.")
    created = False
    output = outputSegmentationNode
    if output is None and inputs.same_volume:
        output = inputs.supportSegmentationNode
    if output is None:
        output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volumeNode.GetName()} FoB")
        created = True
        output.CreateDefaultDisplayNodes()
        tn = volumeNode.GetParentTransformNode()
        if tn is not None:
            output.SetAndObserveTransformNodeID(tn.GetID())
        output.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)

    written = []
    prompt_nodes = []
    try:
        for sid, name, color, res in zip(inputs.segment_ids, inputs.names, inputs.colors, results):
            new_id = write_mask_as_segment(
                res.mask, volumeNode, output, name + RESULT_SUFFIX, result_color(color),
                source_segment_id=sid, source_segmentation_node=inputs.supportSegmentationNode)
            written.append(new_id)
        if show_prompts:
            all_prompts = [p for res in results for p in (res.prompts or [])]
            prompt_nodes = prompts_to_markups(all_prompts, volumeNode, scene)
    except BaseException:
        for sid in written:
            output.GetSegmentation().RemoveSegment(sid)
        if created:
            remove_node_and_displays(scene, [output])
        raise
    return NodeRun(written, output, results, prompt_nodes, created, list(inputs.skipped))


def run_on_nodes(scene, volumeNode, supportSegmentationNode, segmentId, outputSegmentationNode, segmenter,
                 supportVolumeNode=None, segmentIds=None, slice_range=None, support_slices=None,
                 show_prompts=False, progress=None, is_cancelled=None, within=None) -> NodeRun:
    """Segment ``volumeNode`` from one or more painted segments and write one new segment per
    support segment (named ``"<name> (FoB)"``, in the support's hue) into the output
    segmentation: :func:`read_inputs`, :func:`compute`, :func:`write_outputs` in a row (the
    blocking path for scripts; the Slicer panel runs :func:`compute` on a worker thread).

    - ``supportVolumeNode`` is the volume the support was painted on (default: the query).
    - ``outputSegmentationNode``: ``None`` writes into the support segmentation when the
      support was painted on the query itself, otherwise into a new segmentation node.
    - ``segmenter`` is a ``FoBSegmentLib.Segmenter`` (or anything with the same ``segment``).
    - Nothing is written until every segment has been computed: cancelling (``is_cancelled``
      returning True raises :class:`CancelledError`) or an error leaves the scene unchanged.
    """
    inputs = read_inputs(volumeNode, supportSegmentationNode, segmentId, supportVolumeNode, segmentIds, within)
    results = compute(segmenter, inputs, slice_range, support_slices, progress, is_cancelled)
    return write_outputs(scene, inputs, results, outputSegmentationNode, show_prompts)


def volume_to_node(volume: Volume, volumeNode):
    """Fill a volume node (scalar or labelmap) with a :class:`Volume`: voxels and geometry.

    The inverse of :func:`volume_from_node` for a node without a parent transform; used to
    bring files read by FoBSegmentLib (or test data) into a scene."""
    from vtk.util import numpy_support

    vtk = _vtk()
    arr = np.ascontiguousarray(volume.array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    k, j, i = arr.shape
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(arr.ravel(), deep=True))
    volumeNode.SetAndObserveImageData(image)
    m = np.eye(4)
    m[:3, :3] = _RAS_TO_LPS @ (np.asarray(volume.direction) * np.asarray(volume.spacing)[None, :])
    m[:3, 3] = _RAS_TO_LPS @ np.asarray(volume.origin)
    volumeNode.SetIJKToRASMatrix(_np_to_vtk_matrix(m))
    return volumeNode


def acquisition_slice_count(volumeNode) -> int:
    """Number of slices along the acquisition axis, from the geometry only (no voxel copy)."""
    from .geometry import slice_axis_ijk

    if volumeNode is None or volumeNode.GetImageData() is None:
        return 0
    spacing, _, direction = _geometry_from_ijk_to_ras(ijk_to_world_ras(volumeNode))
    axis = slice_axis_ijk(Volume(np.zeros((1, 1, 1)), spacing, (0, 0, 0), direction))
    return int(volumeNode.GetImageData().GetDimensions()[axis])
