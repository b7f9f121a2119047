"""Shared fixtures: real data locations and the embedded backbone (loaded once per run)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
TEST_DATA = REPO / "FoBSegment" / "Testing" / "Data"
SHARED_DATA = Path(os.environ.get("FOBSEGMENT_SHARED_DATA", REPO.parent / "shared" / "data"))


if "FOBSEGMENT_CACHE_DIR" not in os.environ:
    # The command line caches embeddings in the user cache folder by default: tests never touch it.
    import tempfile

    os.environ["FOBSEGMENT_CACHE_DIR"] = tempfile.mkdtemp(prefix="fobsegment-test-cache-")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def shared_case(dataset: str, case: int | str):
    """(image, label) paths of a case in ../shared/data, or skip with the reason."""
    folder = SHARED_DATA / dataset
    img, lab = folder / f"image_{case}.nii.gz", folder / f"label_{case}.nii.gz"
    if not img.is_file() or not lab.is_file():
        pytest.skip(f"shared dataset not available: {img} (set FOBSEGMENT_SHARED_DATA or check out ../shared/data)")
    return img, lab


@pytest.fixture(scope="session")
def example_ct():
    """The TotalSegmentator example CT shipped in the repo (Apache-2.0): image and labels."""
    img, lab = TEST_DATA / "example_ct.nii.gz", TEST_DATA / "example_seg.nii.gz"
    assert img.is_file() and lab.is_file(), "test fixture missing from FoBSegment/Testing/Data"
    return img, lab


@pytest.fixture(scope="session")
def litemedsam():
    import torch

    from FoBSegmentLib.backbones.litemedsam import LiteMedSAMBackbone

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return LiteMedSAMBackbone("cpu")


@pytest.fixture()
def scene():
    """A Qt-free MRML scene as a real Slicer has it: subject hierarchy resolved and the
    segmentation conversion rules registered (as vtkSlicerSegmentationsModuleLogic::RegisterNodes
    does at start-up; slicer-core registers none)."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core (real MRML) is not installed")
    register_conversion_rules(slicer)
    s = slicer.vtkMRMLScene()
    slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(s)
    yield s
    s.Clear(1)


_RULES_REGISTERED = []


def register_conversion_rules(slicer) -> None:
    if _RULES_REGISTERED:
        return
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in ("vtkBinaryLabelmapToClosedSurfaceConversionRule", "vtkClosedSurfaceToBinaryLabelmapConversionRule",
                 "vtkClosedSurfaceToFractionalLabelmapConversionRule",
                 "vtkFractionalLabelmapToClosedSurfaceConversionRule"):
        if hasattr(slicer, rule):
            factory.RegisterConverterRule(getattr(slicer, rule)())
    _RULES_REGISTERED.append(True)


@pytest.fixture(scope="session")
def segmenter(litemedsam):
    """The default Segmenter on the embedded backbone, shared by every test (memory cache)."""
    from FoBSegmentLib import Segmenter

    return Segmenter(litemedsam)


@pytest.fixture(scope="session")
def ct(example_ct):
    """The example CT as a Volume and its integer labels (5 liver, 1 spleen)."""
    from FoBSegmentLib.io import read_volume

    img, lab = example_ct
    return read_volume(img), np.rint(read_volume(lab).array).astype(np.int64)


def other_field_of_view(vol, lab: np.ndarray, k0: int, k1: int):
    """Another field of view of the same body (slices k0:k1 of the acquisition axis), as a
    separate patient's volume: its own array, its own origin -> (Volume, labels)."""
    from FoBSegmentLib.geometry import Volume

    origin = np.asarray(vol.origin) + np.asarray(vol.direction).reshape(3, 3) @ np.array([0, 0, k0 * vol.spacing[2]])
    return Volume(vol.array[k0:k1].copy(), vol.spacing, tuple(origin), vol.direction), lab[k0:k1]


def one_slice_support(vol, gt, which="middle"):
    """What a user paints: one slice of the reference (the middle or the largest) -> (mask in
    the volume's geometry, its stack index, the volume's SliceView)."""
    from FoBSegmentLib.geometry import SliceView, occupied_slices

    view = SliceView.for_volume(vol)
    g = view.to_stack(gt)
    idx = occupied_slices(g)
    k = int(np.argmax(g.sum((1, 2)))) if which == "largest" else int(idx[len(idx) // 2])
    s = np.zeros_like(g)
    s[k] = g[k]
    return view.from_stack(s), k, view


def shared_pair(dataset, support_case, query_case, label):
    """A support/query pair of ../shared/data as the standard protocol sees it -> (support
    image, query image, support mask, query ground truth, the three ep1 support slices, the
    query's slices of the structure); skips where the data is absent."""
    from FoBSegmentLib.evaluation import ep1_support_slices
    from FoBSegmentLib.geometry import SliceView, occupied_slices
    from FoBSegmentLib.io import read_volume

    si, sl = shared_case(dataset, support_case)
    qi, ql = shared_case(dataset, query_case)
    s, q = read_volume(si), read_volume(qi)
    mask = np.rint(read_volume(sl).array) == label
    gt = np.rint(read_volume(ql).array) == label
    ref = occupied_slices(SliceView.for_volume(q).to_stack(gt))
    sup = ep1_support_slices(SliceView.for_volume(s).to_stack(mask))
    return s, q, mask, gt, sup, ref


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * float((a & b).sum()) / float(s)
