"""The ``fobsegment`` command line: batch work outside Slicer.

Every user error exits non-zero with one paragraph on stderr (what is wrong, what to do),
never a traceback, and never leaves an output file behind.
"""

from __future__ import annotations

import argparse
import sys

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
    from .volume_segmenter import Segmenter

    out = io.check_output_path(args.output)
    support_slices = _parse_int_list(args.support_slices, "--support-slices")
    slice_range = _parse_range(args.slices)
    query = io.read_volume(args.volume, "query volume")
    support = io.read_volume(args.support_volume, "support volume") if args.support_volume else query
    sm = io.read_support_mask(args.support_mask, support, label=args.label, segment=args.segment)
    seg = Segmenter(args.backbone, args.device, checkpoint=args.checkpoint, weights=args.weights,
                    prompt=args.prompt, cache_dir=args.cache_dir, prompt_source=args.prompt_source)
    update, close = _progress_bar("segmenting")
    try:
        res = seg.segment(query, support, sm.mask, support_slices=support_slices, slice_range=slice_range,
                          progress=update)
    finally:
        close()
    name = f"{sm.name} (FoB)"
    io.write_result(out, query, res.mask, name=name, color=sm.color, label_value=sm.label_value or 1)
    print(f"wrote {out}: segment {name!r}, {res.slices_segmented} of {res.slices_total} slices, "
          f"{res.slices_encoded} encoded, {res.seconds:.1f} s on {res.device} ({res.backbone}, "
          f"prompts: {res.prompt_source}/{res.prompt_strategy})")
    return 0


def cmd_info(args) -> int:
    from . import checkpoints as ck
    from .backbones import BACKBONES, resolve_device
    from .volume_segmenter import default_weights

    cache = args.cache_dir or ck.default_cache_dir()
    cached = ck.cached_status(args.cache_dir)
    print(f"device: {resolve_device('auto')} (auto)")
    print(f"cache folder: {cache}  (override with --cache-dir or FOBSEGMENT_CACHE_DIR)")
    from .backbones import onnx_runtime

    want = onnx_runtime.requested_runtime()
    if want == "torch":
        rt = "eager PyTorch (FOBSEGMENT_RUNTIME=torch)"
    elif onnx_runtime.onnxruntime_available():
        rt = "ONNX Runtime on CPU for litemedsam (FOBSEGMENT_RUNTIME=torch for eager PyTorch), PyTorch otherwise"
    else:
        rt = "eager PyTorch (pip install onnx onnxruntime for a ~3x faster CPU encoder)"
    print(f"runtime: {rt}")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fobsegment", description="One-shot volume segmentation with FoB-prompted SAM models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment a structure through a volume from one annotated slice")
    s.add_argument("--volume", required=True, help="query volume (NIfTI, NRRD, MHA or DICOM folder)")
    s.add_argument("--support-volume", help="support volume (default: the query itself)")
    s.add_argument("--support-mask", required=True, help="labelmap or .seg.nrrd annotated on the support volume")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--label", type=int, help="label value of the structure in the support mask")
    g.add_argument("--segment", help="segment name in a .seg.nrrd support mask")
    s.add_argument("--support-slices", help="comma-separated support slice indices (default: all annotated)")
    s.add_argument("--slices", help="restrict the query to slices FIRST:LAST (acquisition axis)")
    s.add_argument("--output", required=True, help="output .seg.nrrd, .nii.gz, .nrrd or .mha")
    s.add_argument("--backbone", default="litemedsam")
    s.add_argument("--checkpoint", help="local checkpoint file for the backbone (no download)")
    s.add_argument("--weights", help="FoB generator weights (default: the shipped ones for the backbone)")
    s.add_argument("--prompt", default="auto", help="auto | points | box | box+points")
    s.add_argument("--prompt-source", default="auto", help="auto | fob | propagate")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--cache-dir", help="folder for downloaded checkpoints and cached embeddings")
    s.set_defaults(func=cmd_segment)

    i = sub.add_parser("info", help="list backbones, the device and the cache folder")
    i.add_argument("--cache-dir")
    i.set_defaults(func=cmd_info)

    for mod, name in (("training", "train"), ("evaluation", "evaluate"), ("demo", "demo")):
        try:
            m = __import__(f"FoBSegmentLib.{mod}", fromlist=["add_parser"])
        except ImportError:
            continue
        m.add_parser(sub)
    return p


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
    except FoBError as exc:
        print(f"fobsegment: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("fobsegment: error: out of memory. Restrict the work with --slices, or use a smaller "
              "backbone (litemedsam) or --device cpu.", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
