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
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..settings import WORK_SIZE  # noqa: F401 - re-exported: the grid masks come back on

EMBED_SHAPE = (256, 64, 64)


@dataclass
class Decoded:
    """Output of :meth:`Backbone.decode` for one slice.

    logits: (M, WORK_SIZE, WORK_SIZE) float tensor, M = 3 with multimask else 1
    iou:    (M,) predicted IoU of each mask
    """

    logits: torch.Tensor
    iou: torch.Tensor


class Backbone(abc.ABC):
    """A SAM-family model: an image encoder plus a promptable mask decoder."""

    #: registry name, e.g. ``"litemedsam"``
    name: str = ""
    #: side of the square model input (256 for LiteMedSAM, 1024 for SAM)
    input_size: int = 1024
    #: True for models trained with box prompts only (LiteMedSAM, MedSAM)
    box_trained: bool = False

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    # --- identity -------------------------------------------------------------------
    @abc.abstractmethod
    def weights_id(self) -> str:
        """A short string identifying the weights (e.g. the checkpoint's SHA-256 prefix).
        Part of every embedding-cache key."""

    def preprocess_id(self) -> str:
        """Identifies the preprocessing; part of every embedding-cache key."""
        return f"{type(self).__name__}-in{self.input_size}-v1"

    # --- preprocessing ---------------------------------------------------------------
    def prepare(self, slice2d: np.ndarray) -> torch.Tensor:
        """One intensity-normalised slice (rows, cols) float32 in [0, 1] -> (3, S, S) model
        input on the CPU, resized (longer side S) and zero-padded bottom/right.

        Intensity normalisation (CT window, MR percentiles) happens before, in
        :mod:`FoBSegmentLib.preprocessing`, because it depends on the whole volume.
        """
        t = _resize_pad(slice2d, self.input_size)
        return self.normalise_input(t[None].expand(3, -1, -1).contiguous())

    def normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        """Model-specific pixel normalisation of a (3, S, S) tensor in [0, 1]."""
        return x

    # --- model -----------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) prepared slices -> (B, 256, 64, 64) embeddings (float32, CPU)."""

    @abc.abstractmethod
    def decode(
        self,
        embedding: torch.Tensor,
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


def square_to_slice(square: np.ndarray | torch.Tensor, shape: tuple, mode: str = "bilinear") -> np.ndarray:
    """Crop the padded square grid (..., N, N) to the slice content and resize to ``shape``."""
    t = torch.as_tensor(square, dtype=torch.float32)
    squeeze = t.ndim == 2
    if squeeze:
        t = t[None]
    n = t.shape[-1]
    rows, cols = shape
    scale = n / max(rows, cols)
    nr, nc = max(1, round(rows * scale)), max(1, round(cols * scale))
    t = t[..., :nr, :nc][None]
    kw = {"align_corners": False} if mode == "bilinear" else {}
    t = F.interpolate(t, size=(rows, cols), mode=mode, **kw)[0]
    out = t.numpy()
    return out[0] if squeeze else out


def _resize_pad(image: np.ndarray, n: int) -> torch.Tensor:
    """(rows, cols) -> (n, n) float tensor: longer side resized to n (bilinear), zero-padded
    bottom/right: the padded square every SAM-family model expects."""
    t = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)[None, None]
    rows, cols = t.shape[-2:]
    scale = n / max(rows, cols)
    nr, nc = max(1, round(rows * scale)), max(1, round(cols * scale))
    t = F.interpolate(t, size=(nr, nc), mode="bilinear", align_corners=False)
    return F.pad(t, (0, n - nc, 0, n - nr))[0, 0]


def slice_to_square(mask: np.ndarray, n: int = WORK_SIZE) -> np.ndarray:
    """A (rows, cols) mask -> (n, n) float array on the padded square grid."""
    return _resize_pad(mask, n).numpy()
