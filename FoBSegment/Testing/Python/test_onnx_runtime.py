"""ONNX Runtime encoder and mask decoder: same output as eager PyTorch, safe cache, clean fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TEST_DATA

pytest.importorskip("onnxruntime", reason="onnxruntime not installed: the eager path is the only one")


@pytest.fixture()
def ct_batch(litemedsam):
    from FoBSegmentLib.geometry import SliceView
    from FoBSegmentLib.io import read_volume
    from FoBSegmentLib.preprocessing import fit_normalisation

    vol = read_volume(TEST_DATA / "example_ct.nii.gz")
    view = SliceView.for_volume(vol)
    stack, norm = view.to_stack(vol.array), fit_normalisation(vol.array)
    return np.stack([litemedsam.prepare(norm.apply(stack[k])) for k in (40, 70)])


@pytest.fixture()
def fresh_backbone(monkeypatch, tmp_path):
    """A LiteMedSAM backbone whose ONNX export goes to an empty cache folder."""
    from FoBSegmentLib.backbones.litemedsam import LiteMedSAMBackbone

    monkeypatch.setenv("FOBSEGMENT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FOBSEGMENT_RUNTIME", raising=False)
    monkeypatch.delenv("FOBSEGMENT_PRECISION", raising=False)
    return lambda: LiteMedSAMBackbone("cpu")


def test_onnx_runtime_reproduces_eager_output(fresh_backbone, ct_batch, tmp_path, monkeypatch):
    monkeypatch.setenv("FOBSEGMENT_RUNTIME", "onnxruntime")
    bb = fresh_backbone()
    assert bb.runtime == "onnxruntime"
    fast = bb.encode(ct_batch)
    box, pts, lab = np.array([0.2, 0.3, 0.6, 0.7]), np.array([[0.4, 0.5], [0.1, 0.1]]), np.array([1, 0])
    fast_dec = [bb.decode(fast[0], box=box), bb.decode(fast[1], points=pts, labels=lab),
                bb.decode(fast[0], points=pts, labels=lab, box=box, multimask=True)]
    bb.runtime = "torch"
    eager = bb.encode(ct_batch)
    assert fast.shape == eager.shape == (2, 256, 64, 64)
    assert float(np.abs(fast - eager).max()) < 1e-3
    eager_dec = [bb.decode(eager[0], box=box), bb.decode(eager[1], points=pts, labels=lab),
                 bb.decode(eager[0], points=pts, labels=lab, box=box, multimask=True)]
    for f, e in zip(fast_dec, eager_dec):
        assert f.logits.shape == e.logits.shape and f.iou.shape == e.iou.shape
        assert float(np.abs(f.logits - e.logits).max()) < 1e-2
        assert float(np.abs(f.iou - e.iou).max()) < 1e-3
        assert int(((f.logits > 0) ^ (e.logits > 0)).sum()) <= 2  # the mask the user sees
    assert fast_dec[2].logits.shape[0] == 3 and fast_dec[0].logits.shape[0] == 1
    exported = sorted((tmp_path / "onnx").glob("*.onnx"))
    assert len(exported) == 2 and not list((tmp_path / "onnx").glob("*.part"))  # encoder, decoder
    assert all(p.with_name(p.name + ".sha256").is_file() for p in exported)
    # A second backbone reuses the exported files instead of exporting again.
    mtimes = [p.stat().st_mtime_ns for p in exported]
    assert fresh_backbone().runtime == "onnxruntime"
    assert [p.stat().st_mtime_ns for p in exported] == mtimes


@pytest.mark.slow
def test_corrupt_cached_onnx_file_is_replaced(fresh_backbone, ct_batch, tmp_path, monkeypatch):
    monkeypatch.setenv("FOBSEGMENT_RUNTIME", "onnxruntime")  # not measured: this test is about the file
    bb = fresh_backbone()
    assert bb.runtime == "onnxruntime"
    path = next((tmp_path / "onnx").glob("*encoder256*.onnx"))
    path.write_bytes(path.read_bytes()[:5000])  # a truncated file, e.g. a full disk
    again = fresh_backbone()
    assert again.runtime == "onnxruntime"
    assert path.stat().st_size > 5000
    again.runtime = "torch"
    eager = again.encode(ct_batch[:1])
    again.runtime = "onnxruntime"
    assert float(np.abs(again.encode(ct_batch[:1]) - eager).max()) < 1e-3


def test_runtime_environment_variable_and_missing_package_fall_back_to_eager(fresh_backbone, ct_batch,
                                                                            monkeypatch, tmp_path):
    from FoBSegmentLib.backbones import onnx_runtime

    monkeypatch.setenv("FOBSEGMENT_RUNTIME", "torch")
    bb = fresh_backbone()
    assert bb.runtime == "torch"
    assert not (tmp_path / "onnx").exists()  # nothing exported when not asked for
    monkeypatch.setenv("FOBSEGMENT_RUNTIME", "auto")
    monkeypatch.setattr(onnx_runtime, "onnxruntime_available", lambda: False)
    bb = fresh_backbone()
    assert bb.runtime == "torch"
    assert bb.encode(ct_batch[:1]).shape == (1, 256, 64, 64)
    with pytest.raises(RuntimeError, match="onnxruntime"):
        bb.runtime = "onnxruntime"


def test_bf16_precision_uses_the_eager_path(fresh_backbone, ct_batch, monkeypatch):
    monkeypatch.setenv("FOBSEGMENT_PRECISION", "bf16")
    bb = fresh_backbone()
    assert bb.precision == "bf16"
    assert bb.runtime == "torch"


def test_cache_dir_argument_holds_the_onnx_exports(tmp_path, monkeypatch):
    from FoBSegmentLib.backbones import create_backbone

    monkeypatch.setenv("FOBSEGMENT_RUNTIME", "onnxruntime")
    monkeypatch.setenv("FOBSEGMENT_CACHE_DIR", str(tmp_path / "elsewhere"))
    bb = create_backbone("litemedsam", "cpu", cache_dir=tmp_path / "mine")
    assert bb.runtime == "onnxruntime"
    assert len(list((tmp_path / "mine" / "onnx").glob("*.onnx"))) == 1  # the encoder; the decoder on first use
    bb.decode(np.zeros((256, 64, 64), np.float32), box=np.array([0.2, 0.2, 0.6, 0.6]))
    assert len(list((tmp_path / "mine" / "onnx").glob("*.onnx"))) == 2
    assert not (tmp_path / "elsewhere").exists()


def test_exported_mask_predictor_computes_sams_prompt_encoder_and_mask_decoder(litemedsam, ct_batch):
    """The graph exported for ONNX Runtime encodes the prompts itself (a box as two labelled
    corners, a padding point without a box) and reorders SAM's products (prompt side first,
    channel-last upscaling); its masks and IoU must be SAM's own, for every kind of prompt."""
    from FoBSegmentLib.backbones.mask_decoder import MaskPredictor, dense_pe
    from FoBSegmentLib.backbones.prompt_tokens import prompt_points

    pe, md = litemedsam.model.prompt_encoder, litemedsam.model.mask_decoder
    norm_box = np.array([60.0, 80.0, 150.0, 170.0]) / 256
    norm_pts, labels = np.array([[100.0, 120.0], [30.0, 40.0], [200.0, 90.0]]) / 256, np.array([1, 0, 0])
    with torch.inference_mode():
        emb = litemedsam.model.image_encoder(torch.from_numpy(ct_batch[:1]))
        box = torch.tensor([[[60.0, 80.0, 150.0, 170.0]]])
        points = (torch.tensor([[[100.0, 120.0], [30.0, 40.0], [200.0, 90.0]]]), torch.tensor([[1, 0, 0]]))
        predictor = None
        for prompt, ours in ((dict(points=None, boxes=box), dict(box=norm_box)),
                             (dict(points=points, boxes=None), dict(points=norm_pts, labels=labels)),
                             (dict(points=points, boxes=box), dict(points=norm_pts, labels=labels, box=norm_box))):
            sparse, dense = pe(masks=None, **prompt)
            predictor = predictor or MaskPredictor(pe, md, dense_pe(litemedsam, pe), dense)
            ref_masks, ref_iou = md.predict_masks(emb, dense_pe(litemedsam, pe), sparse, dense)
            coords, labs = (torch.from_numpy(a) for a in prompt_points(litemedsam, **ours))
            assert torch.allclose(predictor.sparse_tokens(coords, labs), sparse, atol=1e-5)
            masks, iou = predictor(emb, coords, labs)
            assert masks.shape == ref_masks.shape == (1, 4, 256, 256)
            assert float((masks - ref_masks).abs().max()) < 1e-3
            assert float((iou - ref_iou).abs().max()) < 1e-4
            assert ref_masks.abs().max() > 1  # real logits, not a degenerate all-zero comparison


@pytest.fixture()
def exported_cache(litemedsam, tmp_path):
    """A cache folder holding the session's verified ONNX exports (no export, no runtime record)."""
    import shutil

    from FoBSegmentLib.backbones import onnx_runtime

    litemedsam._encoder_export()
    litemedsam._decoder_model()
    dest = tmp_path / "cache" / "onnx"
    dest.mkdir(parents=True)
    for f in onnx_runtime.onnx_cache_dir(litemedsam.cache_dir).glob("*.onnx*"):
        shutil.copy(f, dest / f.name)
    return tmp_path / "cache"


def test_encoder_runtime_is_chosen_by_measurement_once_per_machine(exported_cache, ct_batch, monkeypatch):
    """The first backbone of a machine times every installed runtime against eager PyTorch and
    records the fastest that reproduces it; later ones read the record, and a record made on
    another CPU is not trusted."""
    import json

    from FoBSegmentLib.backbones import cpu_runtime
    from FoBSegmentLib.backbones.litemedsam import LiteMedSAMBackbone

    monkeypatch.delenv("FOBSEGMENT_RUNTIME", raising=False)
    monkeypatch.delenv("FOBSEGMENT_PRECISION", raising=False)
    bb = LiteMedSAMBackbone("cpu", cache_dir=exported_cache)
    choice = bb.runtime_choice
    secs = choice.seconds_per_call
    usable = {rt: s for rt, s in secs.items() if s is not None}
    assert "torch" in secs and "onnxruntime" in secs
    assert choice.runtime == min(usable, key=usable.get) and choice.runtime in bb.runtime_choice.reason
    assert choice.signature["model"] and "threads" in choice.signature
    assert all(d <= 1e-3 for rt, d in choice.max_abs_diff.items() if secs[rt] is not None)
    record = next((exported_cache / "onnx").glob("*encoder*-runtime.json"))
    assert json.loads(record.read_text())[0]["runtime"] == choice.runtime
    with torch.inference_mode():
        eager = bb.model.image_encoder(torch.from_numpy(ct_batch[:1])).numpy()
    assert float(np.abs(bb.encode(ct_batch[:1]) - eager).max()) < 1e-3  # the chosen runtime, same output

    def no_calibration(*a, **k):
        raise AssertionError("calibrated again although a record exists for this machine")

    monkeypatch.setattr(cpu_runtime, "calibrate", no_calibration)
    again = LiteMedSAMBackbone("cpu", cache_dir=exported_cache)
    assert again.runtime == choice.runtime and again._encoder is None  # nothing built before a slice needs it

    entries = json.loads(record.read_text())
    entries[0]["signature"]["model"] = "another CPU"
    record.write_text(json.dumps(entries))
    monkeypatch.setattr(cpu_runtime, "calibrate", lambda *a, **k: cpu_runtime.Choice("torch", "measured again"))
    assert LiteMedSAMBackbone("cpu", cache_dir=exported_cache).runtime_choice.reason == "measured again"


def test_openvino_encoder_reproduces_eager_output(exported_cache, ct_batch, monkeypatch):
    pytest.importorskip("openvino", reason="openvino not installed")
    from FoBSegmentLib.backbones.litemedsam import LiteMedSAMBackbone

    monkeypatch.setenv("FOBSEGMENT_RUNTIME", "openvino")
    bb = LiteMedSAMBackbone("cpu", cache_dir=exported_cache)
    assert bb.runtime == "openvino"
    fast = bb.encode(ct_batch)
    bb.runtime = "torch"
    assert float(np.abs(fast - bb.encode(ct_batch)).max()) < 1e-3
    assert (exported_cache / "onnx" / "openvino").is_dir()  # the compiled model is cached for the next process


def test_info_names_the_runtime_and_why(exported_cache, capsys, monkeypatch):
    from FoBSegmentLib.backbones.litemedsam import LiteMedSAMBackbone
    from FoBSegmentLib.cli import main

    monkeypatch.delenv("FOBSEGMENT_RUNTIME", raising=False)
    main(["info", "--cache-dir", str(exported_cache)])
    before = [line for line in capsys.readouterr().out.splitlines() if line.startswith("runtime:")][0]
    cpu = __import__("FoBSegmentLib.backbones.cpu_runtime", fromlist=["x"]).cpu_description()
    assert "not measured yet" in before and cpu["model"] in before
    choice = LiteMedSAMBackbone("cpu", cache_dir=exported_cache).runtime_choice
    main(["info", "--cache-dir", str(exported_cache)])
    after = [line for line in capsys.readouterr().out.splitlines() if line.startswith("runtime:")][0]
    assert after.startswith(f"runtime: {choice.runtime} ") and "per call" in after and choice.measured_at in after


def test_a_cached_run_loads_neither_torch_nor_timm_nor_the_encoder(exported_cache, tmp_path):
    """Start-up and memory: once a machine has its exports and runtime record, decoding on cached
    embeddings runs in ONNX Runtime from numpy: PyTorch (1.3 s, 540 MB), TinyViT (timm, ~3 s)
    and the encoder stay unloaded."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import numpy as np\n"
        "from FoBSegmentLib.backbones import create_backbone\n"
        "bb = create_backbone('litemedsam', 'auto')\n"
        "d = bb.decode(np.zeros((256, 64, 64), np.float32), box=[0.2, 0.2, 0.6, 0.6])\n"
        "print(bb.runtime, bb._encoder is None, 'torch' in sys.modules, 'timm' in sys.modules, d.logits.shape)\n")
    env = {**os.environ, "FOBSEGMENT_CACHE_DIR": str(exported_cache)}
    env.pop("FOBSEGMENT_RUNTIME", None)
    first = ("from FoBSegmentLib.backbones.litemedsam import LiteMedSAMBackbone\n"
             "LiteMedSAMBackbone('cpu').runtime_choice\n")  # a first run records the choice
    assert subprocess.run([sys.executable, "-c", first], env=env, timeout=300).returncode == 0
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    runtime, no_encoder, torch_loaded, timm, shape = out.stdout.split(maxsplit=4)
    assert runtime != "torch" and no_encoder == "True" and torch_loaded == "False" and timm == "False"
    assert shape.strip() == "(1, 256, 256)"


def test_a_failed_measurement_falls_back_without_recording(exported_cache, monkeypatch):
    from FoBSegmentLib.backbones import cpu_runtime
    from FoBSegmentLib.backbones.litemedsam import LiteMedSAMBackbone

    monkeypatch.delenv("FOBSEGMENT_RUNTIME", raising=False)

    def broken(*a, **k):
        raise ImportError("No module named 'timm'")

    monkeypatch.setattr(cpu_runtime, "calibrate", broken)
    bb = LiteMedSAMBackbone("cpu", cache_dir=exported_cache)
    assert bb.runtime == "onnxruntime" and "measurement failed (ImportError)" in bb.runtime_choice.reason
    assert not list((exported_cache / "onnx").glob("*-runtime.json"))


def test_runtimes_use_the_threads_pytorch_would_use_without_importing_it():
    """A run from the exports never imports PyTorch, yet its runtimes take the threads PyTorch
    would have given them: the runtime record is keyed on the thread count, so a run with and
    one without PyTorch must not measure the runtimes twice."""
    import os
    import subprocess
    import sys

    code = ("import sys\n"
            "from FoBSegmentLib.backbones import cpu_runtime\n"
            "without = cpu_runtime.threads()\n"
            "assert 'torch' not in sys.modules\n"
            "import torch\n"
            "print(without, torch.get_num_threads(), cpu_runtime.threads())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    without, torch_default, with_torch = map(int, out.stdout.split())
    assert without == torch_default == with_torch >= 1
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["1", "1", "1"]
