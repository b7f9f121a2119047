"""One slice: prompt -> mask decoder -> mask.

A slice without a segmented neighbour is prompted by a *start prompter* (the default,
:class:`ContrastPrompter`, needs no training); a slice next to one just segmented gets the
neighbour's box, re-fitted to SAM's own answer until it settles.  The prompt recorded with a
slice is exactly what the decoder received last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..background_ring import ring_points
from ..embedding_cache import DecodeCache, array_digest
from ..settings import RING_INNER_PX, RING_OUTER_PX, WORK_SIZE, SegmenterSettings
from .contrast import contrast_region


@dataclass
class SlicePrompt:
    """What the mask decoder receives for one slice, in normalised square coordinates."""

    points: np.ndarray | None = None  # (N, 2) (x, y)
    labels: np.ndarray | None = None  # (N,) 1 foreground, 0 background
    box: np.ndarray | None = None  # (4,) (x0, y0, x1, y1)

    @classmethod
    def make(cls, fg=None, bg=None, box=None) -> "SlicePrompt":
        """Foreground and background points (either may be empty or None) and a box."""
        pts, labs = [], []
        for p, label in ((fg, 1), (bg, 0)):
            if p is not None and len(p):
                pts.append(np.asarray(p, np.float32).reshape(-1, 2))
                labs.append(np.full(len(pts[-1]), label, np.int64))
        if not pts:
            return cls(None, None, box)
        return cls(np.concatenate(pts), np.concatenate(labs), box)

    def decoder_args(self) -> dict:
        return {"points": self.points, "labels": self.labels, "box": self.box}


@dataclass
class SlicePrediction:
    """SAM's answer on one slice."""

    logits: np.ndarray  # (256, 256) on the work grid
    iou: float  # SAM's predicted IoU
    prompt: SlicePrompt  # exactly what produced ``logits``
    fg_conf: float = 1.0  # the start prompter's confidence in the mask (1.0: none given)

    @property
    def mask(self) -> np.ndarray:
        return self.logits > 0


def box_from_mask(mask: np.ndarray, pad_px: float = 0.0, size: int = WORK_SIZE) -> np.ndarray | None:
    """Tight box (normalised) of a mask on the size x size grid, grown by ``pad_px``."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    box = np.array([cols.min() - pad_px, rows.min() - pad_px, cols.max() + 1 + pad_px, rows.max() + 1 + pad_px])
    return np.clip(box / size, 0.0, 1.0).astype(np.float32)


def choose_mask(logits, iou) -> tuple[np.ndarray, float]:
    """(M, N, N) logits and (M,) predicted IoU -> the logit map SAM rates best, and its IoU."""
    idx = int(np.argmax(iou)) if logits.shape[0] > 1 else 0
    return logits[idx], float(iou[idx])


class ContrastPrompter:
    """The training-free start prompt: the box of the region that contrasts most like the
    support against its surroundings (:func:`contrast_region`).  A box-trained backbone gets
    the box alone; a point-trained SAM also gets the region's background ring as negative
    points, as in FoB."""

    name = "contrast"

    def __init__(self, backbone, settings: SegmenterSettings):
        self.with_ring = not backbone.box_trained
        self.strategy = "box+ring" if self.with_ring else "box"
        self.settings = settings.contrast

    def start_prompt(self, q_emb, sup) -> tuple[SlicePrompt, np.ndarray | None]:
        """-> (prompt, per-pixel foreground probability or None)."""
        region = contrast_region(q_emb, sup, self.settings)
        box = box_from_mask(region if region is not None else sup.mask_sq, pad_px=self.settings.box_pad_px)
        ring = None
        if self.with_ring and region is not None:
            ring = ring_points(region, outer_radius=RING_OUTER_PX, inner_radius=RING_INNER_PX)
        return SlicePrompt.make(bg=ring, box=box), None


class SlicePredictor:
    """Prompt one slice and decode it; ``decoded`` (a :class:`DecodeCache`, optional) spares
    decoding a prompt already decoded on the same embedding."""

    def __init__(self, backbone, settings: SegmenterSettings, start_prompter, decoded: DecodeCache | None = None):
        self.backbone = backbone
        self.settings = settings
        self.start_prompter = start_prompter
        self.decoded = decoded
        self._digest = (None, b"")  # (embedding, its digest): settling decodes one slice several times

    def decode(self, q_emb, prompt: SlicePrompt) -> tuple[np.ndarray, float]:
        # A point prompt alone is ambiguous (part, organ, organ + neighbour): let SAM offer three.
        multimask = not self.backbone.box_trained and prompt.box is None
        digest = self._embedding_digest(q_emb) if self.decoded is not None else None
        if digest is not None:
            hit = self.decoded.get(self._key(digest, prompt, multimask))
            if hit is not None:
                return hit
        dec = self.backbone.decode(q_emb, multimask=multimask, **prompt.decoder_args())
        logits, iou = choose_mask(dec.logits, dec.iou)
        if digest is not None:  # keyed again: the first decode may have found it must fall back to eager
            self.decoded.put(self._key(digest, prompt, multimask), logits, iou)
        return logits, iou

    def _key(self, digest: bytes, prompt: SlicePrompt, multimask: bool) -> str:
        return DecodeCache.key(self.backbone.decoder_id(), digest, prompt.points, prompt.labels, prompt.box, multimask)

    def _embedding_digest(self, q_emb) -> bytes:
        last = self._digest  # read once: the Slicer panel and the console may share a predictor
        if last[0] is not q_emb:
            last = (q_emb, array_digest(np.asarray(q_emb, np.float32)))
            self._digest = last
        return last[1]

    def predict(self, q_emb, sup, prev_sq: np.ndarray | None) -> SlicePrediction:
        """SAM's mask on a query slice: from the neighbour's mask ``prev_sq`` when there is
        one (the best prior there is for a box-trained model: docs/benchmarks/benchmark.md),
        otherwise from the start prompter."""
        if prev_sq is not None and prev_sq.any():
            prompt = SlicePrompt(box=box_from_mask(prev_sq, pad_px=self.settings.walk.pad_px))
            logits, iou = self.decode(q_emb, prompt)
            return self.settle_box(q_emb, SlicePrediction(logits, iou, prompt))
        prompt, fg_prob = self.start_prompter.start_prompt(q_emb, sup)
        logits, iou = self.decode(q_emb, prompt)
        fg_conf = 1.0
        if fg_prob is not None:
            m = logits > 0
            fg_conf = float(fg_prob[m].mean()) if m.any() else 0.0
        return SlicePrediction(logits, iou, prompt, fg_conf)

    def settle_box(self, q_emb, pred: SlicePrediction) -> SlicePrediction:
        """Re-prompt with the box of SAM's own mask until the box stops moving.

        The neighbour's box is right for the neighbour, not for this slice: where the organ
        grows, SAM's mask runs into the box edge; where it shrinks, SAM fills the spare box."""
        walk = self.settings.walk
        for _ in range(walk.max_settle_prompts):
            m = pred.logits > 0
            if m.sum() < self.settings.presence.min_area_px:
                break
            box = box_from_mask(m, pad_px=walk.pad_px)
            if np.abs(box - pred.prompt.box).max() * WORK_SIZE < walk.settle_tolerance_px:
                break
            prompt = SlicePrompt(pred.prompt.points, pred.prompt.labels, box)
            logits, iou = self.decode(q_emb, prompt)
            pred = SlicePrediction(logits, iou, prompt, pred.fg_conf)
        return pred
