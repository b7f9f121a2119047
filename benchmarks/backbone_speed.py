"""Seconds per slice and peak memory of every backbone's image encoder on this machine.

    .venv/bin/python benchmarks/backbone_speed.py [--variants litemedsam,sam_vit_b,sam_vit_h] [--device cpu|cuda]
                                                  [--batches 1,2,4,8]

The SAM checkpoints cannot be downloaded on the build machines, so SAM ViT-B/L/H are built
with random weights: the encoder's arithmetic and memory do not depend on the weight values,
so the timing is that of the real model (the output is meaningless and is not used).
LiteMedSAM uses its real, embedded weights and is timed in eager PyTorch, ONNX Runtime and
OpenVINO (``litemedsam``: the runtime chosen on this machine).
Each variant runs in a fresh process so that its peak memory is its own.

On a GPU (``--device cuda``) it prints slices per second for each batch size and the peak
GPU memory, with the card's name: the batch size to use is the fastest one that fits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))
ANCHORS = {"sam_vit_b": "about 20 s per slice here (reference figure)", "sam_vit_h": "75-110 s per slice here (reference figure)"}


def child(variant: str, device: str, batches: list[int], repeats: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    dev = torch.device(device)
    if variant.startswith("litemedsam"):
        from FoBSegmentLib.backbones.litemedsam import LiteMedSAMBackbone

        bb = LiteMedSAMBackbone(str(dev))
        bb.runtime = variant.split("_", 1)[1] if "_" in variant else bb.runtime  # litemedsam: the chosen one
        size = 256

        def encode(x):
            return bb.encode(x.numpy())
    else:
        from segment_anything.build_sam import sam_model_registry

        net = sam_model_registry[variant.split("_", 1)[1]](checkpoint=None).image_encoder.to(dev).eval()
        size = 1024

        def encode(x):
            with torch.inference_mode():
                y = net(x.to(dev))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return y

    out = {"variant": variant, "device": str(dev), "input": size}
    if dev.type == "cuda":
        out["card"] = torch.cuda.get_device_name(dev)
    for b in batches:
        x = torch.rand(b, 3, size, size)
        try:
            encode(x)  # warm-up (allocations, kernels)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            t = time.perf_counter()
            for _ in range(repeats):
                encode(x)
            sec = (time.perf_counter() - t) / (repeats * b)
        except torch.cuda.OutOfMemoryError:
            out.setdefault("batches", {})[b] = "out of memory"
            break
        row = {"s_per_slice": round(sec, 4), "slices_per_s": round(1 / sec, 2)}
        if dev.type == "cuda":
            row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        out.setdefault("batches", {})[b] = row
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="litemedsam_torch,litemedsam_onnxruntime,litemedsam_openvino,sam_vit_b,sam_vit_h")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--repeats", type=int, default=0, help="timed repeats (default: 5 on CPU for LiteMedSAM, 1 for SAM)")
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        reps = args.repeats or (20 if args.device != "cpu" else 5 if args.child.startswith("litemedsam") else 1)
        print(json.dumps(child(args.child, args.device, batches, reps)))
        return 0
    print(f"machine: {os.cpu_count()} CPU cores, device {args.device}")
    rows = []
    for v in args.variants.split(","):
        r = subprocess.run([sys.executable, __file__, "--child", v, "--device", args.device,
                            "--batches", args.batches, "--repeats", str(args.repeats)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{v}: failed\n{r.stderr[-1500:]}")
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        for b, m in row["batches"].items():
            extra = f", peak GPU {m['peak_gpu_gb']} GB" if isinstance(m, dict) and "peak_gpu_gb" in m else ""
            figures = m if isinstance(m, str) else f"{m['s_per_slice']:.3f} s per slice ({m['slices_per_s']:.2f} slices/s){extra}"
            print(f"{v:<24} input {row['input']:>4}  batch {b}: {figures}, peak RSS {row['peak_rss_gb']} GB"
                  + (f"  [anchor: {ANCHORS[v]}]" if v in ANCHORS and b == batches[0] else "")
                  + (f"  [{row['card']}]" if "card" in row else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
