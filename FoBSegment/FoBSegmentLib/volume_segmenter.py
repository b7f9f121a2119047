"""The volume pipeline: volume -> slices -> embeddings -> prompts -> masks -> volume.

No ground-truth oracle: starting from the slices the support anchors, the pipeline walks
outward slice by slice and decides on each slice whether the structure is still there
(prototype contrast against the support, SAM's predicted IoU, overlap with the neighbouring
kept slice). It
stops where the structure ends, so slices beyond it are never encoded.  An optional
``query_slices`` list is the evaluation oracle (protocol EP1): exactly those slices are
segmented and nothing is decided.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .backbones import create_backbone
from .backbones.base import WORK_SIZE, Backbone, slice_to_square, square_to_slice
from .embedding_cache import EmbeddingCache
from .errors import CancelledError, FoBInputError
from .geometry import SliceView, Volume, occupied_slices, validate_volume
from .preprocessing import body_columns, fit_normalisation, side_of_midline
from .prompts import RING_INNER, RING_MARGIN, RING_OUTER, SlicePrompt, box_from_mask, check_strategy, choose_mask

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# Presence decision thresholds (work-grid pixels / fractions); issue B tunes them.
MIN_AREA_PX = 6
MIN_OVERLAP = 0.5
MIN_IOU = 0.45
# Prototype contrast below which a slice no longer shows the structure: an absolute floor and
# a fraction of the contrast typical of this structure in this run (organs differ a lot).
# Chosen on training-fold cases (CHAOS 1, 10; MS-CMRSeg 1) and the example CT.
MIN_CONTRAST = 0.1
REL_CONTRAST = 0.5
MAX_GROWTH = 4.0
# What `prompt_source="auto"` means for slices without a neighbour to follow; chosen by
# measurement (docs/benchmark.md).
AUTO_SOURCE = "contrast"
# Seed and walk settings.  Each was chosen on the two benchmark folds and docs/default_settings.md
# (benchmarks/default_settings.py) shows each one changed alone; mean Dice over both folds,
# both datasets and both protocols 0.842 with all of them, 0.738 with none.
# Contrast levels at which candidate regions are cut (contrast_region): 0.823 with one level.
CONTRAST_LEVELS = (0.0, 0.1, 0.2)
# Weight of the surroundings' likeness, exp(w * cosine), in the seed choice: 0.808 without,
# 0.828 at 6, 0.840 at 14.
CONTEXT_WEIGHT = 10.0
# The seed search of another patient's volume visits about this many slices, then the
# neighbours of the best (every slice of a volume up to twice as long).
SEED_SCAN_SLICES = 40
# The walk also accepts a slice like the neighbour just kept: 0.818 without.
WALK_NEIGHBOUR_CONTRAST = True
# Margin of the box copied from the neighbouring slice (organs grow from slice to slice and a
# tight box clips them): 0.820 at 2 px, 0.839 at 6 px.
PROPAGATE_PAD_PX = 4.0
# Re-prompts of a propagated slice with the box of SAM's own mask, until the box settles
# (Segmenter._settle_box); 0 = the neighbour's box only.  CHAOS ep1, supports 1, 5, 13 x 9
# queries, 1 px tolerance (benchmarks/settle_box.py): liver 0.795 -> 0.817, spleen 0.696 ->
# 0.716, left kidney 0.908 -> 0.923, right kidney 0.932 -> 0.934.  A box that may only grow
# gave nothing (liver, 12 pairs: 0.805 -> 0.805); keeping the first mask when the dropped part looks like the
# support gave liver 0.822 but spleen 0.700.  Known failure: where SAM keeps one of two lobes,
# the box shrinks onto it and the next slices follow (CHAOS 1 -> 13 liver 0.83 -> 0.71).
PROPAGATE_SETTLE = 3
# A box that moved less than this (work-grid px, any side) has settled.  Each re-prompt is one
# more decoder call (~15 ms on the CPU).  Supports 1, 13, liver / spleen, with the decoder calls
# added per call of the neighbour's box alone: 1 px 0.824 / 0.725 (+1.4), 3 px 0.823 / 0.725
# (+0.8), 5 px 0.809 / 0.717, 8 px 0.804 / 0.705, no settling 0.804 / 0.702.
# A tolerance relative to the box (max(3 px, f x mean side)) saves calls but not the liver:
# f = 0.05 / 0.08 / 0.12 -> liver 0.804 / 0.807 / 0.805, spleen 0.720 / 0.711 / 0.703,
# 1.36 / 1.12 / 1.04 calls per call of no settling (3 px: 1.82).  4 px: liver 0.814, spleen 0.723.
SETTLE_TOLERANCE_PX = 3.0
# With the structure's slices given (the ep1 protocol), start from the clearest slice of the
# middle half rather than the middle slice.  CHAOS, all 90 support/query pairs, Dice of the
# start slice: spleen 0.597 -> 0.666, liver 0.859 -> 0.869, right kidney 0.898 -> 0.945;
# all-supports ep1 mean CHAOS 0.773 -> 0.801, MS-CMRSeg 0.846 -> 0.857
# (docs/benchmark_all_supports_start_search.md).
START_SEARCH = True
# The seed search discounts a region by its distance from where the support has the structure
# (exp(-d / sigma), as contrast_region does within a slice): on a slice where only the other
# kidney shows, that kidney must not win.  CHAOS full protocol, kidneys, 5 supports x 9
# queries: 0.726 without, 0.799 with 40 px, 0.789 with 80 px (runs/exp/full_kid.py).  Off by
# default until measured on every class: with 40 px the walk on CHAOS 1 -> 2 liver stops 2
# slices inside the liver (test_other_patient_support_chaos_liver).  Whole-volume search only.
SEED_POSITION_SIGMA_PX = 0.0
# The seed search discounts a region on the other side of the patient's midline than the
# support's structure (x SIDE_PENALTY), where the structure clearly lies to one side (centroid
# more than SIDE_MIN half-widths of the body from the midline): the other kidney is a mirror
# image, not a displaced one.  Whole-volume search only.  CHAOS full protocol, all 10 supports
# x 9 queries (benchmarks/all_supports.py --variant 'seed side prior'): 0.719 -> 0.743; right
# kidney 0.827 -> 0.911 (6 of 9 failed pairs had followed the left kidney), liver 0.664 ->
# 0.673, left kidney and spleen unchanged (their failures are same-side look-alikes).
SEED_SIDE_PRIOR = True
SIDE_MIN = 0.15
SIDE_PENALTY = 0.1
HOLE_RATIO = 0.1  # a support whose holes exceed this fraction of its filled area is a ring


def default_weights(backbone_name: str) -> Path | None:
    p = WEIGHTS_DIR / f"fob_{backbone_name}.pt"
    return p if p.is_file() else None


@dataclass
class SupportSlice:
    index: int  # slice index in the support stack
    rel: float  # relative position within the annotated extent, 0..1
    embedding: torch.Tensor  # (256, 64, 64)
    mask_sq: np.ndarray  # (256, 256) bool on the work grid
    ring: np.ndarray | None  # (Np, 2) normalised
    proto_fg: torch.Tensor | None = None  # (256,) prototypes of the structure and its surroundings
    proto_bg: torch.Tensor | None = None
    side: float = 0.0  # centroid's offset from the patient's midline, in body half-widths (+ = display right)


@dataclass
class SlicePrompts:
    """Prompts shown to SAM on one query slice, in the query's voxel coordinates."""

    slice_index: int
    points_ijk: np.ndarray  # (N, 3)
    labels: np.ndarray  # (N,) 1 foreground, 0 background
    box_ijk: np.ndarray | None  # (2, 3) opposite corners
    points_rc: np.ndarray | None = None  # (N, 2) (row, col) on the displayed slice, for figures
    box_rc: np.ndarray | None = None  # (2, 2) (row, col) corners on the displayed slice


@dataclass
class SegmentationResult:
    mask: np.ndarray  # uint8 (k, j, i) in the query geometry
    prompts: list = field(default_factory=list)
    slice_info: dict = field(default_factory=dict)  # slice -> {iou, fg_conf, contrast, support_contrast, kept, reason}
    backbone: str = ""
    device: str = "cpu"
    prompt_strategy: str = ""
    prompt_source: str = ""
    slices_total: int = 0
    slices_segmented: int = 0
    slices_encoded: int = 0
    seconds: float = 0.0


class Segmenter:
    """One backbone, one prompt generator and one embedding cache, reused across calls.

    ``prompt``: ``auto`` (the measured default of the backbone) or a strategy of
    :mod:`FoBSegmentLib.prompts`.  ``prompt_source`` says how a slice without a segmented
    neighbour is prompted: ``contrast`` (background-ring prototype contrast, no training),
    ``fob`` (the trained generator), ``propagate`` (the support's own box) or ``auto``
    (``AUTO_SOURCE``, chosen by measurement).  The generator is loaded only when it is used.
    """

    def __init__(self, backbone: str | Backbone = "litemedsam", device: str = "auto", checkpoint=None,
                 weights=None, prompt: str = "auto", cache_dir=None, memory_cache_mb: float = 1024,
                 batch_size: int | None = None, mask_choice="best_iou", use_spr: bool = True,
                 prompt_source: str = "auto", download_progress=None, is_cancelled=None,
                 walk_prompt: str = "propagate"):
        self.backbone = backbone if isinstance(backbone, Backbone) else create_backbone(
            backbone, device, checkpoint, cache_dir, download_progress, is_cancelled)
        self.cache = EmbeddingCache(cache_dir, memory_cache_mb)
        self.batch_size = batch_size or (8 if self.backbone.device.type == "cuda" else 1)
        self.mask_choice = mask_choice
        if walk_prompt not in ("propagate", "independent"):
            raise FoBInputError(f"Unknown walk prompt {walk_prompt!r}: use propagate or independent.")
        self.walk_prompt = walk_prompt
        self.generator = None
        self.generator_meta: dict = {}
        weights = Path(weights) if weights else default_weights(self.backbone.name)
        if prompt_source not in ("auto", "fob", "contrast", "propagate"):
            raise FoBInputError(f"Unknown prompt source {prompt_source!r}: use auto, fob, contrast or propagate.")
        uses_generator = prompt_source == "fob" or (prompt_source == "auto" and AUTO_SOURCE == "fob")
        if uses_generator and weights is not None:
            from .prompt_generator import load_generator

            if not Path(weights).is_file():
                raise FoBInputError(f"Generator weights {weights} not found. Check the --weights path.")
            self.generator, self.generator_meta = load_generator(weights, device=self.backbone.device)
            self.generator.eval()
            if not use_spr:  # ablation: coarse (soft-argmax) ring points, no refinement
                self.generator.refiner = None
            trained_for = self.generator_meta.get("backbone")
            if trained_for and trained_for != self.backbone.name:
                raise FoBInputError(
                    f"The generator weights {Path(weights).name} were trained for backbone {trained_for!r}, "
                    f"not {self.backbone.name!r}. Use --backbone {trained_for} or weights trained for this backbone."
                )
        elif prompt_source == "fob":
            raise FoBInputError(
                f"No FoB generator weights for backbone {self.backbone.name!r}. Train them with "
                "`fobsegment train` and pass --weights, or use prompt source 'propagate'."
            )
        if prompt_source == "contrast" or (prompt_source == "auto" and AUTO_SOURCE == "contrast"):
            self.prompt_source = "contrast"
        else:
            self.prompt_source = "fob" if self.generator is not None else "propagate"
        if prompt == "auto":
            prompt = self.generator_meta.get("default_prompt") or ("box" if self.backbone.box_trained else "box+points")
        self.prompt = check_strategy(prompt)
        self.encoded_count = 0

    # ---------------------------------------------------------------- embeddings
    def embed(self, stack: np.ndarray, norm, indices, keys: dict | None = None) -> dict:
        """Embeddings of the given stack slices, encoding only those not cached.  ``keys``
        (slice index -> cache key) spares a run re-hashing a slice it asks for again."""
        out, todo = {}, []
        for i in indices:
            key = keys.get(i) if keys is not None else None
            x = None
            if key is None:
                x = self.backbone.prepare(norm.apply(stack[i]))
                key = EmbeddingCache.key(x, self.backbone.weights_id() + self.backbone.preprocess_id())
                if keys is not None:
                    keys[i] = key
            e = self.cache.get(key)
            if e is None and x is None:  # evicted since it was hashed
                x = self.backbone.prepare(norm.apply(stack[i]))
            if e is None:
                todo.append((i, x, key))
            else:
                out[i] = e
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            emb = self.backbone.encode(torch.stack([x for _, x, _ in chunk]))
            self.encoded_count += len(chunk)
            for (i, _, key), e in zip(chunk, emb):
                self.cache.put(key, e)
                out[i] = e.float()
        return out

    # ---------------------------------------------------------------- support
    def prepare_support(self, support: Volume, support_mask: np.ndarray, support_slices=None):
        validate_volume(support, "support image")
        mask = np.asarray(support_mask)
        if mask.shape != support.array.shape:
            raise FoBInputError(
                f"The support mask has shape {mask.shape} but the support image has {support.array.shape}; "
                "the mask must be drawn on the support image's grid."
            )
        view = SliceView.for_volume(support)
        stack, mstack = view.to_stack(support.array), view.to_stack(mask > 0)
        annotated = occupied_slices(mstack)
        if not annotated:
            raise FoBInputError("The support mask is empty: paint the structure on at least one slice of the support image.")
        n = stack.shape[0]
        if support_slices:
            bad = [s for s in support_slices if not 0 <= int(s) < n]
            if bad:
                raise FoBInputError(
                    f"Support slice(s) {bad} are out of range: the support image has {n} slices along its "
                    f"acquisition axis (0 to {n - 1})."
                )
            empty = [int(s) for s in support_slices if int(s) not in annotated]
            if empty:
                raise FoBInputError(
                    f"Support slice(s) {empty} carry no annotation of the structure. Annotated slices: "
                    f"{_ranges(annotated)}."
                )
            chosen = sorted({int(s) for s in support_slices})
        else:
            chosen = annotated
        norm = fit_normalisation(support.array)
        embs = self.embed(stack, norm, chosen)
        body = body_columns(stack, norm)
        lo, hi = annotated[0], annotated[-1]
        supports = []
        from .background_ring import ring_points

        for i in chosen:
            msq = slice_to_square(mstack[i]) > 0.5
            if not msq.any():  # a structure smaller than one work-grid pixel
                msq = slice_to_square(mstack[i]) > 0
            ring = ring_points(msq, outer_radius=RING_OUTER, inner_radius=RING_INNER) if self.generator else None
            rel = 0.5 if hi == lo else (i - lo) / (hi - lo)
            supports.append(SupportSlice(i, rel, embs[i], msq, ring, *prototypes(embs[i], msq),
                                         side=side_of_midline(mstack[i], body)))
        return supports, view, annotated

    # ---------------------------------------------------------------- one slice
    @torch.inference_mode()
    def predict_slice(self, q_emb: torch.Tensor, sup: SupportSlice, prev_sq: np.ndarray | None):
        """-> (logits (256, 256), predicted IoU, foreground confidence, SlicePrompt)."""
        fg_conf = 1.0
        has_prev = prev_sq is not None and prev_sq.any()
        from_neighbour = False  # the box is the neighbour's: settle it on this slice (_settle_box)
        if self.prompt_source == "contrast" and not (self.walk_prompt == "propagate" and has_prev):
            region = contrast_region(q_emb, sup)
            fg_prob = None
            ring = None
            if region is not None:
                from .background_ring import ring_points

                ring = ring_points(region, outer_radius=RING_OUTER, inner_radius=RING_INNER).astype(np.float32)
            box = box_from_mask(region if region is not None else sup.mask_sq, pad_px=2.0)
            prompt = SlicePrompt(np.zeros((0, 2), np.float32),
                                 ring if ring is not None else np.zeros((0, 2), np.float32), box)
            strategy = "box" if self.backbone.box_trained else "box+points"
        elif self.generator is not None and not (self.walk_prompt == "propagate" and has_prev):
            out = self.generator_output(q_emb, sup)
            from .background_ring import ring_to_box
            from .prompt_generator import foreground_points

            bg = out.points[0].float().cpu().numpy()
            fg_prob = out.fg_prob[0].float().cpu().numpy()
            fg = np.asarray(foreground_points(fg_prob), dtype=np.float32).reshape(-1, 2)
            prompt = SlicePrompt(fg, bg, np.asarray(ring_to_box(bg, RING_MARGIN), np.float32))
            strategy = self.prompt
        else:
            # The neighbouring slice just segmented is the best prior there is for a box-trained
            # model (measured: see docs/benchmark.md); without one, the support's own box.
            fg_prob = None
            from_neighbour = has_prev and self.walk_prompt == "propagate"
            ref = prev_sq if has_prev else sup.mask_sq
            prompt = SlicePrompt(np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32),
                                 box_from_mask(ref, pad_px=PROPAGATE_PAD_PX if has_prev else 2.0))
            strategy = "box"
        dec = self.backbone.decode(q_emb, multimask=not self.backbone.box_trained and strategy == "points",
                                   **prompt.as_decoder_args(strategy))
        logits, iou = choose_mask(dec.logits, dec.iou, self.mask_choice)
        if from_neighbour:
            logits, iou, prompt = self._settle_box(q_emb, logits, iou, prompt)
        if fg_prob is not None:
            m = logits > 0
            fg_conf = float(fg_prob[m].mean()) if m.any() else 0.0
        return logits, iou, fg_conf, prompt

    def _settle_box(self, q_emb, logits, iou, prompt: SlicePrompt):
        """Re-prompt with the box of SAM's own mask until the box stops moving.

        The neighbour's box is right for the neighbour, not for this slice: where the organ
        grows, SAM's mask runs into the box edge; where it shrinks, SAM fills the spare box.
        Boxing SAM's answer again lets the box follow this slice's organ (PROPAGATE_SETTLE)."""
        for _ in range(PROPAGATE_SETTLE):
            m = logits > 0
            if m.sum() < MIN_AREA_PX:
                break
            box = box_from_mask(m, pad_px=PROPAGATE_PAD_PX)
            if np.abs(box - prompt.box).max() * WORK_SIZE < SETTLE_TOLERANCE_PX:
                break
            prompt = SlicePrompt(prompt.fg_points, prompt.bg_points, box)
            dec = self.backbone.decode(q_emb, multimask=False, **prompt.as_decoder_args("box"))
            logits, iou = choose_mask(dec.logits, dec.iou, self.mask_choice)
        return logits, iou, prompt

    @torch.inference_mode()
    def generator_output(self, q_emb: torch.Tensor, sup: SupportSlice):
        """The FoB generator on one (support, query) pair -> GeneratorOutput with B = 1."""
        dev = self.backbone.device
        return self.generator(
            sup.embedding[None].to(dev), torch.as_tensor(sup.mask_sq, dtype=torch.float32)[None].to(dev),
            torch.as_tensor(sup.ring, dtype=torch.float32)[None].to(dev), q_emb[None].to(dev))

    # ---------------------------------------------------------------- volume
    def segment(self, query: Volume, support: Volume | None, support_mask: np.ndarray, support_slices=None,
                slice_range=None, query_slices=None, progress=None, is_cancelled=None,
                holes: str = "auto") -> SegmentationResult:
        """Segment the structure annotated in ``support_mask`` through ``query``.

        A ring-shaped structure (the myocardium around the blood pool) cannot be described by
        one box or one outer ring of background points.  With ``holes='auto'``, when the
        support mask encloses holes, the hole is segmented as its own structure and the wall
        is drawn around it (see :meth:`_segment_ring`).
        """
        m = np.asarray(support_mask) > 0
        sup_vol = query if support is None else support
        if holes != "off" and m.shape == sup_vol.array.shape and m.any():
            s_view = SliceView.for_volume(sup_vol)
            ms = s_view.to_stack(m)
            filled = ms.copy()
            for i in occupied_slices(ms):  # the annotation covers a few slices of many
                filled[i] = ndimage.binary_fill_holes(ms[i])
            hole = filled & ~ms
            if hole.sum() > HOLE_RATIO * filled.sum():
                return self._segment_ring(query, support, s_view, ms, filled, hole, support_slices, slice_range,
                                          query_slices, progress, is_cancelled)
        return self._segment_once(query, support, support_mask, support_slices, slice_range, query_slices,
                                  progress, is_cancelled)

    def _segment_ring(self, query, support, s_view, ms, filled, hole, support_slices, slice_range, query_slices,
                      progress, is_cancelled):
        """Ring structure: find the hole (e.g. the LV blood pool: a compact, bright, well
        localised structure) first, then draw the wall around it at the thickness measured on
        the support.  Measured: localising the filled structure directly fails because its
        prototype mixes wall and cavity, and a box around the cavity gives the cavity again."""
        t0 = time.perf_counter()
        enc0 = self.encoded_count
        chosen = support_slices or occupied_slices(ms)
        hole_sup = [int(i) for i in chosen if hole[int(i)].any()]
        inner = self._segment_once(query, support, s_view.from_stack(hole), hole_sup, slice_range, query_slices,
                                   progress, is_cancelled)
        # Wall thickness on the support: for a ring of thickness t the mean distance of its
        # pixels from the cavity is t / 2.
        thick = [2.0 * float(ndimage.distance_transform_edt(~hole[i])[ms[i]].mean()) for i in hole_sup]
        t = float(np.median(thick)) if thick else 5.0
        view = SliceView.for_volume(query)
        inner_st = view.to_stack(inner.mask > 0)
        out = np.zeros(inner_st.shape, np.uint8)
        for i, info in inner.slice_info.items():
            if info.get("kept") and inner_st[i].any():
                # SAM's box around the cavity segments the cavity again (measured), so the wall
                # is drawn geometrically at the support's thickness.
                out[i] = (ndimage.distance_transform_edt(~inner_st[i]) <= t) & ~inner_st[i]
        if support is None or support is query:  # the user's own annotation stays exactly as drawn
            for i in occupied_slices(ms):
                out[i] = ms[i]
        inner.mask = np.ascontiguousarray(view.from_stack(out))
        inner.prompt_strategy += "+ring"
        inner.slices_segmented = len(occupied_slices(out))
        inner.slices_encoded = self.encoded_count - enc0
        inner.seconds = time.perf_counter() - t0
        return inner

    def _segment_once(self, query: Volume, support: Volume | None, support_mask: np.ndarray, support_slices=None,
                      slice_range=None, query_slices=None, progress=None, is_cancelled=None) -> SegmentationResult:
        t0 = time.perf_counter()
        enc0 = self.encoded_count
        validate_volume(query, "query image")
        same = support is None or support is query or (
            query.same_grid(support) and np.shares_memory(query.array, support.array))
        if support is None:
            support = query
        supports, s_view, annotated = self.prepare_support(support, support_mask, support_slices)
        view = SliceView.for_volume(query)
        stack = view.to_stack(query.array)
        n, rows, cols = stack.shape
        lo, hi = 0, n - 1
        if slice_range is not None:
            a, b = int(slice_range[0]), int(slice_range[1])
            if not (0 <= a <= b < n):
                raise FoBInputError(
                    f"Slice range {a}:{b} is outside the query image, which has {n} slices along its "
                    f"acquisition axis (valid: 0:{n - 1})."
                )
            lo, hi = a, b
        norm = fit_normalisation(query.array)
        keys: dict[int, str] = {}

        def emb_of(i):
            return self.embed(stack, norm, [i], keys)[i]

        out_stack = np.zeros((n, rows, cols), np.uint8)
        result = SegmentationResult(out_stack, backbone=self.backbone.name, device=str(self.backbone.device),
                                    prompt_strategy=self.prompt if self.generator else "box",
                                    prompt_source=self.prompt_source, slices_total=n)
        kept_sq: dict[int, np.ndarray] = {}
        done = [0]
        total = hi - lo + 1

        def tick():
            done[0] += 1
            if progress is not None:
                progress(min(done[0], total), total)
            if is_cancelled is not None and is_cancelled():
                raise CancelledError()

        def nearest_support(rel_or_index, by_index):
            if by_index:
                return min(supports, key=lambda s: abs(s.index - rel_or_index))
            return min(supports, key=lambda s: abs(s.rel - rel_or_index))

        def run(i, sup, prev_sq, decide, prev_i=None, given="oracle"):
            emb = emb_of(i)
            logits, iou, fg_conf, prompt = self.predict_slice(emb, sup, prev_sq)
            m = logits > 0
            contrast = own = prototype_contrast(emb, m, sup)
            if decide and prev_i in kept_sq and WALK_NEIGHBOUR_CONTRAST:
                # An organ changes along the walk (the liver's tip looks little like its middle):
                # a slice also counts as like the structure when it is like the neighbour just kept.
                p_emb = emb_of(prev_i)
                contrast = max(contrast, prototype_contrast(emb, m, prototypes(p_emb, kept_sq[prev_i])))
            info = {"iou": round(iou, 4), "fg_conf": round(fg_conf, 4), "contrast": round(contrast, 4),
                    "support_contrast": round(own, 4), "support": sup.index}
            if decide:
                # Typical contrast of this structure, from walked slices only: the seed was
                # chosen for its high contrast and would set the bar too high.
                seen = [v["contrast"] for v in result.slice_info.values()
                        if v.get("kept") and v.get("reason") == "present"]
                floor = max(MIN_CONTRAST, REL_CONTRAST * float(np.median(seen))) if seen else MIN_CONTRAST
                ok, reason, m = _decide(m, prev_sq, iou, contrast, floor)
                info.update(kept=ok, reason=reason)
            else:
                info.update(kept=True, reason=given)  # not decided here: oracle, seed or a gap
            result.slice_info[i] = info
            if info["kept"]:
                kept_sq[i] = m
                out_stack[i] = square_to_slice(m.astype(np.float32), (rows, cols)) > 0.5
                result.prompts.append(self._prompt_record(view, stack.shape, i, prompt, rows, cols))
            tick()
            return info["kept"]

        if query_slices is not None:
            qs = sorted({int(s) for s in query_slices if lo <= int(s) <= hi})
            total = len(qs)
            q0, q1 = (qs[0], qs[-1]) if qs else (0, 0)

            def support_at(i):  # the support at the same relative position in the oracle's extent
                return nearest_support(0.5 if q1 == q0 else (i - q0) / (q1 - q0), False)

            if self.walk_prompt == "independent" or not qs:
                for i in qs:
                    run(i, support_at(i), None, decide=False)
            else:
                # Start on the slice of the middle half of the given extent where the structure
                # shows most clearly (the middle slice itself may show a look-alike more clearly:
                # measured on CHAOS, see START_SEARCH), then walk to both ends, each slice prompted
                # from its neighbour just segmented (slices given by the oracle).
                if START_SEARCH:
                    middle = qs[len(qs) // 4: len(qs) - len(qs) // 4] or qs
                    # Every slice here holds the structure: no position or side prior (measured
                    # without; the side prior changed nothing: CHAOS spleen, supports 1, 5, 13, 0.716).
                    mid = self._find_seed(emb_of, supports, middle, run, given="oracle")
                else:
                    mid = None
                if mid is None:
                    mid = qs[len(qs) // 2]
                    run(mid, support_at(mid), None, decide=False)
                mid_pos = qs.index(mid)
                for order in (qs[mid_pos - 1::-1] if mid_pos > 0 else [], qs[mid_pos + 1:]):
                    prev = kept_sq.get(mid)
                    for i in order:
                        run(i, support_at(i), prev, decide=False)
                        prev = kept_sq.get(i, prev)
        elif same:
            # The user's own annotation is the answer on the annotated slices.
            user = s_view.to_stack(np.asarray(support_mask) > 0)
            for s in annotated:
                if lo <= s <= hi:
                    kept_sq[s] = slice_to_square(user[s]) > 0.5
                    out_stack[s] = user[s]
                    result.slice_info[s] = {"kept": True, "reason": "annotated"}
            inside = [i for i in range(max(lo, annotated[0]), min(hi, annotated[-1]) + 1) if i not in kept_sq]
            for i in inside:  # gaps between annotated slices: the structure is there
                prev = kept_sq.get(max(k for k in kept_sq if k < i)) if any(k < i for k in kept_sq) else None
                run(i, nearest_support(i, True), prev, decide=False, given="between_annotations")
            start_lo = min(hi, annotated[0]) if annotated[0] >= lo else lo
            start_hi = max(lo, annotated[-1]) if annotated[-1] <= hi else hi
            if annotated[0] >= lo:
                self._walk(run, kept_sq, start_lo, -1, lo, lambda i: nearest_support(i, True))
            if annotated[-1] <= hi:
                self._walk(run, kept_sq, start_hi, +1, hi, lambda i: nearest_support(i, True))
        else:
            body = None
            if SEED_SIDE_PRIOR:
                to_sq = WORK_SIZE / max(rows, cols)
                body = tuple(x * to_sq for x in body_columns(stack, norm))  # (midline, half-width), work grid
            seed = self._find_seed(emb_of, supports, list(range(lo, hi + 1)), run,
                                   position_sigma_px=SEED_POSITION_SIGMA_PX, body=body)
            if seed is not None:
                frac = lambda i: (i - lo) / max(1, hi - lo)  # noqa: E731 - provisional, refined below
                self._walk(run, kept_sq, seed, -1, lo, lambda i: nearest_support(frac(i), False))
                self._walk(run, kept_sq, seed, +1, hi, lambda i: nearest_support(frac(i), False))
                self._reprompt_by_extent(emb_of, supports, kept_sq, out_stack, result, view, rows, cols)
        result.slices_segmented = int(sum(1 for v in result.slice_info.values() if v.get("kept")))
        result.mask = np.ascontiguousarray(view.from_stack(out_stack))
        result.slices_encoded = self.encoded_count - enc0
        result.seconds = time.perf_counter() - t0
        if progress is not None:
            progress(total, total)
        return result

    def _walk(self, run, kept_sq, start, step, stop, support_for):
        """From a kept slice, walk until the structure is judged absent or the range ends."""
        prev_i = start
        i = start + step
        while (i >= stop if step < 0 else i <= stop):
            if i not in kept_sq and not run(i, support_for(i), kept_sq.get(prev_i), decide=True, prev_i=prev_i):
                break
            prev_i = i
            i += step

    def _find_seed(self, emb_of, supports, candidates, run, given="seed", position_sigma_px=0.0, body=None):
        """Find the slice among ``candidates`` where the structure shows most clearly, segment
        it (recorded with reason ``given``) and return its index (None: shown nowhere).

        On another patient's volume the candidates are the whole slice range (in a long
        volume, ``SEED_SCAN_SLICES`` evenly spaced slices, then the neighbours of the best):
        fields of view differ between patients, so the support's relative position says little (CHAOS case 13's kidneys
        lie 10 slices off it).  A slice's score is SAM's predicted IoU x prototype contrast x the likeness of
        the region's surroundings to the support's (:func:`seed_score`), so the spleen and the
        left kidney, alike in texture, are told apart by their neighbours."""
        central = min(supports, key=lambda s: abs(s.rel - 0.5))
        stride = max(1, len(candidates) // SEED_SCAN_SLICES)
        scores: dict[int, float] = {}

        def score(i):
            if i not in scores:
                emb = emb_of(i)
                logits, iou, _, _ = self.predict_slice(emb, central, None)
                scores[i] = seed_score(emb, logits > 0, iou, central, position_sigma_px, body)
            return scores[i]

        for i in candidates[::stride]:
            score(i)
        if stride > 1:
            top = candidates.index(max(scores, key=scores.get))
            for i in candidates[max(0, top - stride + 1): top + stride]:
                score(i)
        best = max(scores, key=scores.get)
        if scores[best] <= 0:
            return None
        run(best, central, None, decide=False, given=given)
        return best

    def _reprompt_by_extent(self, emb_of, supports, kept_sq, out_stack, result, view, rows, cols):
        """With several support slices, re-decode each kept slice from the support at the same
        relative position within the extent now known (the 3-chunk protocol, generalised).
        Embeddings are cached, so this costs decoding only."""
        if len(supports) < 2 or len(kept_sq) < 2 or self.walk_prompt == "propagate":
            return
        k0, k1 = min(kept_sq), max(kept_sq)
        for i in sorted(kept_sq):
            rel = (i - k0) / max(1, k1 - k0)
            sup = min(supports, key=lambda s: abs(s.rel - rel))
            if sup.index == result.slice_info[i].get("support"):
                continue
            emb = emb_of(i)
            logits, iou, fg_conf, _ = self.predict_slice(emb, sup, kept_sq.get(i))
            m = logits > 0
            if m.sum() >= MIN_AREA_PX:
                out_stack[i] = square_to_slice(m.astype(np.float32), (rows, cols)) > 0.5
                result.slice_info[i].update(support=sup.index, iou=round(iou, 4))

    def _prompt_record(self, view, stack_shape, i, prompt: SlicePrompt, rows, cols) -> SlicePrompts:
        L = max(rows, cols)

        def to_rc(xy):
            xy = np.asarray(xy, dtype=float).reshape(-1, 2)
            return np.stack([xy[:, 1] * L - 0.5, xy[:, 0] * L - 0.5], 1)

        def to_ijk(xy):
            rc = to_rc(xy)
            return view.stack_coords_to_ijk(np.concatenate([np.full((len(rc), 1), i, float), rc], 1), stack_shape)

        pts = [prompt.fg_points, prompt.bg_points]
        labels = np.concatenate([np.ones(len(prompt.fg_points), int), np.zeros(len(prompt.bg_points), int)])
        allpts = np.concatenate([np.asarray(p, float).reshape(-1, 2) for p in pts])
        box = None if prompt.box is None else to_ijk(np.asarray(prompt.box).reshape(2, 2))
        box_rc = None if prompt.box is None else to_rc(np.asarray(prompt.box).reshape(2, 2))
        return SlicePrompts(i, to_ijk(allpts), labels, box, to_rc(allpts), box_rc)


def prototypes(embedding: torch.Tensor, mask_sq: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground prototype (masked mean of the embedding) and background prototype (mean
    over a band 4-12 px outside the mask on the 256 grid): what the structure and its
    immediate surroundings look like to the backbone."""
    # City-block distance = what 4 and 12 dilations with the 3x3 cross reach; 100x cheaper,
    # which matters since every seed candidate needs its surroundings.
    d = ndimage.distance_transform_cdt(~np.asarray(mask_sq, bool), metric="taxicab")
    band = (d > 4) & (d <= 12)
    return _pool(embedding, mask_sq), _pool(embedding, band)


def _pool(embedding, mask_sq):
    w = F.adaptive_avg_pool2d(torch.as_tensor(mask_sq, dtype=torch.float32)[None, None], embedding.shape[-1])[0, 0]
    return embedding.reshape(embedding.shape[0], -1) @ w.reshape(-1) / w.sum().clamp_min(1e-6)


def prototype_contrast(embedding, mask_sq, anchor) -> float:
    """cos(region, structure prototype) - cos(region, surroundings prototype): positive while
    the predicted region still looks like the annotated structure, negative once SAM has
    settled on a neighbour.  ``anchor`` is a :class:`SupportSlice` or a (structure,
    surroundings) pair of :func:`prototypes`.  Needs no training (the backbone embedding
    alone)."""
    fg, bg = anchor if isinstance(anchor, tuple) else (anchor.proto_fg, anchor.proto_bg)
    if fg is None or not mask_sq.any():
        return 0.0
    f = _pool(embedding, mask_sq)
    return float(F.cosine_similarity(f, fg, 0) - F.cosine_similarity(f, bg, 0))


def contrast_map(embedding: torch.Tensor, anchor: SupportSlice) -> np.ndarray:
    """Per-pixel cos(feature, structure prototype) - cos(feature, surroundings prototype) on
    the 256 grid: FoB's background prototypes (the ring band around the support structure)
    used as the contrast that tells the structure from what borders it."""
    en = F.normalize(embedding, dim=0)
    c = (en * F.normalize(anchor.proto_fg, dim=0)[:, None, None]).sum(0) \
        - (en * F.normalize(anchor.proto_bg, dim=0)[:, None, None]).sum(0)
    return F.interpolate(c[None, None], size=WORK_SIZE, mode="bilinear", align_corners=False)[0, 0].numpy()


def contrast_region(embedding, anchor, levels=None, sigma_px: float = 40.0,
                    context_weight: float | None = None, per_level: int = 5):
    """Where the structure is on a query slice without a neighbour to follow.

    Candidates are the connected regions of positive contrast (:func:`contrast_map`), cut at
    several contrast levels: at the lowest, an organ touching a look-alike (spleen and left
    kidney, liver and bowel) merges with it into one region whose centre lies between the
    two; a higher level splits them.  Each candidate is scored by its total contrast,
    discounted by its distance from where the structure sits on the support (left and right
    kidney look alike), and weighted by how much its surroundings look like the support's
    surroundings (the band prototype): the spleen and the left kidney have the same texture
    but not the same neighbours.  Returns a (256, 256) bool mask or None."""
    if anchor.proto_fg is None:
        return None
    levels = CONTRAST_LEVELS if levels is None else levels
    context_weight = CONTEXT_WEIGHT if context_weight is None else context_weight
    cm = contrast_map(embedding, anchor)
    cy, cx = ndimage.center_of_mass(anchor.mask_sq)
    best, best_score = None, -np.inf
    for level in levels:
        above = cm > level
        lab, n = ndimage.label(above)
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        sums = ndimage.sum(cm, lab, idx)
        centres = np.array(ndimage.center_of_mass(above, lab, idx)).reshape(-1, 2)
        score = sums * np.exp(-np.hypot(centres[:, 0] - cy, centres[:, 1] - cx) / sigma_px)
        for k in np.argsort(-score)[:per_level]:
            if score[k] <= 0:
                break
            region = lab == idx[k]
            total = float(score[k]) * float(np.exp(context_weight * surroundings_likeness(embedding, region, anchor)))
            if total > best_score:
                best, best_score = region, total
    return best


def seed_score(embedding, mask_sq, iou: float, anchor: SupportSlice, position_sigma_px: float = 0.0,
               body: tuple[float, float] | None = None) -> float:
    """How clearly a slice shows the support's structure: SAM's predicted IoU x prototype
    contrast x exp(CONTEXT_WEIGHT * (cos(surroundings, support surroundings) - 1)); 0 where
    the mask is too small or SAM is unsure.  ``body``: (midline column, half-width) of the
    query's body on the work grid, for the side prior (SEED_SIDE_PRIOR)."""
    if mask_sq.sum() < MIN_AREA_PX or iou < MIN_IOU:
        return 0.0
    contrast = prototype_contrast(embedding, mask_sq, anchor)
    context = surroundings_likeness(embedding, mask_sq, anchor)
    score = max(0.0, iou * contrast) * float(np.exp(CONTEXT_WEIGHT * (context - 1.0)))
    if position_sigma_px:
        # A slice where only the look-alike shows (the other kidney) must not win the search.
        (y, x), (cy, cx) = ndimage.center_of_mass(mask_sq), ndimage.center_of_mass(anchor.mask_sq)
        score *= float(np.exp(-np.hypot(y - cy, x - cx) / position_sigma_px))
    if body is not None and abs(anchor.side) > SIDE_MIN:
        side = side_of_midline(mask_sq, body)
        if side * anchor.side < 0 and abs(side) > SIDE_MIN:
            score *= SIDE_PENALTY
    return score


def surroundings_likeness(embedding, mask_sq, anchor: SupportSlice) -> float:
    """cos(band around the region, band around the support's structure): FoB's background,
    used to tell look-alike organs apart by what borders them."""
    return float(F.cosine_similarity(prototypes(embedding, mask_sq)[1], anchor.proto_bg, 0))


def _decide(m, prev_sq, iou, contrast, min_contrast=MIN_CONTRAST):
    """Is the structure on this slice?  -> (kept, reason, cleaned mask)."""
    area = int(m.sum())
    if area < MIN_AREA_PX:
        return False, "empty", m
    if prev_sq is not None and prev_sq.any():
        near = ndimage.binary_dilation(prev_sq, iterations=6)
        lab, nlab = ndimage.label(m)
        if nlab > 1:  # keep only components touching the neighbour: 3D connectivity
            touching = np.unique(lab[near & m])
            m = np.isin(lab, touching[touching > 0])
            area = int(m.sum())
            if area < MIN_AREA_PX:
                return False, "disconnected", m
        if (m & near).sum() < MIN_OVERLAP * area:
            return False, "disconnected", m
        if area > MAX_GROWTH * prev_sq.sum() + 50:
            return False, "leak", m
    if iou < MIN_IOU:
        return False, "low_iou", m
    if contrast < min_contrast:
        return False, "unlike_support", m
    return True, "present", m


def _ranges(idx):
    idx = sorted(idx)
    out, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)
