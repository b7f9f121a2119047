"""What a run did on each slice, for a person to review: kept or why not, SAM's predicted IoU,
the contrast against the support, and which slices are worth a look first."""

from __future__ import annotations

#: SAM's predicted IoU below which a kept slice is worth checking
DOUBTFUL_IOU = 0.75

REASONS = {
    "present": "kept",
    "annotated": "painted",
    "seed": "kept (start)",
    "oracle": "kept (given)",
    "between_annotations": "kept (between painted slices)",
    "empty": "stop: nothing found",
    "disconnected": "stop: not connected to the neighbour",
    "leak": "stop: spilled into a neighbour",
    "low_iou": "stop: model unsure",
    "unlike_support": "stop: unlike the painted structure",
    "removed_by_refine": "removed by Refine",
    "corrected": "corrected",
    "kept_previous": "previous result kept",
    "outside_bound": "cleared: outside the bounding segment's slices",
}


def review_rows(result) -> list[dict]:
    """Rows sorted by slice: ``slice``, ``status``, ``iou``, ``contrast`` (strings for a
    table) and ``doubtful``: a kept slice the model was unsure of, or a slice where the walk
    stopped (the structure's ends are where a one-shot result is most often wrong)."""
    rows = []
    for i in sorted(result.slice_info):
        v = result.slice_info[i]
        reason = v.get("reason", "")
        iou, contrast = v.get("iou"), v.get("contrast")
        kept = bool(v.get("kept"))
        doubtful = (kept and iou is not None and iou < DOUBTFUL_IOU) or (not kept and reason in (
            "empty", "disconnected", "leak", "low_iou", "unlike_support"))
        rows.append({"slice": int(i), "status": REASONS.get(reason, reason), "kept": kept,
                     "iou": "" if iou is None else f"{iou:.2f}",
                     "contrast": "" if contrast is None else f"{contrast:.2f}", "doubtful": bool(doubtful)})
    return rows


def doubtful_slices(result) -> list[int]:
    return [r["slice"] for r in review_rows(result) if r["doubtful"]]
