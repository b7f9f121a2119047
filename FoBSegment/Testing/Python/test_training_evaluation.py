"""Self-supervised training (supervoxels, episodes, resumable loop) and the evaluation protocols."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TEST_DATA
from FoBSegmentLib.evaluation import ep1_support_slices, evaluate, parse_classes
from FoBSegmentLib.errors import FoBInputError
from FoBSegmentLib.research.training_data import PreparedVolume, body_mask, supervoxels


def _ct_crop(tmp_path, z0=90, z1=96, name="image_7.nii.gz", shrink=2):
    """A small real CT crop (liver/spleen region) with its labels, in the evaluation layout."""
    ct = sitk.ReadImage(str(TEST_DATA / "example_ct.nii.gz"))[::shrink, ::shrink, z0:z1]
    lab = sitk.ReadImage(str(TEST_DATA / "example_seg.nii.gz"))[::shrink, ::shrink, z0:z1]
    sitk.WriteImage(ct, str(tmp_path / name))
    sitk.WriteImage(lab, str(tmp_path / name.replace("image_", "label_")))
    return tmp_path / name


def test_ep1_support_slices_are_at_one_sixth_half_five_sixths():
    lab = np.zeros((40, 4, 4), bool)
    lab[10:22, 1, 1] = True  # 12 labelled slices: 10..21
    assert ep1_support_slices(lab) == [12, 16, 20]
    assert ep1_support_slices(np.zeros((5, 2, 2), bool)) == []


def test_parse_classes_reports_bad_input():
    assert parse_classes("liver=1,spleen=4") == {"liver": 1, "spleen": 4}
    with pytest.raises(FoBInputError):
        parse_classes("liver:1")


def test_supervoxels_cover_the_body_and_follow_spacing():
    img = TEST_DATA / "example_ct.nii.gz"
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(img)))[60:80].astype(np.float32)
    x = np.clip((arr + 160) / 400, 0, 1)
    body = body_mask(x)
    assert 0.2 < body.mean() < 0.9
    lab = supervoxels(x, (3.0, 3.0, 3.0), "slic", 30.0)
    assert (lab[~body] == 0).all() and (lab[body] > 0).mean() > 0.95
    n = len(np.unique(lab[lab > 0]))
    expected = body.sum() * 27 / 30.0**3
    assert 0.3 * expected < n < 3 * expected
    # Episodes need a supervoxel on two adjacent slices with >= 200 px; a 256-grid stack has them.
    sq = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=(256, 256))[0].numpy()
    pv = PreparedVolume("t", np.zeros((20, 1)), sq, supervoxels(sq, (3.0, 122 * 3 / 256, 122 * 3 / 256)), np.arange(20))
    cands = pv.episodes_candidates()
    assert cands and all(b == a + 1 for a, b, _ in cands)


@pytest.mark.slow
def test_training_runs_resumes_and_writes_loadable_weights(tmp_path):
    from FoBSegmentLib.research.prompt_generator import load_generator
    from FoBSegmentLib.research.training import train

    _ct_crop(tmp_path, 88, 92, "image_1.nii.gz", shrink=1)
    out = tmp_path / "w.pt"
    kw = dict(images=[str(tmp_path / "image_*.nii.gz")], output=out, device="cpu", batch=2, seed=3,
              cache_dir=tmp_path / "cache", save_every=2, channels=32)
    train(iterations=2, **kw)
    ck = torch.load(str(out) + ".ckpt", weights_only=False)
    assert ck["iteration"] == 2
    model, meta = load_generator(out)
    assert meta["iterations"] == 2 and meta["backbone"] == "litemedsam" and meta["seed"] == 3
    train(iterations=4, **kw)  # resumes from iteration 2, does not start over
    assert torch.load(str(out) + ".ckpt", weights_only=False)["iteration"] == 4
    assert load_generator(out)[1]["iterations"] == 4
    assert out.stat().st_size < 20 * 2**20
    with pytest.raises(FoBInputError, match="other settings .*episodes 'adjacent' -> 'relocate'"):
        train(iterations=6, episodes="relocate", **kw)  # would mix two recipes in one run
    assert torch.load(str(out) + ".ckpt", weights_only=False)["iteration"] == 4
    # Relocation fine-tuning from those weights, with snapshots for a held-out curve.
    tuned = tmp_path / "tuned.pt"
    train(iterations=4, episodes="mixed", prior_dropout=0.5, init=out, snapshot_every=2,
          **{**kw, "output": tuned})
    snaps = sorted(tmp_path.glob("tuned.it*.pt"))
    assert [p.name for p in snaps] == ["tuned.it000002.pt", "tuned.it000004.pt"]
    assert load_generator(snaps[0])[1]["episodes"] == "mixed"
    meta = load_generator(tuned)[1]
    assert meta["episodes"] == "mixed" and meta["prior_dropout"] == 0.5 and meta["init"] == str(out)
    with pytest.raises(FoBInputError, match="architecture"):
        train(iterations=1, init=out, **{**kw, "output": tmp_path / "wide.pt", "channels": 64})


def test_setting_two_excludes_slices_with_the_test_labels(tmp_path, litemedsam):
    from FoBSegmentLib.research.training_data import load_prepared, prepare_volume

    img = _ct_crop(tmp_path, 66, 72, "image_1.nii.gz")
    p = prepare_volume(img, litemedsam, tmp_path / "prep", label_path=tmp_path / "label_1.nii.gz",
                       exclude_labels=[1])  # spleen starts at slice 82: none of these slices excluded
    pv, ex = load_prepared(p)
    assert not ex.any()
    p2 = prepare_volume(img, litemedsam, tmp_path / "prep", label_path=tmp_path / "label_1.nii.gz",
                        exclude_labels=[5])  # liver is on every slice from 69 on
    _, ex2 = load_prepared(p2)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "label_1.nii.gz")))
    assert np.array_equal(ex2, (lab == 5).reshape(lab.shape[0], -1).any(1))


def test_evaluate_ep1_ceiling_and_json(tmp_path, litemedsam):
    from FoBSegmentLib.cli import main
    from FoBSegmentLib import Segmenter

    _ct_crop(tmp_path, 95, 101, "image_7.nii.gz", shrink=1)
    _ct_crop(tmp_path, 94, 100, "image_8.nii.gz", shrink=1)
    seg = Segmenter(litemedsam)
    r = evaluate(tmp_path, {"liver": 5}, "7", ["8"], "ep1", segmenter=seg, method="gt_box")
    assert r["protocol"] == "ep1" and r["backbone"] == "litemedsam"
    assert r["classes"]["liver"]["cases"]["8"] > 0.85  # LiteMedSAM with the true box
    naive = evaluate(tmp_path, {"liver": 5}, "7", ["8"], "ep1", segmenter=seg, method="support_box")
    assert naive["slices_encoded"] == 0  # everything came from the cache
    assert 0.0 < naive["mean_dice"] <= r["mean_dice"] + 0.05
    out = tmp_path / "r.json"
    code = main(["evaluate", "--data", str(tmp_path), "--classes", "liver=5", "--support-case", "7", "--cases", "8",
                 "--protocol", "full", "--json", str(out), "--device", "cpu"])
    assert code == 0
    j = json.loads(out.read_text())
    assert j["protocol"] == "full" and j["mean_dice"] > 0.5, "the oracle-free run finds the liver of the crop"
    assert set(j["classes"]["liver"]["cases"]) == {"8"} and "seconds" in j and "slices_encoded" in j


@pytest.mark.slow
def test_distributed_training_with_torchrun_on_two_cpu_processes(tmp_path):
    """PyTorch DDP (gloo on CPU, the same code path as NCCL on GPUs): two ranks train, rank 0
    writes resumable weights once, and a time-boxed run stops every rank together."""
    import os
    import subprocess
    import sys

    from FoBSegmentLib.research.prompt_generator import load_generator

    _ct_crop(tmp_path, 88, 92, "image_1.nii.gz", shrink=2)
    _ct_crop(tmp_path, 70, 74, "image_2.nii.gz", shrink=2)
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FOBSEGMENT_CACHE_DIR": str(tmp_path / "cache")}

    def run(iterations, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "FoBSegmentLib.cli", "train", "--images", str(tmp_path / "image_*.nii.gz"),
               "--output", str(out), "--device", "cpu", "--iterations", str(iterations), "--batch", "2",
               "--save-every", "2", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    r = run(2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # only rank 0 writes
    _, meta = load_generator(out)
    assert meta["world_size"] == 2 and meta["episodes_per_iteration"] == 4 and meta["iterations"] == 2
    # Resume under torchrun, then a time-boxed run: both ranks must stop at the same iteration.
    r = run(4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and load_generator(out)[1]["iterations"] == 4
    r = run(10_000, "--max-minutes", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopping after 0.0 min at iteration 5" in r.stdout
    assert torch.load(str(out) + ".ckpt", weights_only=False)["iteration"] == 5


def _shifted_pair(shift=(0, 24, -16), seed=0):
    """Two prepared volumes, the second the first moved in-plane: every supervoxel of one
    lies elsewhere in the other, with the same embedding under it."""
    rng = np.random.default_rng(seed)
    n = 6
    blocks = np.broadcast_to(1 + np.arange(256).reshape(16, 16), (n, 16, 16))  # 16 x 16 px supervoxels
    pseudo = np.kron(blocks, np.ones((1, 16, 16), int)).astype(np.int32)  # spanning every slice
    codes = rng.standard_normal((257, 256)).astype(np.float32)
    lab64 = pseudo[:, ::4, ::4]
    emb = (codes[lab64].transpose(0, 3, 1, 2) + 0.1 * rng.standard_normal((n, 256, 64, 64))).astype(np.float16)
    a = PreparedVolume("a", emb, np.zeros((n, 256, 256), np.float16), pseudo, np.arange(n))
    dz, dy, dx = shift
    b = PreparedVolume("b", np.roll(emb, (dy // 4, dx // 4), axis=(2, 3)), a.image_sq,
                       np.roll(pseudo, (dy, dx), axis=(1, 2)), np.arange(n))
    return a, b


def test_supervoxels_are_matched_across_volumes_wherever_they_lie():
    from FoBSegmentLib.research.training_data import matched_supervoxels

    a, b = _shifted_pair()
    none = np.zeros(a.pseudo.shape[0], bool)
    matches = matched_supervoxels([(a, none), (b, none)], min_cosine=0.85)
    assert len(matches) >= 0.8 * len(a.prototypes(none)[0])
    # The same supervoxel (same id, moved 24 / 16 px) is found in the other volume.
    assert np.mean([la == lb for _, _, la, _, _, lb in matches]) > 0.95
    assert all(i == 0 and j == 1 for i, _, _, j, _, _ in matches)
    # Unrelated embeddings match nothing at this threshold.
    c = PreparedVolume("c", np.random.default_rng(5).standard_normal(a.embeddings.shape).astype(np.float16),
                       a.image_sq, a.pseudo, a.slice_index)
    assert matched_supervoxels([(a, none), (c, none)], min_cosine=0.85) == []
    # Distant candidates: the same supervoxel two or more slices apart.
    dist = a.distant_candidates(none)
    assert dist and all(s2 - s1 >= 2 for s1, s2, _ in dist)


def test_relocation_episodes_move_the_structure_and_drop_the_prior():
    from FoBSegmentLib.research.training import EpisodeSampler

    a, b = _shifted_pair()
    none = np.zeros(a.pseudo.shape[0], bool)
    vols = [(a, none), (b, none)]
    adj = EpisodeSampler(vols, np.random.default_rng(0), episodes="adjacent", prior_dropout=1.0)
    _, _, sr, _, _, _, prior, prior_ring = adj.sample(8)
    assert torch.equal(prior, torch.ones(8))  # adjacent episodes keep the prior: the support ring
    assert torch.equal(prior_ring, sr)
    rel = EpisodeSampler(vols, np.random.default_rng(0), episodes="relocate", prior_dropout=1.0, augment=False)
    assert rel.matches
    se, sm, sr, qe, qm, qr, prior, _ = rel.sample(16)
    assert torch.equal(prior, torch.zeros(16))

    def centre(m):
        yy, xx = np.nonzero(m.numpy() > 0.5)
        return np.array([yy.mean(), xx.mean()])

    moved = [np.abs(centre(sm[k]) - centre(qm[k])).max() for k in range(16)]
    assert np.mean([d > 8 for d in moved]) > 0.3  # cross-volume episodes: the structure sits elsewhere
    # The contrast region's ring as the prior: found on the query, so it follows the structure.
    found = EpisodeSampler(vols, np.random.default_rng(1), episodes="relocate", augment=False,
                           prior_source="contrast")
    se, sm, sr, qe, qm, qr, prior, prior_ring = found.sample(16)
    assert torch.equal(prior, torch.ones(16))
    to_query = (prior_ring - qr).abs().mean((1, 2))
    to_support = (prior_ring - sr).abs().mean((1, 2))
    far = torch.tensor([np.abs(centre(sm[k]) - centre(qm[k])).max() > 8 for k in range(16)])
    assert far.any() and bool((to_query[far] < to_support[far]).all())
    with pytest.raises(FoBInputError):
        EpisodeSampler(vols, np.random.default_rng(0), episodes="sideways")


def test_generator_takes_its_position_prior_from_the_contrast_region_on_the_query(segmenter, ct):
    """The shipped generator copies the support ring's position; with ``prior='contrast'``
    it rings the region the training-free localisation found on the query instead."""
    from FoBSegmentLib.backbones.base import slice_to_square
    from FoBSegmentLib.geometry import SliceView
    from FoBSegmentLib.preprocessing import fit_normalisation
    from FoBSegmentLib.research.generator_prompts import GeneratorPrompter

    vol, lab = ct
    view = SliceView.for_volume(vol)
    liver = view.to_stack(lab == 5)
    area = liver.sum((1, 2))
    k_sup = int(np.argmax(area))
    # A query slice where the liver has moved: the one whose liver overlaps the support's least.
    cand = [k for k in range(len(area)) if area[k] > 0.3 * area[k_sup]]
    k_q = min(cand, key=lambda k: (liver[k] & liver[k_sup]).sum() / liver[k].sum())
    sup_mask = np.zeros_like(liver)
    sup_mask[k_sup] = liver[k_sup]
    sup = segmenter.prepare_support(vol, view.from_stack(sup_mask)).slices[0]
    stack = view.to_stack(vol.array)
    q_emb = segmenter.embedder.embed(stack, fit_normalisation(vol.array), [k_q])[k_q]
    gt = slice_to_square(liver[k_q].astype(np.float32)) > 0.5
    contrast_box = segmenter.start_prompter.start_prompt(q_emb, sup)[0].box
    box = GeneratorPrompter(segmenter.backbone, prior="contrast").start_prompt(q_emb, sup)[0].box
    n = gt.shape[0]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert gt[int(cy * n), int(cx * n)]
    # Its box lies over the contrast region's, not over the support's.
    centre = lambda b: np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    assert np.abs(centre(box) - centre(contrast_box)).max() < 0.1
    with pytest.raises(FoBInputError, match="prior"):
        GeneratorPrompter(segmenter.backbone, prior="atlas")


def test_training_options_are_checked_before_any_work(tmp_path):
    from FoBSegmentLib.errors import CheckpointError
    from FoBSegmentLib.research.training import train

    kw = dict(images=[str(tmp_path / "image_*.nii.gz")], output=tmp_path / "w.pt", device="cpu")
    with pytest.raises(FoBInputError, match="from 0 to 1"):
        train(prior_dropout=1.5, **kw)
    with pytest.raises(FoBInputError, match="at least 1"):
        train(snapshot_every=0, **kw)
    not_weights = tmp_path / "notes.pt"
    not_weights.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="written by `fobsegment train`") as err:
        train(init=not_weights, **kw)
    assert "weights_only" not in str(err.value)
