"""The annotated support: its slices, embeddings and prototypes."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..backbones.base import slice_to_square
from ..errors import FoBInputError
from ..geometry import SliceView, Volume, occupied_slices, validate_volume
from ..preprocessing import body_columns, fit_normalisation, side_of_midline, solidity
from .contrast import prototypes


@dataclass
class SupportSlice:
    """One annotated slice as the pipeline uses it."""

    index: int  # slice index in the support stack
    rel: float  # relative position within the annotated extent, 0..1
    embedding: np.ndarray  # (256, 64, 64) float32
    mask_sq: np.ndarray  # (256, 256) bool on the work grid
    proto_fg: np.ndarray  # (256,) what the structure looks like
    proto_bg: np.ndarray  # (256,) what its immediate surroundings look like
    side: float = 0.0  # centroid's offset from the patient's midline, in body half-widths (+ = display right)
    # Every slice of the same support, this one included: whether the structure is a crescent
    # on each (seed.shape_max_solidity).
    siblings: tuple = field(default=(), repr=False, compare=False)

    @cached_property
    def solidity(self) -> float:
        """Area over convex hull area of the mask (``preprocessing.solidity``, ~10 ms), computed
        when the shape prior first asks: a same-volume run never does."""
        return solidity(self.mask_sq)

    @property
    def most_solid(self) -> float:
        """The largest solidity among this support's slices: below ``seed.shape_max_solidity``
        the structure is a crescent on every annotated slice."""
        return max(x.solidity for x in self.siblings)


@dataclass
class Support:
    """Every support slice of one structure, and where the annotation lies."""

    slices: list  # [SupportSlice], in slice order
    view: SliceView  # the support volume's slice view
    annotated: list  # every annotated slice index of the support stack

    def nearest_index(self, index: int) -> SupportSlice:
        """The support slice closest to ``index`` (same volume)."""
        return min(self.slices, key=lambda s: abs(s.index - index))

    def nearest_rel(self, rel: float) -> SupportSlice:
        """The support slice at the closest relative position within its extent (another volume)."""
        return min(self.slices, key=lambda s: abs(s.rel - rel))

    def central(self) -> SupportSlice:
        return self.nearest_rel(0.5)


def prepare_support(embedder, support: Volume, support_mask: np.ndarray, support_slices=None,
                    on_encoded=None) -> Support:
    """Validate the support and embed its chosen slices (default: every annotated slice)."""
    validate_volume(support, "support image")
    mask = np.asarray(support_mask)
    if mask.shape != support.array.shape:
        raise FoBInputError(
            f"The support mask has shape {mask.shape} but the support image has {support.array.shape}; "
            "the mask must be drawn on the support image's grid."
        )
    view = SliceView.for_volume(support)
    stack, mstack = view.to_stack(support.array), view.to_stack(mask > 0)
    annotated, chosen = _annotated_and_chosen(mstack, support_slices)
    norm = fit_normalisation(support.array)
    embs = embedder.embed(stack, norm, chosen, on_encoded=on_encoded)
    body = body_columns(stack, norm)
    lo, hi = annotated[0], annotated[-1]
    slices = []
    for i in chosen:
        msq = slice_to_square(mstack[i]) > 0.5
        if not msq.any():  # a structure smaller than one work-grid pixel
            msq = slice_to_square(mstack[i]) > 0
        rel = 0.5 if hi == lo else (i - lo) / (hi - lo)
        slices.append(SupportSlice(i, rel, embs[i], msq, *prototypes(embs[i], msq),
                                   side=side_of_midline(mstack[i], body)))
    every = tuple(slices)
    for sl in slices:
        sl.siblings = every
    return Support(slices, view, annotated)


def check_support_slices(support: Volume, support_mask: np.ndarray, support_slices=None) -> list:
    """The support slices a run will use (default: every annotated one), checked without
    encoding anything, so that a command can refuse a bad choice before building a model."""
    view = SliceView.for_volume(support)
    return _annotated_and_chosen(view.to_stack(np.asarray(support_mask) > 0), support_slices)[1]


def _annotated_and_chosen(mstack: np.ndarray, support_slices) -> tuple[list, list]:
    annotated = occupied_slices(mstack)
    if not annotated:
        raise FoBInputError("The support mask is empty: paint the structure on at least one slice of the "
                            "support image.")
    return annotated, _chosen_slices(support_slices, annotated, mstack.shape[0])


def _chosen_slices(support_slices, annotated: list, n: int) -> list:
    if not support_slices:
        return annotated
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
            f"{ranges_text(annotated)}."
        )
    return sorted({int(s) for s in support_slices})


def ranges_text(idx) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    idx = sorted(idx)
    out, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)
