"""Embedding cache: no slice is ever encoded twice, and no damaged entry is ever used.

The key is a hash of the model input itself (the normalised, resized, padded slice) plus the
backbone's weights and preprocessing identifiers, so a re-run with another support or another
organ on the same volume only decodes.  Entries live in memory (bounded, least recently used
first out) and optionally on disk: one file per slice holding a checksum of its content,
written atomically (temporary file, fsync, rename).  An entry that fails its checksum, has the
wrong shape or cannot be read is dropped and recomputed; a cache folder that cannot be written
(read-only, full) makes the cache memory-only, with one warning.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .errors import FoBError
from .files import atomic_write

log = logging.getLogger(__name__)

_MAGIC = b"FOBEMB1\n"
_DIGEST = 32  # blake2b bytes


class EmbeddingCache:
    """``get(key)`` / ``put(key, embedding)``; both hand back the stored (fp16-rounded) values
    as float32, so results never depend on whether an embedding came from the cache."""

    def __init__(self, cache_dir: str | Path | None = None, memory_mb: float = 1024.0, dtype=np.float16):
        # fp16 halves memory (2 MB per 64 x 64 x 256 embedding); the Dice change is nil because
        # the mask decoder's own activations dominate the rounding error.
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.memory_bytes = int(memory_mb * 2**20)
        self.dtype = np.dtype(dtype)
        self._mem: OrderedDict[str, np.ndarray] = OrderedDict()
        self._used = 0
        self.hits = 0
        self.misses = 0
        self.dropped = 0  # damaged disk entries dropped
        self._disk_ok = self.cache_dir is not None
        self._warned_damaged = False
        # The Slicer panel may prepare a volume on one worker while Apply runs on another.
        self._lock = threading.RLock()

    @staticmethod
    def key(model_input: np.ndarray, backbone_id: str) -> str:
        h = hashlib.blake2b(digest_size=20)
        h.update(backbone_id.encode())
        h.update(str(tuple(model_input.shape)).encode())
        h.update(np.ascontiguousarray(model_input, dtype=np.float32).tobytes())
        return h.hexdigest()

    def _path(self, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / "embeddings" / "v2" / key[:2] / f"{key}.emb"

    def get(self, key: str, shape: tuple | None = None) -> np.ndarray | None:
        """The cached embedding (float32) or None; ``shape``: the shape it must have."""
        with self._lock:
            return self._get(key, shape)

    def _get(self, key, shape):
        t = self._mem.get(key)
        if t is not None:
            self._mem.move_to_end(key)
            self.hits += 1
            return t.astype(np.float32)
        p = self._path(key)
        if p is not None and p.is_file():
            arr = self._read(p, shape)
            if arr is not None:
                self._remember(key, arr)
                self.hits += 1
                return arr.astype(np.float32)
        self.misses += 1
        return None

    def _read(self, p: Path, shape) -> np.ndarray | None:
        try:
            data = p.read_bytes()
            if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + _DIGEST:
                raise ValueError("not a FoBSegment cache entry")
            digest = data[len(_MAGIC):len(_MAGIC) + _DIGEST]
            payload = data[len(_MAGIC) + _DIGEST:]
            if hashlib.blake2b(payload, digest_size=_DIGEST).digest() != digest:
                raise ValueError("checksum mismatch")
            arr = np.load(io.BytesIO(payload), allow_pickle=False)
            if arr.dtype != self.dtype:
                raise ValueError(f"dtype {arr.dtype}")
            if shape is not None and tuple(arr.shape) != tuple(shape):
                raise ValueError(f"shape {arr.shape}, expected {tuple(shape)}")
            return arr
        except (OSError, ValueError, EOFError) as exc:
            self.dropped += 1
            if not self._warned_damaged:
                log.warning("FoBSegment: damaged embedding cache entry %s (%s): dropped, the slice is "
                            "encoded again.", p.name, exc)
                self._warned_damaged = True
            try:
                p.unlink()
            except OSError:
                pass
            return None

    def put(self, key: str, embedding: np.ndarray) -> np.ndarray:
        """Store an embedding; returns it as stored (rounded to the cache's precision), float32."""
        t = np.ascontiguousarray(embedding, dtype=self.dtype)
        with self._lock:
            self._remember(key, t)
        p = self._path(key)
        if p is not None and self._disk_ok and not p.exists():
            self._write(p, t)
        return t.astype(np.float32)

    def _write(self, p: Path, t: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, t, allow_pickle=False)
        payload = buf.getvalue()
        data = _MAGIC + hashlib.blake2b(payload, digest_size=_DIGEST).digest() + payload

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)

        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(p, write, suffix=".tmp", mode=0o666)
        except (OSError, FoBError) as exc:
            self._disk_ok = False
            log.warning("FoBSegment: the embedding cache folder %s cannot be written (%s); embeddings are "
                        "kept in memory only for this process.", self.cache_dir, exc)

    def _remember(self, key: str, t: np.ndarray) -> None:
        if key in self._mem:
            return
        size = t.nbytes
        if size > self.memory_bytes:
            return
        self._mem[key] = t
        self._used += size
        while self._used > self.memory_bytes:
            _, old = self._mem.popitem(last=False)
            self._used -= old.nbytes

    def __len__(self) -> int:
        return len(self._mem)

    def clear_memory(self) -> None:
        self._mem.clear()
        self._used = 0
