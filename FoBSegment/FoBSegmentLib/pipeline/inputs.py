"""What a caller hands the Segmenter, checked before any work: a clear input error instead of a
traceback from deep inside, and no silent reading of something else than what was meant."""

from __future__ import annotations

import numbers

import numpy as np

from ..errors import FoBInputError
from ..geometry import SliceView, Volume


def check_volume(v, what: str) -> None:
    if not isinstance(v, Volume):
        raise FoBInputError(
            f"The {what} must be a FoBSegmentLib Volume (got {type(v).__name__}): read files with "
            "FoBSegmentLib.read_volume(path), or wrap an array with Volume(array, spacing, origin, direction)."
        )
    kind = np.asarray(v.array).dtype
    if kind == bool or not (np.issubdtype(kind, np.integer) or np.issubdtype(kind, np.floating)):
        raise FoBInputError(f"The {what} holds {kind} voxels; FoBSegment needs a grey-level image (integer or "
                            "floating-point voxels).")


def check_mask(mask, what: str = "support mask") -> np.ndarray:
    """A mask of one structure as an array: any voxel > 0 is the structure.  A label map of
    several structures is refused: uniting them would be a silent wrong answer."""
    if mask is None:
        raise FoBInputError(f"No {what} given: pass the annotation, an array on the image's grid (> 0 = structure).")
    m = np.asarray(mask)
    if m.dtype == object or not (m.dtype == bool or np.issubdtype(m.dtype, np.number)):
        raise FoBInputError(f"The {what} must be a numeric or boolean array (got {m.dtype}).")
    if np.issubdtype(m.dtype, np.integer):
        values = np.unique(m[m > 0])
        if values.size > 1:
            shown = ", ".join(str(int(x)) for x in values[:8])
            raise FoBInputError(f"The {what} holds several labels ({shown}): pass one structure, e.g. "
                                f"labels == {int(values[0])}.")
    return m


def check_slices(slices, what: str) -> list[int] | None:
    """Slice numbers (a list of whole numbers) or None."""
    if slices is None:
        return None
    if isinstance(slices, (str, bytes, numbers.Number)) or not hasattr(slices, "__iter__"):
        raise FoBInputError(f"{what} must be a list of slice numbers such as [12, 18, 24] (got {slices!r}).")
    out = []
    for s in slices:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or float(s) != int(s):
            raise FoBInputError(f"{what} must be whole slice numbers (got {s!r}).")
        out.append(int(s))
    return out


def check_slice_range(slice_range, query: Volume | None = None) -> tuple[int, int] | None:
    """(first, last) as two whole numbers, or None.  With ``query``: checked against its slices
    (acquisition axis) -> the first and last slice a run on it covers (all of them for None)."""
    if slice_range is not None:
        if isinstance(slice_range, (str, bytes)) or not hasattr(slice_range, "__len__") or len(slice_range) != 2:
            raise FoBInputError(f"slice_range must be (first, last), two slice numbers (got {slice_range!r}).")
        slice_range = tuple(check_slices(slice_range, "slice_range"))
    if query is None:
        return slice_range
    return slice_bounds(slice_range, SliceView.for_volume(query).n_slices(query))


def slice_bounds(slice_range, n: int) -> tuple[int, int]:
    """(first, last) of a volume of ``n`` slices: ``slice_range`` checked, or all of them."""
    if slice_range is None:
        return 0, n - 1
    a, b = int(slice_range[0]), int(slice_range[1])
    if a > b:
        raise FoBInputError(f"Slice range {a}:{b} runs backwards: give the first slice first ({b}:{a}).")
    if not (0 <= a <= b < n):
        raise FoBInputError(
            f"Slice range {a}:{b} is outside the query image, which has {n} slices along its "
            f"acquisition axis (valid: 0:{n - 1})."
        )
    return a, b


def check_query_slices(query_slices, n: int) -> list[int] | None:
    """The oracle's slices: at least one, each on the query (0 to ``n`` - 1)."""
    qs = check_slices(query_slices, "query_slices")
    if qs is None:
        return None
    if not qs:
        raise FoBInputError("query_slices is empty: give the slices to segment, or None to let the pipeline decide.")
    bad = sorted({s for s in qs if not 0 <= s < n})
    if bad:
        raise FoBInputError(f"query_slices {bad} are outside the query, which has {n} slices along its acquisition "
                            f"axis (0 to {n - 1}).")
    return qs


def check_segment_call(query, support, support_mask, support_slices, slice_range, query_slices):
    """Everything :meth:`Segmenter.segment` is given -> (mask, support slices, slice range, query
    slices), each checked and in the form the pipeline uses."""
    check_volume(query, "query")
    if support is not None:
        check_volume(support, "support")
    if query_slices is not None:
        query_slices = check_query_slices(query_slices, SliceView.for_volume(query).n_slices(query))
    return (check_mask(support_mask), check_slices(support_slices, "support_slices"), check_slice_range(slice_range),
            query_slices)
