"""One run of the pipeline on one query volume: its slices, what has been kept, the output.

A :class:`QueryRun` replaces shared closures: the seed search, the walk and the protocols all
work on it, and :meth:`QueryRun.result` assembles the volume at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from ..backbones.base import slice_to_square, square_to_slice
from ..errors import CancelledError
from ..geometry import SliceView, Volume, within_slices
from ..preprocessing import fit_normalisation
from .contrast import prototype_contrast, prototypes
from .inputs import slice_bounds
from .slice_prompting import SlicePrompt
from .walk import contrast_floor, decide


@dataclass
class SlicePromptRecord:
    """The prompt SAM received on one query slice, in the query's voxel coordinates."""

    slice_index: int
    points_ijk: np.ndarray  # (N, 3)
    labels: np.ndarray  # (N,) 1 foreground, 0 background
    box_ijk: np.ndarray | None  # (2, 3) opposite corners
    points_rc: np.ndarray | None = None  # (N, 2) (row, col) on the displayed slice, for figures
    box_rc: np.ndarray | None = None  # (2, 2) (row, col) corners on the displayed slice


@dataclass
class SegmentationResult:
    """What :meth:`FoBSegmentLib.Segmenter.segment` returns."""

    mask: np.ndarray  # uint8 (k, j, i) in the query geometry
    prompts: list = field(default_factory=list)  # [SlicePromptRecord] of the kept slices
    slice_info: dict = field(default_factory=dict)  # slice -> {iou, fg_conf, contrast, support_contrast, kept, reason}
    backbone: str = ""
    device: str = "cpu"
    prompt_strategy: str = ""
    prompt_source: str = ""
    slices_total: int = 0
    slices_segmented: int = 0
    slices_encoded: int = 0
    seconds: float = 0.0
    supports: list = field(default_factory=list)  # atlas runs: per support, its run's Dice to the fused mask

    def keep_within(self, bound: np.ndarray, query: Volume) -> int:
        """Clear the mask outside the first to last slice (acquisition axis) of ``bound``, a
        mask on the ``query`` grid: a structure the user knows lies within another's extent
        (cardiac short axis: the right ventricle within the left's blood pool).  An empty
        ``bound`` bounds nothing, and a slice the user painted is never cleared.  Returns how
        many kept slices were cleared; the review lists them as outside the bound."""
        view = SliceView.for_volume(query)
        painted = {i for i, v in self.slice_info.items() if v.get("reason") == "annotated"}
        kept, cleared = within_slices(view.to_stack(self.mask > 0), view.to_stack(np.asarray(bound) > 0), painted)
        if cleared:
            self.mask = np.ascontiguousarray(view.from_stack(kept.astype(self.mask.dtype)))
            self.slices_segmented -= len(cleared)
            for i in cleared:
                self.slice_info[i] = {**self.slice_info.get(i, {}), "kept": False, "reason": "outside_bound"}
        return len(cleared)


class QueryRun:
    """The query's slices and the state of one run over them."""

    def __init__(self, segmenter, query: Volume, slice_range=None, progress=None, is_cancelled=None,
                 started: tuple | None = None):
        self.segmenter = segmenter
        self.settings = segmenter.settings
        # (time, encoded count) when the run began, support preparation included
        self.t0, self.enc0 = started or (time.perf_counter(), segmenter.embedder.encoded_count)
        self.view = SliceView.for_volume(query)
        self.stack = self.view.to_stack(query.array)
        n, self.rows, self.cols = self.stack.shape
        self.lo, self.hi = slice_bounds(slice_range, n)
        self.norm = fit_normalisation(query.array)
        self.keys: dict[int, str] = {}
        self.out = np.zeros((n, self.rows, self.cols), np.uint8)
        self.kept: dict[int, np.ndarray] = {}  # slice -> kept mask on the work grid
        self.result = SegmentationResult(
            self.out, backbone=segmenter.backbone.name, device=str(segmenter.backbone.device),
            prompt_strategy=segmenter.start_prompter.strategy, prompt_source=segmenter.start_prompter.name,
            slices_total=n)
        self.progress = progress
        self.is_cancelled = is_cancelled
        self.done = 0
        self.total = self.hi - self.lo + 1

    # ---------------------------------------------------------------- slices -> embeddings
    def embedding(self, i: int):
        return self.segmenter.embedder.embed(self.stack, self.norm, [i], self.keys,
                                             on_encoded=lambda _n: self.heartbeat())[i]

    def check_cancelled(self) -> None:
        if self.is_cancelled is not None and self.is_cancelled():
            raise CancelledError()

    def heartbeat(self) -> None:
        """After every encoded or decoded slice of any phase: report (the caller's GUI gets a
        turn) and honour a cancel, so a cancel costs at most one slice of work."""
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)
        self.check_cancelled()

    def _tick(self) -> None:
        self.done += 1
        self.heartbeat()

    # ---------------------------------------------------------------- one slice
    def segment_slice(self, i: int, sup, prev_sq, decide_presence: bool, prev_i=None, given="oracle") -> bool:
        """Prompt, decode and (with ``decide_presence``) judge slice ``i``; keep it if the
        structure is there.  Returns whether it was kept; ``given`` is the reason recorded
        for a slice kept without a decision (oracle, seed, between annotations)."""
        emb = self.embedding(i)
        pred = self.segmenter.predictor.predict(emb, sup, prev_sq)
        m = pred.mask
        contrast = own = prototype_contrast(emb, m, sup)
        if decide_presence and prev_i in self.kept:
            # An organ changes along the walk (the liver's tip looks little like its middle):
            # a slice also counts as like the structure when it is like the neighbour just kept.
            p_emb = self.embedding(prev_i)
            contrast = max(contrast, prototype_contrast(emb, m, prototypes(p_emb, self.kept[prev_i])))
        info = {"iou": round(pred.iou, 4), "fg_conf": round(pred.fg_conf, 4), "contrast": round(contrast, 4),
                "support_contrast": round(own, 4), "support": sup.index}
        if decide_presence:
            floor = contrast_floor(self.result.slice_info, self.settings.presence)
            ok, reason, m = decide(m, prev_sq, pred.iou, contrast, floor, self.settings.presence)
            info.update(kept=ok, reason=reason)
        else:
            info.update(kept=True, reason=given)
        self.result.slice_info[i] = info
        if info["kept"]:
            self.keep(i, m)
            self.result.prompts.append(self.prompt_record(i, pred.prompt))
        self._tick()
        return info["kept"]

    def branch(self) -> "QueryRun":
        """A fresh start on the same query (slices, embeddings, progress) to try another seed."""
        b = copy.copy(self)
        b.out, b.kept = np.zeros_like(self.out), {}
        b.result = dataclasses.replace(self.result, mask=b.out, prompts=[], slice_info={})
        return b

    def adopt(self, other: "QueryRun") -> None:
        """Take ``other``'s slices and output as this run's (progress is the caller's: each
        walk goes on from the one before)."""
        self.out, self.kept, self.result = other.out, other.kept, other.result

    def keep(self, i: int, mask_sq: np.ndarray) -> None:
        self.kept[i] = mask_sq
        self.out[i] = square_to_slice(mask_sq.astype(np.float32), (self.rows, self.cols)) > 0.5

    def keep_user_slice(self, i: int, mask2d: np.ndarray) -> None:
        """The user's own annotation is the answer on a slice they painted."""
        self.kept[i] = slice_to_square(mask2d) > 0.5
        self.out[i] = mask2d
        self.result.slice_info[i] = {"kept": True, "reason": "annotated"}

    def prompt_record(self, i: int, prompt: SlicePrompt) -> SlicePromptRecord:
        L = max(self.rows, self.cols)

        def to_rc(xy):
            xy = np.asarray(xy, dtype=float).reshape(-1, 2)
            return np.stack([xy[:, 1] * L - 0.5, xy[:, 0] * L - 0.5], 1)

        def to_ijk(xy):
            rc = to_rc(xy)
            return self.view.stack_coords_to_ijk(np.concatenate([np.full((len(rc), 1), i, float), rc], 1),
                                                 self.stack.shape)

        pts = prompt.points if prompt.points is not None else np.zeros((0, 2), np.float32)
        labels = prompt.labels if prompt.labels is not None else np.zeros(0, np.int64)
        box = None if prompt.box is None else np.asarray(prompt.box).reshape(2, 2)
        return SlicePromptRecord(i, to_ijk(pts), np.asarray(labels, int), None if box is None else to_ijk(box),
                                 to_rc(pts), None if box is None else to_rc(box))

    # ---------------------------------------------------------------- -> volume
    def result_volume(self) -> SegmentationResult:
        r = self.result
        r.slices_segmented = int(sum(1 for v in r.slice_info.values() if v.get("kept")))
        r.mask = np.ascontiguousarray(self.view.from_stack(self.out))
        r.slices_encoded = self.segmenter.embedder.encoded_count - self.enc0
        r.seconds = time.perf_counter() - self.t0
        if self.progress is not None:
            self.progress(self.total, self.total)
        return r
