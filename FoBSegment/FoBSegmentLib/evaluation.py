"""Evaluation on labelled volumes: the field's standard protocol and the real-use one.

``ep1`` (SSL-ALPNet, as FoB reports; docs/method.md section 4): per class, the support slices are
the support volume's labelled slices at 1/6, 1/2 and 5/6; only the query slices whose ground
truth contains the class are segmented (an oracle), each from the support at the same
relative position (3 chunks); 3D Dice per query volume.

``full``: the same three support slices, but the whole query volume is processed and the
pipeline decides where the structure is; 3D Dice over the whole volume.

Methods (side by side on the same runs): ``pipeline`` (the Segmenter as configured),
``coarse`` (the learned generator's coarse prototype mask alone, no SAM), ``support_box`` (the
support slice's own box reused on every query slice: the naive baseline) and ``gt_box`` (the
ground-truth box on every slice: the ceiling).  Baselines are EP1 only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import geometry
from .backbones.base import slice_to_square, square_to_slice
from .errors import FoBInputError
from .geometry import SliceView, occupied_slices
from .io import read_volume
from .files import atomic_write
from .pipeline.slice_prompting import box_from_mask, choose_mask

METHODS = ("pipeline", "coarse", "support_box", "gt_box")


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def ep1_support_slices(label_stack: np.ndarray) -> list[int]:
    """Labelled slices at 1/6, 1/2 and 5/6 of the support's extent (SSL-ALPNet EP1)."""
    idx = occupied_slices(label_stack)
    if not idx:
        return []
    picks = [idx[min(len(idx) - 1, int(len(idx) * f))] for f in (1 / 6, 1 / 2, 5 / 6)]
    return sorted({int(p) for p in picks})


def one_slice_support(view: SliceView, ref: np.ndarray) -> tuple[np.ndarray, int]:
    """What a user paints on one slice: the reference's labelled slice of largest area, as a
    mask in the volume's geometry, and that slice's index in the view's stack."""
    g = view.to_stack(ref)
    k = int(np.argmax(g.reshape(g.shape[0], -1).sum(1)))
    s = np.zeros_like(g)
    s[k] = g[k]
    return view.from_stack(s), k


def parse_classes(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            name, value = part.split("=")
            name, value = name.strip(), int(value)
        except ValueError:
            raise FoBInputError(f"--classes must look like liver=1,spleen=4 (got {part!r}).") from None
        if name in out:
            raise FoBInputError(f"--classes names {name!r} twice ({name}={out[name]} and {name}={value}); give "
                                "each class one label value.")
        out[name] = value
    if not out:
        raise FoBInputError("--classes is empty: give name=value pairs such as liver=1,spleen=4.")
    return out


def _load_labels(data: Path, case: str) -> np.ndarray:
    lab = data / f"label_{case}.nii.gz"
    if not lab.is_file():
        raise FoBInputError(f"Case {case!r}: expected {lab.name} in {data}.")
    return np.rint(read_volume(lab, f"label of case {case}").array).astype(np.int64)


def _load_case(data: Path, case: str):
    img, lab = data / f"image_{case}.nii.gz", data / f"label_{case}.nii.gz"
    if not img.is_file() or not lab.is_file():
        raise FoBInputError(f"Case {case!r}: expected {img.name} and {lab.name} in {data}.")
    return read_volume(img, f"image of case {case}"), _load_labels(data, case)


def parse_within(text: str | None, classes: dict) -> dict[str, str]:
    """``--within rv:lv_bp, ...`` -> {class kept within: class bounding it}, checked against ``classes``."""
    within = geometry.parse_within(text)
    check_within(within, classes)
    return within


def check_within(within: dict, classes: dict) -> None:
    geometry.check_within(within, classes, "--within", f"not one of the classes {', '.join(classes)}.")


def evaluation_cases(data, classes: dict, support_case: str, cases: list, protocol: str = "ep1",
                     within: dict | None = None):
    """The evaluation as batch cases: one per class and query case whose ground truth contains
    the class, with the support's EP1 slices; ``ep1`` segments the reference's slices only.
    ``within`` ({class: bounding class}) keeps a class's result within the slices of the
    bounding class's result on the same query (its cases run after the bounding class's).
    Returns ``(cases, {case id: (class name, query case)}, {class name: support slices})``."""
    from .batch import Case

    within = dict(within or {})
    check_within(within, classes)
    data = Path(data)
    s_vol, s_lab = _load_case(data, support_case)
    s_view = SliceView.for_volume(s_vol)
    sup_slices = {}
    for name, value in classes.items():
        sup_slices[name] = ep1_support_slices(s_view.to_stack(s_lab == value))
        if not sup_slices[name]:
            raise FoBInputError(f"Class {name}={value} is absent from the support case {support_case}.")
    query_labels = {str(c): _load_labels(data, c) for c in cases if str(c) != str(support_case)}
    out, where = [], {}
    for name in sorted(classes, key=lambda c: c in within):  # bounding classes first
        value = classes[name]
        for case, q_lab in query_labels.items():
            if not (q_lab == value).any():
                continue
            cid = f"{name}-{case}"
            out.append(Case(cid, data / f"image_{case}.nii.gz", data / f"label_{support_case}.nii.gz",
                            data / f"image_{support_case}.nii.gz", value, None, data / f"label_{case}.nii.gz", value,
                            f"{name}_{case}.seg.nrrd", tuple(sup_slices[name]), protocol == "ep1"))
            bound = f"{within.get(name)}-{case}"
            if bound in where:
                out[-1].within, out[-1].within_output = bound, f"{within[name]}_{case}.seg.nrrd"
            where[cid] = (name, case)
    return out, where, sup_slices


def evaluate(data, classes: dict, support_case: str, cases: list, protocol: str = "ep1", segmenter=None,
             method: str = "pipeline", progress=None, output_dir=None, shard=(0, 1), engine: str = "local",
             workers: int = 1, within: dict | None = None, **segmenter_kw) -> dict:
    """3D Dice of ``method`` on the ``cases`` of ``data`` with ``support_case`` as the support.
    ``segmenter``: a built Segmenter (else one is built from ``segmenter_kw``).  ``within``:
    {class: bounding class}, a class's result kept within the bounding class's slices.

    The pipeline runs as a batch with references (:mod:`FoBSegmentLib.batch`): each class and
    query case is one case, a failed case is recorded and the rest go on, and with
    ``output_dir`` the segmentations and the batch summary are kept there, so the same call
    again resumes; ``shard`` and ``engine="dask"`` split the work like ``fobsegment batch``."""
    if protocol not in ("ep1", "full"):
        raise FoBInputError(f"Unknown protocol {protocol!r}: use ep1 or full.")
    if not [c for c in cases if str(c) != str(support_case)]:
        raise FoBInputError(f"No query case: the cases are only the support case {support_case}. Give other "
                            "cases to segment from it.")
    if method not in METHODS:
        raise FoBInputError(f"Unknown method {method!r}: use one of {', '.join(METHODS)}.")
    if within and method != "pipeline":
        raise FoBInputError("--within applies to the pipeline's results only, not to the baselines.")
    if method != "pipeline" and protocol != "ep1":
        raise FoBInputError(f"The {method} baseline is defined for protocol ep1 only.")
    if method != "pipeline":
        return _evaluate_baseline(Path(data), classes, support_case, cases, segmenter, method, progress,
                                  **segmenter_kw)
    import tempfile

    from .batch import run_batch

    t0 = time.perf_counter()
    batch_cases, where, sup_slices = evaluation_cases(data, classes, support_case, cases, protocol, within)
    rows = {}

    def on_case(r):
        rows[r.id] = r
        if progress and r.status in ("ok", "skipped"):
            progress(*where[r.id], r.dice)

    seg = segmenter
    if seg is None and engine == "local":
        from .pipeline.segmenter import Segmenter

        seg = Segmenter(**segmenter_kw)
    with tempfile.TemporaryDirectory(prefix="fobsegment-evaluate-") as tmp:
        run_batch(batch_cases, Path(output_dir) if output_dir else Path(tmp), segmenter_kw, shard, engine, workers,
                  on_case=on_case, segmenter=seg if engine == "local" else None)
    per_class = {}
    for name in classes:
        mine = [(where[c.id][1], rows.get(c.id)) for c in batch_cases if where[c.id][0] == name and c.id in rows]
        scores = {case: r.dice for case, r in mine if r.status in ("ok", "skipped")}
        failed = {case: r.message for case, r in mine if r.status == "failed"}
        per_class[name] = {"mean_dice": round(float(np.mean(list(scores.values()))), 4) if scores else None,
                           "cases": scores, "support_slices": sup_slices[name]}
        if failed:
            per_class[name]["failed"] = failed
    means = [v["mean_dice"] for v in per_class.values() if v["mean_dice"] is not None]
    ran = [r for r in rows.values() if r.status == "ok"]
    return {
        "protocol": protocol, "method": method,
        "backbone": seg.backbone.name if seg is not None else segmenter_kw.get("backbone", "litemedsam"),
        "prompt": seg.start_prompter.strategy if seg is not None else None,
        "prompt_source": seg.prompt_source if seg is not None else "contrast",
        "support_case": str(support_case), "cases": [str(c) for c in cases if str(c) != str(support_case)],
        "mean_dice": round(float(np.mean(means)), 4) if means else None,
        "classes": per_class,
        "failed": sum(r.status == "failed" for r in rows.values()),
        "seconds": round(time.perf_counter() - t0, 1),
        "slices_encoded": sum(r.slices_encoded or 0 for r in ran),
        "device": str(seg.backbone.device) if seg is not None else segmenter_kw.get("device", "auto"),
    }


def _evaluate_baseline(data: Path, classes, support_case, cases, segmenter, method, progress, **segmenter_kw) -> dict:
    """The EP1 baselines (no pipeline): the support's box, the learned coarse mask, the true box."""
    from .pipeline.segmenter import Segmenter

    seg = segmenter or Segmenter(**segmenter_kw)
    if method == "coarse" and seg.prompt_source != "fob":
        raise FoBInputError("The coarse-mask baseline needs FoB generator weights.")
    t0 = time.perf_counter()
    enc0 = seg.encoded_count
    s_vol, s_lab = _load_case(data, support_case)
    s_view = SliceView.for_volume(s_vol)
    per_class = {}
    queries = [(c, *_load_case(data, c)) for c in cases if str(c) != str(support_case)]
    for name, value in classes.items():
        s_mask = s_lab == value
        sup_slices = ep1_support_slices(s_view.to_stack(s_mask))
        if not sup_slices:
            raise FoBInputError(f"Class {name}={value} is absent from the support case {support_case}.")
        scores = {}
        for case, q_vol, q_lab in queries:
            gt = q_lab == value
            if not gt.any():
                continue
            q_view = SliceView.for_volume(q_vol)
            gt_idx = occupied_slices(q_view.to_stack(gt))
            pred = _baseline(seg, method, q_vol, q_view, gt, gt_idx, s_vol, s_mask, sup_slices)
            scores[str(case)] = round(dice(pred, gt), 4)
            if progress:
                progress(name, case, scores[str(case)])
        per_class[name] = {"mean_dice": round(float(np.mean(list(scores.values()))), 4) if scores else None,
                           "cases": scores, "support_slices": sup_slices}
    means = [v["mean_dice"] for v in per_class.values() if v["mean_dice"] is not None]
    return {
        "protocol": "ep1", "method": method, "backbone": seg.backbone.name,
        "prompt": "box" if "box" in method else None, "prompt_source": seg.prompt_source,
        "support_case": str(support_case), "cases": [str(c) for c, *_ in queries],
        "mean_dice": round(float(np.mean(means)), 4) if means else None,
        "classes": per_class, "failed": 0,
        "seconds": round(time.perf_counter() - t0, 1),
        "slices_encoded": seg.encoded_count - enc0,
        "device": str(seg.backbone.device),
    }


def _baseline(seg, method, q_vol, q_view, gt, gt_idx, s_vol, s_mask, sup_slices):
    """EP1 baselines on the oracle slices, sharing the Segmenter's backbone and cache."""
    from .preprocessing import fit_normalisation

    supports = seg.prepare_support(s_vol, s_mask, sup_slices)
    stack = q_view.to_stack(q_vol.array)
    g = q_view.to_stack(gt)
    norm = fit_normalisation(q_vol.array)
    out = np.zeros(stack.shape, np.uint8)
    q0, q1 = gt_idx[0], gt_idx[-1]
    shape = stack.shape[1:]
    for i in gt_idx:
        rel = 0.5 if q1 == q0 else (i - q0) / (q1 - q0)
        sup = supports.nearest_rel(rel)
        emb = seg.embedder.embed(stack, norm, [i])[i]
        if method == "coarse":
            m_sq = seg.start_prompter.output(emb, sup).fg_prob[0].float().cpu().numpy() > 0.5
        else:
            ref = sup.mask_sq if method == "support_box" else slice_to_square(g[i]) > 0.5
            box = box_from_mask(ref)
            if box is None:
                continue
            dec = seg.backbone.decode(emb, box=box)
            logits, _ = choose_mask(dec.logits, dec.iou)
            m_sq = logits > 0
        out[i] = square_to_slice(m_sq.astype(np.float32), shape) > 0.5
    return q_view.from_stack(out) > 0


def write_json(path, obj) -> None:
    path = Path(path)
    if not path.parent.exists():
        raise FoBInputError(f"The folder of --json {path.parent} does not exist.")
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)), suffix=".json.tmp")


def check_json_output(path, data, cases) -> None:
    """``--json`` checked before any work: a file name in an existing, writable folder that is
    none of the evaluation's images or labels."""
    from .files import check_writable_folder, refuse_write_protected
    from .io import refuse_overwriting_inputs

    p = Path(path)
    if not p.parent.is_dir():
        raise FoBInputError(f"The folder of --json {p.parent} does not exist. Create it first.")
    if p.is_dir():
        raise FoBInputError(f"--json {p} is a folder; give a file name such as {p / 'results.json'}.")
    refuse_write_protected(p, "--json file")
    check_writable_folder(p.parent, "--json")
    refuse_overwriting_inputs(p, [Path(data) / f"{kind}_{c}.nii.gz" for c in cases for kind in ("image", "label")],
                              "--json")


def cmd_evaluate(args) -> int:
    from .batch import parse_shard

    classes = parse_classes(args.classes)
    within = parse_within(args.within, classes)
    cases = [c for c in args.cases.split(",") if c]
    if args.json:
        check_json_output(args.json, args.data, [args.support_case, *cases])
    if args.output_dir and Path(args.output_dir).is_file():
        raise FoBInputError(f"The output folder {args.output_dir} is a file; give a folder with --output-dir.")
    if args.output_dir and not Path(args.output_dir).is_dir():
        raise FoBInputError(f"The output folder {args.output_dir} does not exist. Create it first.")
    if args.engine == "dask" and (args.prompt_source != "contrast" or args.method != "pipeline"):
        raise FoBInputError("--engine dask runs the default pipeline only (no --prompt-source fob, no baselines).")

    def show(name, case, d):
        print(f"  {name:<14} case {case:<4} Dice {d:.4f}", flush=True)

    seg = None
    if args.engine == "local":
        seg = build_segmenter(args.backbone, args.device, args.checkpoint, args.cache_dir, args.prompt_source,
                              args.weights, args.prompt, not args.no_spr)
    res = evaluate(args.data, classes, args.support_case, cases, args.protocol, segmenter=seg, method=args.method,
                   progress=show, output_dir=args.output_dir, shard=parse_shard(args.shard), engine=args.engine,
                   workers=args.workers, within=within, backbone=args.backbone, device=args.device,
                   checkpoint=args.checkpoint, cache_dir=args.cache_dir)
    for name, v in res["classes"].items():
        print(f"{name:<14} mean Dice {v['mean_dice']}")
        for case, message in v.get("failed", {}).items():
            print(f"  {name:<14} case {case:<4} failed: {message}")
    print(f"mean Dice {res['mean_dice']} ({res['protocol']}, {res['method']}, {res['backbone']}, "
          f"{res['seconds']} s, {res['slices_encoded']} slices encoded, {res['failed']} failed)")
    if args.json:
        write_json(args.json, res)
    return 0 if not res["failed"] else 1


def build_segmenter(backbone="litemedsam", device="auto", checkpoint=None, cache_dir=None, prompt_source="contrast",
                    weights=None, prompt="auto", use_spr=True):
    """A Segmenter for evaluation: the default, or (research) the learned generator as start prompter."""
    from .backbones import create_backbone
    from .pipeline.segmenter import Segmenter

    if prompt_source not in ("contrast", "fob"):
        raise FoBInputError(f"Unknown prompt source {prompt_source!r}: use contrast (the default) or fob.")
    if prompt_source == "contrast" and (weights or prompt != "auto" or not use_spr):
        raise FoBInputError("--weights, --prompt and --no-spr apply to the learned generator only: "
                            "add --prompt-source fob.")
    bb = create_backbone(backbone, device, checkpoint, cache_dir)
    prompter = None
    if prompt_source == "fob":
        from .research.generator_prompts import GeneratorPrompter

        prompter = GeneratorPrompter(bb, weights, prompt, use_spr)
    return Segmenter(bb, cache_dir=cache_dir, start_prompter=prompter)
