"""Reading volumes and support masks, writing results; every failure becomes a clear
``FoBInputError`` and no output file is ever left half-written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FoBInputError
from .files import atomic_write, check_writable_folder, refuse_write_protected, same_file
from .geometry import Volume, validate_volume

# .mhd is refused: its voxels live in a second file that cannot be renamed atomically with it.
LABELMAP_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
# Formats that store a direction matrix only as a rotation (NIfTI's qform/sform is orthonormal).
_ORTHONORMAL_ONLY = (".nii", ".nii.gz")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".seg.nrrd", ".nii.gz"):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def read_volume(path: str | Path, what: str = "volume", series: str | None = None) -> Volume:
    """NIfTI, NRRD, MHA/MHD or a DICOM series folder -> :class:`Volume` (validated, 3D).

    A DICOM folder holding several series needs ``series``: a SeriesInstanceUID or its
    number (1, 2, ...) in the list the error message gives."""
    import SimpleITK as sitk

    p = Path(path)
    if not _readable(p, what):
        raise FoBInputError(f"The {what} file {p} does not exist. Check the path.")
    try:
        if p.is_dir():
            reader = sitk.ImageSeriesReader()
            series_choice = series
            # GDCM warns on stderr about every non-DICOM file of a folder; the error below says it all.
            shown = sitk.ProcessObject.GetGlobalWarningDisplay()
            sitk.ProcessObject.SetGlobalWarningDisplay(False)
            try:
                series = reader.GetGDCMSeriesIDs(str(p))
            finally:
                sitk.ProcessObject.SetGlobalWarningDisplay(shown)
            if not series:
                raise FoBInputError(
                    f"The folder {p} given as {what} holds no DICOM series. Point to a folder of "
                    "DICOM slices or to a NIfTI/NRRD/MHA file."
                )
            files = reader.GetGDCMSeriesFileNames(str(p), _pick_series(p, reader, list(series), series_choice, what))
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            _check_complete(p)
            image = sitk.ReadImage(str(p))
    except FoBInputError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise FoBInputError(
            f"Cannot read the {what} {p}: the file is unreadable, truncated or not an image "
            f"(NIfTI, NRRD, MHA or a DICOM folder) ({first[:160]}). Re-export or re-copy it."
        ) from None
    return image_to_volume(image, what=what, name=p.name)


def _readable(p: Path, what: str) -> bool:
    """Does ``p`` exist?  A file or folder that exists but may not be read is an input error
    of its own (the advice for a damaged file would not help)."""
    try:
        if not p.exists():
            return False
        if not p.is_dir():
            with open(p, "rb"):
                pass
        return True
    except PermissionError:
        raise FoBInputError(f"Cannot read the {what} {p}: permission denied (the file or a folder on its path). "
                            "Check its permissions.") from None


def _pick_series(folder: Path, reader, uids: list, choice, what: str) -> str:
    """One series of a DICOM folder: the only one, or the one the user chose."""
    if choice is None and len(uids) == 1:
        return uids[0]
    if choice is not None:
        c = str(choice).strip()
        if c in uids:
            return c
        if c.isdigit() and 1 <= int(c) <= len(uids):
            return uids[int(c) - 1]
    import SimpleITK as sitk

    lines = []
    for n, uid in enumerate(uids, 1):
        files = reader.GetGDCMSeriesFileNames(str(folder), uid)
        desc = ""
        try:
            r = sitk.ImageFileReader()
            r.SetFileName(files[0])
            r.ReadImageInformation()
            desc = r.GetMetaData("0008|103e").strip() if r.HasMetaDataKey("0008|103e") else ""
        except RuntimeError:
            pass
        lines.append(f"  {n}: {desc or '(no description)'}, {len(files)} files, UID {uid}")
    head = (f"--series {choice!r} matches none of the" if choice is not None
            else f"The DICOM folder {folder} given as {what} holds {len(uids)}")
    raise FoBInputError(f"{head} series:\n" + "\n".join(lines)
                        + "\nChoose one with --series NUMBER or --series UID.")


def _check_complete(p: Path) -> None:
    """ITK zero-fills a truncated .gz silently; read the stream through to catch it."""
    if p.name.lower().endswith(".gz"):
        import gzip
        import zlib

        try:
            with gzip.open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
        except (EOFError, OSError, zlib.error):
            raise RuntimeError("compressed stream ends early or is damaged") from None


def image_to_volume(image, what: str = "volume", name: str = "") -> Volume:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise FoBInputError(
            f"The {what} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or "
            "vector image); FoBSegment needs a scalar (grey-level) volume."
        )
    dim = image.GetDimension()
    if dim != 3:
        shape = image.GetSize()
        raise FoBInputError(
            f"The {what} is {dim}D (size {shape}); FoBSegment needs a 3D volume. "
            + ("For a 4D series (cine, dynamic, multi-echo) extract one 3D frame first."
               if dim == 4 else "Stack 2D slices into a 3D volume first.")
        )
    arr = sitk.GetArrayFromImage(image)
    vol = Volume(arr, image.GetSpacing(), image.GetOrigin(), np.array(image.GetDirection()).reshape(3, 3), name)
    validate_volume(vol, what)
    return vol


def volume_to_image(vol: Volume):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.array))
    img.SetSpacing(vol.spacing)
    img.SetOrigin(vol.origin)
    img.SetDirection(tuple(np.asarray(vol.direction).ravel()))
    return img


@dataclass
class SupportMask:
    """A binary support mask on the support volume's grid plus what the user calls it."""

    mask: np.ndarray  # bool (k, j, i)
    name: str
    color: tuple  # RGB in [0, 1]
    label_value: int | None = None


DEFAULT_COLOURS = {
    "liver": (0.87, 0.51, 0.31), "spleen": (0.62, 0.0, 1.0), "right_kidney": (0.72, 0.31, 0.25),
    "left_kidney": (0.72, 0.31, 0.25), "lv_bp": (0.86, 0.21, 0.21), "lv_myo": (0.94, 0.78, 0.39),
    "rv": (0.31, 0.47, 0.86),
}


def _colour_for(name: str, value: int | None) -> tuple:
    if name.lower() in DEFAULT_COLOURS:
        return DEFAULT_COLOURS[name.lower()]
    rng = np.random.default_rng(value if value is not None else abs(hash(name)) % 1000)
    return tuple(float(c) for c in rng.uniform(0.2, 0.95, 3))


def read_support_mask(path: str | Path, support: Volume, label: int | None = None,
                      segment: str | None = None, what: str = "support mask") -> SupportMask:
    """A labelmap (any value, or ``label``) or a Slicer ``.seg.nrrd`` (segment by name or label
    value) -> binary mask on the support grid.  The grids must agree; we never resample
    silently because a mask drawn on another grid would be a silent wrong answer."""
    p = Path(path)
    if not _readable(p, what):
        raise FoBInputError(f"The {what} file {p} does not exist. Check the path.")
    if _suffix(p) == ".seg.nrrd":
        return _read_seg_nrrd(p, support, label, segment)
    if segment is not None:
        raise FoBInputError(
            f"--segment {segment!r} names a segment, but {p.name} is a plain labelmap without segment "
            "names. Use --label N for a labelmap, or pass a Slicer .seg.nrrd."
        )
    labvol = read_volume(p, what=what)
    if not labvol.same_grid(support):
        raise FoBInputError(
            f"The {what} {p.name} (size {labvol.shape_ijk}, spacing {np.round(labvol.spacing, 3)}, origin "
            f"{np.round(labvol.origin, 2)}) is not on the support image's grid (size {support.shape_ijk}, spacing "
            f"{np.round(support.spacing, 3)}, origin {np.round(support.origin, 2)}). "
            "Save the mask on the same grid as the image it was drawn on (in Slicer: export the segmentation "
            "with the image as reference volume)."
        )
    raw = np.asarray(labvol.array)
    if not raw.any() or not (raw > 0).any():
        raise FoBInputError(
            f"The {what} {p.name} is empty: no voxel is labelled. Paint the structure on at "
            "least one slice of the support image."
        )
    if not np.issubdtype(raw.dtype, np.integer) and not np.all(np.mod(raw, 1) == 0):
        # Not a labelmap but a soft or interpolated mask: the library's rule, value > 0 is the structure.
        if label is not None:
            raise FoBInputError(
                f"The {what} {p.name} holds non-integer values, so it is not a labelmap and --label "
                f"{label} cannot select from it. Drop --label (every voxel > 0 is the structure) or save "
                "an integer labelmap.")
        return SupportMask(raw > 0, "mask", _colour_for("mask", None), None)
    # A 512 x 512 x 300 labelmap is 79 M voxels: no int64 copy, and the values from the
    # labelled voxels only (np.unique sorts a copy of what it is given).
    lab = raw if np.issubdtype(raw.dtype, np.integer) else raw.astype(np.int64)
    values = [int(v) for v in np.unique(lab[lab > 0])]
    if label is None:
        if len(values) > 1:
            raise FoBInputError(
                f"The {what} {p.name} holds several labels {values}; choose one with --label N."
            )
        label = values[0]
    if label not in values:
        raise FoBInputError(
            f"Label {label} is not present in the {what} {p.name}; it holds {values}. "
            "Pass one of these with --label."
        )
    name = f"label_{label}"
    return SupportMask(lab == label, name, _colour_for(name, label), label)


def _read_seg_nrrd(p: Path, support: Volume, label, segment) -> SupportMask:
    seg = _read_segmentation(p, "segmentation", "Re-save it from Slicer.")
    segments = seg.get("segments", [])
    names = [s.get("name", "") for s in segments]
    chosen = None
    if segment is not None:
        chosen = next((s for s in segments if s.get("name") == segment), None)
        if chosen is None:
            raise FoBInputError(f"No segment named {segment!r} in {p.name}; it has {names}. Use --segment with one of them.")
    elif label is not None:
        matches = [s for s in segments if int(s.get("labelValue", -1)) == int(label)]
        if not matches:
            vals = [s.get("labelValue") for s in segments]
            raise FoBInputError(f"No segment with label value {label} in {p.name} (values {vals}, names {names}).")
        if len(matches) > 1:
            raise FoBInputError(
                f"Several segments of {p.name} carry label value {label} (on different layers): "
                f"{[s.get('name') for s in matches]}. Choose one with --segment NAME.")
        chosen = matches[0]
    elif len(segments) == 1:
        chosen = segments[0]
    else:
        raise FoBInputError(f"{p.name} holds several segments {names}; choose one with --segment NAME.")
    mask = _segment_on(seg, chosen["name"], support, p.name, "support image")
    if not mask.any():
        raise FoBInputError(
            f"Segment {chosen['name']!r} in {p.name} is empty on the support image. Paint it on at least one slice."
        )
    color = tuple(float(c) for c in chosen.get("color", _colour_for(chosen["name"], None)))
    return SupportMask(mask.astype(bool), chosen["name"], color, int(chosen.get("labelValue", 1)))


def _read_segmentation(p: Path, what: str, advice: str) -> dict:
    """A ``.seg.nrrd`` read by slicerio; a damaged file is an input error ending in ``advice``."""
    import slicerio

    try:
        return slicerio.read_segmentation(str(p))
    except Exception as exc:  # slicerio raises many types for a damaged file
        raise FoBInputError(f"Cannot read the {what} {p}: {exc}. {advice}") from None


def _segment_on(seg: dict, name: str, volume: Volume, file_name: str = "", what: str = "image") -> np.ndarray:
    """One segment of a segmentation read by slicerio, as a boolean mask on ``volume``'s grid.
    The segmentation must lie on that grid (it may store only part of it): one drawn on another
    image is refused, not resampled, as a labelmap on another grid is."""
    import slicerio

    extracted = slicerio.extract_segments(seg, [(name, 1)])
    voxels = np.asarray(extracted["voxels"])  # (i, j, k) in the file's IJK
    if voxels.ndim == 4:
        voxels = voxels[..., 0]
    ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=float)
    direction = ijk_to_lps[:3, :3] / np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    labvol = Volume(np.transpose(voxels, (2, 1, 0)), spacing, ijk_to_lps[:3, 3], direction)
    if labvol.same_grid(volume):
        return labvol.array > 0
    if not labvol.on_lattice_of(volume):
        raise FoBInputError(
            f"The segmentation {file_name} was not drawn on the {what}: its grid (spacing {np.round(spacing, 3)}, "
            f"origin {np.round(ijk_to_lps[:3, 3], 2)}) is not part of the {what}'s (spacing "
            f"{np.round(volume.spacing, 3)}, origin {np.round(volume.origin, 2)}). Give the segmentation made on "
            "that image (in Slicer: its reference geometry is that volume).")
    return _resample_nearest_onto(labvol, volume)


def read_result_mask(path: str | Path, query: Volume) -> np.ndarray:
    """A result written by :func:`write_result` (one segment, or a labelmap) as a boolean mask
    on the query's grid; unlike a support mask it may be empty (nothing found)."""
    p = Path(path)
    if not _readable(p, "result") or not p.is_file():
        raise FoBInputError(f"The result {p} does not exist. Check the path, or segment that structure first.")
    if _suffix(p) != ".seg.nrrd":
        vol = read_volume(p, what="result")
        if not vol.same_grid(query):
            raise FoBInputError(f"The result {p.name} is not on the query's grid; it belongs to another image.")
        raw = np.asarray(vol.array)
        values = np.unique(raw[raw != 0])
        if values.size > 1:
            raise FoBInputError(f"The result {p.name} holds several labels {[float(v) for v in values[:8]]}: give "
                                "one structure's result (save that label alone).")
        return raw > 0
    seg = _read_segmentation(p, "result", "Write it again (from Slicer or FoBSegment).")
    names = [s.get("name", "") for s in seg.get("segments", [])]
    if len(names) != 1:
        raise FoBInputError(f"The result {p.name} holds {len(names)} segments {names}: give one structure's result "
                            "(export that segment alone).")
    return _segment_on(seg, names[0], query, p.name, "query")


def _resample_nearest_onto(src: Volume, ref: Volume) -> np.ndarray:
    """A .seg.nrrd usually stores only the segments' bounding box (an extent of the
    reference grid); nearest-neighbour resampling in physical space puts it back."""
    import SimpleITK as sitk

    img = volume_to_image(src.with_array((src.array > 0).astype(np.uint8)))
    refimg = volume_to_image(ref.with_array(np.zeros(ref.array.shape, np.uint8)))
    out = sitk.Resample(img, refimg, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out) > 0


def check_output_path(path: str | Path) -> Path:
    p = Path(path)
    if not p.parent.exists() or not p.parent.is_dir():
        raise FoBInputError(
            f"The output folder {p.parent} does not exist. Create it first or choose another --output path."
        )
    if _suffix(p) not in LABELMAP_SUFFIXES + (".seg.nrrd",):
        raise FoBInputError(
            f"Unsupported output format {p.name!r}: use .seg.nrrd (Slicer segmentation), .nii.gz, .nii, .nrrd or .mha."
        )
    if p.is_dir():
        raise FoBInputError(f"The output path {p} is a folder; give a file name such as {p / 'result.seg.nrrd'}.")
    refuse_write_protected(p)
    check_writable_folder(p.parent)
    return p


def refuse_overwriting_inputs(output: str | Path, inputs, option: str = "--output") -> None:
    """The output must never replace an input (symlinks, '..', letter case all resolved)."""
    for src in inputs:
        src = Path(src)
        try:
            inside = src.is_dir() and Path(output).exists() and Path(output).resolve().parent == src.resolve()
        except OSError as exc:  # a folder on the way that may not be listed
            raise FoBInputError(f"Cannot check the input {src}: {exc.strerror or exc}. Check its folder's "
                                "permissions.") from None
        if same_file(output, src) or inside:
            raise FoBInputError(
                f"The output {output} is the input {src}: writing it would replace that input. Choose "
                f"another {option} path.")


@dataclass
class SegmentationInputs:
    """A query, its support and the support mask, read and checked against the output."""

    output: Path
    query: Volume
    support: Volume
    support_mask: SupportMask


def read_segmentation_inputs(output, volume, support_mask, support_volume=None, label=None, segment=None,
                             series=None, also_inputs=(), what: str = "") -> SegmentationInputs:
    """Everything ``fobsegment segment`` and each ``batch`` case check and read before any
    work: the output path (format, folder writable, not one of the inputs, a geometry it can
    hold), the query, the support volume (default: the query) and the support mask."""
    out = check_output_path(output)
    refuse_overwriting_inputs(out, [p for p in (volume, support_volume, support_mask, *also_inputs) if p])
    query = read_volume(volume, f"query volume{what}", series=series)
    support = read_volume(support_volume, f"support volume{what}", series=series) if support_volume else query
    sm = read_support_mask(support_mask, support, label=label, segment=segment)
    check_output_geometry(out, query)
    check_segment_name(result_name(sm.name), _suffix(out))
    return SegmentationInputs(out, query, support, sm)


def read_more_supports(pairs, label=None, segment=None, what: str = "") -> list:
    """An atlas's further supports: (volume path, mask path) pairs -> [(Volume, bool mask)],
    numbered from 2 in messages (the first support is read with the query)."""
    out = []
    for n, (v, m) in enumerate(pairs, 2):
        vol = read_volume(v, f"support volume {n}{what}")
        out.append((vol, read_support_mask(m, vol, label=label, segment=segment).mask))
    return out


def check_output_geometry(path: str | Path, query: Volume) -> None:
    """Refuse a geometry the output format cannot hold, before any work."""
    if _suffix(Path(path)) in _ORTHONORMAL_ONLY:
        d = np.asarray(query.direction, float)
        if np.abs(d.T @ d - np.eye(3)).max() > 1e-4:
            raise FoBInputError(
                f"The query's direction matrix is not a rotation (sheared or skewed axes); NIfTI cannot "
                f"store it and the result would be misplaced. Write .nrrd, .mha or .seg.nrrd instead of "
                f"{Path(path).name}.")


def result_label(value) -> int:
    """The label value a result is written with: the support's where a label map can hold it
    (1 to 65535), else 1."""
    return int(value) if value is not None and 1 <= int(value) <= 65535 else 1


def result_name(name: str) -> str:
    """A result's segment name: the support's, marked ``(FoB)`` once (a support that is itself a
    FoBSegment result keeps its single mark)."""
    return name if name.endswith("(FoB)") else f"{name} (FoB)"


def check_segments_to_write(segments, shape: tuple, suffix: str) -> None:
    """What :func:`write_segments` is given, checked before it writes: one or more masks on the
    query's grid, label values a label map holds (1 to 65535: 0 is background), and segment
    names a ``.seg.nrrd`` header can hold (one line of ASCII)."""
    if not segments:
        raise FoBInputError("Nothing to write: give at least one (mask, name, colour, label value).")
    for mask, name, _color, value in segments:
        if tuple(np.shape(mask)) != shape:
            raise FoBInputError(f"The mask of {name!r} has shape {tuple(np.shape(mask))}, the query {shape}: a result "
                                "must be on the query's grid.")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= 65535:
            raise FoBInputError(f"The label value of {name!r} must be a whole number from 1 to 65535 (got {value!r}).")
        check_segment_name(str(name), suffix)


def check_segment_name(name: str, suffix: str) -> None:
    """A segment name a ``.seg.nrrd`` header can hold: one line of ASCII."""
    if suffix != ".seg.nrrd":  # a label map stores no names
        return
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise FoBInputError(f"The segment name {name!r} holds a line break or control character: rename the segment.")
    if not name.isascii():
        raise FoBInputError(f"The segment name {name!r} has characters a .seg.nrrd header cannot hold (only ASCII): "
                            "rename the segment (e.g. without accents), or write .nii.gz, .nrrd or .mha.")


def write_result(path: str | Path, query: Volume, mask: np.ndarray, name: str = "segment",
                 color=(1.0, 0.0, 0.0), label_value: int = 1) -> Path:
    """Write one binary mask in the query geometry (see :func:`write_segments`)."""
    return write_segments(path, query, [(mask, name, color, label_value)])


def write_segments(path: str | Path, query: Volume, segments) -> Path:
    """Write binary masks ``[(mask, name, colour, label value), ...]`` in the query geometry
    as a labelmap (NIfTI/NRRD/MHA; later segments win where they overlap) or a ``.seg.nrrd``
    (one layer per segment, so overlaps are kept).  Written to a temporary file in the same
    folder and renamed, so a failure never leaves a partial output behind."""
    import SimpleITK as sitk

    p = check_output_path(path)
    if not isinstance(query, Volume):
        raise FoBInputError(f"The query must be a FoBSegmentLib Volume (got {type(query).__name__}): the output "
                            "takes its geometry.")
    check_output_geometry(p, query)
    suffix = _suffix(p)
    expected_shape = tuple(query.array.shape)
    check_segments_to_write(segments, expected_shape, suffix)

    if suffix == ".seg.nrrd":
        import slicerio

        layers, meta = [], []
        dtype = np.uint8 if max(int(v) for *_, v in segments) <= 255 else np.uint16
        for n, (mask, name, color, value) in enumerate(segments):
            layers.append(np.transpose((np.asarray(mask) > 0).astype(dtype) * dtype(value), (2, 1, 0)))
            meta.append({"id": f"Segment_{n + 1}", "labelValue": int(value), "layer": n, "name": name,
                         "color": [float(c) for c in color]})
        voxels = layers[0] if len(layers) == 1 else np.stack(layers, axis=0)  # slicerio: ([layer,] i, j, k)

        def write(tmp):
            slicerio.write_segmentation(str(tmp), {
                "voxels": voxels, "ijkToLPS": query.ijk_to_lps(), "encoding": "gzip",
                "containedRepresentationNames": ["Binary labelmap"], "segments": meta,
            })

        def verify(tmp):
            back = slicerio.read_segmentation(str(tmp))
            if tuple(np.asarray(back["voxels"]).shape[-3:]) != tuple(voxels.shape[-3:]):
                raise OSError(5, "the written segmentation reads back with another shape")
    else:
        labels = np.zeros(expected_shape, np.uint16 if max(v for *_, v in segments) > 255 else np.uint8)
        for mask, _name, _color, value in segments:
            labels[np.asarray(mask) > 0] = value

        def write(tmp):
            sitk.WriteImage(volume_to_image(query.with_array(labels)), str(tmp), useCompression=True)

        def verify(tmp):
            r = sitk.ImageFileReader()
            r.SetFileName(str(tmp))
            r.ReadImageInformation()
            if tuple(reversed(r.GetSize())) != expected_shape:
                raise OSError(5, "the written image reads back with another size")
            _check_complete(tmp)

    return atomic_write(p, write, verify, suffix=suffix)
