"""SAM (ViT-B/L/H) and MedSAM ViT-B backbones built from the ``segment-anything`` package.

segment-anything's builders call ``torch.load`` without ``map_location``, which fails on
CPU-only machines for checkpoints saved on a GPU.  So the model is built with
``checkpoint=None`` (on the ``meta`` device, so no time or memory is spent on a random
initialisation) and the state dict is loaded here with ``map_location="cpu"``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoints import file_sha256
from ..errors import CheckpointError, FoBInputError
from .base import Backbone, Decoded
from .mask_decoder import sam_style_decode

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
PIXEL_NORMS = ("sam", "unit")


def _registry_builder(variant: str) -> Callable[[], torch.nn.Module]:
    from segment_anything.build_sam import sam_model_registry

    if variant not in ("vit_b", "vit_l", "vit_h"):
        raise FoBInputError(f"Unknown SAM variant '{variant}': use vit_b, vit_l or vit_h.")
    return partial(sam_model_registry[variant], checkpoint=None)


def build_tiny_sam() -> torch.nn.Module:
    """A tiny, randomly initialised ``Sam`` from segment-anything's own classes (a few MB).

    Same interfaces as the real models: 1024 x 1024 input, (256, 64, 64) embeddings, real
    prompt encoder and mask decoder.  For tests.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    encoder = ImageEncoderViT(
        img_size=1024, patch_size=16, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
        out_chans=256, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True, window_size=16, global_attn_indexes=(),
    )
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                           mask_in_chans=16)
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=64, num_heads=8),
        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=32,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
               pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD)).eval()


def _extract_state(obj, checkpoint: Path) -> dict:
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{checkpoint} does not contain a model state dict (a SAM checkpoint was expected).")
    if all(str(k).startswith("module.") for k in obj):  # saved from DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    # load as float32 whatever the file stores (half-precision mirrors exist)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in obj.items()}


def _summarise_mismatch(exc: RuntimeError, model: torch.nn.Module, state: dict) -> str:
    expected = set(model.state_dict())
    got = set(state)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if not parts:
        first = str(exc).strip().splitlines()
        parts.append(first[1].strip() if len(first) > 1 else first[0][:300])
    return "; ".join(parts)


class SamBackbone(Backbone):
    """A segment-anything ``Sam`` model: SAM ViT-B/L/H, or MedSAM ViT-B (``pixel_norm="unit"``)."""

    input_size = 1024

    def __init__(
        self,
        variant: str,
        device: torch.device | str,
        checkpoint: str | Path,
        name: str,
        box_trained: bool = False,
        expected_sha256: str | None = None,
        pixel_norm: str = "sam",
        builder: Callable[[], torch.nn.Module] | None = None,
    ):
        super().__init__(device)
        if pixel_norm not in PIXEL_NORMS:
            raise FoBInputError(f"pixel_norm must be one of {PIXEL_NORMS}, not '{pixel_norm}'.")
        self.variant = variant
        self.name = name
        self.box_trained = bool(box_trained)
        self.pixel_norm = pixel_norm
        checkpoint = Path(checkpoint).expanduser()
        if not checkpoint.is_file():
            raise CheckpointError(f"The {name} checkpoint {checkpoint} does not exist.")
        self.checkpoint = checkpoint
        self._sha: str | None = None
        if expected_sha256:
            digest = file_sha256(checkpoint)
            if digest != expected_sha256.lower():
                raise CheckpointError(
                    f"The checkpoint {checkpoint} has SHA-256 {digest[:16]}..., expected "
                    f"{expected_sha256[:16]}...: it is corrupt or not the official {name} weights. "
                    "Delete it and download it again."
                )
            self._sha = digest
        build = builder or _registry_builder(variant)
        self.model = self._load(build, checkpoint).to(self.device).eval()
        self._mean = np.asarray(SAM_PIXEL_MEAN, np.float32).reshape(3, 1, 1)
        self._std = np.asarray(SAM_PIXEL_STD, np.float32).reshape(3, 1, 1)

    def _load(self, build: Callable[[], torch.nn.Module], checkpoint: Path) -> torch.nn.Module:
        try:
            raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            raise CheckpointError(
                f"Cannot read {checkpoint} as a PyTorch checkpoint ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}). The file is corrupt "
                f"or not a {self.name} checkpoint."
            ) from exc
        state = _extract_state(raw, checkpoint)
        del raw
        # Build without allocating or initialising weights, then adopt the loaded tensors.
        with torch.device("meta"):
            model = build()
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{checkpoint} is not a {self.name} ({self.variant}) checkpoint: "
                f"{_summarise_mismatch(exc, model, state)}. Choose the backbone that matches the file."
            ) from exc
        if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
            # a non-persistent buffer was created on meta: build normally and copy instead
            model = build()
            model.load_state_dict(state, strict=True)
        return model

    # --- identity -----------------------------------------------------------------------
    def weights_id(self) -> str:
        if self._sha is None:
            self._sha = file_sha256(self.checkpoint)
        return f"{self.name}-{self._sha[:16]}"

    def preprocess_id(self) -> str:
        return f"{type(self).__name__}-in{self.input_size}-{self.pixel_norm}-v2"  # v2: padded after normalising

    # --- model --------------------------------------------------------------------------
    def normalise_input(self, x: np.ndarray) -> np.ndarray:
        if self.pixel_norm == "unit":  # MedSAM: [0, 1] as is
            return x
        return (x * np.float32(255.0) - self._mean) / self._std

    @torch.inference_mode()
    def encode(self, batch: np.ndarray) -> np.ndarray:
        emb = self.model.image_encoder(torch.as_tensor(np.asarray(batch, np.float32)).to(self.device))
        return emb.float().cpu().numpy()

    def decode(self, embedding, points=None, labels=None, box=None, multimask=False) -> Decoded:
        return sam_style_decode(self, self.model.prompt_encoder, self.model.mask_decoder,
                                embedding, points, labels, box, multimask)
