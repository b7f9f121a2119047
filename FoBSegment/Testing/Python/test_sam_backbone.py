"""SamBackbone with a tiny segment-anything model, downloaded through the real cache code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from FoBSegmentLib import checkpoints as ck
from FoBSegmentLib.backbones.base import EMBED_SHAPE, WORK_SIZE, Backbone
from FoBSegmentLib.backbones.sam import SamBackbone, build_tiny_sam
from FoBSegmentLib.errors import CheckpointError

# the loopback server and the tiny checkpoint are shared with the downloader tests
from test_checkpoints import server, tiny_ckpt, tiny_entry  # noqa: F401


@pytest.fixture
def tiny_backbone(server, tiny_ckpt, tiny_entry, tmp_path):  # noqa: F811
    path = ck.ensure_checkpoint("sam_tiny", cache_dir=tmp_path, url=server.base + "tiny_sam.pth")
    return SamBackbone("vit_b", "cpu", path, "sam_tiny", builder=build_tiny_sam), path


def test_download_then_load_encode_decode(tiny_backbone, tiny_ckpt):  # noqa: F811
    bb, path = tiny_backbone
    src, sha, _ = tiny_ckpt
    assert isinstance(bb, Backbone) and bb.input_size == 1024 and not bb.box_trained
    # the weights are exactly the file's, loaded on the CPU
    saved = torch.load(src, map_location="cpu", weights_only=True)
    got = bb.model.state_dict()
    assert set(saved) <= set(got)
    assert all(torch.equal(saved[k], got[k]) for k in saved)
    assert all(p.device.type == "cpu" for p in bb.model.parameters())
    assert bb.weights_id() == f"sam_tiny-{sha[:16]}"

    rng = np.random.default_rng(0)
    x = bb.prepare(rng.random((300, 200), dtype=np.float32))
    assert x.shape == (3, 1024, 1024)
    emb = bb.encode(x[None])
    assert emb.shape == (1, *EMBED_SHAPE) and emb.dtype == np.float32
    assert np.isfinite(emb).all() and emb.std() > 0

    one = bb.decode(emb[0], points=np.array([[0.3, 0.4]]), labels=np.array([1]))
    assert one.logits.shape == (1, WORK_SIZE, WORK_SIZE) and one.iou.shape == (1,)
    multi = bb.decode(emb, points=np.array([[0.3, 0.4], [0.1, 0.1]]), labels=np.array([1, 0]), multimask=True)
    assert multi.logits.shape == (3, WORK_SIZE, WORK_SIZE) and multi.iou.shape == (3,)
    boxed = bb.decode(emb[0], box=np.array([0.1, 0.2, 0.5, 0.6]))
    assert boxed.logits.shape == (1, WORK_SIZE, WORK_SIZE)
    assert not np.allclose(boxed.logits, one.logits)  # the prompt matters


def test_slice_to_mask_matches_segment_anythings_own_predictor(tiny_backbone):
    """A non-square slice through prepare -> encode -> decode(box) gives segment-anything's own
    SamPredictor result: its embedding, its IoU and its low-resolution logits.  (The padding
    of a non-square slice is 0 after the pixel normalisation, as SAM pads.)"""
    from segment_anything import SamPredictor

    bb, _ = tiny_backbone
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (768, 1024)).astype(np.uint8)  # rows, cols: 256 rows of padding
    predictor = SamPredictor(bb.model)
    predictor.set_image(np.repeat(grey[..., None], 3, axis=2))
    box = np.array([100, 150, 600, 500])  # x0, y0, x1, y1 in image pixels
    _, iou, low = predictor.predict(box=box, multimask_output=False, return_logits=True)

    emb = bb.encode(bb.prepare(grey.astype(np.float32) / 255)[None])
    assert emb.shape == (1, *EMBED_SHAPE)
    np.testing.assert_allclose(emb, predictor.features.numpy(), atol=1e-5)
    dec = bb.decode(emb[0], box=box / 1024.0)
    np.testing.assert_allclose(dec.iou, iou, atol=1e-5)
    np.testing.assert_allclose(dec.logits, low, atol=1e-4)


def test_pixel_normalisation(tiny_ckpt):  # noqa: F811
    src, _, _ = tiny_ckpt
    sam = SamBackbone("vit_b", "cpu", src, "sam_tiny", builder=build_tiny_sam)
    med = SamBackbone("vit_b", "cpu", src, "medsam_vit_b", box_trained=True, pixel_norm="unit",
                      builder=build_tiny_sam)
    x = np.ones((3, 4, 4), np.float32)
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    assert np.allclose(sam.normalise_input(x)[:, 0, 0], (255.0 - mean) / std)
    assert np.allclose(sam.normalise_input(np.zeros((3, 2, 2), np.float32))[:, 0, 0], -mean / std)
    assert np.array_equal(med.normalise_input(x), x)
    assert med.box_trained and med.name == "medsam_vit_b"
    assert sam.preprocess_id() != med.preprocess_id()  # different embeddings -> different cache keys


def test_not_a_sam_state_dict(tmp_path, tiny_ckpt):  # noqa: F811
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="Cannot read"):
        SamBackbone("vit_b", "cpu", junk, "sam_vit_b")
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(CheckpointError, match="not a sam_vit_b"):
        SamBackbone("vit_b", "cpu", other, "sam_vit_b")
    notdict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], notdict)
    with pytest.raises(CheckpointError, match="state dict"):
        SamBackbone("vit_b", "cpu", notdict, "sam_vit_b")
    # a real SAM state dict of another architecture (tiny into ViT-B)
    with pytest.raises(CheckpointError, match="missing keys|size mismatch|unexpected keys"):
        SamBackbone("vit_b", "cpu", tiny_ckpt[0], "sam_vit_b")


def test_wrapped_state_dict_and_expected_sha(tmp_path, tiny_ckpt):  # noqa: F811
    src, sha, _ = tiny_ckpt
    wrapped = tmp_path / "wrapped.pth"
    state = torch.load(src, map_location="cpu", weights_only=True)
    torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in state.items()}}, wrapped)
    bb = SamBackbone("vit_b", "cpu", wrapped, "sam_tiny", builder=build_tiny_sam)
    assert all(p.dtype == torch.float32 for p in bb.model.parameters())
    SamBackbone("vit_b", "cpu", src, "sam_tiny", builder=build_tiny_sam, expected_sha256=sha)
    with pytest.raises(CheckpointError, match="SHA-256"):
        SamBackbone("vit_b", "cpu", src, "sam_tiny", builder=build_tiny_sam, expected_sha256="f" * 64)
    with pytest.raises(CheckpointError, match="does not exist"):
        SamBackbone("vit_b", "cpu", tmp_path / "missing.pth", "sam_tiny", builder=build_tiny_sam)


def test_tiny_sam_is_small_and_sam_shaped():
    from segment_anything.modeling import Sam

    m = build_tiny_sam()
    assert isinstance(m, Sam)
    assert sum(p.numel() for p in m.parameters()) < 4_000_000
    with torch.no_grad():
        assert m.image_encoder(torch.zeros(1, 3, 1024, 1024)).shape == (1, *EMBED_SHAPE)
