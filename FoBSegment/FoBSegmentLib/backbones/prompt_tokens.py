"""Prompts for an exported mask decoder (:class:`.mask_decoder.MaskPredictor`), in numpy.

SAM's prompt encoder takes points and a box; its exported twin takes one list of points with
labels, a box being its two corners (labels 2 and 3) and, without a box, a padding point
(label -1) appended as SAM appends one.  Nothing here imports PyTorch.
"""

from __future__ import annotations

import numpy as np

from .base import Decoded

#: version of the exported decoder graph these inputs are for (``MaskPredictor``), part of its
#: file name: bump it whenever the graph changes, so that an older export is never loaded
GRAPH_VERSION = 3
#: labels of SAM's prompt points: a box's corners, and the padding point of a prompt without a box
BOX_CORNERS = (2, 3)
PADDING = -1


def prompt_points(backbone, points=None, labels=None, box=None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised prompts -> (coords (1, T, 2) float32 in model input pixels, labels (1, T) int64)."""
    xy, lab = [], []
    if points is not None and len(points):
        xy.append(backbone.to_model_coords(np.asarray(points, np.float32).reshape(-1, 2)))
        lab.append(np.asarray(labels, np.int64).reshape(-1))
        if box is None:
            xy.append(np.zeros((1, 2), np.float32))
            lab.append(np.array([PADDING], np.int64))
    if box is not None:
        xy.append(backbone.to_model_coords(np.asarray(box, np.float32).reshape(2, 2)))
        lab.append(np.array(BOX_CORNERS, np.int64))
    if not xy:
        raise ValueError("a prompt needs points or a box")
    return np.concatenate(xy)[None].astype(np.float32), np.concatenate(lab)[None]


def decode_exported(predict, backbone, embedding, points=None, labels=None, box=None,
                    multimask=False) -> Decoded:
    """One slice through an exported mask decoder ``predict(embedding, coords, labels)``."""
    emb = np.asarray(embedding, np.float32)
    if emb.ndim == 3:
        emb = emb[None]
    coords, labs = prompt_points(backbone, points, labels, box)
    masks, iou = predict(emb, coords, labs)
    keep = slice(1, None) if multimask else slice(0, 1)  # as SAM's MaskDecoder.forward selects
    return Decoded(logits=np.ascontiguousarray(masks[0, keep], np.float32), iou=np.asarray(iou[0, keep], np.float32))
