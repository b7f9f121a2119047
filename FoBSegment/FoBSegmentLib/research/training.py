"""Self-supervised training of the FoB prompt generator on frozen backbone embeddings.

Episodes (docs/method.md section 3): a random prepared volume, a random supervoxel, two adjacent
slices that both contain it (>= 200 px); one is the support, the other the query (random
order).  Augmentation works in feature space because the encoder is frozen and embeddings
are cached: a small random affine (rotation +-5 deg, scale 0.9-1.2, shear, shift) is applied
to the query's embedding and mask together.  (Intensity gamma would need re-encoding and is
left out; see the model card.)

Adjacent episodes teach the generator to copy the support's ring, because the organ barely
moves between neighbours.  ``episodes="relocate"`` forces it to find the structure elsewhere:
the same supervoxel two or more slices away, or the supervoxel of another volume that matches
it (:func:`training_data.matched_supervoxels`), with a strong affine (rotation +-15 deg,
scale 0.8-1.25, shift +-15 % of the width) and the support ring's position prior dropped at
random (``prior_dropout``).  ``"mixed"`` draws either kind with equal odds.  With
``prior_source="contrast"`` a relocation episode's position prior is instead the ring around
the training-free contrast region on the (augmented) query, as ``GeneratorPrompter(prior=
"contrast")`` gives it at run time: the generator learns to correct that localisation.

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


EPISODES = ("adjacent", "relocate", "mixed")
PRIOR_SOURCES = ("support", "contrast")

# (rotation deg, scale range, shear deg, shift in normalised units: 2 = the image's width)
AFFINE = {"adjacent": (5.0, (0.9, 1.2), 3.0, 0.05), "relocate": (15.0, (0.8, 1.25), 5.0, 0.3)}


class EpisodeSampler:
    """Draws FoB episodes from prepared volumes (see :mod:`training_data` and the module
    docstring for the kinds).  ``sample`` returns the batch with one prior weight per episode."""

    def __init__(self, volumes, rng: np.random.Generator, augment: bool = True, episodes: str = "adjacent",
                 prior_dropout: float = 0.0, match_cosine: float = 0.85, prior_source: str = "support"):
        from .training_data import matched_supervoxels

        if episodes not in EPISODES:
            raise FoBInputError(f"Unknown episode kind {episodes!r}: use one of {', '.join(EPISODES)}.")
        if prior_source not in PRIOR_SOURCES:
            raise FoBInputError(f"Unknown prior source {prior_source!r}: use one of {', '.join(PRIOR_SOURCES)}.")
        self.volumes, self.distant = [], []  # distant: [(volume index, candidates)], none empty
        kept = []
        for pv, exclude in volumes:
            cands = pv.episodes_candidates(exclude)
            if cands:
                self.volumes.append((pv, cands))
                distant = pv.distant_candidates(exclude)
                if distant:
                    self.distant.append((len(self.volumes) - 1, distant))
                kept.append((pv, exclude))
        if not self.volumes:
            raise FoBInputError("No training episodes: no supervoxel spans two adjacent slices with >= 200 px. "
                                "Check the training images (or lower the supervoxel size).")
        self.matches = matched_supervoxels(kept, match_cosine) if episodes != "adjacent" else []
        if episodes != "adjacent" and not self.matches and not self.distant:
            raise FoBInputError("No relocation episodes: no supervoxel recurs two slices apart and none matches "
                                "another volume's. Give more training volumes or use --episodes adjacent.")
        self.prior_source = prior_source
        self.rng = rng
        self.augment = augment
        self.episodes = episodes
        self.prior_dropout = prior_dropout

    def __len__(self):
        return sum(len(c) for _, c in self.volumes) + sum(len(d) for _, d in self.distant) + len(self.matches)

    def _pair(self):
        """-> (support volume, slice, label, query volume, slice, label, kind)."""
        r = self.rng
        kind = self.episodes if self.episodes != "mixed" else ("adjacent" if r.random() < 0.5 else "relocate")
        if kind == "relocate":
            if self.matches and (not self.distant or r.random() < 0.7):
                i, a, la, j, b, lb = self.matches[r.integers(len(self.matches))]
                if r.random() < 0.5:
                    i, a, la, j, b, lb = j, b, lb, i, a, la
                return self.volumes[i][0], a, la, self.volumes[j][0], b, lb, kind
            k, d = self.distant[r.integers(len(self.distant))]
            a, b, label = d[r.integers(len(d))]
        else:
            k = r.integers(len(self.volumes))
            a, b, label = self.volumes[k][1][r.integers(len(self.volumes[k][1]))]
        if r.random() < 0.5:
            a, b = b, a
        pv = self.volumes[k][0]
        return pv, a, label, pv, b, label, kind

    def _contrast_ring(self, se, sm, qe, fallback):
        """The ring around the contrast region on the query, found from the support's
        prototypes as the training-free start prompt finds it; ``fallback`` where none is."""
        from types import SimpleNamespace

        from ..pipeline.contrast import prototypes
        from ..settings import DEFAULT_SETTINGS
        from .generator_prompts import contrast_prior_ring

        mask = sm.numpy() > 0.5
        proto_fg, proto_bg = prototypes(se.numpy(), mask)
        anchor = SimpleNamespace(mask_sq=mask, proto_fg=proto_fg, proto_bg=proto_bg)
        ring = contrast_prior_ring(qe.numpy(), anchor, DEFAULT_SETTINGS.contrast)
        return fallback if ring is None else ring

    def sample(self, batch: int):
        """-> support (embedding, mask, ring), query (embedding, mask, ring), prior weight (B,)
        and prior ring (B, Np, 2) of each episode."""
        s_emb, s_mask, s_ring, q_emb, q_mask, q_ring, prior, p_ring = [], [], [], [], [], [], [], []
        while len(s_emb) < batch:
            spv, a, la, qpv, b, lb, kind = self._pair()
            se = torch.from_numpy(spv.embeddings[a].astype(np.float32))
            qe = torch.from_numpy(qpv.embeddings[b].astype(np.float32))
            sm = torch.from_numpy(spv.pseudo[a] == la).float()
            qm = torch.from_numpy(qpv.pseudo[b] == lb).float()
            if self.augment:
                qe, qm = self._affine(qe, qm, AFFINE[kind])
            if qm.sum() < 50:
                continue
            try:
                sr, qr = ring_points(sm.numpy() > 0.5), ring_points(qm.numpy() > 0.5)
            except ValueError:
                continue
            s_emb.append(se), s_mask.append(sm), s_ring.append(torch.from_numpy(sr).float())
            q_emb.append(qe), q_mask.append(qm), q_ring.append(torch.from_numpy(qr).float())
            prior.append(0.0 if kind == "relocate" and self.rng.random() < self.prior_dropout else 1.0)
            from_query = kind == "relocate" and self.prior_source == "contrast"
            p_ring.append(torch.from_numpy(self._contrast_ring(se, sm, qe, sr) if from_query else sr).float())
        st = torch.stack
        return (st(s_emb), st(s_mask), st(s_ring), st(q_emb), st(q_mask), st(q_ring),
                torch.tensor(prior, dtype=torch.float32), st(p_ring))

    def _affine(self, emb: torch.Tensor, mask: torch.Tensor, strength=AFFINE["adjacent"]):
        r = self.rng
        rot, (s_lo, s_hi), sh, shift = strength
        ang = math.radians(r.uniform(-rot, rot))
        scale = r.uniform(s_lo, s_hi)
        shear = math.radians(r.uniform(-sh, sh))
        tx, ty = r.uniform(-shift, shift, 2)
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
          max_minutes: float | None = None, default_prompt: str | None = None, episodes: str = "adjacent",
          prior_dropout: float = 0.0, init=None, snapshot_every: int | None = None,
          prior_source: str = "support") -> Path:
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
    if not 0.0 <= prior_dropout <= 1.0:
        raise FoBInputError(f"--prior-dropout is a probability: give a value from 0 to 1 (got {prior_dropout}).")
    if snapshot_every is not None and snapshot_every < 1:
        raise FoBInputError(f"--snapshot-every must be at least 1 iteration (got {snapshot_every}).")
    start_weights = None
    if init is not None:  # read before the (long) preparation, so a bad file fails at once
        from .prompt_generator import load_generator

        start_weights, _ = load_generator(init, device="cpu")
    # What a checkpoint must have been trained with to be resumed by this command.
    recipe = dict(batch=batch, lr=lr, seed=seed, episodes=episodes, prior_dropout=prior_dropout,
                  prior_source=prior_source, init=str(init) if init else None, channels=channels, use_spr=use_spr,
                  supervoxel=supervoxel, supervoxel_mm=supervoxel_mm)
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
    sampler = EpisodeSampler(vols, rng, episodes=episodes, prior_dropout=prior_dropout, prior_source=prior_source)
    if rank == 0:
        print(f"{len(vols)} volumes, {len(sampler)} episode candidates ({len(sampler.matches)} matched across "
              f"volumes), preparation {time.time() - t_prep:.0f} s", flush=True)

    model = FoBPromptGenerator(channels=channels, use_spr=use_spr).to(dev)
    if start_weights is not None:  # fine-tune: start from trained weights (the optimiser starts afresh)
        if start_weights.config != model.config:
            raise FoBInputError(f"--init {init}: its architecture {start_weights.config} differs from this run's "
                                f"{model.config}. Use the same --channels and SPR setting.")
        model.load_state_dict(start_weights.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # The official schedule decays x0.98 every 3000 of 39k iterations; keep the same total decay.
    step_size = max(1, iterations // 13)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=0.98)
    ckpt_path = output.with_name(output.name + ".ckpt")
    start, elapsed_before, history = 0, 0.0, []
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        made_with = state.get("recipe")
        if made_with is not None and made_with != recipe:
            changed = ", ".join(f"{k} {made_with.get(k)!r} -> {v!r}" for k, v in recipe.items() if made_with.get(k) != v)
            raise FoBInputError(f"{ckpt_path} is a run with other settings ({changed}); resuming it would mix two "
                                "recipes. Rerun with its settings, or give another --output.")
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
        se, sm, sr, qe, qm, qr, pw, pr = (t.to(dev) for t in sampler.sample(batch))
        out = net(se, sm, sr, qe, pw, pr)
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
                          "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "recipe": recipe},
                         ckpt_path)
        if rank == 0 and snapshot_every and done % snapshot_every == 0:
            # Weights along the way, for a held-out curve (benchmarks/relocation.py).
            save_generator(model, output.with_name(f"{output.stem}.it{done:06d}.pt"),
                           {"backbone": backbone, "iterations": done, "episodes": episodes,
                            "prior_dropout": prior_dropout, "prior_source": prior_source,
                            "default_prompt": default_prompt}, fp16=True)
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
            "episodes_per_iteration": batch * world, "episodes": episodes, "prior_dropout": prior_dropout,
            "init": str(init) if init else None, "prior_source": prior_source,
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
          max_minutes=args.max_minutes, default_prompt=args.default_prompt, episodes=args.episodes,
          prior_dropout=args.prior_dropout, init=args.init, snapshot_every=args.snapshot_every,
          prior_source=args.prior_source)
    return 0
