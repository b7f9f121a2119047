"""The interface every SAM-family backbone implements.

Coordinates
-----------
All prompts cross this interface in **normalised square coordinates**: a 2D slice of shape
``(rows, cols)`` is scaled so that its longer side spans ``[0, 1]`` and padded at the bottom
and right to a square (how SAM and LiteMedSAM pad).  A point is ``(x, y)`` = (column, row)
in that square; a box is ``(x0, y0, x1, y1)``.  The prompt generator works on a 256 x 256
grid of the same square, so it never needs to know the backbone's input size.

Masks come back as logits on a ``work_size x work_size`` grid of that square (256 for every
backbone); :func:`square_to_slice` crops and resizes them to the slice.

Arrays
------
Everything crossing this interface is a numpy array: model inputs, embeddings, logits.  A
backbone whose exports are ready runs without importing PyTorch at all (``import torch`` is
1.3 s and 540 MB of a command-line run); backbones that run in PyTorch convert at their edge.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from ..settings import WORK_SIZE  # noqa: F401 - re-exported: the grid masks come back on
from .device import Device

EMBED_SHAPE = (256, 64, 64)


@dataclass
class Decoded:
    """Output of :meth:`Backbone.decode` for one slice.

    logits: (M, WORK_SIZE, WORK_SIZE) float32, M = 3 with multimask else 1
    iou:    (M,) float32, predicted IoU of each mask
    """

    logits: np.ndarray
    iou: np.ndarray


class Backbone(abc.ABC):
    """A SAM-family model: an image encoder plus a promptable mask decoder."""

    #: registry name, e.g. ``"litemedsam"``
    name: str = ""
    #: side of the square model input (256 for LiteMedSAM, 1024 for SAM)
    input_size: int = 1024
    #: True for models trained with box prompts only (LiteMedSAM, MedSAM)
    box_trained: bool = False

    def __init__(self, device: str = "cpu"):
        self.device = Device(str(device))

    # --- identity -------------------------------------------------------------------
    @abc.abstractmethod
    def weights_id(self) -> str:
        """A short string identifying the weights (e.g. the checkpoint's SHA-256 prefix).
        Part of every embedding-cache key."""

    def preprocess_id(self) -> str:
        """Identifies the preprocessing; part of every embedding-cache key."""
        return f"{type(self).__name__}-in{self.input_size}-v1"

    def decoder_id(self) -> str:
        """Identifies what decodes a prompt (weights, where and how it runs); part of every
        decode-cache key, so that a mask decoded one way is never handed out for another."""
        return f"{self.weights_id()}-{type(self).__name__}-{self.device.type}-{getattr(self, 'precision', 'fp32')}"

    # --- preprocessing ---------------------------------------------------------------
    def prepare(self, slice2d: np.ndarray) -> np.ndarray:
        """One intensity-normalised slice (rows, cols) float32 in [0, 1] -> (3, S, S) model
        input on the CPU, resized (longer side S) and zero-padded bottom/right.

        Intensity normalisation (CT window, MR percentiles) happens before, in
        :mod:`FoBSegmentLib.preprocessing`, because it depends on the whole volume.
        """
        # Normalised before padding: the padding is 0 in the model's input space (SAM's own
        # preprocess pads after its pixel normalisation), not black normalised.
        n = self.input_size
        t = _resize_longest(slice2d, n)
        out = np.zeros((3, n, n), np.float32)
        out[:, :t.shape[0], :t.shape[1]] = self.normalise_input(np.repeat(t[None], 3, axis=0))
        return out

    def normalise_input(self, x: np.ndarray) -> np.ndarray:
        """Model-specific pixel normalisation of a (3, S, S) tensor in [0, 1]."""
        return x

    # --- model -----------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) prepared slices -> (B, 256, 64, 64) float32 embeddings."""

    @abc.abstractmethod
    def decode(
        self,
        embedding: np.ndarray,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        multimask: bool = False,
    ) -> Decoded:
        """Decode prompts on one slice.

        embedding: (256, 64, 64) or (1, 256, 64, 64)
        points: (N, 2) normalised (x, y); labels: (N,) 1 = foreground, 0 = background
        box: (4,) normalised (x0, y0, x1, y1)
        """

    def to_model_coords(self, xy: np.ndarray) -> np.ndarray:
        """Normalised square coordinates -> model input pixels."""
        return np.asarray(xy, dtype=np.float32) * self.input_size


def square_to_slice(square: np.ndarray, shape: tuple) -> np.ndarray:
    """Crop the padded square grid (..., N, N) to the slice content and resize to ``shape``."""
    a = np.asarray(square, dtype=np.float32)
    n = a.shape[-1]
    rows, cols = shape
    scale = n / max(rows, cols)
    nr, nc = max(1, round(rows * scale)), max(1, round(cols * scale))
    return resize(a[..., :nr, :nc], (rows, cols))


def _resize_longest(image: np.ndarray, n: int) -> np.ndarray:
    """(rows, cols) -> float32 with the longer side resized to n (bilinear)."""
    a = np.asarray(image, dtype=np.float32)
    rows, cols = a.shape[-2:]
    scale = n / max(rows, cols)
    return resize(a, (max(1, round(rows * scale)), max(1, round(cols * scale))))


def _resize_pad(image: np.ndarray, n: int) -> np.ndarray:
    """(rows, cols) -> (n, n) float32: longer side resized to n (bilinear), zero-padded
    bottom/right: the padded square every SAM-family model expects."""
    t = _resize_longest(image, n)
    out = np.zeros((n, n), np.float32)
    out[:t.shape[0], :t.shape[1]] = t
    return out


def slice_to_square(mask: np.ndarray, n: int = WORK_SIZE) -> np.ndarray:
    """A (rows, cols) mask -> (n, n) float array on the padded square grid."""
    return _resize_pad(mask, n)


def _source_pixels(n_in: int, n_out: int):
    """Per output pixel along one axis: the two source pixels and their weights, with pixel
    centres aligned (``align_corners=False``), as PyTorch's ``interpolate`` samples."""
    out = np.arange(n_out, dtype=np.float32)
    if n_in == n_out:
        i = np.arange(n_out)
        return i, i, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    # scale * (i + 0.5) - 0.5 rounded once, as PyTorch's fused multiply-add computes it
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = np.maximum((scale * (out + np.float32(0.5)) - 0.5).astype(np.float32), np.float32(0))
    i0 = src.astype(np.int64)
    w1 = np.clip(src - i0, 0, 1).astype(np.float32)
    return i0, np.where(i0 < n_in - 1, i0 + 1, i0), np.float32(1) - w1, w1


def resize(a: np.ndarray, shape: tuple) -> np.ndarray:
    """(..., rows, cols) float32 -> (..., *shape), bilinear over the last two axes: the sampling
    of PyTorch's ``interpolate(mode="bilinear", align_corners=False)``, to float32 rounding."""
    a = np.asarray(a, dtype=np.float32)
    if tuple(a.shape[-2:]) == tuple(shape):
        return a.copy()
    r0, r1, wr0, wr1 = _source_pixels(a.shape[-2], shape[0])
    c0, c1, wc0, wc1 = _source_pixels(a.shape[-1], shape[1])
    top, bottom = a[..., r0, :], a[..., r1, :]
    top = top[..., c0] * wc0 + top[..., c1] * wc1
    bottom = bottom[..., c0] * wc0 + bottom[..., c1] * wc1
    return top * wr0[:, None] + bottom * wr1[:, None]
