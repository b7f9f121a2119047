"""Self-supervised training of the FoB prompt generator on frozen backbone embeddings.

Episodes (docs/method.md section 3): a random prepared volume, a random supervoxel, two adjacent
slices that both contain it (>= 200 px); one is the support, the other the query (random
order).  Augmentation works in feature space because the encoder is frozen and embeddings
are cached: a small random affine (rotation +-5 deg, scale 0.9-1.2, shear, shift) is applied
to the query's embedding and mask together.  (Intensity gamma would need re-encoding and is
left out; see the model card.)

Resumable: ``<output>.ckpt`` holds model, optimiser, scheduler, iteration and RNG states
and is rewritten atomically every ``--save-every`` iterations.  Multi-GPU goes through
PyTorch's own DistributedDataParallel under ``torchrun``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..background_ring import ring_points
from ..errors import FoBInputError

log = logging.getLogger(__name__)


class EpisodeSampler:
    """Draws FoB episodes from prepared volumes (see :mod:`training_data`)."""

    def __init__(self, volumes, rng: np.random.Generator, augment: bool = True):
        self.volumes = []
        for pv, exclude in volumes:
            cands = pv.episodes_candidates(exclude)
            if cands:
                self.volumes.append((pv, cands))
        if not self.volumes:
            raise FoBInputError("No training episodes: no supervoxel spans two adjacent slices with >= 200 px. "
                                "Check the training images (or lower the supervoxel size).")
        self.rng = rng
        self.augment = augment

    def __len__(self):
        return sum(len(c) for _, c in self.volumes)

    def sample(self, batch: int):
        s_emb, s_mask, s_ring, q_emb, q_mask, q_ring = [], [], [], [], [], []
        while len(s_emb) < batch:
            pv, cands = self.volumes[self.rng.integers(len(self.volumes))]
            a, b, label = cands[self.rng.integers(len(cands))]
            if self.rng.random() < 0.5:
                a, b = b, a
            se = torch.from_numpy(pv.embeddings[a].astype(np.float32))
            qe = torch.from_numpy(pv.embeddings[b].astype(np.float32))
            sm = torch.from_numpy(pv.pseudo[a] == label).float()
            qm = torch.from_numpy(pv.pseudo[b] == label).float()
            if self.augment:
                qe, qm = self._affine(qe, qm)
            if qm.sum() < 50:
                continue
            try:
                sr, qr = ring_points(sm.numpy() > 0.5), ring_points(qm.numpy() > 0.5)
            except ValueError:
                continue
            s_emb.append(se), s_mask.append(sm), s_ring.append(torch.from_numpy(sr).float())
            q_emb.append(qe), q_mask.append(qm), q_ring.append(torch.from_numpy(qr).float())
        st = torch.stack
        return st(s_emb), st(s_mask), st(s_ring), st(q_emb), st(q_mask), st(q_ring)

    def _affine(self, emb: torch.Tensor, mask: torch.Tensor):
        r = self.rng
        ang = math.radians(r.uniform(-5, 5))
        scale = r.uniform(0.9, 1.2)
        shear = math.radians(r.uniform(-3, 3))
        tx, ty = r.uniform(-0.05, 0.05, 2)
        c, s = math.cos(ang), math.sin(ang)
        A = np.array([[c, -s], [s, c]]) @ np.array([[1, math.tan(shear)], [0, 1]]) / scale
        theta = torch.tensor([[A[0, 0], A[0, 1], tx], [A[1, 0], A[1, 1], ty]], dtype=torch.float32)[None]
        # One theta in normalised coordinates moves the 64-grid embedding and the 256-grid mask alike.
        g64 = F.affine_grid(theta, (1, 1, 64, 64), align_corners=False)
        g256 = F.affine_grid(theta, (1, 1, 256, 256), align_corners=False)
        emb = F.grid_sample(emb[None], g64, mode="bilinear", padding_mode="border", align_corners=False)[0]
        mask = F.grid_sample(mask[None, None], g256, mode="bilinear", align_corners=False)[0, 0]
        return emb, (mask > 0.5).float()


def _atomic_save(obj, path: Path):
    from ..files import atomic_write

    atomic_write(path, lambda tmp: torch.save(obj, tmp), suffix=".tmp")


def train(images, output, backbone: str = "litemedsam", device: str = "auto", iterations: int = 2000,
          batch: int = 8, lr: float = 1e-4, seed: int = 0, cache_dir=None, exclude_labels=None,
          supervoxel: str = "slic", supervoxel_mm: float = 30.0, use_spr: bool = True, save_every: int = 100,
          checkpoint=None, threads: int | None = None, log_every: int = 20, channels: int = 128,
          max_minutes: float | None = None, default_prompt: str | None = None) -> Path:
    from ..backbones import create_backbone, resolve_device
    from .prompt_generator import FoBPromptGenerator, fob_loss, save_generator
    from .training_data import expand_images, label_for, load_prepared, prepare_volume

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        from datetime import timedelta

        # Ranks > 0 wait at a barrier while rank 0 encodes the training volumes, which can take
        # far longer than the default 30 min timeout on a large image set.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=6))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if threads:
        torch.set_num_threads(threads)
    output = Path(output)
    if not output.parent.exists():
        raise FoBInputError(f"The output folder {output.parent} does not exist. Create it first.")
    files = expand_images(images)
    if not files:
        raise FoBInputError(f"No training images match {images!r}. Give a glob such as 'DIR/image_*.nii.gz'.")
    dev = resolve_device(device)
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    rng = np.random.default_rng(seed + rank)

    prep_dir = Path(cache_dir or Path(output).parent / ".fob_prepared") / "prepared"
    bb = create_backbone(backbone, "cpu" if dev.type == "cpu" else str(dev), checkpoint, cache_dir)
    t_prep = time.time()
    vols = []
    if world > 1 and rank != 0:
        # Rank 0 encodes and stores the prepared volumes; the others then read its files
        # instead of encoding the same slices concurrently.
        torch.distributed.barrier()
    for f in files:
        p = prepare_volume(f, bb, prep_dir, label_path=label_for(f) if exclude_labels else None,
                           exclude_labels=exclude_labels)
        vols.append(load_prepared(p, supervoxel, supervoxel_mm))
        if rank == 0:
            print(f"prepared {f.name} ({vols[-1][0].embeddings.shape[0]} slices)", flush=True)
    del bb
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    sampler = EpisodeSampler(vols, rng)
    if rank == 0:
        print(f"{len(vols)} volumes, {len(sampler)} episode candidates, preparation {time.time() - t_prep:.0f} s", flush=True)

    model = FoBPromptGenerator(channels=channels, use_spr=use_spr).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # The official schedule decays x0.98 every 3000 of 39k iterations; keep the same total decay.
    step_size = max(1, iterations // 13)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=0.98)
    ckpt_path = output.with_name(output.name + ".ckpt")
    start, elapsed_before, history = 0, 0.0, []
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, elapsed_before, history = state["iteration"], state.get("elapsed", 0.0), state.get("history", [])
        if world == 1:
            rng.bit_generator.state = state["rng"]
            torch.set_rng_state(state["torch_rng"])
        else:  # the saved state is rank 0's: give every rank its own stream again
            rng = np.random.default_rng([seed, rank, start])
            sampler.rng = rng
        if rank == 0:
            print(f"resumed from {ckpt_path} at iteration {start}", flush=True)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    model.train()
    t0 = time.time()
    running = {}
    it, stop = start, False
    for it in range(start, iterations):
        se, sm, sr, qe, qm, qr = (t.to(dev) for t in sampler.sample(batch))
        out = net(se, sm, sr, qe)
        losses = fob_loss(out, qr, qm)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        done = it + 1
        if rank == 0 and done % log_every == 0:
            avg = {k: round(v / log_every, 4) for k, v in running.items()}
            history.append({"iteration": done, **avg})
            el = elapsed_before + time.time() - t0
            print(f"it {done}/{iterations} {json.dumps(avg)} {el / 60:.1f} min", flush=True)
            running = {}
        stop = max_minutes is not None and (time.time() - t0) / 60 > max_minutes
        if world > 1 and max_minutes is not None:
            # Every rank must stop at the same iteration or the next all-reduce hangs.
            flag = torch.tensor([float(stop)], device=dev)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if rank == 0 and (done % save_every == 0 or done == iterations or stop):
            _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                          "iteration": done, "elapsed": elapsed_before + time.time() - t0, "history": history,
                          "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}, ckpt_path)
        if stop:
            if rank == 0:
                print(f"stopping after {max_minutes} min at iteration {done}; rerun the same command to resume", flush=True)
            break
    done = it + 1 if iterations > start else start
    if rank == 0 and (done >= iterations or stop):
        # A time-boxed run still writes usable weights; rerunning resumes towards `iterations`.
        meta = {
            "backbone": backbone, "iterations": done, "iterations_planned": iterations, "batch": batch, "lr": lr, "seed": seed,
            "images": [str(f) for f in files], "exclude_labels": list(exclude_labels or []),
            "supervoxel": supervoxel, "supervoxel_mm": supervoxel_mm, "use_spr": use_spr,
            "train_seconds": round(elapsed_before + time.time() - t0, 1), "device": str(dev),
            "history": history[-20:], "default_prompt": default_prompt, "world_size": world,
            "episodes_per_iteration": batch * world,
        }
        save_generator(model, output, meta, fp16=True)
        print(f"wrote {output}", flush=True)
    if world > 1:
        import torch.distributed as dist

        # Leave together: a rank that tears its process group (and DDP's gloo threads) down
        # while rank 0 is still writing the weights was seen to abort ("terminate called
        # without an active exception"), and torchrun then kills rank 0 too.
        dist.barrier()
        del net
        dist.destroy_process_group()
    return output


def cmd_train(args) -> int:
    train(args.images, args.output, backbone=args.backbone, device=args.device, iterations=args.iterations,
          batch=args.batch, lr=args.lr, seed=args.seed, cache_dir=args.cache_dir,
          exclude_labels=[int(x) for x in args.exclude_labels.split(",")] if args.exclude_labels else None,
          supervoxel=args.supervoxel, supervoxel_mm=args.supervoxel_mm, use_spr=not args.no_spr,
          save_every=args.save_every, checkpoint=args.checkpoint, threads=args.threads,
          max_minutes=args.max_minutes, default_prompt=args.default_prompt)
    return 0
