"""The FoB prompt generator (FoBSegmentLib.research.prompt_generator) on synthetic episodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from FoBSegmentLib.background_ring import ring_points
from FoBSegmentLib.errors import CheckpointError
from FoBSegmentLib.research.prompt_generator import (
    FoBPromptGenerator,
    GeneratorOutput,
    biased_attention,
    biased_attention_reference,
    fob_loss,
    foreground_points,
    load_generator,
    sample_features,
    save_generator,
)

N = 256
SMALL = dict(channels=32, attn_dim=32, heads=2, key_stride=4, refiner_hidden=32)


def disk(cx, cy, r):
    yy, xx = np.mgrid[:N, :N]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


def embed(mask, basis, rng, noise=0.3):
    """A fake (1, 256, 64, 64) embedding: a disk-shaped signal (inside, ring band, angle in the
    band, signed distance) projected onto random channel directions, plus noise."""
    m = mask.astype(bool)
    d = ndimage.distance_transform_edt(~m) - ndimage.distance_transform_edt(m)
    rows, cols = np.nonzero(m)
    yy, xx = np.mgrid[:N, :N]
    th = np.arctan2(yy - rows.mean(), xx - cols.mean())
    band = np.exp(-((d - 8.5) ** 2) / 32.0)
    feats = np.stack([m, band, band * np.cos(th), band * np.sin(th), np.tanh(d / 20)]).astype(np.float32)
    f64 = torch.nn.functional.avg_pool2d(torch.from_numpy(feats)[None], 4)[0]
    emb = torch.einsum("kc,khw->chw", basis, f64)
    emb = emb + noise * torch.from_numpy(rng.standard_normal((256, 64, 64)).astype(np.float32))
    return emb[None]


@pytest.fixture(scope="module")
def episode():
    rng = np.random.default_rng(0)
    basis = torch.from_numpy(rng.standard_normal((5, 256)).astype(np.float32))
    ms, mq = disk(110, 128, 30), disk(140, 118, 28)
    return dict(
        support_emb=embed(ms, basis, rng),
        support_mask=torch.from_numpy(ms.astype(np.float32))[None],
        support_ring=torch.from_numpy(ring_points(ms).astype(np.float32))[None],
        query_emb=embed(mq, basis, rng),
        query_mask=torch.from_numpy(mq.astype(np.float32))[None],
        query_ring=torch.from_numpy(ring_points(mq).astype(np.float32))[None],
    )


def run(model, ep):
    return model(ep["support_emb"], ep["support_mask"], ep["support_ring"], ep["query_emb"])


def test_shapes_default_config(episode):
    torch.manual_seed(0)
    model = FoBPromptGenerator().eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 3_000_000
    with torch.no_grad():
        out = run(model, episode)
    assert isinstance(out, GeneratorOutput)
    assert out.heatmaps.shape == (1, 10, N, N)
    assert out.phi.shape == (1, 10, 64, 64)
    assert out.points_coarse.shape == out.points.shape == (1, 10, 2)
    assert len(out.points_refined) == 3 and all(p.shape == (1, 10, 2) for p in out.points_refined)
    assert torch.equal(out.points, out.points_refined[-1])
    assert out.fg_prob.shape == (1, N, N) and 0 <= out.fg_prob.min() and out.fg_prob.max() <= 1
    assert out.proto_fg.shape == (1, 128) and out.proto_bg.shape == (1, 10, 128)
    assert out.threshold.shape == (1,)
    assert torch.all((out.points > 0) & (out.points < 1))
    assert model.config["n_points"] == 10 and model.config["use_spr"] is True


def test_batch_and_no_spr(episode):
    ep2 = {k: torch.cat([v, v]) for k, v in episode.items()}
    model = FoBPromptGenerator(n_points=10, use_spr=False, **SMALL).eval()
    assert model.refiner is None
    with torch.no_grad():
        out = run(model, ep2)
    assert out.points_refined == [] and torch.equal(out.points, out.points_coarse)
    assert out.heatmaps.shape == (2, 10, N, N) and out.proto_bg.shape == (2, 10, 32)
    assert torch.allclose(out.points[0], out.points[1], atol=1e-5)
    losses = fob_loss(out, ep2["query_ring"], ep2["query_mask"])
    assert {"total", "heatmap", "phi", "hinge", "bce", "coord"} <= set(losses)
    with pytest.raises(ValueError):
        model(ep2["support_emb"], ep2["support_mask"], ep2["support_ring"][:, :5], ep2["query_emb"])


def test_coordinate_loss_trains_refiner(episode):
    torch.manual_seed(1)
    model = FoBPromptGenerator(**SMALL)
    out = run(model, episode)
    only_coord = {"heatmap": 0.0, "phi": 0.0, "hinge": 0.0, "bce": 0.0, "coord": 1.0}
    fob_loss(out, episode["query_ring"], episode["query_mask"], weights=only_coord)["total"].backward()
    ref = model.refiner
    assert ref.alpha_logit.grad is not None and ref.alpha_logit.grad.abs() > 0
    for name, p in ref.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.adapter.proj.weight.grad.abs().sum() > 0  # and further back, through the points


def test_attention_matches_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 300, 16, generator=g) for _ in range(3))
    bias = torch.randn(2, 300, generator=g) * 3
    assert torch.allclose(biased_attention(q, k, v, bias), biased_attention_reference(q, k, v, bias, chunk=128), atol=1e-5)


def test_feature_sampling_uses_normalised_coordinates():
    feats = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 1, 64, 64)
    r, c = 10, 37
    pt = torch.tensor([[[(c + 0.5) / 64, (r + 0.5) / 64]]])
    assert sample_features(feats, pt).item() == pytest.approx(r * 64 + c)


@pytest.mark.slow
def test_overfit_one_episode(episode):
    torch.manual_seed(0)
    model = FoBPromptGenerator(**SMALL)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    target = episode["query_ring"]
    first = None
    for _ in range(60):
        out = run(model, episode)
        loss = fob_loss(out, target, episode["query_mask"])
        if first is None:
            first = (loss["total"].item(), (out.points - target).norm(dim=-1).mean().item())
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
    with torch.no_grad():
        out = run(model, episode)
        last = fob_loss(out, target, episode["query_mask"])["total"].item()
        err = (out.points - target).norm(dim=-1).mean().item()
    assert last < 0.25 * first[0], (first, last)
    assert err < 0.5 * first[1] and err * N < 8.0, (first, err * N)


def test_save_load_roundtrip(tmp_path, episode):
    torch.manual_seed(2)
    model = FoBPromptGenerator(**SMALL).eval()
    with torch.no_grad():
        ref = run(model, episode)
    p32 = tmp_path / "g32.pt"
    save_generator(model, p32, meta={"backbone": "litemedsam", "step": np.int64(5)}, fp16=False)
    m32, meta = load_generator(p32)
    assert meta == {"backbone": "litemedsam", "step": 5}
    assert m32.config == model.config and not m32.training
    with torch.no_grad():
        out = run(m32, episode)
    assert torch.equal(out.points, ref.points) and torch.equal(out.heatmaps, ref.heatmaps)

    p16 = tmp_path / "g16.pt"
    save_generator(model, p16, meta={}, fp16=True)
    assert p16.stat().st_size < 0.6 * p32.stat().st_size
    m16, _ = load_generator(p16)
    for (k, a), b in zip(model.state_dict().items(), m16.state_dict().values()):
        assert b.dtype == a.dtype and torch.equal(b, a.half().float()), k
    with torch.no_grad():
        out16 = run(m16, episode)
        again = run(load_generator(p16)[0], episode)
    assert torch.equal(out16.points, again.points)  # deterministic after the fp16 round trip
    assert (out16.points - ref.points).abs().max() < 0.01


def test_load_rejects_non_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file" * 10)
    with pytest.raises(CheckpointError):
        load_generator(garbage)
    other = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, other)
    with pytest.raises(CheckpointError, match="not a FoB prompt generator"):
        load_generator(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_generator(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"config": dict(channels=32), "state_dict": {"x": torch.zeros(1)}, "meta": {}}, bad)
    with pytest.raises(CheckpointError):
        load_generator(bad)


def test_foreground_points():
    prob = np.zeros((N, N), np.float32)
    region = disk(100, 150, 25)
    prob[region] = 0.95
    prob[disk(200, 40, 10)] = 0.7  # confident-ish but below the threshold
    pts = foreground_points(torch.from_numpy(prob), n=10, threshold=0.9)
    assert pts.shape == (10, 2)
    rc = np.floor(pts[:, ::-1] * N).astype(int)
    assert region[rc[:, 0], rc[:, 1]].all()
    assert len(np.unique(rc, axis=0)) == 10
    assert np.array_equal(pts, foreground_points(prob))
    # spread out: not all in one corner of the disk
    assert np.linalg.norm(pts - pts.mean(0), axis=1).mean() * N > 8
    # non-convex region: still inside
    ring = disk(128, 128, 40) & ~disk(128, 128, 30)
    p2 = foreground_points(ring.astype(np.float32), n=10)
    rc2 = np.floor(p2[:, ::-1] * N).astype(int)
    assert ring[rc2[:, 0], rc2[:, 1]].all()
    # fallback: nothing above 0.9 -> top pixels; everything < 0.5 -> empty
    weak = np.full((N, N), 0.1, np.float32)
    weak[50, 60] = 0.7
    fb = foreground_points(weak)
    assert fb.shape == (1, 2) and np.allclose(fb[0], [60.5 / N, 50.5 / N])
    assert foreground_points(np.full((N, N), 0.3)).shape == (0, 2)


def test_prior_weight_scales_only_the_position_prior(episode):
    torch.manual_seed(0)
    model = FoBPromptGenerator(**SMALL).eval()
    with torch.no_grad():
        model.context.prior_gain.fill_(5.0)  # a prior strong enough to move the points
        default = run(model, episode)
        one = model(episode["support_emb"], episode["support_mask"], episode["support_ring"], episode["query_emb"],
                    torch.ones(1))
        off = model(episode["support_emb"], episode["support_mask"], episode["support_ring"], episode["query_emb"],
                    torch.zeros(1))
    assert torch.equal(default.points, one.points) and torch.equal(default.fg_prob, one.fg_prob)
    # Without the prior the heatmaps lose the support ring's Gaussians; the foreground is untouched.
    assert (default.heatmaps - off.heatmaps).abs().max() > 1.0
    assert (default.points - off.points).abs().max() > 0.01
    assert torch.equal(default.fg_prob, off.fg_prob)


def test_a_prior_ring_found_on_the_query_moves_the_points_there(episode):
    torch.manual_seed(0)
    model = FoBPromptGenerator(**SMALL).eval()
    with torch.no_grad():
        model.context.prior_gain.fill_(50.0)  # the prior dominates the untrained heatmaps
        model.refiner = None
        own = run(model, episode)
        moved_ring = episode["support_ring"] + torch.tensor([40.0 / N, 0.0])
        moved = model(episode["support_emb"], episode["support_mask"], episode["support_ring"], episode["query_emb"],
                      prior_ring=moved_ring)
    shift = (moved.points - own.points)[0].mean(0) * N
    assert 25 < float(shift[0]) < 45 and abs(float(shift[1])) < 5
    # The support's prototypes still come from the support ring: the foreground is unchanged.
    assert torch.equal(own.fg_prob, moved.fg_prob)
