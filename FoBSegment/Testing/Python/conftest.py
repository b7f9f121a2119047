"""Shared fixtures: real data locations and the embedded backbone (loaded once per run)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
TEST_DATA = REPO / "FoBSegment" / "Testing" / "Data"
SHARED_DATA = Path(os.environ.get("FOBSEGMENT_SHARED_DATA", REPO.parent / "shared" / "data"))


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
    return LiteMedSAMBackbone(torch.device("cpu"))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * float((a & b).sum()) / float(s)
