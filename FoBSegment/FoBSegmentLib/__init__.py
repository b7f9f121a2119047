"""FoBSegmentLib: one-shot segmentation of a structure through a volume (Slicer-free).

The public API (internal modules may move behind it)::

    from FoBSegmentLib import Segmenter, read_volume, read_support_mask, write_result

    q = read_volume("query.nii.gz")
    support = read_support_mask("support.seg.nrrd", q, segment="liver")
    result = Segmenter("litemedsam").segment(q, None, support.mask)
    write_result("liver.seg.nrrd", q, result.mask, name="liver (FoB)", color=support.color)

Names are imported on first use, so ``import FoBSegmentLib`` costs nothing (no torch).
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_PUBLIC = {
    "Segmenter": "pipeline.segmenter",
    "SegmentationResult": "pipeline.run",
    "SlicePromptRecord": "pipeline.run",
    "SegmenterSettings": "settings",
    "DEFAULT_SETTINGS": "settings",
    "Volume": "geometry",
    "read_volume": "io",
    "read_support_mask": "io",
    "write_result": "io",
    "write_segments": "io",
    "SupportMask": "io",
    "FoBError": "errors",
    "FoBInputError": "errors",
    "CancelledError": "errors",
    "CheckpointError": "errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
