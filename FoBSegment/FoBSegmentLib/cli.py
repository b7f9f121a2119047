"""The ``fobsegment`` command line: batch work outside Slicer.

Every user error exits non-zero with one paragraph on stderr (what is wrong, what to do),
never a traceback, and never leaves an output file behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import CancelledError, FoBError, FoBInputError


def _parse_int_list(text: str | None, what: str):
    if not text:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise FoBInputError(f"{what} must be comma-separated integers such as 12,18 (got {text!r}).") from None


def _parse_range(text: str | None):
    if not text:
        return None
    try:
        a, b = text.split(":")
        return int(a), int(b)
    except ValueError:
        raise FoBInputError(f"--slices must look like FIRST:LAST, e.g. 10:40 (got {text!r}).") from None


def _progress_bar(desc: str):
    """A tqdm bar on a terminal; silent when stderr is not a terminal (logs, CI)."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="slice", leave=False)

    def update(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar.close


def cmd_segment(args) -> int:
    from . import io

    masks, volumes = args.support_mask, args.support_volume or []
    if len(masks) > 1:
        return _segment_atlas(args)
    if len(volumes) > 1:
        raise FoBInputError(f"{len(volumes)} --support-volume but {len(masks)} --support-mask: give one "
                            "--support-mask per --support-volume, in the same order.")
    support_slices = _parse_int_list(args.support_slices, "--support-slices")
    slice_range = _parse_range(args.slices)
    inp = io.read_segmentation_inputs(args.output, args.volume, masks[0], volumes[0] if volumes else None,
                                      args.label, args.segment, args.series, also_inputs=[args.within])
    from .pipeline.inputs import check_slice_range
    from .pipeline.support import check_support_slices

    check_support_slices(inp.support, inp.support_mask.mask, support_slices)  # before a model is built
    check_slice_range(slice_range, inp.query)
    _segment_and_write(args, inp, "segmenting", lambda seg, update: seg.segment(
        inp.query, inp.support, inp.support_mask.mask, support_slices=support_slices, slice_range=slice_range,
        progress=update))
    return 0


def _segment_and_write(args, inp, desc: str, run):
    """Build the model, run ``run(segmenter, progress)`` under a progress bar, write the result
    as ``<name> (FoB)`` in the support's colour and say what was done -> the result."""
    from . import io
    from .pipeline.segmenter import Segmenter

    bound = io.read_result_mask(args.within, inp.query) if args.within else None
    seg = Segmenter(args.backbone, args.device, checkpoint=args.checkpoint, cache_dir=_cache_dir(args))
    update, close = _progress_bar(desc)
    try:
        res = run(seg, update)
    finally:
        close()
    cleared = res.keep_within(bound, inp.query) if bound is not None else 0
    sm = inp.support_mask
    name = io.result_name(sm.name)
    io.write_result(inp.output, inp.query, res.mask, name=name, color=sm.color,
                    label_value=io.result_label(sm.label_value))
    runtime = getattr(seg.backbone, "runtime", "torch")
    print(f"wrote {inp.output}: segment {name!r}, {res.slices_segmented} of {res.slices_total} slices, "
          f"{res.slices_encoded} encoded, {res.seconds:.1f} s on {res.device} ({res.backbone} in {runtime}, "
          f"prompts: {res.prompt_source}/{res.prompt_strategy})"
          + (f"; {cleared} slices outside {Path(args.within).name}'s cleared" if cleared else ""))
    return res


def _segment_atlas(args) -> int:
    """Several support patients: ``--support-volume A --support-mask A_mask --support-volume B ...``."""
    from . import io

    masks, volumes = args.support_mask, args.support_volume or []
    if len(volumes) != len(masks):
        raise FoBInputError(f"{len(masks)} --support-mask but {len(volumes)} --support-volume: with several "
                            "supports (an atlas of other patients) give each mask its own --support-volume, "
                            "in the same order.")
    if args.support_slices:
        raise FoBInputError("--support-slices names slices of one support; with several supports every "
                            "annotated slice of each is used. Drop --support-slices, or crop the masks.")
    inp = io.read_segmentation_inputs(args.output, args.volume, masks[0], volumes[0], args.label, args.segment,
                                      args.series, also_inputs=[*masks[1:], *volumes[1:], args.within])
    supports = [(inp.support, inp.support_mask.mask),
                *io.read_more_supports(zip(volumes[1:], masks[1:]), args.label, args.segment)]
    slice_range = _parse_range(args.slices)
    from .pipeline.inputs import check_slice_range

    check_slice_range(slice_range, inp.query)  # before a model is built
    res = _segment_and_write(args, inp, f"segmenting from {len(supports)} supports", lambda seg, update:
                             seg.segment_atlas(inp.query, supports, rule=args.atlas_fusion, slice_range=slice_range,
                                               progress=update))
    for s in res.supports:
        mark = "  <- unlike the others: check this support's annotation" if s["unlike_others"] else ""
        print(f"  support {s['support']} ({Path(masks[s['support'] - 1]).name}): Dice to the fused mask "
              f"{s['dice_to_fused']:.3f}, {s['slices_segmented']} slices{mark}")
    return 0


def _cache_dir(args):
    """Embeddings and checkpoints live in the user cache by default, so a second command on
    the same volume (another structure, a refine, a prepared volume) only decodes."""
    from .checkpoints import default_cache_dir

    return args.cache_dir or str(default_cache_dir())


def cmd_prepare(args) -> int:
    from . import io
    from .pipeline.segmenter import Segmenter

    volume = io.read_volume(args.volume, "volume", series=args.series)
    seg = Segmenter(args.backbone, args.device, checkpoint=args.checkpoint, cache_dir=_cache_dir(args))
    update, close = _progress_bar("encoding")
    try:
        n = seg.prepare(volume, progress=update, slice_range=_parse_range(args.slices))
    finally:
        close()
    print(f"prepared {args.volume}: {n} slices encoded ({seg.backbone.name}), cache {_cache_dir(args)}")
    return 0


def cmd_refine(args) -> int:
    from . import io
    from .pipeline.segmenter import Segmenter

    out = io.check_output_path(args.output)
    inputs = [p for p in (args.volume, args.previous, args.corrected, args.support_volume, args.support_mask,
                          args.within) if p]
    io.refuse_overwriting_inputs(out, inputs)
    query = io.read_volume(args.volume, "query volume", series=args.series)
    previous = io.read_support_mask(args.previous, query, label=args.label, segment=args.segment,
                                    what="previous result")
    corrected = io.read_support_mask(args.corrected, query, label=args.label, segment=args.segment,
                                     what="corrected result")
    support = support_mask = None
    if args.support_mask:
        support = io.read_volume(args.support_volume, "support volume") if args.support_volume else query
        support_mask = io.read_support_mask(args.support_mask, support, label=args.support_label).mask
    bound = io.read_result_mask(args.within, query) if args.within else None
    io.check_output_geometry(out, query)
    seg = Segmenter(args.backbone, args.device, checkpoint=args.checkpoint, cache_dir=_cache_dir(args))
    res = seg.refine(query, previous.mask, corrected.mask, support, support_mask)
    if bound is not None:
        res.keep_within(bound, query)
    changed = sum(1 for v in res.slice_info.values() if v.get("reason") != "annotated")
    name = io.result_name(corrected.name)
    io.write_result(out, query, res.mask, name=name, color=corrected.color,
                    label_value=io.result_label(corrected.label_value))
    print(f"wrote {out}: {changed} slices recomputed from {len([i for i, v in res.slice_info.items() if v.get('reason') == 'annotated'])} "
          f"corrected, {res.slices_encoded} encoded, {res.seconds:.1f} s")
    return 0


def cmd_info(args) -> int:
    from . import checkpoints as ck
    from .backbones import BACKBONES, resolve_device
    from .embedding_cache import folder_usage
    from .pipeline.segmenter import default_weights
    from .settings import DEFAULT_SETTINGS

    cache = args.cache_dir or ck.default_cache_dir()
    ck.check_cache_dir(cache)
    cached = ck.cached_status(args.cache_dir)
    print(f"device: {resolve_device('auto')} (auto)")
    print(f"cache folder: {cache}  (override with --cache-dir or FOBSEGMENT_CACHE_DIR)")
    usage = ", ".join(f"{what} {n} ({size / 2**20:.0f} MB)" for what, (n, size) in folder_usage(cache).items())
    print(f"cached: {usage}; kept under {DEFAULT_SETTINGS.embedding_cache_disk_mb:.0f} MB of embeddings and "
          f"{DEFAULT_SETTINGS.decode_cache_disk_mb:.0f} MB of decoded masks")
    print(f"runtime: {_runtime_line(args.cache_dir)}")
    print("backbones:")
    for name, (desc, _box) in BACKBONES.items():
        if name == "litemedsam":
            state = "installed (embedded)"
        elif name == "medsam_vit_b":
            state = "local file (--checkpoint)"
        else:
            state = "cached" if cached.get(name) else "downloadable"
        w = default_weights(name)
        print(f"  {name:<13} {state:<22} FoB weights: {'shipped' if w else 'none'}  - {desc}")
    return 0


def _runtime_line(cache_dir) -> str:
    """Which runtime runs LiteMedSAM's encoder on this machine, and why."""
    from .backbones import cpu_runtime, onnx_runtime

    cpu = cpu_runtime.cpu_description()
    where = f"CPU {cpu['model']} ({' '.join(cpu['flags']) or 'no AVX2'}), {cpu['cores']} cores"
    want = onnx_runtime.requested_runtime()
    if want != "auto":
        return f"{want} (FOBSEGMENT_RUNTIME={want}) on {where}"
    installed = [rt for rt in ("onnxruntime", "openvino") if cpu_runtime.available(rt)]
    if not installed:
        return f"eager PyTorch on {where} (pip install onnxruntime openvino for a faster CPU encoder)"
    try:
        from .backbones.litemedsam import LiteMedSAMBackbone

        recorded = LiteMedSAMBackbone(cache_dir=cache_dir).recorded_runtime()
    except FoBError:
        recorded = None
    if recorded is None:
        return (f"not measured yet on {where}: the first segmentation times {', '.join(installed)} and eager "
                f"PyTorch once (~10 s) and keeps the fastest (FOBSEGMENT_RUNTIME=... to choose)")
    return f"{recorded.runtime} for the litemedsam encoder on {where}: {recorded.reason}, {recorded.measured_at}"


def _lazy(target: str):
    """A command function imported only when the command runs (``--help`` stays fast)."""
    def run(args):
        import importlib

        module, func = target.split(":")
        return getattr(importlib.import_module(f"FoBSegmentLib.{module}"), func)(args)
    return run


def _add_model_options(p, checkpoint: bool = True, cache_help: str | None = None) -> None:
    """The backbone, checkpoint, device and cache folder options every model command takes."""
    p.add_argument("--backbone", default="litemedsam",
                   help="litemedsam (embedded, default) | sam_vit_b | sam_vit_l | sam_vit_h | medsam_vit_b")
    if checkpoint:
        p.add_argument("--checkpoint", help="local checkpoint file for the backbone (no download)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--cache-dir", help=cache_help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fobsegment", description="One-shot volume segmentation with FoB-prompted SAM models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment a structure through a volume from one annotated slice")
    s.add_argument("--volume", required=True, help="query volume (NIfTI, NRRD, MHA or DICOM folder)")
    s.add_argument("--series", help="DICOM folder with several series: the SeriesInstanceUID or its number in the list")
    s.add_argument("--support-volume", action="append",
                   help="support volume (default: the query itself); repeat with --support-mask for an atlas "
                        "of several annotated patients")
    s.add_argument("--support-mask", required=True, action="append",
                   help="labelmap or .seg.nrrd annotated on the support volume (one per --support-volume)")
    s.add_argument("--atlas-fusion", choices=["consensus", "vote"],
                   help="with several supports: consensus (default: the run that agrees best with the others) or "
                        "vote (kept where at least half of the runs agree)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--label", type=int, help="label value of the structure in the support mask")
    g.add_argument("--segment", help="segment name in a .seg.nrrd support mask")
    s.add_argument("--support-slices", help="comma-separated support slice indices (default: all annotated)")
    s.add_argument("--slices", help="restrict the query to slices FIRST:LAST (acquisition axis)")
    s.add_argument("--within", help="a result (or labelmap) of another structure on this volume: keep this result "
                                    "within its first to last slice (e.g. the right ventricle within the left "
                                    "ventricle's blood pool on a cardiac short-axis stack)")
    s.add_argument("--output", required=True, help="output .seg.nrrd, .nii.gz, .nii, .nrrd or .mha")
    _add_model_options(s, cache_help="folder for downloaded checkpoints and cached embeddings (default: the user "
                                     "cache folder, see `fobsegment info`)")
    s.set_defaults(func=cmd_segment)

    pr = sub.add_parser("prepare", help="encode a volume's slices into the cache (later commands only decode)")
    pr.add_argument("--volume", required=True)
    pr.add_argument("--series")
    pr.add_argument("--slices", help="only slices FIRST:LAST")
    _add_model_options(pr, cache_help="default: the user cache folder (see `fobsegment info`)")
    pr.set_defaults(func=cmd_prepare)

    r = sub.add_parser("refine", help="redo a result from the slices you corrected (corrected slices are kept)")
    r.add_argument("--volume", required=True, help="the query volume of the result")
    r.add_argument("--series")
    r.add_argument("--previous", required=True, help="the result as FoBSegment wrote it")
    r.add_argument("--corrected", required=True, help="the same result after your corrections")
    g2 = r.add_mutually_exclusive_group()
    g2.add_argument("--label", type=int, help="label value in --previous / --corrected")
    g2.add_argument("--segment", help="segment name in --previous / --corrected (.seg.nrrd)")
    r.add_argument("--support-volume", help="the original support volume (default: the corrected slices)")
    r.add_argument("--support-mask", help="the original support mask (default: the corrected slices)")
    r.add_argument("--support-label", type=int)
    r.add_argument("--within", help="as for segment: keep the refined result within this result's first to last "
                                    "slice (the corrected slices stay)")
    r.add_argument("--output", required=True)
    _add_model_options(r)
    r.set_defaults(func=cmd_refine)

    i = sub.add_parser("info", help="list backbones, the device and the cache folder")
    i.add_argument("--cache-dir")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("batch", help="segment every case of a manifest (resumable, shardable)")
    b.add_argument("--manifest", required=True, help="CSV or JSON lines: query, support_mask[, support_volume, label, "
                                                     "segment, reference, reference_label, output, id, "
                                                     "support_slices, oracle, atlas_fusion, within]")
    b.add_argument("--output-dir", required=True, help="folder for the outputs and summary.{jsonl,csv,json}")
    b.add_argument("--shard", help="I/N: run rows I, I+N, I+2N, ... (0-based), e.g. $SLURM_ARRAY_TASK_ID/$N")
    b.add_argument("--engine", default="local", choices=["local", "dask"],
                   help="local: this process; dask: a Dask LocalCluster (or --scheduler) with --workers processes")
    b.add_argument("--workers", type=int, default=1, help="worker processes for --engine dask")
    b.add_argument("--scheduler", help="address of a running Dask scheduler (e.g. tcp://host:8786)")
    _add_model_options(b, cache_help="folder for checkpoints and cached embeddings")
    b.set_defaults(func=_lazy("batch:cmd_batch"))

    _add_train(sub)
    _add_evaluate(sub)
    _add_demo(sub)
    return p


def _add_train(sub):
    t = sub.add_parser("train", help="train the FoB prompt generator self-supervised (no labels)")
    t.add_argument("--images", nargs="+", required=True, help="glob(s) of training images, e.g. 'DIR/image_*.nii.gz'")
    t.add_argument("--output", required=True, help="generator weights to write (.pt); <output>.ckpt resumes")
    t.add_argument("--backbone", default="litemedsam")
    t.add_argument("--checkpoint", help="local backbone checkpoint")
    t.add_argument("--device", default="auto")
    t.add_argument("--iterations", type=int, default=2000)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--exclude-labels", help="Setting II: skip slices containing any of these label values "
                                            "(read from label_<case> beside each image)")
    t.add_argument("--supervoxel", default="slic", choices=["slic", "felzenszwalb"])
    t.add_argument("--supervoxel-mm", type=float, default=30.0)
    t.add_argument("--no-spr", action="store_true")
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--max-minutes", type=float, help="stop (resumably) after this many minutes")
    t.add_argument("--threads", type=int)
    t.add_argument("--default-prompt", help="prompt strategy recorded as this generator's default")
    t.add_argument("--episodes", default="adjacent", choices=["adjacent", "relocate", "mixed"],
                   help="adjacent slices (default), relocation (the structure elsewhere in the volume or in "
                        "another volume, strong augmentation) or both")
    t.add_argument("--prior-dropout", type=float, default=0.0,
                   help="chance of training a relocation episode without the support ring's position prior")
    t.add_argument("--prior-source", default="support", choices=["support", "contrast"],
                   help="a relocation episode's position prior: the support ring (default) or the ring "
                        "around the training-free contrast region on the query")
    t.add_argument("--init", help="generator weights (.pt) to start from (fine-tuning)")
    t.add_argument("--snapshot-every", type=int, help="also write <output>.itNNNNNN.pt every N iterations")
    t.add_argument("--cache-dir")
    t.set_defaults(func=_lazy("research.training:cmd_train"))


def _add_evaluate(sub):
    e = sub.add_parser("evaluate", help="Dice on labelled volumes (protocols ep1 and full)")
    e.add_argument("--data", required=True, help="folder with image_<case>.nii.gz and label_<case>.nii.gz")
    e.add_argument("--classes", required=True, help="name=value pairs, e.g. liver=1,right_kidney=2")
    e.add_argument("--support-case", required=True)
    e.add_argument("--cases", required=True, help="comma-separated query case ids")
    e.add_argument("--protocol", default="ep1", choices=["ep1", "full"])
    e.add_argument("--method", default="pipeline", choices=["pipeline", "coarse", "support_box", "gt_box"])
    e.add_argument("--within", help="keep a class within another's first to last slice, e.g. rv:lv_bp (cardiac "
                                    "short axis: the right ventricle's labels never pass the left's); "
                                    "comma-separated pairs")
    e.add_argument("--json", help="write the results here")
    e.add_argument("--output-dir", help="keep each case's segmentation and the batch summary here; the same "
                                        "command again resumes (default: a temporary folder)")
    e.add_argument("--shard", help="I/N: run every N-th case from the I-th (0-based), as fobsegment batch")
    e.add_argument("--engine", default="local", choices=["local", "dask"])
    e.add_argument("--workers", type=int, default=2, help="local Dask workers (with --engine dask)")
    _add_model_options(e)
    e.add_argument("--prompt-source", default="contrast", choices=["contrast", "fob"],
                   help="how a slice without a segmented neighbour is prompted: contrast (default, no training) "
                        "or fob (research: the learned generator)")
    e.add_argument("--weights", help="learned generator weights (with --prompt-source fob)")
    e.add_argument("--prompt", default="auto", help="with --prompt-source fob: auto | points | box | box+points")
    e.add_argument("--no-spr", action="store_true", help="with --prompt-source fob: no ring refinement (ablation)")
    e.set_defaults(func=_lazy("evaluation:cmd_evaluate"))


def _add_demo(sub):
    d = sub.add_parser("demo", help="segment liver and spleen of the shipped example CT from one slice each")
    d.add_argument("--output-dir", default="fobsegment_demo")
    d.add_argument("--volume", help="CT volume (default: the shipped TotalSegmentator example)")
    d.add_argument("--labels", help="its reference label map (5 liver, 1 spleen)")
    _add_model_options(d, checkpoint=False)
    d.set_defaults(func=_lazy("demo:cmd_demo"))


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CancelledError as exc:
        print(f"fobsegment: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("fobsegment: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`fobsegment info | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except FoBError as exc:
        print(f"fobsegment: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("fobsegment: error: out of memory. Restrict the work with --slices, or use a smaller "
              "backbone (litemedsam) or --device cpu.", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
