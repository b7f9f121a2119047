"""Speed and footprint on the machine in hand: encoder runtimes, start-up, re-runs, memory.

    .venv/bin/python benchmarks/speed_memory.py [--quick] [--big] [--emulate-avx2] [--rounds 3] [--json OUT.json]

Prints, in one run:

1. the CPU (model, AVX2/AVX-512 flags, cores) and package versions;
2. seconds per slice of LiteMedSAM's image encoder in every installed runtime (eager PyTorch,
   ONNX Runtime, OpenVINO) on real MRI slices, each as a ratio to eager PyTorch, and the
   runtime FoBSegment chooses on this machine and why.  Each runtime runs in a process of its
   own (no other runtime's threads or memory beside it), the runtimes in turn, ``--rounds``
   times: a shared machine drifts between minutes, so the ratio is also given per round.
   With ``--emulate-avx2`` the same with oneDNN and MKL limited to AVX2
   (``ONEDNN_MAX_CPU_ISA=AVX2``: PyTorch and OpenVINO honour it, ONNX Runtime's own kernels
   do not);
3. the Dice change of each runtime against eager PyTorch on the benchmark folds (CHAOS
   support 2 / cases 3, 5, 8, 20 and MS-CMRSeg support 2 / cases 3-9, protocols ep1 and full;
   ``--quick``: the example CT's liver and spleen instead);
4. ``fobsegment --help`` and ``fobsegment segment`` as separate processes on a 37-slice MRI
   (CHAOS case 1, one painted liver slice; the example CT without the shared data): seconds
   from start to the first slice encoding, cold (no embedding cached) and cached (the same
   command again: embeddings and decoded masks cached), their ratio, the same with the
   decoded masks removed (embeddings cached: what another structure or support costs), and
   peak RSS of each;
5. with ``--big``: peak RSS of ``fobsegment segment`` on a 512 x 512 x 300 CT synthesised from
   the example CT (a 21-slice range bounds the time).

Every process uses a fresh cache folder holding only the verified ONNX exports and the
runtime record, so "cold" means no embedding cached, as for a new volume.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))
sys.path.insert(0, str(REPO / "benchmarks"))
DATA = Path(os.environ.get("FOBSEGMENT_SHARED_DATA", REPO.parent / "shared" / "data"))
TEST_DATA = REPO / "FoBSegment" / "Testing" / "Data"
RUNTIMES = ("torch", "onnxruntime", "openvino")

# Run as a child: the CLI with the moment the first slice starts encoding and the peak RSS.
CHILD = r"""
import sys, time
import FoBSegmentLib.backbones.litemedsam as L
encode = L.LiteMedSAMBackbone.encode
def first(self, batch):
    if not hasattr(first, "t"):
        first.t = time.time()
        print(f"BENCH_FIRST_ENCODE {first.t}", file=sys.stderr, flush=True)
    return encode(self, batch)
L.LiteMedSAMBackbone.encode = first
from FoBSegmentLib.cli import main
code = main(sys.argv[1:])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked parent across exec.
hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(f"BENCH_PEAK_RSS_KB {hwm}", file=sys.stderr, flush=True)
print(f"BENCH_TORCH_LOADED {'torch' in sys.modules}", file=sys.stderr, flush=True)
sys.exit(code)
"""


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="Dice change on the example CT instead of the folds")
    ap.add_argument("--big", action="store_true", help="also the 512 x 512 x 300 CT")
    ap.add_argument("--emulate-avx2", action="store_true", help="also the runtimes with oneDNN/MKL limited to AVX2")
    ap.add_argument("--rounds", type=int, default=3, help="encoder timings: each runtime this many times")
    ap.add_argument("--one-runtime", choices=RUNTIMES, help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args(argv)
    report: dict = {}
    if args.one_runtime:  # a child timing one runtime
        print(json.dumps(encoder_seconds(args.one_runtime, real_slices())))
        return 0
    machine(report)
    with tempfile.TemporaryDirectory(prefix="fobsegment-bench-") as tmp:
        tmp = Path(tmp)
        exports = prepared_exports(tmp / "exports")
        section("encoder, seconds per slice (LiteMedSAM, 256 x 256 input, real MRI slices)")
        env = {**os.environ, "FOBSEGMENT_CACHE_DIR": str(exports)}
        report["encoder"] = encoder_runtimes(env, args.rounds)
        chosen(report, exports)
        if args.emulate_avx2:
            section("encoder with oneDNN and MKL limited to AVX2 (emulated; ONNX Runtime's kernels ignore the limit)")
            env.update(ONEDNN_MAX_CPU_ISA="AVX2", DNNL_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
            report["encoder_avx2_emulated"] = encoder_runtimes(env, args.rounds)
        section("Dice change against eager PyTorch (same slices, each runtime's own embeddings)")
        report["dice_change"] = dice_changes(args.quick)
        section("command line, separate processes")
        report["processes"] = processes(tmp, exports)
        if args.big:
            section("512 x 512 x 300 CT, separate process")
            report["big_ct"] = big_ct(tmp, exports)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def section(title):
    print(f"\n## {title}", flush=True)


def machine(report):
    import torch

    from FoBSegmentLib.backbones import cpu_runtime

    from refine_loop import cpu_line

    sig = cpu_runtime.machine_signature()
    report["machine"] = sig
    print(f"CPU: {cpu_line()}")
    print(f"threads {cpu_runtime.threads()}; versions: "
          + ", ".join(f"{k} {v}" for k, v in sig["versions"].items()))
    print(f"GPU: {'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (GPU figures not measured)'}")


def backbone(cache_dir=None, runtime=None):
    from FoBSegmentLib.backbones.litemedsam import LiteMedSAMBackbone

    bb = LiteMedSAMBackbone("cpu", cache_dir=cache_dir)
    if runtime:
        bb.runtime = runtime
    return bb


def prepared_exports(folder: Path) -> Path:
    """A cache folder with the verified ONNX exports and this machine's runtime record."""
    bb = backbone()
    bb.runtime_choice  # exports and measures once per machine into the user cache
    bb._decoder_model()
    from FoBSegmentLib.backbones import onnx_runtime

    (folder / "onnx").mkdir(parents=True)
    for f in onnx_runtime.onnx_cache_dir(bb.cache_dir).iterdir():
        if f.is_file() and not f.name.endswith(".part"):
            shutil.copy(f, folder / "onnx" / f.name)
    return folder


def real_slices(n=6):
    from FoBSegmentLib.geometry import SliceView
    from FoBSegmentLib.io import read_volume
    from FoBSegmentLib.preprocessing import fit_normalisation

    path = DATA / "chaos_t2spir_mri" / "image_1.nii.gz"
    vol = read_volume(path if path.is_file() else TEST_DATA / "example_ct.nii.gz")
    stack, norm = SliceView.for_volume(vol).to_stack(vol.array), fit_normalisation(vol.array)
    bb = backbone(runtime="torch")
    picks = np.linspace(stack.shape[0] * 0.25, stack.shape[0] * 0.75, n).astype(int)
    return [bb.prepare(norm.apply(stack[i]))[None] for i in picks]


def encoder_seconds(rt: str, xs) -> float | None:
    """Median seconds per slice of one runtime over the slices, after a warm-up call."""
    import torch

    from FoBSegmentLib.backbones import cpu_runtime

    if not cpu_runtime.available(rt):
        return None
    try:
        bb = backbone(runtime=rt)
    except RuntimeError:
        return None
    with torch.inference_mode():
        bb.encode(xs[0])
        times = []
        for x in xs:
            t = time.perf_counter()
            bb.encode(x)
            times.append(time.perf_counter() - t)
    return round(float(np.median(times)), 4)


def encoder_runtimes(env: dict, rounds: int) -> dict:
    """Every runtime in a process of its own, in turn, ``rounds`` times: per round and overall
    (median) seconds per slice, and each runtime's ratio to eager PyTorch."""
    per_round = []
    for r in range(rounds):
        row = {}
        for rt in RUNTIMES:
            out = subprocess.run([sys.executable, __file__, "--one-runtime", rt], env=env, capture_output=True,
                                 text=True)
            try:
                row[rt] = json.loads(out.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                print(f"  {rt} failed:", out.stderr[-1500:])
                row[rt] = None
        per_round.append(row)
        print(f"  round {r + 1}: " + ", ".join(f"{rt} {s:.3f} s" if s else f"{rt} -" for rt, s in row.items()),
              flush=True)
    median = {rt: (round(float(np.median([row[rt] for row in per_round if row[rt]])), 4)
                   if any(row[rt] for row in per_round) else None) for rt in RUNTIMES}
    ratios = {rt: [round(row["torch"] / row[rt], 2) for row in per_round if row[rt] and row.get("torch")]
              for rt in RUNTIMES if rt != "torch"}
    eager = median.get("torch")
    for rt, s in median.items():
        if s is None:
            print(f"  {rt:<12} not available")
        elif rt == "torch" or not eager:
            print(f"  {rt:<12} {s:.3f} s per slice (median of {rounds} rounds)")
        else:
            print(f"  {rt:<12} {s:.3f} s per slice  {eager / s:.2f}x eager PyTorch (per round: "
                  + ", ".join(f"{x:.2f}x" for x in ratios[rt]) + ")")
    return {"seconds_per_slice": median, "per_round": per_round,
            "ratio_to_eager": {rt: round(eager / median[rt], 2) for rt in ratios if eager and median[rt]},
            "ratio_per_round": ratios}


def chosen(report, exports):
    bb = backbone(exports)
    c = bb.runtime_choice
    report["chosen"] = {"runtime": c.runtime, "reason": c.reason}
    print(f"chosen on this machine: {c.runtime} ({c.reason}; recorded {c.measured_at})")


def dice_changes(quick: bool) -> dict:
    from FoBSegmentLib import Segmenter
    from FoBSegmentLib.evaluation import evaluate
    from run_benchmark import FOLDS  # the generator's held-out fold 1, the benchmark set

    runs = []
    if not quick and all((DATA / d["folder"]).is_dir() for d in FOLDS["1"].values()):
        for name, d in FOLDS["1"].items():
            for protocol in ("ep1", "full"):
                runs.append((f"{name} {protocol}", d, protocol))
    else:
        print(f"  (--quick or no shared data at {DATA}: the example CT's liver and spleen, whole volume)")
    results = {}
    for rt in RUNTIMES:
        try:
            bb = backbone(runtime=rt)
        except RuntimeError:
            continue
        seg = Segmenter(bb, cache_dir=None)  # memory-only cache: this runtime's own embeddings
        per = {}
        if runs:
            for label, d, protocol in runs:
                r = evaluate(DATA / d["folder"], d["classes"], d["support"], d["cases"], protocol, segmenter=seg)
                per[label] = {f"{c}/{case}": v for c, cls in r["classes"].items() for case, v in cls["cases"].items()}
        else:
            per["example CT"] = example_ct_dice(seg)
        results[rt] = per
        print(f"  {rt:<12} done ({sum(len(v) for v in per.values())} structure-cases)", flush=True)
    out = {}
    for rt in results:
        if rt == "torch":
            continue
        diffs = [abs(results[rt][k][c] - results["torch"][k][c]) for k in results[rt] for c in results[rt][k]]
        means = {k: (float(np.mean(list(results[rt][k].values()))), float(np.mean(list(results["torch"][k].values()))))
                 for k in results[rt]}
        out[rt] = {"max_abs_change": round(max(diffs), 4), "mean_abs_change": round(float(np.mean(diffs)), 5),
                   "changed": int(sum(d > 0 for d in diffs)), "n": len(diffs),
                   "mean_dice": {k: [round(a, 4), round(b, 4)] for k, (a, b) in means.items()}}
        print(f"  {rt:<12} vs eager: per structure and case, max |change| {max(diffs):.4f}, mean "
              f"{np.mean(diffs):.5f}, {out[rt]['changed']} of {len(diffs)} changed; mean Dice "
              + "; ".join(f"{k} {a:.4f} vs {b:.4f}" for k, (a, b) in means.items()))
    return out


def example_ct_dice(seg) -> dict:
    from FoBSegmentLib.evaluation import dice, one_slice_support
    from FoBSegmentLib.geometry import SliceView
    from FoBSegmentLib.io import read_volume

    q = read_volume(TEST_DATA / "example_ct.nii.gz")
    lab = np.rint(read_volume(TEST_DATA / "example_seg.nii.gz").array).astype(int)
    out = {}
    for name, value in (("liver", 5), ("spleen", 1)):
        sup, _ = one_slice_support(SliceView.for_volume(q), lab == value)
        out[name] = round(dice(seg.segment(q, q, sup).mask, lab == value), 4)
    return out


def run_cli(args, cache: Path) -> dict:
    env = {**os.environ, "FOBSEGMENT_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO / "FoBSegment")}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"fobsegment {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    first = rss = torch_loaded = None
    for line in p.stderr.splitlines():
        if line.startswith("BENCH_FIRST_ENCODE"):
            first = float(line.split()[1]) - t0
        elif line.startswith("BENCH_PEAK_RSS_KB"):
            rss = int(line.split()[1]) / 2**20
        elif line.startswith("BENCH_TORCH_LOADED"):
            torch_loaded = line.split()[1] == "True"
    return {"seconds": round(wall, 2), "first_encode_s": round(first, 2) if first else None,
            "peak_rss_gib": round(rss, 3) if rss else None, "torch_loaded": torch_loaded, "stdout": p.stdout.strip()}


def support_case(tmp: Path):
    """A query volume and one painted liver slice on it."""
    from FoBSegmentLib.evaluation import one_slice_support
    from FoBSegmentLib.geometry import SliceView
    from FoBSegmentLib.io import read_volume, write_result

    img, lab, value = DATA / "chaos_t2spir_mri" / "image_1.nii.gz", DATA / "chaos_t2spir_mri" / "label_1.nii.gz", 1
    if not img.is_file():
        img, lab, value = TEST_DATA / "example_ct.nii.gz", TEST_DATA / "example_seg.nii.gz", 5
    q = read_volume(img)
    mask, _ = one_slice_support(SliceView.for_volume(q), np.rint(read_volume(lab).array) == value)
    write_result(tmp / "support.nii.gz", q, mask)
    return img, tmp / "support.nii.gz", q.array.shape


def processes(tmp: Path, exports: Path) -> dict:
    out = {}
    t = time.time()
    subprocess.run([sys.executable, "-m", "FoBSegmentLib.cli", "--help"], capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO / "FoBSegment")})
    out["help_s"] = round(time.time() - t, 2)
    print(f"  fobsegment --help: {out['help_s']:.2f} s")
    img, support, shape = support_case(tmp)
    cache = tmp / "cache"
    shutil.copytree(exports, cache)
    args = ["segment", "--volume", str(img), "--support-mask", str(support), "--output", str(tmp / "out.seg.nrrd")]
    print(f"  volume {img.name} {shape[::-1]} (i, j, k), one painted liver slice")
    for name in ("cold", "cached", "decoding"):
        (tmp / "out.seg.nrrd").unlink(missing_ok=True)
        if name == "decoding":  # embeddings cached, decoded masks not: another structure's cost
            shutil.rmtree(cache / "decoded")
        r = run_cli(args, cache)
        out[name] = r
        first = f"{r['first_encode_s']:.2f} s" if r["first_encode_s"] is not None else "never (nothing to encode)"
        print(f"  {name:<8} {r['seconds']:6.2f} s, first slice encoding after {first}, peak RSS "
              f"{r['peak_rss_gib']:.2f} GiB, PyTorch {'loaded' if r['torch_loaded'] else 'not loaded'} | {r['stdout']}")
    out["cold_over_cached"] = round(out["cold"]["seconds"] / out["cached"]["seconds"], 2)
    out["cold_over_decoding"] = round(out["cold"]["seconds"] / out["decoding"]["seconds"], 2)
    print(f"  cold / cached: {out['cold_over_cached']:.2f}x; cold / decoding only (embeddings cached, decoded "
          f"masks removed): {out['cold_over_decoding']:.2f}x")
    return out


def big_ct(tmp: Path, exports: Path) -> dict:
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(TEST_DATA / "example_ct.nii.gz"))
    lab = sitk.ReadImage(str(TEST_DATA / "example_seg.nii.gz"))
    ref = sitk.Image([512, 512, 300], sitk.sitkInt16)
    ref.SetSpacing([ct.GetSpacing()[i] * ct.GetSize()[i] / s for i, s in enumerate((512, 512, 300))])
    ref.SetOrigin(ct.GetOrigin())
    ref.SetDirection(ct.GetDirection())
    big = sitk.Resample(ct, ref, sitk.Transform(), sitk.sitkLinear, -1024, sitk.sitkInt16)
    liver = sitk.GetArrayFromImage(sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                 sitk.sitkUInt8)) == 5
    k = int(np.argmax(liver.reshape(300, -1).sum(1)))
    sup = np.zeros(liver.shape, np.uint8)
    sup[k] = liver[k]
    s_img = sitk.GetImageFromArray(sup)
    s_img.CopyInformation(big)
    sitk.WriteImage(big, str(tmp / "big.nii.gz"))
    sitk.WriteImage(s_img, str(tmp / "big_support.nii.gz"))
    cache = tmp / "big_cache"
    shutil.copytree(exports, cache)
    r = run_cli(["segment", "--volume", str(tmp / "big.nii.gz"), "--support-mask", str(tmp / "big_support.nii.gz"),
                 "--slices", f"{k - 10}:{k + 10}", "--output", str(tmp / "big_out.seg.nrrd")], cache)
    print(f"  {r['seconds']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB | {r['stdout']}")
    return r


if __name__ == "__main__":
    sys.exit(main())
