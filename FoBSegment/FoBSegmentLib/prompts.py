"""Turning the generator's output into SAM prompts, and SAM's masks into one mask.

Strategies (method.md section 5):
- ``points``: foreground points from the coarse prototype mask plus the refined background
  ring (the paper's setting, for point-trained SAM);
- ``box``: the box enclosing the background ring, shrunk by the ring margin (for box-trained
  models: LiteMedSAM, MedSAM);
- ``box+points``: both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import FoBInputError

STRATEGIES = ("points", "box", "box+points")
# Ring radii of method.md at the 256 grid; the box is shrunk by the ring's mean distance.
RING_OUTER, RING_INNER = 10.0, 7.0
RING_MARGIN = 0.5 * (RING_OUTER + RING_INNER)


@dataclass
class SlicePrompt:
    """Prompts for one slice, in normalised square coordinates."""

    fg_points: np.ndarray  # (F, 2)
    bg_points: np.ndarray  # (B, 2)
    box: np.ndarray | None  # (4,)

    def as_decoder_args(self, strategy: str) -> dict:
        pts, labs = [], []
        if strategy in ("points", "box+points"):
            if len(self.fg_points):
                pts.append(self.fg_points)
                labs.append(np.ones(len(self.fg_points), np.int64))
            if len(self.bg_points):
                pts.append(self.bg_points)
                labs.append(np.zeros(len(self.bg_points), np.int64))
        box = self.box if strategy in ("box", "box+points") else None
        if not pts:
            return {"points": None, "labels": None, "box": box}
        return {"points": np.concatenate(pts).astype(np.float32), "labels": np.concatenate(labs), "box": box}


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise FoBInputError(f"Unknown prompt strategy {strategy!r}: use one of {', '.join(STRATEGIES)}.")
    return strategy


def choose_mask(logits, iou, mask_choice="best_iou") -> tuple[np.ndarray, float]:
    """(M, N, N) logits and (M,) predicted IoU -> one logit map and its IoU."""
    if logits.shape[0] == 1:
        return logits[0].numpy(), float(iou[0])
    idx = int(np.argmax(iou.numpy())) if mask_choice == "best_iou" else int(mask_choice)
    return logits[idx].numpy(), float(iou[idx])


def box_from_mask(mask: np.ndarray, pad_px: float = 0.0, size: int = 256) -> np.ndarray | None:
    """Tight box (normalised) of a mask on the size x size grid, grown by ``pad_px``."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    box = np.array([cols.min() - pad_px, rows.min() - pad_px, cols.max() + 1 + pad_px, rows.max() + 1 + pad_px])
    return np.clip(box / size, 0.0, 1.0).astype(np.float32)
