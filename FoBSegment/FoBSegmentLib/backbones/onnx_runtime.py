"""Run frozen parts of a backbone (image encoder, mask decoder) through ONNX Runtime on a CPU.

Why: on a CPU the image encoder is almost the whole cost of a run, and once it is fast the
mask decoder is the next thing in the profile.  ONNX Runtime fuses the convolution +
batch-norm, GELU and attention kernels that eager PyTorch runs one by one.  Measured on
2 cores (``benchmarks/speed_memory.py``, ``docs/benchmarks/speed.md``): LiteMedSAM's TinyViT encoder
2.7-3.0x faster, its mask decoder 2.8x (with the graph of ``mask_decoder.MaskPredictor``),
with the same output (max |difference| ~1e-5).

A model is exported once per (weights, part, torch version) into the user cache folder,
written to a temporary name and renamed only when complete, and compared with eager
PyTorch on a probe input right after the export; a sidecar then records the checksum of
the verified file, so later runs only re-hash it.  Anything that goes wrong (package
missing, export failure, a corrupt cached file, a mismatch) returns ``None`` and the caller
keeps the eager PyTorch path.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ..checkpoints import default_cache_dir, sha256_file

log = logging.getLogger(__name__)

#: ``FOBSEGMENT_RUNTIME``: ``auto`` (the fastest measured on this CPU), ``onnxruntime``, ``openvino``, ``torch``
RUNTIME_ENV = "FOBSEGMENT_RUNTIME"
#: largest |ORT - eager| accepted on the probe input.  Embeddings and mask logits are O(1)
#: to O(10) and embeddings are cached as fp16 (resolution ~1e-3): 1e-3 changes nothing downstream.
MAX_ABS_DIFF = 1e-3
_OPSET = 17


def requested_runtime() -> str:
    value = os.environ.get(RUNTIME_ENV, "auto").strip().lower()
    return value if value in ("auto", "onnxruntime", "openvino", "torch") else "auto"


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def torch_version() -> str:
    """The installed PyTorch's version, read from its metadata (no ``import torch``): exports
    made by another version are exported again."""
    import sys
    from importlib import metadata

    if "torch" in sys.modules:
        return sys.modules["torch"].__version__.split("+")[0]
    try:
        return metadata.version("torch").split("+")[0]
    except metadata.PackageNotFoundError:
        return "none"


@functools.lru_cache(maxsize=None)
def package_version(name: str) -> str:
    """An installed package's version from its metadata (without importing it), or ``none``."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


class OnnxModel:
    """Callable ``(*arrays) -> list of float32 arrays`` backed by an ONNX Runtime session."""

    def __init__(self, session, input_names: list[str]):
        self.session = session
        self.input_names = input_names
        self.input_types = {i.name: i.type for i in session.get_inputs()}

    def __call__(self, *inputs) -> list[np.ndarray]:
        feed = {n: as_input(x, self.input_types[n]) for n, x in zip(self.input_names, inputs)}
        return [np.asarray(o) for o in self.session.run(None, feed)]


def as_input(x, onnx_type: str = "float") -> np.ndarray:
    """A numpy array (or a CPU tensor, from the checks against eager PyTorch) as ONNX Runtime
    takes it: float32 unless the graph's input is an integer."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.int64 if "int64" in onnx_type else np.float32)


def onnx_cache_dir(cache_dir: str | Path | None = None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "onnx"


def _clean_stale_parts(folder: Path, max_age_s: float = 3600.0) -> None:
    """An export killed part-way leaves a ``.part`` file; one untouched for an hour is dead."""
    import time

    for part in folder.glob("*.part"):
        try:
            if time.time() - part.stat().st_mtime > max_age_s:
                part.unlink()
        except OSError:
            pass


def _export(module, probe, dest: Path, input_names, output_names, dynamic_axes) -> None:
    import torch

    from ..files import current_umask

    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_parts(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # The tracer warns about Python-int shape arithmetic (TinyViT's window sizes);
            # those values are exact for the fixed image size the graph is exported for.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(probe), tmp, input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dynamic_axes or None,
                              opset_version=_OPSET, dynamo=False)
        os.chmod(tmp, 0o666 & ~current_umask())  # a shared cache must be readable by its users
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _session(path: Path, threads: int, disabled_optimizers=()):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # Spinning worker threads would keep both cores busy after each call and slow the
    # PyTorch work (prompt encoding, pooling) that runs between ONNX calls.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))


def export_path(key: str, cache_dir: str | Path | None = None) -> Path:
    """Where the export of ``key`` lives (the torch version and opset are part of the name)."""
    return onnx_cache_dir(cache_dir) / f"{key}-torch{torch_version()}-opset{_OPSET}.onnx"


def verified_export(key: str, cache_dir: str | Path | None = None) -> Path | None:
    """The export of ``key`` if it exists and its checksum is the one recorded when it was
    verified against eager PyTorch; None otherwise (then :func:`exported_onnx` makes it)."""
    path = export_path(key, cache_dir)
    verified = path.with_name(path.name + ".sha256")
    try:
        if path.is_file() and verified.is_file() and verified.read_text().strip() == sha256_file(path):
            return path
    except OSError as exc:
        log.warning("Cached ONNX model %s is unreadable (%s); exporting it again.", path, exc)
    return None


def exported_onnx(module, key: str, probe, input_names: list[str], output_names: list[str],
                  dynamic_axes: dict | None = None, cache_dir: str | Path | None = None,
                  disabled_optimizers=()) -> Path | None:
    """The verified ONNX export of ``module`` (an eval-mode module, or a function that builds
    one only if an export is needed), or ``None`` where it cannot be exported or does not
    reproduce the eager outputs on ``probe`` (a tuple of inputs, or a function making one only
    if an export is needed).  ``key`` names the weights and the part (e.g.
    ``litemedsam-<sha>-encoder256``); ``disabled_optimizers`` names ONNX Runtime graph
    rewrites that make this graph slower.  A cached export is only re-hashed: neither PyTorch
    nor onnx is imported and no session is created, so a process that never runs this part
    pays nothing more."""
    found = verified_export(key, cache_dir)
    if found is not None:
        return found
    if not onnxruntime_available():
        log.info("onnxruntime/onnx not installed: %s runs in eager PyTorch.", key)
        return None
    import torch

    if callable(probe):
        probe = probe()
    path = export_path(key, cache_dir)
    verified = path.with_name(path.name + ".sha256")
    # No unlink before exporting: another process (a second batch worker) may be exporting the
    # same model; each export replaces the file atomically and is checked before it is recorded.
    try:
        if not isinstance(module, torch.nn.Module):  # a factory: the module is built only to export
            module = module()
        with torch.inference_mode():
            expected = module(*probe)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        log.info("Exporting %s to ONNX once: %s", key, path)
        with torch.no_grad():
            _export(module, probe, path, input_names, output_names, dynamic_axes)
        model = onnx_model(path, input_names, disabled_optimizers)
        diff = max(float(np.abs(o - e.float().numpy()).max()) for o, e in zip(model(*probe), expected))
    except Exception as exc:  # noqa: BLE001 - any failure means "use eager"
        log.warning("ONNX Runtime unavailable for %s (%s: %s); using eager PyTorch.", key, type(exc).__name__, exc)
        path.unlink(missing_ok=True)
        return None
    if diff > MAX_ABS_DIFF:
        log.warning("ONNX %s differs from eager PyTorch by %.3g (> %.0e); using eager PyTorch.", key, diff,
                    MAX_ABS_DIFF)
        path.unlink(missing_ok=True)
        return None
    from ..files import atomic_write

    try:
        digest = sha256_file(path)
        atomic_write(verified, lambda tmp: tmp.write_text(digest), suffix=".part")
    except OSError as exc:  # replaced or removed by another process meanwhile: use eager this time
        log.warning("ONNX export %s could not be recorded (%s); using eager PyTorch.", path, exc)
        return None
    return path


def onnx_model(path: Path, input_names: list[str], disabled_optimizers=()) -> OnnxModel:
    """An ONNX Runtime session of an exported file; raises if the file does not load or has
    other inputs than ``input_names``."""
    from .cpu_runtime import threads

    session = _session(path, threads(), disabled_optimizers)
    if [i.name for i in session.get_inputs()] != list(input_names):
        raise ValueError(f"{path.name} has inputs {[i.name for i in session.get_inputs()]}, expected {input_names}")
    return OnnxModel(session, list(input_names))
