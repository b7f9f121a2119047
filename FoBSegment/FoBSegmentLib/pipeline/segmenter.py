"""The Segmenter: one backbone, one embedding cache and one settings object, reused across runs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..backbones.base import Backbone
from ..backbones.cpu_runtime import single_threaded_blas
from ..embedding_cache import DecodeCache, EmbeddingCache
from ..errors import FoBInputError
from ..geometry import SliceView, Volume, occupied_slices, validate_image_content, validate_volume
from ..settings import DEFAULT_SETTINGS, SegmenterSettings
from . import protocols
from .embedding import Embedder
from .inputs import check_mask, check_segment_call, check_slice_range, check_volume as _check_volume
from .ring_structures import check_wall_rule, draw_walls, split_ring, wall_thickness
from .run import QueryRun, SegmentationResult
from .slice_prompting import ContrastPrompter, SlicePredictor
from .support import Support, _chosen_slices, prepare_support


class Segmenter:
    """Segment a structure through a volume from one or a few annotated slices.

    ``backbone``: a name (``litemedsam``, the embedded default; ``sam_vit_b`` / ``_l`` / ``_h``,
    downloaded on first use; ``medsam_vit_b``, a local checkpoint) or a built
    :class:`~FoBSegmentLib.backbones.base.Backbone`.  ``device``: ``auto``, ``cpu`` or ``cuda``.
    ``cache_dir``: where checkpoints, slice embeddings and decoded masks are kept between runs
    (None: memory only).  ``settings``: a :class:`~FoBSegmentLib.settings.SegmenterSettings`.
    ``start_prompter``: how a slice without a segmented neighbour is prompted (default: the
    training-free background contrast; research code may pass the learned generator).
    """

    def __init__(self, backbone: str | Backbone = "litemedsam", device: str = "auto", checkpoint=None,
                 cache_dir=None, settings: SegmenterSettings = DEFAULT_SETTINGS, start_prompter=None,
                 batch_size: int | None = None, download_progress=None, is_cancelled=None):
        if not isinstance(settings, SegmenterSettings):
            raise FoBInputError(f"settings must be a SegmenterSettings, not {type(settings).__name__}.")
        from ..checkpoints import check_cache_dir

        check_cache_dir(cache_dir)
        if not isinstance(backbone, Backbone):
            from ..backbones import create_backbone

            backbone = create_backbone(backbone, device, checkpoint, cache_dir, download_progress, is_cancelled)
        self.backbone, self.settings = backbone, settings
        self.cache = EmbeddingCache(cache_dir, settings.memory_cache_mb, disk_mb=settings.embedding_cache_disk_mb)
        self.embedder = Embedder(backbone, self.cache, batch_size)
        self.start_prompter = start_prompter or ContrastPrompter(backbone, settings)
        self.decoded = DecodeCache(cache_dir, disk_mb=settings.decode_cache_disk_mb) if settings.decode_cache else None
        self.predictor = SlicePredictor(backbone, settings, self.start_prompter, self.decoded)

    def with_settings(self, settings: SegmenterSettings | None = None, **changes) -> "Segmenter":
        """A Segmenter with other settings sharing this one's backbone and caches (no slice is
        encoded again).  ``changes`` by dotted name: ``with_settings(**{"walk.pad_px": 6})``."""
        settings = (settings or self.settings).with_changes(**changes) if changes else (settings or self.settings)
        other = object.__new__(Segmenter)
        other.backbone, other.settings, other.cache = self.backbone, settings, self.cache
        other.decoded = self.decoded if settings.decode_cache else None
        other.embedder = Embedder(self.backbone, self.cache, self.embedder.batch_size)
        contrast = isinstance(self.start_prompter, ContrastPrompter)
        other.start_prompter = ContrastPrompter(self.backbone, settings) if contrast else self.start_prompter
        other.predictor = SlicePredictor(self.backbone, settings, other.start_prompter, other.decoded)
        return other

    @property
    def encoded_count(self) -> int:
        """Slices encoded by this Segmenter so far (the rest came from the cache)."""
        return self.embedder.encoded_count

    @property
    def prompt_source(self) -> str:
        return self.start_prompter.name

    def prepare_support(self, support: Volume, support_mask: np.ndarray, support_slices=None,
                        on_encoded=None) -> Support:
        return prepare_support(self.embedder, support, support_mask, support_slices, on_encoded)

    def prepare(self, volume: Volume, progress=None, is_cancelled=None, slice_range=None) -> int:
        """Encode every slice of ``volume`` (or of ``slice_range``) into the cache, so that a
        later :meth:`segment` on it only decodes.  ``progress(done, total)`` after every slice;
        ``is_cancelled()`` polled after every slice.  Returns the number of slices encoded
        (0 when everything was cached already)."""
        from ..errors import CancelledError
        from ..preprocessing import fit_normalisation

        _check_volume(volume, "volume")
        validate_volume(volume, "volume")
        stack = SliceView.for_volume(volume).to_stack(volume.array)
        lo, hi = check_slice_range(slice_range, volume)
        norm = fit_normalisation(volume.array)
        before = self.encoded_count
        total = hi - lo + 1
        for n, i in enumerate(range(lo, hi + 1), 1):
            if is_cancelled is not None and is_cancelled():
                raise CancelledError("Preparation cancelled; the slices encoded so far stay cached.")
            self.embedder.embed(stack, norm, [i])
            if progress is not None:
                progress(n, total)
        return self.encoded_count - before

    # ---------------------------------------------------------------- volume
    @single_threaded_blas
    def segment(self, query: Volume, support: Volume | None, support_mask: np.ndarray, support_slices=None,
                slice_range=None, query_slices=None, progress=None, is_cancelled=None,
                holes: str = "auto") -> SegmentationResult:
        """Segment the structure annotated in ``support_mask`` (on ``support``; None: the
        query itself) through ``query``.

        ``support_slices``: which annotated slices to use (default: all).  ``slice_range``:
        (first, last) slices of the query to consider.  ``query_slices``: the evaluation
        oracle (protocol EP1): exactly these slices are segmented and nothing is decided.
        ``progress(done, total)`` is called after every segmented slice; ``is_cancelled()``
        is polled after every encoded or decoded slice and raises ``CancelledError``.
        ``holes='auto'``: a support mask enclosing holes (a wall around a cavity) is segmented
        as a ring structure; ``'off'`` never."""
        support_mask, support_slices, slice_range, query_slices = check_segment_call(
            query, support, support_mask, support_slices, slice_range, query_slices)
        sup_vol = query if support is None else support
        m = support_mask > 0
        if holes != "off" and m.shape == sup_vol.array.shape and m.any():
            s_view = SliceView.for_volume(sup_vol)
            ms = s_view.to_stack(m)
            hole = split_ring(ms, self.settings.ring.hole_ratio)
            if hole is not None:
                return self._segment_ring(query, support, s_view, ms, hole, support_slices, slice_range,
                                          query_slices, progress, is_cancelled)
        return self._segment_structure(query, support, support_mask, support_slices, slice_range, query_slices,
                                       progress, is_cancelled)

    def segment_atlas(self, query: Volume, supports, rule: str | None = None, slice_range=None, query_slices=None,
                      progress=None, is_cancelled=None, holes: str = "auto") -> SegmentationResult:
        """Segment ``query`` from several annotated support patients (an atlas): one run of
        :meth:`segment` per support, then the masks fused by ``rule`` (default
        ``settings.atlas.fusion``, ``consensus``: the run that agrees best with the others;
        ``vote``: kept where at least half of the runs agree; see :mod:`.atlas`).

        ``supports``: ``[(support volume, support mask), ...]`` or ``(volume, mask,
        support_slices)`` triples, each annotated on another patient than the query.
        ``result.supports``: each support's run's Dice to the fused mask, and ``unlike_others``
        where it is far below the others'.  Progress runs over all the runs."""
        from .atlas import check_supports, fused_result

        started = (time.perf_counter(), self.encoded_count)
        _check_volume(query, "query")
        check_slice_range(slice_range, query)  # before any support's run
        rule = rule or self.settings.atlas.fusion
        triples = check_supports(query, supports, rule)
        n = len(triples)

        def run_progress(j):
            if progress is None:
                return None
            return lambda done, total: progress(j * total + done, n * total)

        runs = []
        for j, (vol, mask, slices) in enumerate(triples):
            try:
                runs.append(self.segment(query, vol, mask, support_slices=slices, slice_range=slice_range,
                                         query_slices=query_slices, progress=run_progress(j),
                                         is_cancelled=is_cancelled, holes=holes))
            except FoBInputError as e:
                raise FoBInputError(f"Atlas support {j + 1}: {e}") from None
        res = fused_result(query, runs, rule, self.settings.atlas)
        res.slices_encoded = self.encoded_count - started[1]
        res.seconds = time.perf_counter() - started[0]
        return res

    def _segment_structure(self, query, support, support_mask, support_slices=None, slice_range=None,
                           query_slices=None, progress=None, is_cancelled=None) -> SegmentationResult:
        """One compact structure: prepare the support, then visit the query by its protocol."""
        started = (time.perf_counter(), self.encoded_count)
        validate_volume(query, "query image")
        validate_image_content(query, "query image")
        if support is not None and support is not query:
            validate_image_content(support, "support image")
        same = support is None or query.is_same_image(support)
        run = QueryRun(self, query, slice_range, progress, is_cancelled, started)
        sup = self.prepare_support(query if support is None else support, support_mask, support_slices,
                                   on_encoded=lambda _n: run.heartbeat())
        if query_slices is not None:
            protocols.oracle_slices(run, sup, query_slices)
        elif same:
            protocols.same_volume(run, sup, support_mask)
        else:
            protocols.other_patient(run, sup)
        return run.result_volume()

    def refine(self, query: Volume, previous_mask: np.ndarray, corrected_mask: np.ndarray, support: Volume | None = None,
               support_mask: np.ndarray | None = None, slice_range=None, progress=None, is_cancelled=None,
               agree: float = 0.9) -> SegmentationResult:
        """Redo the walk from the slices where ``corrected_mask`` (the user's edit of a result)
        differs from ``previous_mask`` (that result), keeping every edited slice exactly as the
        user left it (see :mod:`.refine`).  ``support`` / ``support_mask``: the original
        support (default: the corrected slices on the query).  A slice's walk stops where its
        mask agrees with the previous one to Dice ``agree``.  Costs decoding only when the
        query's embeddings are cached.  ``result.slice_info`` lists the recomputed slices."""
        from . import refine as rf

        started = (time.perf_counter(), self.encoded_count)
        _check_volume(query, "query")
        if support is not None:
            _check_volume(support, "support")
        if support is not None and support_mask is not None:
            support_mask = check_mask(support_mask)
        slice_range = check_slice_range(slice_range)
        view, prev, corr = rf.to_stacks(query, previous_mask, corrected_mask)
        anchors = rf.edited_slices(prev, corr)
        run = QueryRun(self, query, slice_range, progress, is_cancelled, started)
        run.out[:] = corr
        if not anchors:
            return run.result_volume()
        if support is None or support_mask is None:
            support, support_mask = query, view.from_stack(rf.support_from_corrections(corr, anchors))
        if split_ring(view.to_stack(np.asarray(corrected_mask) > 0), self.settings.ring.hole_ratio) is not None:
            raise FoBInputError("Refine does not handle ring-shaped structures (a wall around a cavity) yet: "
                                "correct the slices by hand, or paint more support slices and segment again.")
        sup = self.prepare_support(support, support_mask, None, on_encoded=lambda _n: run.heartbeat())
        run.total = len(anchors)
        rf.refine_run(run, sup, prev, corr, [a for a in anchors if run.lo <= a <= run.hi], agree)
        res = run.result_volume()
        res.slices_segmented = len(occupied_slices(run.out))
        return res

    def _segment_ring(self, query, support, s_view, ms, hole, support_slices, slice_range, query_slices,
                      progress, is_cancelled) -> SegmentationResult:
        """A wall around a cavity: segment the cavity, then draw the wall around it at about the
        support's thickness (``settings.ring``)."""
        check_wall_rule(self.settings.ring)
        t0, enc0 = time.perf_counter(), self.encoded_count
        chosen = _chosen_slices(support_slices, occupied_slices(ms), ms.shape[0])
        hole_sup = [i for i in chosen if hole[i].any()]
        if support_slices and not hole_sup:
            raise FoBInputError(f"Support slice(s) {support_slices} show no cavity inside the ring-shaped structure; "
                                "choose slices where the wall encloses it.")
        inner = self._segment_structure(query, support, s_view.from_stack(hole), hole_sup, slice_range,
                                        query_slices, progress, is_cancelled)
        t_mm = wall_thickness(ms, hole, hole_sup, self.settings.ring.default_thickness_px, s_view.pixel_spacing)
        view, out = draw_walls(query, inner, t_mm, self.settings.ring)
        if support is None or support is query:  # the user's own annotation stays exactly as drawn
            for i in occupied_slices(ms):
                out[i] = ms[i]
        inner.mask = np.ascontiguousarray(view.from_stack(out))
        inner.prompt_strategy += "+ring"
        inner.slices_segmented = len(occupied_slices(out))
        inner.slices_encoded = self.encoded_count - enc0
        inner.seconds = time.perf_counter() - t0
        return inner


def default_weights(backbone_name: str) -> Path | None:
    """The FoB generator weights shipped for a backbone (research use), or None."""
    p = Path(__file__).resolve().parents[1] / "weights" / f"fob_{backbone_name}.pt"
    return p if p.is_file() else None
