"""FoB's background prototypes used without training: how much a region looks like the
support's structure rather than what borders it, and where on a slice that region is."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..backbones.base import resize
from ..preprocessing import side_of_midline, solidity
from ..settings import WORK_SIZE, ContrastSettings, PresenceSettings, SeedSettings

# The surroundings band: 4-12 px outside the mask on the 256 grid.
BAND_INNER_PX, BAND_OUTER_PX = 4, 12


def prototypes(embedding: np.ndarray, mask_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(256, 64, 64) embedding and (256, 256) mask -> (structure, surroundings) prototypes (256,):
    the masked mean of the embedding, and its mean over the band around the mask."""
    # City-block distance = what 4 and 12 dilations with the 3x3 cross reach; 100x cheaper,
    # which matters since every seed candidate needs its surroundings.
    d = ndimage.distance_transform_cdt(~np.asarray(mask_sq, bool), metric="taxicab")
    band = (d > BAND_INNER_PX) & (d <= BAND_OUTER_PX)
    return _pool(embedding, mask_sq), _pool(embedding, band)


def _pool(embedding, mask_sq):
    """Mean of the embedding weighted by the mask's coverage of each embedding cell."""
    grid = embedding.shape[-1]
    cell = mask_sq.shape[-1] // grid
    w = np.asarray(mask_sq, np.float32).reshape(grid, cell, grid, cell).mean((1, 3), dtype=np.float32)
    return embedding.reshape(embedding.shape[0], -1) @ w.reshape(-1) / max(float(w.sum()), 1e-6)


def cosine(a, b) -> float:
    """Cosine similarity of two prototypes (256,)."""
    return float(a @ b) / max(float(np.linalg.norm(a)) * float(np.linalg.norm(b)), 1e-8)


def _unit(a, axis=0):
    return a / np.maximum(np.linalg.norm(a, axis=axis, keepdims=True), 1e-12)


def prototype_contrast(embedding, mask_sq, anchor) -> float:
    """cos(region, structure prototype) - cos(region, surroundings prototype): positive while
    the region still looks like the annotated structure, negative once SAM has settled on a
    neighbour.  ``anchor``: a support slice or a (structure, surroundings) pair."""
    fg, bg = anchor if isinstance(anchor, tuple) else (anchor.proto_fg, anchor.proto_bg)
    if fg is None or not mask_sq.any():
        return 0.0
    f = _pool(embedding, mask_sq)
    return cosine(f, fg) - cosine(f, bg)


def surroundings_likeness(embedding, mask_sq, anchor) -> float:
    """cos(band around the region, band around the support's structure): what borders a
    region tells look-alike organs apart."""
    return cosine(prototypes(embedding, mask_sq)[1], anchor.proto_bg)


def contrast_map(embedding: np.ndarray, anchor) -> np.ndarray:
    """Per-pixel prototype contrast (256, 256) on the work grid."""
    en = _unit(embedding.reshape(embedding.shape[0], -1))
    c = _unit(anchor.proto_fg) @ en - _unit(anchor.proto_bg) @ en
    return resize(c.reshape(embedding.shape[1:]).astype(np.float32), (WORK_SIZE, WORK_SIZE))


def contrast_region(embedding, anchor, settings: ContrastSettings) -> np.ndarray | None:
    """Where the structure is on a slice with no neighbour to follow -> (256, 256) bool or None:
    the best of :func:`contrast_regions`."""
    regions = contrast_regions(embedding, anchor, settings, 1)
    return regions[0] if regions else None


def contrast_regions(embedding, anchor, settings: ContrastSettings, count: int) -> list:
    """The ``count`` best places of a slice for the structure -> [(256, 256) bool], best first,
    none covering half of another.

    Candidates are the connected regions of positive contrast cut at several levels: at the
    lowest, an organ touching a look-alike (spleen and left kidney) merges with it into one
    region whose centre lies between the two; a higher level splits them.  A candidate scores
    its total contrast, discounted by its distance from where the support has the structure,
    times how much its surroundings look like the support's.  A merged region outscores each
    of its parts (more contrast in total, and its border runs along neither organ's
    neighbour), so where a higher level splits the best region into sizeable parts
    (``split_fraction``), the best part is the structure."""
    cm = contrast_map(embedding, anchor)
    cy, cx = ndimage.center_of_mass(anchor.mask_sq)
    candidates = []  # (level index, region, score)
    for li, level in enumerate(settings.levels):
        above = cm > level
        lab, n = ndimage.label(above)
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        sums = ndimage.sum(cm, lab, idx)
        centres = np.array(ndimage.center_of_mass(above, lab, idx)).reshape(-1, 2)
        score = sums * np.exp(-np.hypot(centres[:, 0] - cy, centres[:, 1] - cx) / settings.position_sigma_px)
        for k in np.argsort(-score)[:settings.per_level]:
            if score[k] <= 0:
                break
            region = lab == idx[k]
            total = float(score[k]) * float(np.exp(settings.context_weight
                                                   * surroundings_likeness(embedding, region, anchor)))
            candidates.append((li, region, total))
    out = []
    while candidates and len(out) < count:
        best = max(candidates, key=lambda c: c[2])
        if settings.split_fraction is not None:
            best = _split(best, candidates, settings.split_fraction)
        out.append(best[1])
        candidates = [c for c in candidates if not _same_place(c[1], best[1])]
    return out


def _same_place(a, b) -> bool:
    both = (a & b).sum()
    return both >= 0.5 * a.sum() or both >= 0.5 * b.sum()


def _split(best, candidates, fraction: float):
    """The best part of ``best`` at the first higher level that cuts it into two or more parts
    of at least ``fraction`` of its area each; ``best`` itself where none does."""
    li, region, _ = best
    area = region.sum()
    for level in sorted({c[0] for c in candidates if c[0] > li}):
        parts = [c for c in candidates if c[0] == level and (c[1] & region).sum() >= fraction * area]
        if len(parts) >= 2:
            return max(parts, key=lambda c: c[2])
    return best


def seed_score(embedding, mask_sq, iou: float, anchor, presence: PresenceSettings, contrast: ContrastSettings,
               seed: SeedSettings, body: tuple | None = None) -> float:
    """How clearly a slice shows the support's structure: SAM's predicted IoU x prototype
    contrast x exp(w * (surroundings likeness - 1)); 0 where the mask is too small or SAM
    unsure; for a support that is a crescent on every slice, x the likeness of the mask's
    solidity to the support's (``seed.shape_width``, ``seed.shape_max_solidity``).
    ``body``: (midline column, half-width) of the query's body on the work grid, for the side
    prior."""
    if mask_sq.sum() < presence.min_area_px or iou < presence.min_iou:
        return 0.0
    c = prototype_contrast(embedding, mask_sq, anchor)
    context = surroundings_likeness(embedding, mask_sq, anchor)
    score = max(0.0, iou * c) * float(np.exp(contrast.context_weight * (context - 1.0)))
    if (seed.shape_width > 0 and len(anchor.siblings) >= seed.shape_min_slices
            and anchor.most_solid < seed.shape_max_solidity):
        # a crescent (the RV) is not a disc (the LV blood pool) however alike inside
        score *= float(np.exp(-((solidity(mask_sq) - anchor.solidity) / seed.shape_width) ** 2))
    if body is not None and abs(anchor.side) > seed.side_min:
        side = side_of_midline(mask_sq, body)
        if side * anchor.side < 0 and abs(side) > seed.side_min:
            score *= seed.side_penalty
    return score
