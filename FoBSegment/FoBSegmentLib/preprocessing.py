"""Intensity normalisation of a whole volume to [0, 1], the way MedSAM-family models were
trained: a soft-tissue window for CT (Hounsfield units) and percentile clipping for MR.

It is computed from the whole volume (not per slice) so that one structure has the same
brightness on every slice, and it is part of the embedding-cache key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CT_WINDOW = (40.0, 400.0)  # level, width: abdominal soft tissue
MR_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Normalisation:
    modality: str  # "CT" or "MR"
    low: float
    high: float

    def key(self) -> str:
        return f"{self.modality}:{self.low:.4g}:{self.high:.4g}"

    def apply(self, a: np.ndarray) -> np.ndarray:
        out = (np.asarray(a, dtype=np.float32) - self.low) / max(self.high - self.low, 1e-6)
        return np.clip(out, 0.0, 1.0, out=out)


def guess_modality(array: np.ndarray) -> str:
    """CT volumes hold Hounsfield units: air near -1000.  MR intensities are non-negative."""
    sample = array[:: max(1, array.shape[0] // 8)]
    return "CT" if float(np.percentile(sample, 1)) < -500 else "MR"


def fit_normalisation(array: np.ndarray, modality: str = "auto") -> Normalisation:
    modality = guess_modality(array) if modality in (None, "auto") else modality.upper()
    if modality == "CT":
        level, width = CT_WINDOW
        return Normalisation("CT", level - width / 2, level + width / 2)
    if modality != "MR":
        raise ValueError(f"modality must be 'auto', 'CT' or 'MR', not {modality!r}")
    # Subsample: percentiles of a 512 x 512 x 300 volume do not need every voxel.
    flat = np.asarray(array).reshape(-1)
    step = max(1, flat.size // 2_000_000)
    sample = flat[::step].astype(np.float32)
    nonzero = sample[sample > sample.min()]
    if nonzero.size < 100:
        nonzero = sample
    lo, hi = np.percentile(nonzero, MR_PERCENTILES)
    if hi <= lo:
        hi = lo + 1.0
    return Normalisation("MR", float(lo), float(hi))


#: normalised intensity above which a voxel counts as body, not air (fat is ~0.15 in the CT window)
BODY_LEVEL = 0.05


def body_columns(stack: np.ndarray, norm: Normalisation, samples: int = 16) -> tuple[float, float]:
    """(centre, half-width) of the body across the columns of a (slices, rows, cols) stack in
    display orientation, i.e. where the patient's midline is from right to left.  Columns
    where at least 5 % of the rows are body, over up to ``samples`` evenly spaced slices."""
    n, _, cols = stack.shape
    idx = np.unique(np.linspace(0, n - 1, min(samples, n)).round().astype(int))
    frac = np.mean([(norm.apply(stack[i]) > BODY_LEVEL).mean(0) for i in idx], 0)
    body = np.flatnonzero(frac > 0.05)
    if body.size == 0:
        return (cols - 1) / 2.0, cols / 2.0
    return (body[0] + body[-1]) / 2.0, max(1.0, (body[-1] - body[0]) / 2.0)


def side_of_midline(mask: np.ndarray, body: tuple[float, float]) -> float:
    """Where a 2D mask's centroid lies across the body: (column - midline) / half-width, with
    ``body`` from :func:`body_columns` in the mask's column units (+ = display right)."""
    return (float(np.nonzero(mask)[1].mean()) - body[0]) / body[1]


def solidity(mask: np.ndarray) -> float:
    """A 2D mask's area over its convex hull's: about 0.98 for the LV blood pool, 0.75 for the
    crescent of the RV.  An affine map keeps it (a hull stays a hull, area ratios keep), so the
    work grid's resampling barely alters it.  1.0 for an empty mask."""
    from skimage.morphology import convex_hull_image

    m = np.asarray(mask, bool)
    if not m.any():
        return 1.0
    return float(m.sum()) / float(convex_hull_image(m).sum())
