"""Which CPU runtime runs an exported image encoder: chosen by measurement on this machine.

Why: the fastest runtime depends on the CPU.  ONNX Runtime ran LiteMedSAM's encoder 2.7x
faster than eager PyTorch on an AVX-512 EPYC and 1.0x on an AVX2-only one; OpenVINO's CPU
plugin is fast on both (docs/benchmarks/speed.md).  A table of CPU features would be a guess,
so the first encoder of a machine times every installed runtime on the same probe input
(eager PyTorch included), keeps those that reproduce eager PyTorch to ``MAX_ABS_DIFF``, and
records the fastest in ``<cache>/onnx/<part>-runtime.json`` for this machine's signature (CPU
model, ISA flags, threads, package versions).  Later processes read the record and build only
the chosen runtime, and only when a slice is actually encoded.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import onnx_runtime

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "openvino", "torch")
#: ISA flags that decide CPU kernel speed, reported with every measurement
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "avx_vnni")
#: timed calls per runtime (the minimum is kept: a shared machine only ever adds time)
CALIBRATION_CALLS = 3


def installed(package: str) -> bool:
    """Whether ``package`` is installed, found without importing it (openvino takes 0.3 s)."""
    import importlib.util

    return importlib.util.find_spec(package) is not None


def available(runtime: str) -> bool:
    """Whether ``runtime`` can run an export that already exists (making one also needs onnx)."""
    if runtime in ("onnxruntime", "openvino"):
        return installed(runtime)
    return runtime == "torch"


def cpu_description() -> dict:
    """CPU model and the ISA flags that matter, from /proc/cpuinfo where there is one."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count()}


_THREADS: int | None = None


def set_threads(n: int) -> None:
    """The CPU threads every runtime uses from now on (a batch worker's share of the cores)."""
    global _THREADS
    _THREADS = max(1, int(n))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(_THREADS)


def threads() -> int:
    """CPU threads for the runtimes: :func:`set_threads`, else PyTorch's setting where PyTorch
    is loaded, else ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, else the physical cores this
    process may run on (PyTorch's default): a run that never imports PyTorch uses the cores
    it would have used."""
    if _THREADS is not None:
        return _THREADS
    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    for env in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        try:
            if int(os.environ.get(env, "0")) > 0:
                return int(os.environ[env])
        except ValueError:
            pass
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(allowed, _physical_cores() or allowed))


def single_threaded_blas(fn):
    """Run ``fn`` with numpy's BLAS limited to one thread (where threadpoolctl is installed).

    OpenBLAS's worker threads keep spinning after each product and take a core from ONNX
    Runtime's mask decoder, which runs right after; the pipeline's products (a 256 x 4096
    matrix times a vector) are as fast on one thread.  Measured in docs/benchmarks/speed.md."""
    import functools

    @functools.wraps(fn)
    def limited(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return fn(*args, **kwargs)
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return limited


def _physical_cores() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, phys = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or None


def _versions() -> dict:
    from importlib import metadata

    out = {"torch": onnx_runtime.torch_version()}
    for name in ("onnxruntime", "openvino"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine_signature() -> dict:
    return {**cpu_description(), "threads": threads(), "versions": _versions()}


class OpenVinoModel:
    """Callable ``(*arrays) -> list of float32 arrays`` backed by a compiled OpenVINO
    model, in fp32 (its bf16 default on AVX512-BF16 CPUs changes the embeddings by ~1e-2)."""

    def __init__(self, path: Path, threads: int):
        import shutil

        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": max(1, threads),
                  "PERFORMANCE_HINT": "LATENCY"}
        # OpenVINO's own cache of the compiled model: 0.18 s to load instead of 0.5 s to compile.
        blobs = path.parent / "openvino"
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", {**config, "CACHE_DIR": str(blobs)})
        except Exception as exc:  # noqa: BLE001 - a damaged or unwritable blob cache: compile afresh
            log.warning("OpenVINO's compiled-model cache %s is unusable (%s); compiling without it.", blobs, exc)
            shutil.rmtree(blobs, ignore_errors=True)
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # an infer request serves one call at a time (panel workers)

    def __call__(self, *inputs) -> list[np.ndarray]:
        feed = {i: onnx_runtime.as_input(x) for i, x in enumerate(inputs)}
        with self._lock:
            result = self.request.infer(feed)
            return [np.array(result[o]) for o in self.compiled.outputs]


def load(runtime: str, path: Path, input_names: list[str]):
    """A callable model of the export at ``path`` in ``runtime`` (onnxruntime or openvino)."""
    if runtime == "openvino":
        return OpenVinoModel(path, threads())
    return onnx_runtime.onnx_model(path, input_names)


@dataclass
class Choice:
    """The runtime that runs a part on this machine and the measurement behind it."""
    runtime: str
    reason: str
    seconds_per_call: dict = field(default_factory=dict)  # runtime -> s (None: failed or too different)
    max_abs_diff: dict = field(default_factory=dict)
    signature: dict = field(default_factory=dict)
    measured_at: str = ""


def _record_path(path: Path) -> Path:
    return path.with_name(path.name.replace(".onnx", "") + "-runtime.json")


def recorded_choice(path: Path) -> Choice | None:
    """The choice recorded for this machine's signature next to the export, if any."""
    rec = _record_path(path)
    try:
        entries = json.loads(rec.read_text())
    except (OSError, ValueError):
        return None
    sig = machine_signature()
    for e in entries if isinstance(entries, list) else []:
        if e.get("signature") == sig and e.get("runtime") in RUNTIMES:
            return Choice(**{k: e.get(k) for k in Choice.__dataclass_fields__})
    return None


def _time(fn: Callable, probe) -> float:
    fn(*probe)  # first call: memory arenas, kernel selection
    best = float("inf")
    for _ in range(CALIBRATION_CALLS):
        t = time.perf_counter()
        fn(*probe)
        best = min(best, time.perf_counter() - t)
    return best


def calibrate(path: Path, input_names: list[str], probe: tuple, eager: Callable, candidates) -> Choice:
    """Time every candidate and eager PyTorch on ``probe``; keep the fastest that reproduces
    eager PyTorch, record it for this machine and return it."""
    import torch

    with torch.inference_mode():
        expected = eager(*probe)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        seconds = {"torch": round(_time(eager, probe), 4)}
    diffs = {}
    for rt in candidates:
        try:
            model = load(rt, path, input_names)
            diffs[rt] = max(float(np.abs(o - e.float().numpy()).max()) for o, e in zip(model(*probe), expected))
            seconds[rt] = round(_time(model, probe), 4) if diffs[rt] <= onnx_runtime.MAX_ABS_DIFF else None
            del model
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot run this graph is not a candidate
            log.warning("%s cannot run %s (%s: %s).", rt, path.name, type(exc).__name__, exc)
            seconds[rt] = None
    usable = {rt: s for rt, s in seconds.items() if s is not None}
    best = min(usable, key=usable.get)
    shown = ", ".join(f"{rt} {s:.2f} s" if s is not None else f"{rt} unusable" for rt, s in seconds.items())
    choice = Choice(best, f"fastest measured on this CPU ({shown} per call)", seconds, diffs, machine_signature(),
                    time.strftime("%Y-%m-%dT%H:%M:%S"))
    _record(path, choice)
    return choice


def _record(path: Path, choice: Choice) -> None:
    from ..files import atomic_write

    rec = _record_path(path)
    try:
        entries = json.loads(rec.read_text()) if rec.is_file() else []
    except (OSError, ValueError):
        entries = []
    entries = [e for e in entries if isinstance(e, dict) and e.get("signature") != choice.signature]
    entries.append(asdict(choice))
    try:
        atomic_write(rec, lambda tmp: tmp.write_text(json.dumps(entries, indent=1)), suffix=".part")
    except OSError as exc:  # a read-only cache: measured again next time, still correct
        log.warning("Cannot record the runtime choice in %s (%s).", rec, exc)


def choose(path: Path | None, input_names: list[str], probe_factory: Callable, eager: Callable,
           requested: str = "auto") -> Choice:
    """The runtime for the export at ``path``: ``requested`` if it is installed, else the
    recorded or freshly measured fastest; eager PyTorch when there is no export."""
    if requested == "torch":
        return Choice("torch", "FOBSEGMENT_RUNTIME=torch")
    if path is None:
        return Choice("torch", "no verified ONNX export (see the log): eager PyTorch")
    if requested in ("onnxruntime", "openvino"):
        if available(requested):
            return Choice(requested, f"FOBSEGMENT_RUNTIME={requested}")
        log.warning("%s was requested but is not installed; choosing by measurement instead.", requested)
    recorded = recorded_choice(path)
    if recorded is not None and available(recorded.runtime):
        return recorded
    candidates = [rt for rt in ("onnxruntime", "openvino") if available(rt)]
    log.info("Measuring the encoder runtimes on this CPU once (%s and eager PyTorch).", ", ".join(candidates))
    try:
        return calibrate(path, input_names, probe_factory(), eager, candidates)
    except Exception as exc:  # noqa: BLE001 - e.g. the eager model cannot be built: the export was verified
        fallback = candidates[0] if candidates else "torch"
        log.warning("Could not measure the encoder runtimes (%s: %s); using %s, not recorded.", type(exc).__name__,
                    exc, fallback)
        return Choice(fallback, f"measurement failed ({type(exc).__name__}); {fallback} by default")
