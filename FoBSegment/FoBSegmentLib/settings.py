"""Every tunable of the volume pipeline, in one frozen object.

``Segmenter(backbone, settings=...)`` takes a :class:`SegmenterSettings`; a variant is
``dataclasses.replace(DEFAULT_SETTINGS, ...)`` or :func:`SegmenterSettings.with_changes`
with dotted names (``"walk.pad_px"``).  Each field says what it does and where its default
was measured; the figures live in the benchmark pages under ``docs/benchmarks/``, not here.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

from .errors import FoBInputError

#: Side of the square grid on which masks, boxes and generator heatmaps live (every backbone).
WORK_SIZE = 256
#: Background ring radii of the FoB paper at the 256 grid (docs/method.md section 2, BPPC).
RING_OUTER_PX, RING_INNER_PX = 10.0, 7.0
#: The box enclosed by a ring is shrunk by the ring's mean distance from the structure.
RING_MARGIN_PX = 0.5 * (RING_OUTER_PX + RING_INNER_PX)


@dataclass(frozen=True)
class PresenceSettings:
    """Is the structure on this slice?  Decides where the walk stops (``pipeline.walk``)."""

    #: A mask smaller than this (work-grid pixels) is empty.
    min_area_px: int = 6
    #: Fraction of a mask that must lie within 6 px of the neighbour kept before it (3D connectivity).
    min_overlap: float = 0.5
    #: SAM's predicted IoU below which the mask is not trusted.
    min_iou: float = 0.45
    #: Absolute floor of prototype contrast: below it the region no longer looks like the support.
    #: Chosen on training-fold cases (CHAOS 1, 10; MS-CMRSeg 1) and the example CT.
    min_contrast: float = 0.1
    #: Fraction of this structure's typical contrast in this run below which a slice is dropped.
    rel_contrast: float = 0.5
    #: A mask more than this times the neighbour's area (+ 50 px) has leaked into a neighbour organ.
    max_growth: float = 4.0
    #: Dilation (px) of the neighbour's mask within which a component counts as connected.
    near_px: int = 6


@dataclass(frozen=True)
class ContrastSettings:
    """Training-free localisation by FoB's background prototypes (``pipeline.contrast``)."""

    #: Contrast levels at which candidate regions are cut (docs/benchmarks/default_settings.md,
    #: row "one contrast level").
    levels: tuple = (0.0, 0.1, 0.2)
    #: Weight w of the surroundings' likeness exp(w * cosine) in region and seed choice
    #: (docs/benchmarks/default_settings.md, rows "no surroundings", "surroundings weight 6 / 14").
    context_weight: float = 10.0
    #: Within one slice, a region is discounted by exp(-d / sigma) with d its distance (px) from
    #: where the support has the structure (left and right kidney look alike).
    position_sigma_px: float = 40.0
    #: Candidate regions kept per contrast level.
    per_level: int = 5
    #: Margin (px) of the box drawn around the chosen region.
    box_pad_px: float = 2.0
    #: Where a higher contrast level cuts the chosen region into parts of at least this
    #: fraction of its area each, the best part is taken instead (None: never; measured in
    #: docs/benchmarks/benchmark_all_supports.md against the previous version's figures).
    split_fraction: float | None = 0.2


@dataclass(frozen=True)
class SeedSettings:
    """Where to start on another patient's volume, over its whole slice range or over the slices
    the evaluation protocol EP1 gives (``pipeline.seed``)."""

    #: The whole-volume search visits about this many evenly spaced slices, then the neighbours
    #: of the best (every slice of a volume up to twice as long).
    scan_slices: int = 40
    #: Discount regions across the body's midline from the support's structure
    #: (docs/benchmarks/benchmark_all_supports.md; row "no side prior" of default_settings.md).
    side_prior: bool = True
    #: The support's structure must lie this many body half-widths off the midline for the prior.
    side_min: float = 0.15
    #: Score factor of a region on the other side.
    side_penalty: float = 0.1
    #: Places scored per scanned slice: the start prompter's region and, with more than 1, the
    #: next best contrast regions elsewhere on the slice.  2 finds structures a look-alike
    #: outscores everywhere (CHAOS EP1 0.827 -> 0.833) but seeds MS-CMRSeg's RV on the LV
    #: blood pool (0.865 -> 0.860): docs/benchmarks/benchmark_all_supports_two_places_per_slice.md.
    regions: int = 1
    #: A seed's score is multiplied by exp(-((its solidity - the support's) / this) ** 2)
    #: (area over convex hull area: the RV's crescent 0.75, the LV blood pool 0.98); 0 = off.
    #: Applied to every support it tells MS-CMRSeg's RV from the blood pool (EP1 0.873 -> 0.876)
    #: but a liver's shape varies too much from slice to slice (CHAOS 0.827 -> 0.811:
    #: docs/benchmarks/benchmark_all_supports_shape_prior.md), so only crescents get it.
    shape_width: float = 0.15
    #: The shape prior applies only to a support of ``shape_min_slices`` or more slices, every
    #: one less solid than this: a crescent on every annotated slice, whose shape is its signature.
    #: The most solid of the three ep1 support slices is 0.73-0.88 for MS-CMRSeg's RVs and
    #: 0.875-0.99 for CHAOS's organs (the least: patient 19's spleen): 0.87 gives the prior to
    #: 13 of the 15 RV supports (0.85: 12, not patient 9's, whose runs then miss patients 2's
    #: and 10's RVs) and to no CHAOS support (benchmark_all_supports.md).
    shape_max_solidity: float = 0.87
    #: Support slices needed before their shape counts: one or two cannot tell (a liver's
    #: single slices run from solidity 0.71 to 0.94).
    shape_min_slices: int = 3
    #: Seeds walked on another patient's volume, each on a different structure
    #: (docs/benchmarks/seed_walks.md, benchmark_all_supports.md).
    walks: int = 2
    #: The walk from the clearest seed is kept unless another holds this many times its
    #: evidence (``seed.walked_evidence``).
    walk_margin: float = 1.5
    #: A walk's evidence is multiplied by exp(this x how much more the support agrees with it
    #: than with the first walk, ``seed.support_agreement``); 0 = evidence alone
    #: (``seed.walk_strength``, docs/benchmarks/seed_walks.md).
    agreement_weight: float = 4.0
    #: Agreement gaps up to this leave the evidence alone: walks on different structures differ
    #: by 0.08-0.26 where the agreement changes CHAOS's choice, two walks of MS-CMRSeg patient
    #: 10's blood pool (one past the apex) by 0.02.
    agreement_min_gap: float = 0.05
    #: A walk whose kept masks overlap the first walk's by this 3D Dice or more lies on the
    #: same structure, and its agreement is not weighed (``seed.walk_overlap``; 1.01 = never).
    #: Recorded walks: the same structure again with one to three end slices more 0.87-0.99,
    #: a part of an organ against all of it up to 0.84, other structures near 0 (seed_walks.md).
    same_structure_dice: float = 0.85


@dataclass(frozen=True)
class WalkSettings:
    """Slice to slice from the seed, each slice prompted from its neighbour (``pipeline.walk``)."""

    #: Margin (px) of the box copied from the neighbouring slice: organs grow from slice to
    #: slice and a tight box clips them (default_settings.md, rows "box margin 2 / 6 px").
    pad_px: float = 4.0
    #: Maximum re-prompts of a propagated slice with the box of SAM's own mask until the box
    #: settles; 0 = the neighbour's box only (docs/benchmarks/settle_box.md, row "no box settling").
    max_settle_prompts: int = 3
    #: A box that moved less than this (px, any side) has settled (docs/benchmarks/settle_box.md).
    settle_tolerance_px: float = 3.0


@dataclass(frozen=True)
class RingStructureSettings:
    """Ring-shaped structures such as the myocardium around the blood pool (``pipeline.ring_structures``)."""

    #: A support whose holes exceed this fraction of its filled area is a ring.
    hole_ratio: float = 0.1
    #: Wall thickness (px) when the support gives none.
    default_thickness_px: float = 5.0
    #: ``image``: the wall's outer edge follows the query's image, sector by sector around the
    #: cavity, between ``wall_least`` and ``wall_most`` times the support's thickness; ``band``:
    #: the support's thickness all round (docs/benchmarks/myocardium.md).
    wall: str = "image"
    #: Nearest the outer edge may come to the cavity, in support thicknesses.
    wall_least: float = 0.6
    #: Farthest the outer edge may go from the cavity, in support thicknesses.
    wall_most: float = 1.4
    #: How far (robust standard deviations) the image may be from the wall's inner part and
    #: still count as wall.
    wall_spread: float = 1.5
    #: Angular sectors around the cavity, each with an outer edge of its own.
    wall_sectors: int = 48
    #: The edges are smoothed by a running median over this many sectors each side.
    wall_smooth: int = 7


@dataclass(frozen=True)
class AtlasSettings:
    """Several support patients for one query (``pipeline.atlas``)."""

    #: How the supports' masks are fused: ``consensus`` (the run that agrees best with the
    #: others) or ``vote`` (docs/benchmarks/atlas.md: consensus is as good or better everywhere).
    fusion: str = "consensus"
    #: A support whose own run agrees with the fused mask (Dice) less than this times the other
    #: supports' median is reported as unlike them (docs/benchmarks/atlas.md, "run-time warning").
    outlier_ratio: float = 0.5


@dataclass(frozen=True)
class SegmenterSettings:
    """All tunables of :class:`FoBSegmentLib.Segmenter`, grouped by pipeline step."""

    presence: PresenceSettings = field(default_factory=PresenceSettings)
    contrast: ContrastSettings = field(default_factory=ContrastSettings)
    seed: SeedSettings = field(default_factory=SeedSettings)
    walk: WalkSettings = field(default_factory=WalkSettings)
    ring: RingStructureSettings = field(default_factory=RingStructureSettings)
    atlas: AtlasSettings = field(default_factory=AtlasSettings)
    #: Largest size (MB) of the in-memory embedding cache (fp16, 2 MB per slice).
    memory_cache_mb: float = 1024.0
    #: Largest size (MB) of the embeddings in the cache folder (2 MB per slice: 10 GB holds
    #: about 17 CTs of 300 slices); the least recently used go first.
    embedding_cache_disk_mb: float = 10240.0
    #: Keep the mask decoder's answers (in memory and in the cache folder), so that a run
    #: repeated with the same inputs decodes nothing; False decodes every prompt (benchmarks
    #: that time the decoder).
    decode_cache: bool = True
    #: Largest size (MB) of the decoded masks in the cache folder (0.25 MB per decoder call);
    #: the least recently used go first.
    decode_cache_disk_mb: float = 2048.0

    def __post_init__(self) -> None:
        check_settings(self)

    def with_changes(self, **changes) -> "SegmenterSettings":
        """A copy with fields changed by dotted name: ``with_changes(**{"walk.pad_px": 6.0})``."""
        groups: dict = {}
        top = {}
        for name, value in changes.items():
            group, _, leaf = name.partition(".")
            known = [f.name for f in dataclasses.fields(self)]
            if group not in known:
                raise FoBInputError(f"Unknown setting {name!r}; the settings are {', '.join(known)}.")
            if leaf:
                sub = getattr(self, group)
                if not dataclasses.is_dataclass(sub) or leaf not in [f.name for f in dataclasses.fields(sub)]:
                    names = ", ".join(f"{group}.{f.name}" for f in dataclasses.fields(sub)) if dataclasses.is_dataclass(
                        sub) else group
                    raise FoBInputError(f"Unknown setting {name!r}; known: {names}.")
                groups.setdefault(group, {})[leaf] = value
            else:
                top[group] = value
        for group, kw in groups.items():
            top[group] = dataclasses.replace(getattr(self, group), **kw)
        return dataclasses.replace(self, **top)


#: Counts of at least one; every other number is at least zero unless signed.
_AT_LEAST_ONE = {"seed.scan_slices", "seed.walks", "seed.regions", "seed.shape_min_slices", "contrast.per_level",
                 "ring.wall_sectors"}
#: Widths that divide: more than zero.
_POSITIVE = {"contrast.position_sigma_px"}
#: Contrasts (cosine differences) may be negative.
_SIGNED = {"presence.min_contrast", "contrast.levels"}
#: Fractions, 0 to 1.
_FRACTIONS = {"presence.min_overlap", "presence.min_iou", "presence.rel_contrast", "seed.side_penalty",
              "contrast.split_fraction", "ring.hole_ratio"}


def check_settings(settings: "SegmenterSettings") -> None:
    """Every field of ``settings`` of its declared kind and in its range, else an input error
    naming the setting (a wrong value would otherwise fail deep inside a run, or silently
    segment nothing)."""
    def leaves(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from leaves(value, f"{f.name}.")
            else:
                yield f"{prefix}{f.name}", str(f.type), value

    for name, kind, value in leaves(settings):
        problem = _problem(name, kind, value)
        if problem:
            raise FoBInputError(f"Setting {name} must be {problem} (got {value!r}).")


def _problem(name: str, kind: str, value) -> str | None:
    """What is wrong with ``value`` for a field declared ``kind`` (None: nothing)."""
    base, optional = kind.split("|")[0].strip(), "None" in kind
    if base.endswith("Settings"):  # a group replaced as a whole
        return None if dataclasses.is_dataclass(value) else f"a {base}"
    if value is None:
        return None if optional else "given (not None)"
    if base == "bool":
        return None if isinstance(value, bool) else "True or False"
    if base == "str":
        return None if isinstance(value, str) else "text"
    items = value if base == "tuple" else (value,)
    if base == "tuple" and (not isinstance(value, tuple) or not value):
        return "a tuple of numbers"
    whole = base == "int"
    for v in items:
        kind_ok = isinstance(v, numbers.Integral if whole else numbers.Real) and not isinstance(v, bool)
        if not kind_ok or not math.isfinite(v):
            return "a whole number" if whole else "a number"
        low = 1 if name in _AT_LEAST_ONE else (-math.inf if name in _SIGNED else 0)
        if v < low or (name in _FRACTIONS and v > 1):
            return f"from {low} to 1" if name in _FRACTIONS else f"at least {low}"
        if name in _POSITIVE and v <= 0:
            return "more than 0"
    return None


DEFAULT_SETTINGS = SegmenterSettings()
