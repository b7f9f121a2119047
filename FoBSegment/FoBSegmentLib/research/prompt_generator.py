"""The FoB ("Focus on Background") prompt generator.

From one annotated support slice it predicts, on a query slice, ``Np`` background points on a
ring just outside the target structure plus a coarse foreground probability map from which
foreground points are drawn.  See ``docs/method.md``; every line here is our own.

Pipeline (shapes for batch ``B``, ``C`` adapter channels, ``Np`` ring points)::

    support_emb, query_emb (B, 256, 64, 64)  --EmbeddingAdapter-->  F_s, F_q (B, C, 64, 64)
    BPPC  (BackgroundPrototypes): F_s, support mask, support ring -> p_fg (B, C), p_b (B, Np, C)
    BCM   (BackgroundContext):    F_q, p_fg, p_b -> Phi (B, Np, 64, 64), heatmaps (B, Np, 256, 256),
                                  coarse points (B, Np, 2), context features (B, C, 64, 64)
    SPR   (RingRefiner):          graph over the ring, k candidate offsets, 3 iterations
    ForegroundPrior (ADNet-style): F_q, p_fg -> fg probability (B, 256, 256), threshold t (B,)

Coordinates are normalised square coordinates ``(x, y)`` in ``[0, 1]`` (``0`` = left/top edge
of the padded square, pixel centres of the 256 grid at ``(i + 0.5) / 256``), as in
:mod:`FoBSegmentLib.backbones.base`.  Every coordinate stays a differentiable tensor: the
coordinate loss trains the refiner (the released FoB code never trained it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..background_ring import gaussian_heatmaps_torch
from ..errors import CheckpointError
from ..settings import WORK_SIZE

FEAT_SIZE = 64  # embedding grid
RING_SIGMA = 4.0  # px at 256
CHECKPOINT_FORMAT = "FoBSegment-prompt-generator"
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def cosine_map(feats: torch.Tensor, proto: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pixel with a prototype.

    feats (B, C, H, W), proto (B, C) -> (B, H, W)
    """
    return F.cosine_similarity(feats, proto[:, :, None, None], dim=1, eps=1e-6)


def to_grid(points: torch.Tensor) -> torch.Tensor:
    """Normalised [0, 1] (x, y) -> ``grid_sample`` coordinates in [-1, 1] (align_corners=False:
    -1 is the left edge of the left pixel, exactly like 0 in our convention)."""
    return points * 2.0 - 1.0


def sample_features(feats: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear features at points.

    feats (B, C, H, W), points (B, ..., 2) normalised (x, y) -> (B, ..., C)
    """
    b, c = feats.shape[:2]
    lead = points.shape[1:-1]
    grid = to_grid(points).reshape(b, 1, -1, 2)
    s = F.grid_sample(feats, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return s.reshape(b, c, -1).transpose(1, 2).reshape(b, *lead, c)


def soft_argmax(heatmaps: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """Differentiable arg-max of heatmaps.

    heatmaps (B, N, H, W), beta scalar (inverse temperature) -> (B, N, 2) normalised (x, y)
    of pixel centres.
    """
    b, n, h, w = heatmaps.shape
    prob = torch.softmax(heatmaps.reshape(b, n, -1) * beta, dim=-1).reshape(b, n, h, w)
    xs = (torch.arange(w, device=heatmaps.device, dtype=heatmaps.dtype) + 0.5) / w
    ys = (torch.arange(h, device=heatmaps.device, dtype=heatmaps.dtype) + 0.5) / h
    x = (prob.sum(dim=2) * xs).sum(-1)
    y = (prob.sum(dim=3) * ys).sum(-1)
    return torch.stack([x, y], dim=-1)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v with one additive bias per key token.

    q (B, h, Nq, d), k/v (B, h, Nk, d), key_bias (B, Nk) -> (B, h, Nq, d).
    Uses the fused ``scaled_dot_product_attention`` kernel (the bias is its additive float
    ``attn_mask``, broadcast over heads and queries); :func:`biased_attention_reference` is the
    plain formula, for tests.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias[:, None, None, :].to(q.dtype))


def biased_attention_reference(q, k, v, key_bias, chunk: int = 1024):
    """Explicit (chunked over queries) version of :func:`biased_attention`."""
    scale = q.shape[-1] ** -0.5
    kt = k.transpose(-1, -2)
    bias = key_bias[:, None, None, :]
    out = [torch.softmax(q[:, :, s : s + chunk] @ kt * scale + bias, dim=-1) @ v for s in range(0, q.shape[2], chunk)]
    return torch.cat(out, dim=2)


def _check(t: torch.Tensor, name: str, shape: tuple) -> None:
    if t.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
class EmbeddingAdapter(nn.Module):
    """Trainable adapter on the frozen backbone embedding.

    (B, in_ch, 64, 64) -> (B, C, 64, 64):
    h = conv1x1(x); out = h + conv1x1(ReLU(GN(depthwise conv3x3(h)))).
    The 3x3 mixing is depthwise-separable to keep the CPU forward cheap.
    """

    def __init__(self, in_channels: int = 256, channels: int = 128, groups: int = 8):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, channels, 1)
        self.spatial = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm = nn.GroupNorm(groups, channels)
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        h = self.proj(emb)
        return h + self.mix(F.relu(self.norm(self.spatial(h))))


class BackgroundPrototypes(nn.Module):
    """BPPC: foreground and background prototypes of the support slice (no parameters).

    forward(F_s (B, C, 64, 64), mask (B, 256, 256), ring (B, Np, 2))
        -> proto_fg (B, C), proto_bg (B, Np, C), weights (B, Np, 64, 64)
    Background prototype i = Gaussian-weighted average of F_s around ring point i (sigma 4 px at
    256, evaluated at the 64-grid pixel centres); foreground prototype = masked average with the
    mask area-downsampled to 64.
    """

    def __init__(self, sigma: float = RING_SIGMA, work_size: int = WORK_SIZE):
        super().__init__()
        self.sigma = sigma
        self.work_size = work_size

    def forward(self, feats, mask, ring):
        size = feats.shape[-1]
        sigma = self.sigma * size / self.work_size
        w = gaussian_heatmaps_torch(ring, size=size, sigma=sigma)  # (B, Np, h, w)
        w = w / w.sum(dim=(-1, -2), keepdim=True).clamp_min(1e-6)
        proto_bg = torch.einsum("bnhw,bchw->bnc", w, feats)
        m = F.interpolate(mask[:, None].float(), size=feats.shape[-2:], mode="area")  # (B, 1, h, w)
        proto_fg = (feats * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp_min(1e-6)
        return proto_fg, proto_bg, w


class BiasedEncoderLayer(nn.Module):
    """One pre-norm Transformer encoder layer over the H*W query tokens with an additive
    attention bias per key token.

    forward(x (B, C, H, W), bias (B, 1, H, W)) -> (B, C, H, W).
    ``key_stride`` > 1 average-pools keys/values (and the bias) by that factor (spatial-reduction
    attention: all 4096 query tokens attend to 1024 pooled key tokens at stride 2); 1 gives the
    full 4096 x 4096 attention.
    """

    def __init__(self, channels: int, attn_dim: int = 64, heads: int = 2, ffn_mult: int = 2, key_stride: int = 1):
        super().__init__()
        if attn_dim % heads:
            raise ValueError("attn_dim must be divisible by heads")
        self.heads, self.key_stride = heads, key_stride
        self.norm1 = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, attn_dim)
        self.kv = nn.Linear(channels, 2 * attn_dim)
        self.out = nn.Linear(attn_dim, channels)
        self.norm2 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, ffn_mult * channels), nn.GELU(), nn.Linear(ffn_mult * channels, channels))

    def forward(self, x, bias):
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        t = self.norm1(tokens)
        if self.key_stride > 1:
            kmap = F.avg_pool2d(t.transpose(1, 2).reshape(b, c, h, w), self.key_stride)
            kt = kmap.flatten(2).transpose(1, 2)
            kb = F.avg_pool2d(bias, self.key_stride).flatten(1)
        else:
            kt, kb = t, bias.flatten(1)
        q = self.q(t)
        k, v = self.kv(kt).chunk(2, dim=-1)

        def heads(z):
            return z.reshape(b, z.shape[1], self.heads, -1).transpose(1, 2)

        o = biased_attention(heads(q), heads(k), heads(v), kb)  # (B, h, HW, d)
        o = o.transpose(1, 2).reshape(b, h * w, -1)
        tokens = tokens + self.out(o)
        tokens = tokens + self.ffn(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class BackgroundContext(nn.Module):
    """BCM: background-centric context modelling on the query.

    forward(F_q (B, C, 64, 64), proto_fg (B, C), proto_bg (B, Np, C), cos_fg (B, 64, 64) | None)
        -> phi (B, Np, 64, 64), heatmaps (B, Np, 256, 256), points (B, Np, 2), context (B, C, 64, 64)

    1. foreground suppression F_sup = (1 - cos(F_q, p_fg)) * F_q;
    2. prompt matching: q = W_q F_sup, p = W_s p_b, a = tanh(MLP(p)), Phi_i = cos(q, (1 + a_i) * p_i)
       (channel re-weighting around identity so the untrained module is a plain matcher);
    3. mask bias ReLU(conv3x3(Phi)) (B, 1, 64, 64) added to the attention logits of one encoder
       layer over tokens conv1x1([q, Phi]);
    4. head 1x1 conv, InstanceNorm, ReLU, 1x1 conv -> Np heatmap logits at 64, bilinearly
       upsampled to 256 (raw values, regressed to unit-peak Gaussians);
    5. soft-argmax with a learnable inverse temperature -> coarse points.
    """

    def __init__(self, channels: int = 128, n_points: int = 10, attn_dim: int = 64, heads: int = 2, key_stride: int = 2, work_size: int = WORK_SIZE):
        super().__init__()
        self.work_size = work_size
        self.w_q = nn.Conv2d(channels, channels, 1)
        self.w_s = nn.Linear(channels, channels)
        self.reweight = nn.Sequential(nn.Linear(channels, channels // 2), nn.ReLU(), nn.Linear(channels // 2, channels))
        self.mask_bias = nn.Conv2d(n_points, 1, 3, padding=1)
        self.tokens = nn.Conv2d(channels + n_points, channels, 1)
        self.encoder = BiasedEncoderLayer(channels, attn_dim=attn_dim, heads=heads, key_stride=key_stride)
        hidden = max(channels // 2, n_points)
        self.head = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.InstanceNorm2d(hidden, affine=True),
            nn.ReLU(),
            nn.Conv2d(hidden, n_points, 1),
        )
        nn.init.normal_(self.head[3].weight, std=0.01)  # start from flat heatmaps (centre points)
        nn.init.zeros_(self.head[3].bias)
        self.log_beta = nn.Parameter(torch.tensor(math.log(20.0)))
        # Project adaptation (not in the paper): the support ring, drawn as Gaussians, is added
        # to the heatmap logits with a learned gain.  In the canonical display orientation the
        # organ sits near the same place on the support and the query, so the untrained
        # generator starts from "copy the support ring" and BCM/SPR learn the correction;
        # without it, short CPU training leaves every point at the image centre (measured).
        self.prior_gain = nn.Parameter(torch.tensor(1.0))
        self.prior_sigma = 8.0  # px at 256: wide enough to be a prior, not an answer

    def forward(self, feats, proto_fg, proto_bg, cos_fg=None, ring_prior=None, prior_weight=None):
        if cos_fg is None:
            cos_fg = cosine_map(feats, proto_fg)
        f_sup = (1.0 - cos_fg)[:, None] * feats
        q = self.w_q(f_sup)  # (B, C, h, w)
        p = self.w_s(proto_bg)  # (B, Np, C)
        p = p * (1.0 + torch.tanh(self.reweight(p)))
        phi = torch.einsum("bchw,bnc->bnhw", F.normalize(q, dim=1, eps=1e-6), F.normalize(p, dim=-1, eps=1e-6))
        bias = F.relu(self.mask_bias(phi))  # (B, 1, h, w)
        ctx = self.encoder(self.tokens(torch.cat([q, phi], dim=1)), bias)
        logits = self.head(ctx)
        heatmaps = F.interpolate(logits, size=(self.work_size, self.work_size), mode="bilinear", align_corners=False)
        if ring_prior is not None:
            prior = gaussian_heatmaps_torch(ring_prior, size=self.work_size, sigma=self.prior_sigma)
            if prior_weight is not None:  # (B,): 0 drops the prior for that episode
                prior = prior * prior_weight.to(prior.dtype)[:, None, None, None]
            heatmaps = heatmaps + self.prior_gain * prior
        points = soft_argmax(heatmaps, self.log_beta.exp())
        return phi, heatmaps, points, ctx


def ring_adjacency(n: int) -> torch.Tensor:
    """Row-normalised ring graph: i linked to i-1 and i+1 (mod n).  (n, n)."""
    a = torch.zeros(n, n)
    idx = torch.arange(n)
    a[idx, (idx + 1) % n] = 1.0
    a[idx, (idx - 1) % n] = 1.0
    return a / a.sum(dim=1, keepdim=True).clamp_min(1.0)


class RingRefiner(nn.Module):
    """SPR: structure-guided refinement of the ring points.

    forward(feats (B, C, 64, 64), proto_bg (B, Np, C), points (B, Np, 2)) -> list of
    (B, Np, 2), one per iteration.  Per iteration: sample features at the points
    (``grid_sample``, normalised coordinates), node features from [sampled, prototype,
    position relative to the ring centre]; graph convolution with
    A = alpha * A_adaptive + (1 - alpha) * A_ring (A_adaptive = softmax of prototype
    affinities, alpha = sigmoid(learnable)); k candidate offsets (tanh * max_offset) scored
    against the features sampled at each candidate; point += softmax-weighted offset.
    Weights are shared across iterations.  Fully differentiable in the points.
    """

    def __init__(self, channels: int = 128, n_points: int = 10, hidden: int = 64, k: int = 8, iterations: int = 3, max_offset: float = 0.05):
        super().__init__()
        self.k, self.iterations, self.max_offset = k, iterations, max_offset
        self.register_buffer("a_ring", ring_adjacency(n_points), persistent=False)
        self.alpha_logit = nn.Parameter(torch.zeros(()))
        self.proto_key = nn.Linear(channels, hidden)
        self.node = nn.Linear(2 * channels + 2, hidden)
        self.gc_self = nn.Linear(hidden, hidden)
        self.gc_nb = nn.Linear(hidden, hidden)
        self.gc_norm = nn.LayerNorm(hidden)
        self.offsets = nn.Linear(hidden, 2 * k)
        self.cand = nn.Linear(channels, hidden)
        self.score = nn.Linear(hidden, 1)

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_logit)

    def adjacency(self, proto_bg: torch.Tensor) -> torch.Tensor:
        """(B, Np, C) -> (B, Np, Np) row-stochastic mixed adjacency."""
        key = self.proto_key(proto_bg)
        aff = key @ key.transpose(1, 2) / math.sqrt(key.shape[-1])
        a_adapt = torch.softmax(aff, dim=-1)
        return self.alpha * a_adapt + (1.0 - self.alpha) * self.a_ring.to(aff.dtype)

    def step(self, feats, proto_bg, points, adj):
        """One refinement step: (B, Np, 2) -> (B, Np, 2)."""
        b, n, _ = points.shape
        sampled = sample_features(feats, points)  # (B, Np, C)
        rel = (points - points.mean(dim=1, keepdim=True)) * 4.0
        h = F.relu(self.node(torch.cat([sampled, proto_bg, rel], dim=-1)))
        h = F.relu(self.gc_norm(self.gc_self(h) + self.gc_nb(adj @ h)))
        off = torch.tanh(self.offsets(h).reshape(b, n, self.k, 2)) * self.max_offset
        cand = points[:, :, None, :] + off  # (B, Np, k, 2)
        cf = self.cand(sample_features(feats, cand))  # (B, Np, k, hidden)
        w = torch.softmax(self.score(F.relu(cf + h[:, :, None, :])).squeeze(-1), dim=-1)  # (B, Np, k)
        new = (w[..., None] * cand).sum(dim=2)
        lo, hi = 0.5 / WORK_SIZE, 1.0 - 0.5 / WORK_SIZE
        return new.clamp(lo, hi)

    def forward(self, feats, proto_bg, points):
        adj = self.adjacency(proto_bg)
        out = []
        for _ in range(self.iterations):
            points = self.step(feats, proto_bg, points, adj)
            out.append(points)
        return out


class ForegroundPrior(nn.Module):
    """ADNet-style coarse foreground mask.

    s = -scale * cos(F_q, p_fg);  p = 1 - sigmoid(0.5 * (s - t)) = sigmoid(0.5 * (t - s)),
    t = MLP([mean-pooled F_q, p_fg]) a learned image-dependent threshold (initialised at
    -scale / 2, i.e. p = 0.5 at cos = 0.5).  p is high where the query matches the prototype.

    forward(F_q (B, C, 64, 64), proto_fg (B, C), cos_fg (B, 64, 64) | None)
        -> prob (B, 256, 256), logits (B, 256, 256), t (B,)
    """

    def __init__(self, channels: int = 128, scale: float = 20.0, slope: float = 0.5, work_size: int = WORK_SIZE):
        super().__init__()
        self.scale, self.slope, self.work_size = scale, slope, work_size
        self.mlp = nn.Sequential(nn.Linear(2 * channels, channels // 2), nn.ReLU(), nn.Linear(channels // 2, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, -scale / 2)

    def forward(self, feats, proto_fg, cos_fg=None):
        if cos_fg is None:
            cos_fg = cosine_map(feats, proto_fg)
        s = -self.scale * cos_fg
        t = self.mlp(torch.cat([feats.mean(dim=(2, 3)), proto_fg], dim=-1)).squeeze(-1)  # (B,)
        logit = self.slope * (t[:, None, None] - s)
        logits = F.interpolate(logit[:, None], size=(self.work_size, self.work_size), mode="bilinear", align_corners=False)[:, 0]
        return torch.sigmoid(logits), logits, t


@dataclass
class GeneratorOutput:
    """Everything :class:`FoBPromptGenerator` predicts for a batch of B episodes.

    heatmaps:        (B, Np, 256, 256) raw BCM head output (trained towards unit-peak Gaussians)
    phi:             (B, Np, 64, 64) prototype similarity maps (cosines)
    points_coarse:   (B, Np, 2) soft-argmax of the heatmaps, normalised (x, y)
    points_refined:  list of (B, Np, 2), one per SPR iteration ([] without SPR)
    points:          (B, Np, 2) final background points (last refined, else coarse)
    fg_prob:         (B, 256, 256) coarse foreground probability
    proto_fg:        (B, C) support foreground prototype
    proto_bg:        (B, Np, C) support background prototypes
    threshold:       (B,) learned ADNet threshold t
    fg_logits:       (B, 256, 256) logits of fg_prob (for a stable BCE)
    """

    heatmaps: torch.Tensor
    phi: torch.Tensor
    points_coarse: torch.Tensor
    points_refined: list
    points: torch.Tensor
    fg_prob: torch.Tensor
    proto_fg: torch.Tensor
    proto_bg: torch.Tensor
    threshold: torch.Tensor
    fg_logits: torch.Tensor | None = field(default=None)


class FoBPromptGenerator(nn.Module):
    """The complete FoB prompt generator on SAM-family embeddings.

    forward(support_emb (B, 256, 64, 64), support_mask (B, 256, 256), support_ring (B, Np, 2),
            query_emb (B, 256, 64, 64), prior_weight (B,) or None, prior_ring (B, Np, 2) or None)
            -> GeneratorOutput
    ``support_ring`` comes from :func:`FoBSegmentLib.background_ring.ring_points` (canonical
    angular order); masks are on the 256 work grid.  The position prior is ``prior_ring``
    (default: the support ring), scaled per episode by ``prior_weight`` (None: 1; 0: the query
    is searched without it); a ring found on the query itself, e.g. around the training-free
    contrast region, relocates it.
    """

    def __init__(
        self,
        n_points: int = 10,
        channels: int = 128,
        spr_iterations: int = 3,
        use_spr: bool = True,
        *,
        embed_dim: int = 256,
        attn_dim: int = 64,
        heads: int = 2,
        key_stride: int = 2,
        refiner_hidden: int = 64,
        k_candidates: int = 8,
        max_offset: float = 0.05,
    ):
        super().__init__()
        self.config = dict(
            n_points=n_points,
            channels=channels,
            spr_iterations=spr_iterations,
            use_spr=use_spr,
            embed_dim=embed_dim,
            attn_dim=attn_dim,
            heads=heads,
            key_stride=key_stride,
            refiner_hidden=refiner_hidden,
            k_candidates=k_candidates,
            max_offset=max_offset,
        )
        self.n_points, self.embed_dim = n_points, embed_dim
        self.adapter = EmbeddingAdapter(embed_dim, channels)
        self.prototypes = BackgroundPrototypes()
        self.context = BackgroundContext(channels, n_points, attn_dim=attn_dim, heads=heads, key_stride=key_stride)
        self.refiner = (
            RingRefiner(channels, n_points, hidden=refiner_hidden, k=k_candidates, iterations=spr_iterations, max_offset=max_offset)
            if use_spr and spr_iterations > 0
            else None
        )
        self.foreground = ForegroundPrior(channels)

    def forward(self, support_emb, support_mask, support_ring, query_emb, prior_weight=None,
                prior_ring=None) -> GeneratorOutput:
        if support_mask.ndim == 4 and support_mask.shape[1] == 1:
            support_mask = support_mask[:, 0]
        b = support_emb.shape[0]
        _check(support_emb, "support_emb", (b, self.embed_dim, FEAT_SIZE, FEAT_SIZE))
        _check(query_emb, "query_emb", (b, self.embed_dim, FEAT_SIZE, FEAT_SIZE))
        _check(support_mask, "support_mask", (b, None, None))
        _check(support_ring, "support_ring", (b, self.n_points, 2))
        support_ring = support_ring.to(support_emb.dtype)

        feats = self.adapter(torch.cat([support_emb, query_emb], dim=0))
        f_s, f_q = feats[:b], feats[b:]
        proto_fg, proto_bg, _ = self.prototypes(f_s, support_mask, support_ring)
        cos_fg = cosine_map(f_q, proto_fg)
        prior = support_ring if prior_ring is None else prior_ring.to(support_ring.dtype)
        phi, heatmaps, coarse, ctx = self.context(f_q, proto_fg, proto_bg, cos_fg, ring_prior=prior,
                                                  prior_weight=prior_weight)
        refined = self.refiner(ctx, proto_bg, coarse) if self.refiner is not None else []
        fg_prob, fg_logits, t = self.foreground(f_q, proto_fg, cos_fg)
        return GeneratorOutput(
            heatmaps=heatmaps,
            phi=phi,
            points_coarse=coarse,
            points_refined=refined,
            points=refined[-1] if refined else coarse,
            fg_prob=fg_prob,
            proto_fg=proto_fg,
            proto_bg=proto_bg,
            threshold=t,
            fg_logits=fg_logits,
        )


# --------------------------------------------------------------------------------------------
# foreground points
# --------------------------------------------------------------------------------------------
def foreground_points(fg_prob, n: int = 10, threshold: float = 0.9) -> np.ndarray:
    """~``n`` foreground points spread over the confident region of a coarse mask.

    fg_prob: (H, W) tensor/array of probabilities (H = W = 256 on the work grid).
    The pixels with p > threshold are clustered with deterministic k-means (farthest-point
    initialisation from the pixel nearest their centroid); each centre is snapped to the
    nearest selected pixel, so points always lie inside the region, also when it is not
    convex.  With no pixel above the threshold, the top-probability pixels (p >= max(0.5,
    max - 0.05)) are used; an empty (0, 2) array only if the whole map is below 0.5.
    Returns (n', 2) float64 normalised (x, y) pixel centres, n' <= n.
    """
    if isinstance(fg_prob, torch.Tensor):
        fg_prob = fg_prob.detach().float().cpu().numpy()
    p = np.asarray(fg_prob, dtype=np.float64)
    p = np.squeeze(p)
    if p.ndim != 2:
        raise ValueError(f"fg_prob must be a 2D map, got shape {np.shape(fg_prob)}")
    h, w = p.shape
    pmax = float(p.max()) if p.size else 0.0
    if n < 1 or pmax < 0.5:
        return np.zeros((0, 2))
    sel = p > threshold
    if not sel.any():
        sel = p >= max(0.5, pmax - 0.05)
    rc = np.argwhere(sel).astype(np.float64)  # row-major order: deterministic
    k = min(n, len(rc))
    # farthest-point initialisation
    first = int(np.argmin(((rc - rc.mean(axis=0)) ** 2).sum(axis=1)))
    centres = [rc[first]]
    d2 = ((rc - rc[first]) ** 2).sum(axis=1)
    for _ in range(1, k):
        j = int(np.argmax(d2))
        centres.append(rc[j])
        d2 = np.minimum(d2, ((rc - rc[j]) ** 2).sum(axis=1))
    c = np.array(centres)
    for _ in range(15):  # Lloyd iterations
        lab = np.argmin(((rc[:, None, :] - c[None]) ** 2).sum(axis=2), axis=1)
        new = np.array([rc[lab == i].mean(axis=0) if np.any(lab == i) else c[i] for i in range(k)])
        if np.allclose(new, c):
            break
        c = new
    snap = np.argmin(((c[:, None, :] - rc[None]) ** 2).sum(axis=2), axis=1)
    _, first_idx = np.unique(snap, return_index=True)
    pix = rc[snap[np.sort(first_idx)]]
    return np.stack([(pix[:, 1] + 0.5) / w, (pix[:, 0] + 0.5) / h], axis=1)


# --------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------
DEFAULT_LOSS_WEIGHTS = {"heatmap": 1.0, "phi": 1.0, "hinge": 1.0, "bce": 1.0, "coord": 1.0}


def fob_loss(out: GeneratorOutput, query_ring: torch.Tensor, query_mask: torch.Tensor, weights: dict | None = None) -> dict:
    """FoB training loss.

    out: GeneratorOutput for B episodes; query_ring (B, Np, 2) canonical-order ring of the
    query mask (target point i <-> predicted point i); query_mask (B, 256, 256).
    Returns a dict of scalar tensors:
      heatmap: 1000 * MSE(heatmaps, Gaussian targets of the query ring, sigma 4 px)
      phi:     1000 * MSE(Phi, the same targets average-pooled to 64)
      hinge:   mean max(0, 0.5 + cos(p_fg, p_b^i))
      bce:     BCE on fg_prob with class weights 0.1 (background) / 1.0 (foreground),
               normalised by the weight sum (like a class-weighted cross-entropy)
      coord:   10 * mean L1 (normalised coordinates) of the coarse points and of every SPR
               iteration vs the query ring
      total:   weighted sum (``weights`` overrides DEFAULT_LOSS_WEIGHTS entries)
    """
    w = dict(DEFAULT_LOSS_WEIGHTS)
    if weights:
        unknown = set(weights) - set(w)
        if unknown:
            raise ValueError(f"unknown loss weights: {sorted(unknown)}")
        w.update(weights)
    if query_mask.ndim == 4 and query_mask.shape[1] == 1:
        query_mask = query_mask[:, 0]
    query_ring = query_ring.to(out.heatmaps.dtype)
    size = out.heatmaps.shape[-1]
    target = gaussian_heatmaps_torch(query_ring, size=size, sigma=RING_SIGMA * size / WORK_SIZE)
    losses = {"heatmap": 1000.0 * F.mse_loss(out.heatmaps, target)}
    target_phi = F.adaptive_avg_pool2d(target, out.phi.shape[-2:])
    losses["phi"] = 1000.0 * F.mse_loss(out.phi, target_phi)
    cos = F.cosine_similarity(out.proto_fg[:, None, :], out.proto_bg, dim=-1, eps=1e-6)
    losses["hinge"] = F.relu(0.5 + cos).mean()
    m = (query_mask.to(out.fg_prob.dtype) > 0.5).to(out.fg_prob.dtype)
    if m.shape[-2:] != out.fg_prob.shape[-2:]:
        raise ValueError(f"query_mask must be (B, {size}, {size}), got {tuple(query_mask.shape)}")
    logits = out.fg_logits if out.fg_logits is not None else torch.logit(out.fg_prob.clamp(1e-6, 1 - 1e-6))
    cw = 0.1 + 0.9 * m
    losses["bce"] = (F.binary_cross_entropy_with_logits(logits, m, reduction="none") * cw).sum() / cw.sum()
    preds = [out.points_coarse, *out.points_refined]
    losses["coord"] = 10.0 * torch.stack([F.l1_loss(p, query_ring) for p in preds]).mean()
    losses["total"] = sum(w[k] * v for k, v in losses.items())
    return losses


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def _plain(obj):
    """Make meta storable with ``weights_only`` loading (numpy -> python types)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_generator(model: FoBPromptGenerator, path, meta: dict | None = None, fp16: bool = True) -> None:
    """Write one torch file {'format', 'version', 'config', 'state_dict', 'meta'}; floating
    tensors are stored in float16 when ``fp16``."""
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        sd[k] = v.half() if (fp16 and v.is_floating_point()) else v.clone()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": dict(model.config),
        "state_dict": sd,
        "meta": _plain(dict(meta or {})),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from ..files import atomic_write

    atomic_write(path, lambda tmp: torch.save(payload, tmp), suffix=".tmp")


def load_generator(path, device="cpu") -> tuple:
    """Load a checkpoint written by :func:`save_generator` -> (model in eval mode, meta).

    Weights are cast back to float32.  Raises CheckpointError if the file is missing or is
    not a prompt-generator checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Prompt generator checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a checkpoint problem
        # PyTorch's own message advises loading untrusted files unsafely: not repeated here.
        raise CheckpointError(f"{path} is not a readable FoB prompt generator checkpoint (not a PyTorch weights file, "
                              f"or damaged: {type(e).__name__}). Give weights written by `fobsegment train` (.pt).") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a FoB prompt generator checkpoint (expected a dict with 'config' and 'state_dict').")
    if ckpt.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has format {ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT!r}.")
    try:
        model = FoBPromptGenerator(**ckpt["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid generator config {ckpt['config']!r} ({e}).") from e
    sd = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in ckpt["state_dict"].items()}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the generator config ({e}).") from e
    model.to(device).eval()
    return model, ckpt.get("meta", {}) or {}
