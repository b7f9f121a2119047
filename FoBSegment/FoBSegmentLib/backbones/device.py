"""Devices named without importing PyTorch (1.3 s and 540 MB that a CPU run from exports never needs)."""

from __future__ import annotations

import os
import sys


class Device(str):
    """A device name (``cpu``, ``cuda``, ``cuda:1``) that says its ``type`` like
    ``torch.device`` does, without importing PyTorch; PyTorch takes it wherever it takes a string."""

    @property
    def type(self) -> str:
        return self.split(":", 1)[0]


def cuda_present() -> bool | None:
    """False where no CUDA GPU can be present, without importing PyTorch (no NVIDIA driver on
    Linux, or macOS); None where only PyTorch can tell."""
    if "torch" in sys.modules:
        return None
    if sys.platform == "darwin":
        return False
    if sys.platform.startswith("linux"):
        return None if os.path.exists("/proc/driver/nvidia/version") else False
    return None
