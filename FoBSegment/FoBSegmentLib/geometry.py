"""Volume geometry: the image grid in patient space, the acquisition (slice) axis and the
canonical 2D view of each slice.

Conventions
-----------
``Volume.array`` is indexed ``(k, j, i)`` exactly like ``SimpleITK.GetArrayFromImage`` and
``slicer.util.arrayFromVolume``.  ``spacing`` and ``origin`` are given in ``(i, j, k)`` order
and ``direction`` is the 3 x 3 matrix whose *columns* are the unit vectors of the i, j, k
axes in **LPS** patient coordinates (the ITK / DICOM convention).  The Slicer adapter converts
from RAS (flip the first two rows).

The model sees 2D slices.  A :class:`SliceView` maps a volume to a stack
``(n_slices, rows, cols)`` whose first axis is the acquisition axis and whose in-plane axes
are permuted and flipped into a radiological display orientation (axial: columns toward the
patient's left, rows toward posterior).  Support and query volumes of different patients
(with different direction matrices) therefore present the organ the same way up, which
matters because the prompt generator compares the two.  The view is pure transposes and
flips, so it is exact and reversible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import FoBInputError

# How much larger than both in-plane spacings a spacing must be to call that axis the
# acquisition axis on spacing alone (thick-slice MR, most CT series).
_THICK_SLICE_RATIO = 1.2


@dataclass
class Volume:
    """A 3D scalar image on a grid in patient (LPS) space."""

    array: np.ndarray  # (k, j, i)
    spacing: tuple = (1.0, 1.0, 1.0)  # (i, j, k) mm
    origin: tuple = (0.0, 0.0, 0.0)  # LPS mm of voxel (0, 0, 0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))  # columns: i, j, k axes in LPS
    name: str = ""

    def __post_init__(self):
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shape_ijk(self) -> tuple:
        return tuple(reversed(self.array.shape))

    def same_grid(self, other: "Volume", tol: float = 1e-3) -> bool:
        """True when both volumes sample the same voxels in space."""
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=max(tol, 1e-2))
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def on_lattice_of(self, other: "Volume", tol: float = 0.05) -> bool:
        """True when this volume's voxel centres lie on ``other``'s lattice or on a whole-number
        subdivision of it (Slicer's oversampled segmentation geometry), its axes those of
        ``other`` in any order or sense, and the two overlap: a segmentation drawn on ``other``,
        which may store only its segments' extent.  Not a grid of another image."""
        m = np.linalg.inv(other.ijk_to_lps()) @ self.ijk_to_lps()
        axes, offset = m[:3, :3], m[:3, 3]
        steps = np.abs(axes).max(axis=0)  # per axis of self: its step in other's voxels (1 / k)
        if np.any(steps < 1e-6):
            return False
        if np.abs(np.abs(axes) / steps - np.round(np.abs(axes) / steps)).max() > tol:
            return False  # not an axis-aligned permutation of other's axes
        if np.any(np.round(np.abs(axes) / steps).sum(axis=0) != 1):
            return False
        k = 1.0 / steps
        if np.abs(k - np.round(k)).max() > tol:
            return False  # not a whole-number subdivision
        k = np.round(k)
        # voxel 0 of a k-fold subdivision of other's voxel v is centred at v - 1/2 + 1/(2k)
        order = np.abs(axes).argmax(axis=0)  # other's axis of each of self's axes
        first = np.array([offset[order[a]] for a in range(3)])
        start = first * k + 0.5 * k - 0.5
        if np.abs(start - np.round(start)).max() > tol * k.max():
            return False
        corners = np.array([[i, j, kk, 1.0] for i in (0, self.shape_ijk[0] - 1) for j in (0, self.shape_ijk[1] - 1)
                            for kk in (0, self.shape_ijk[2] - 1)]) @ m.T
        lo, hi = corners[:, :3].min(axis=0), corners[:, :3].max(axis=0)
        return bool(np.all(hi > -0.5) and np.all(lo < np.asarray(other.shape_ijk) - 0.5))

    def is_same_image(self, other: "Volume") -> bool:
        """The same image (not a copy of it): the same object, or the same grid over the same
        voxel memory."""
        return other is self or (self.same_grid(other) and np.shares_memory(self.array, other.array))

    def with_array(self, array: np.ndarray, name: str | None = None) -> "Volume":
        """The same geometry with another voxel array (e.g. a mask)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} != volume shape {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy(), name or self.name)

    def ijk_to_lps(self) -> np.ndarray:
        """4 x 4 homogeneous matrix from (i, j, k) indices to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m


def validate_volume(volume: Volume, what: str = "image") -> None:
    """Reject what the pipeline cannot segment, with a message that says what to do."""
    a = volume.array
    if a.ndim != 3:
        raise FoBInputError(
            f"The {what} is {a.ndim}D (shape {a.shape}); FoBSegment needs a 3D volume. "
            "For a 2D image stack the slices into a volume; for a 4D series (e.g. cine or "
            "multi-echo) extract one 3D frame first."
        )
    if min(a.shape) < 1 or a.size == 0:
        raise FoBInputError(f"The {what} is empty (shape {a.shape}).")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        n_bad = int((~np.isfinite(a)).sum())
        raise FoBInputError(
            f"The {what} contains {n_bad} NaN or infinite voxel(s). Replace them (for example "
            "with the minimum intensity) before segmenting; FoBSegment does not guess a value."
        )
    if not np.all(np.isfinite(volume.direction)) or abs(np.linalg.det(volume.direction)) < 1e-6:
        raise FoBInputError(f"The {what} has a degenerate direction matrix; check its header.")
    if min(volume.spacing) <= 0:
        raise FoBInputError(f"The {what} has a non-positive spacing {volume.spacing}; check its header.")


def validate_image_content(volume: Volume, what: str = "image") -> None:
    """An image with one value everywhere (all zero, a blank export) has nothing to segment."""
    a = volume.array
    if a.size and float(a.max()) == float(a.min()):
        raise FoBInputError(
            f"The {what} has the same value ({float(a.min()):g}) in every voxel: there is nothing to "
            "segment. Check that the right file was chosen and that it was exported with its image data.")


def slice_axis_ijk(volume: Volume) -> int:
    """The acquisition axis as an index into (i, j, k): 0, 1 or 2.

    A clearly thicker spacing marks the slice axis (short-axis cardiac MR, abdominal MR,
    most CT).  With near-isotropic voxels the geometry cannot tell, so we follow the file's
    stacking order (k), which is how scanners and DICOM series store slices.
    """
    sp = np.asarray(volume.spacing)
    order = np.argsort(sp)
    thickest = int(order[-1])
    if sp[thickest] > _THICK_SLICE_RATIO * sp[order[-2]]:
        return thickest
    return 2


def occupied_slices(stack: np.ndarray) -> list[int]:
    """Indices of the slices of a (slices, rows, cols) stack with any non-zero voxel."""
    return [int(i) for i in np.flatnonzero(stack.reshape(stack.shape[0], -1).any(1))]


def within_slices(stack: np.ndarray, bound: np.ndarray, keep=()) -> tuple[np.ndarray, list[int]]:
    """``stack`` (slices, rows, cols) cleared outside the first to last occupied slice of
    ``bound`` (a stack of the same shape), but for the slices in ``keep``, and the occupied
    slices that cleared.  An empty ``bound`` bounds nothing: a structure not found says
    nothing about its neighbour's extent."""
    if stack.shape != bound.shape:
        raise ValueError(f"stack {stack.shape} and bound {bound.shape} differ in shape")
    mine, where = occupied_slices(stack), occupied_slices(bound)
    if not where:
        return stack, []
    outside = [i for i in mine if (i < where[0] or i > where[-1]) and i not in keep]
    if not outside:
        return stack, []
    out = stack.copy()
    out[outside] = 0
    return out, outside


def parse_within(text: str | None) -> dict[str, str]:
    """``rv:lv_bp, ...`` (pairs separated by ``,`` or ``;``) -> {structure kept within: structure
    bounding it}, for :func:`within_slices`."""
    out = {}
    for part in (text or "").replace(";", ",").split(","):
        if not part.strip():
            continue
        pair = [x.strip() for x in part.split(":")]
        if len(pair) != 2 or not all(pair):
            raise FoBInputError(f"A 'within' pair must look like rv:lv_bp (keep rv within lv_bp's first to last "
                                f"slice; got {part.strip()!r}).")
        out[pair[0]] = pair[1]
    return out


def check_within(within: dict, names, who: str, absent: str) -> None:
    """Refuse a pair of ``within`` that names a structure outside ``names`` (``absent``: what
    that means and what to do), keeps a structure within itself, or bounds by a structure that
    is itself bounded (one level of bound).  ``who`` names the option in the message."""
    for name, bound in within.items():
        for n in (name, bound):
            if n not in names:
                raise FoBInputError(f"{who} names {n!r}, which is {absent}")
        if name == bound or bound in within:
            raise FoBInputError(f"{who} {name!r} -> {bound!r}: a structure is kept within another that is not "
                                "itself kept within one.")


# LPS reference directions for (column, row) of the displayed slice, by the patient axis
# that the slice normal is closest to.  Radiological convention.
_DISPLAY_REFS = {
    2: (np.array([1.0, 0, 0]), np.array([0, 1.0, 0])),  # axial: cols -> L, rows -> P
    1: (np.array([1.0, 0, 0]), np.array([0, 0, -1.0])),  # coronal: cols -> L, rows -> I
    0: (np.array([0, 1.0, 0]), np.array([0, 0, -1.0])),  # sagittal: cols -> P, rows -> I
}


@dataclass(frozen=True)
class SliceView:
    """Reversible map between a (k, j, i) array and a (slice, row, col) stack.

    ``perm`` is applied with ``np.transpose`` to the (k, j, i) array; ``flips`` lists the
    stack axes (1 = rows, 2 = cols) then reversed.  Slice order is never flipped so that slice
    indices stay the file's indices along the acquisition axis.
    """

    perm: tuple
    flips: tuple
    slice_axis_ijk: int
    pixel_spacing: tuple  # (row, col) mm
    slice_spacing: float

    @classmethod
    def for_volume(cls, volume: Volume) -> "SliceView":
        s_ijk = slice_axis_ijk(volume)
        in_plane = [a for a in range(3) if a != s_ijk]
        d = volume.direction
        normal = d[:, s_ijk]
        plane = int(np.argmax(np.abs(normal)))
        col_ref, row_ref = _DISPLAY_REFS[plane]
        # Choose which in-plane index axis becomes the column axis by best alignment.
        a, b = in_plane
        score_ab = abs(d[:, a] @ col_ref) + abs(d[:, b] @ row_ref)
        score_ba = abs(d[:, b] @ col_ref) + abs(d[:, a] @ row_ref)
        col_ijk, row_ijk = (a, b) if score_ab >= score_ba else (b, a)
        # (k, j, i) array axis of an ijk axis is 2 - axis.
        perm = (2 - s_ijk, 2 - row_ijk, 2 - col_ijk)
        flips = []
        if d[:, row_ijk] @ row_ref < 0:
            flips.append(1)
        if d[:, col_ijk] @ col_ref < 0:
            flips.append(2)
        sp = volume.spacing
        return cls(perm, tuple(flips), s_ijk, (sp[row_ijk], sp[col_ijk]), sp[s_ijk])

    def to_stack(self, array_kji: np.ndarray) -> np.ndarray:
        """(k, j, i) -> (slice, row, col); a view, no copy."""
        out = np.transpose(array_kji, self.perm)
        for ax in self.flips:
            out = np.flip(out, axis=ax)
        return out

    def from_stack(self, stack: np.ndarray) -> np.ndarray:
        """(slice, row, col) -> (k, j, i); the exact inverse of :meth:`to_stack`."""
        out = stack
        for ax in self.flips:
            out = np.flip(out, axis=ax)
        inv = np.argsort(self.perm)
        return np.transpose(out, inv)

    def n_slices(self, volume: Volume) -> int:
        return volume.array.shape[self.perm[0]]

    def slice_position_mm(self, volume: Volume, index: int) -> float:
        """Signed position of slice ``index`` along the slice normal (mm)."""
        normal = volume.direction[:, self.slice_axis_ijk]
        ijk = np.zeros(3)
        ijk[self.slice_axis_ijk] = index
        p = volume.ijk_to_lps() @ np.append(ijk, 1.0)
        return float(p[:3] @ normal)

    def stack_coords_to_ijk(self, coords: np.ndarray, stack_shape: tuple) -> np.ndarray:
        """(N, 3) continuous (slice, row, col) stack coordinates -> (N, 3) (i, j, k) voxel
        coordinates of the volume (for placing prompts as markups)."""
        c = np.array(coords, dtype=float).reshape(-1, 3)
        for ax in self.flips:
            c[:, ax] = stack_shape[ax] - 1 - c[:, ax]
        kji = np.empty_like(c)
        for t, a in enumerate(self.perm):
            kji[:, a] = c[:, t]
        return kji[:, ::-1]
