"""Caches: no slice is ever encoded twice, no prompt is ever decoded twice on the same slice,
and no damaged entry is ever used.

Both caches keep entries in memory (bounded, least recently used first out) and optionally on
disk: one file per entry holding a checksum of its content, written atomically (temporary
file, fsync, rename).  An entry that fails its checksum, has the wrong shape or cannot be read
is dropped and computed again; a cache folder that cannot be written (read-only, full) makes
the cache memory-only, with one warning.

- :class:`EmbeddingCache`: a slice's embedding, keyed by a hash of the model input itself (the
  normalised, resized, padded slice) plus the backbone's weights and preprocessing
  identifiers, so a re-run with another support or another organ on the same volume only
  decodes.
- :class:`DecodeCache`: the mask decoder's answer to one prompt on one embedding, keyed by a
  hash of the decoder's identity, the embedding and the prompt.  The decoder is a pure
  function of these, so a run repeated with the same inputs (the same command again, a batch
  re-run) decodes nothing, while any change of support, settings or corrections decodes
  exactly the prompts that changed.

Each folder is kept under a size limit (an embedding is 2 MB, a decoded mask 0.25 MB), the least
recently used entries removed first; reading an entry marks it used.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .errors import FoBError
from .files import atomic_write

log = logging.getLogger(__name__)

_MAGIC = b"FOBEMB1\n"
_DIGEST = 32  # blake2b bytes
_UNWRITABLE: set = set()  # cache folders found unwritable in this process


class _EntryStore:
    """Memory (LRU, ``memory_mb``) in front of an optional folder of checksummed entries,
    kept under ``disk_mb`` (least recently used out first)."""

    folder = ""  # below the cache folder
    suffix = ""
    what = ""  # "<what> cache entry" in messages
    redo = ""  # what happens instead of using a damaged entry

    def __init__(self, cache_dir: str | Path | None = None, memory_mb: float = 1024.0,
                 disk_mb: float | None = None):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.memory_bytes = int(memory_mb * 2**20)
        self.disk_bytes = None if disk_mb is None else int(disk_mb * 2**20)  # None: no limit
        self._disk_used: int | None = None  # bytes in the folder, counted on the first write
        self._unseen = 0  # bytes this process wrote since it last counted the folder
        self._mem: OrderedDict[str, tuple] = OrderedDict()  # key -> (value, nbytes)
        self._used = 0
        self.hits = 0
        self.misses = 0
        self.dropped = 0  # damaged disk entries dropped
        self._disk_ok = self.cache_dir is not None
        self._warned_damaged = False
        # The Slicer panel may prepare a volume on one worker while Apply runs on another.
        self._lock = threading.RLock()

    def _path(self, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / self.folder / key[:2] / f"{key}{self.suffix}"

    def _lookup(self, key: str, parse):
        """The value in memory, else parsed from disk (``parse(payload) -> value``, raising
        ValueError for an entry it cannot use), else None."""
        with self._lock:
            hit = self._mem.get(key)
            if hit is not None:
                self._mem.move_to_end(key)
                self.hits += 1
                return hit[0]
            p = self._path(key)
            if p is not None and p.is_file():
                value = self._read(p, parse)
                if value is not None:
                    self._remember(key, value)
                    self.hits += 1
                    self._used_on_disk(p)
                    return value
            self.misses += 1
            return None

    def _read(self, p: Path, parse):
        try:
            data = p.read_bytes()
        except FileNotFoundError:  # removed by another process since it was listed: a miss
            return None
        try:
            if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + _DIGEST:
                raise ValueError("not a FoBSegment cache entry")
            digest = data[len(_MAGIC):len(_MAGIC) + _DIGEST]
            payload = data[len(_MAGIC) + _DIGEST:]
            if hashlib.blake2b(payload, digest_size=_DIGEST).digest() != digest:
                raise ValueError("checksum mismatch")
            return parse(payload)
        except (OSError, ValueError, EOFError, KeyError) as exc:
            self.dropped += 1
            if not self._warned_damaged:
                log.warning("FoBSegment: damaged %s cache entry %s (%s): dropped, %s.", self.what, p.name, exc,
                            self.redo)
                self._warned_damaged = True
            try:
                p.unlink()
            except OSError:
                pass
            return None

    def _store(self, key: str, value, payload) -> None:
        """Keep ``value`` in memory and, where there is a usable folder, ``payload()`` on disk."""
        with self._lock:
            self._remember(key, value)
        p = self._path(key)
        if p is not None and self._disk_ok and not p.exists():
            self._write_payload(p, payload())

    def _write_payload(self, p: Path, payload: bytes) -> None:
        data = _MAGIC + hashlib.blake2b(payload, digest_size=_DIGEST).digest() + payload

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)

        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(p, write, suffix=".tmp", mode=0o666)
        except (OSError, FoBError) as exc:
            self._disk_ok = False
            if self.cache_dir not in _UNWRITABLE:  # said once for both caches of a folder
                _UNWRITABLE.add(self.cache_dir)
                log.warning("FoBSegment: the cache folder %s cannot be written (%s); embeddings and decoded masks "
                            "are kept in memory only for this process.", self.cache_dir, exc)
            return
        try:
            self._written(len(data))
        except OSError as exc:  # the folder could not be listed: entries stay, trimmed next time
            log.debug("Could not trim %s: %s", self.cache_dir, exc)

    def _used_on_disk(self, p: Path) -> None:
        try:
            os.utime(p)  # recently used: removed last, also by other processes that trim the folder
        except OSError:
            pass

    def _written(self, nbytes: int) -> None:
        if self.disk_bytes is None:
            return
        # Counted from the folder, then added up, and counted again after every eighth of the
        # limit written: what other processes wrote to the same folder is seen by then, so the
        # folder exceeds its limit by at most an eighth per process writing to it.
        entries = None
        if self._disk_used is None or self._unseen + nbytes > self.disk_bytes // 8:
            entries = _disk_entries(self.cache_dir, type(self))  # this one too
            self._disk_used, self._unseen = sum(size for _, size, _ in entries), 0
        else:
            self._disk_used += nbytes
            self._unseen += nbytes
        if self._disk_used > self.disk_bytes:
            self._trim(entries)

    def _trim(self, entries=None) -> None:
        """Remove the least recently used entries until the folder holds 3/4 of its limit
        (trimming on every write would list the folder on every write); ``entries``: the
        folder's listing when just made."""
        entries = sorted(_disk_entries(self.cache_dir, type(self)) if entries is None else entries,
                         key=lambda e: e[0])
        used = sum(size for _, size, _ in entries)
        for _, size, f in entries:
            if used <= self.disk_bytes * 3 // 4:
                break
            try:
                f.unlink()
            except FileNotFoundError:  # trimmed by another process
                pass
            except OSError:
                continue
            used -= size
        self._disk_used, self._unseen = used, 0

    def _remember(self, key: str, value) -> None:
        if key in self._mem:
            return
        size = _nbytes(value)
        if size > self.memory_bytes:
            return
        self._mem[key] = (value, size)
        self._used += size
        while self._used > self.memory_bytes:
            _, (_, old) = self._mem.popitem(last=False)
            self._used -= old

    def __len__(self) -> int:
        return len(self._mem)

    def clear_memory(self) -> None:
        self._mem.clear()
        self._used = 0


def _nbytes(value) -> int:
    if isinstance(value, tuple):
        return sum(_nbytes(v) for v in value)
    return int(getattr(value, "nbytes", 64))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class EmbeddingCache(_EntryStore):
    """``get(key)`` / ``put(key, embedding)``; both hand back the stored (fp16-rounded) values
    as float32, so results never depend on whether an embedding came from the cache."""

    folder, suffix = "embeddings/v2", ".emb"
    what, redo = "embedding", "the slice is encoded again"

    def __init__(self, cache_dir: str | Path | None = None, memory_mb: float = 1024.0, dtype=np.float16,
                 disk_mb: float | None = None):
        # fp16 halves memory (2 MB per 64 x 64 x 256 embedding); the Dice change is nil because
        # the mask decoder's own activations dominate the rounding error.
        super().__init__(cache_dir, memory_mb, disk_mb)
        self.dtype = np.dtype(dtype)

    @staticmethod
    def key(model_input: np.ndarray, backbone_id: str) -> str:
        h = hashlib.blake2b(digest_size=20)
        h.update(backbone_id.encode())
        h.update(str(tuple(model_input.shape)).encode())
        h.update(np.ascontiguousarray(model_input, dtype=np.float32).tobytes())
        return h.hexdigest()

    def get(self, key: str, shape: tuple | None = None) -> np.ndarray | None:
        """The cached embedding (float32) or None; ``shape``: the shape it must have."""

        def parse(payload):
            arr = np.load(io.BytesIO(payload), allow_pickle=False)
            if arr.dtype != self.dtype:
                raise ValueError(f"dtype {arr.dtype}")
            if shape is not None and tuple(arr.shape) != tuple(shape):
                raise ValueError(f"shape {arr.shape}, expected {tuple(shape)}")
            return arr

        t = self._lookup(key, parse)
        return None if t is None else t.astype(np.float32)

    def put(self, key: str, embedding: np.ndarray) -> np.ndarray:
        """Store an embedding; returns it as stored (rounded to the cache's precision), float32."""
        t = np.ascontiguousarray(embedding, dtype=self.dtype)
        self._store(key, t, lambda: _npy(t))
        return t.astype(np.float32)

    def _write(self, p: Path, t: np.ndarray) -> None:
        self._write_payload(p, _npy(t))


class DecodeCache(_EntryStore):
    """``get(key)`` / ``put(key, logits, iou)``: the mask the decoder chose for one prompt
    (float32 logits on the work grid, exactly as decoded) and its predicted IoU."""

    folder, suffix = "decoded/v1", ".dec"
    what, redo = "decoded mask", "the prompt is decoded again"

    def __init__(self, cache_dir: str | Path | None = None, memory_mb: float = 64.0, disk_mb: float | None = 2048.0):
        super().__init__(cache_dir, memory_mb, disk_mb)

    @staticmethod
    def key(decoder_id: str, embedding_digest: bytes, points, labels, box, multimask: bool) -> str:
        """The decoder's identity, the embedding (its digest, :func:`array_digest`) and the prompt."""
        h = hashlib.blake2b(digest_size=20)
        h.update(decoder_id.encode())
        h.update(embedding_digest)
        for name, a, dtype in (("p", points, np.float32), ("l", labels, np.int64), ("b", box, np.float32)):
            h.update(name.encode())
            if a is not None:
                a = np.ascontiguousarray(a, dtype=dtype)
                h.update(str(a.shape).encode())
                h.update(a.tobytes())
        h.update(b"multi" if multimask else b"single")
        return h.hexdigest()

    def get(self, key: str) -> tuple[np.ndarray, float] | None:
        def parse(payload):
            arr = np.load(io.BytesIO(payload), allow_pickle=False)
            if arr.dtype != np.float32 or arr.ndim != 1 or arr.size < 2:
                raise ValueError(f"dtype {arr.dtype}, shape {arr.shape}")
            side = int(round(np.sqrt(arr.size - 1)))
            if side * side != arr.size - 1:
                raise ValueError(f"{arr.size - 1} logits are not a square grid")
            return arr[:-1].reshape(side, side), float(arr[-1])

        hit = self._lookup(key, parse)
        return None if hit is None else (hit[0].copy(), hit[1])

    def put(self, key: str, logits: np.ndarray, iou: float) -> None:
        logits = np.ascontiguousarray(logits, np.float32)
        value = (logits.copy(), float(iou))
        self._store(key, value, lambda: _npy(np.concatenate([logits.ravel(), np.float32([iou])])))



def _disk_entries(cache_dir: Path, cache: type) -> list[tuple[float, int, Path]]:
    """(last use, bytes, path) of every entry of a cache class below ``cache_dir``; another
    process's temporary file (not yet an entry) is not listed, so it is never trimmed."""
    root = Path(cache_dir).expanduser() / cache.folder
    out = []
    for sub in os.scandir(root) if root.is_dir() else ():
        for entry in os.scandir(sub.path) if sub.is_dir() else ():
            if entry.name.endswith(cache.suffix):
                try:
                    st = entry.stat()
                except OSError:  # removed since it was listed
                    continue
                out.append((st.st_mtime, st.st_size, Path(entry.path)))
    return out


def folder_usage(cache_dir: str | Path) -> dict:
    """Entries and bytes on disk of each cache below ``cache_dir``: ``{what: (count, bytes)}``."""
    out = {}
    for cls, what in ((EmbeddingCache, "embeddings"), (DecodeCache, "decoded masks")):
        entries = _disk_entries(cache_dir, cls)
        out[what] = (len(entries), sum(size for _, size, _ in entries))
    return out


def array_digest(a: np.ndarray) -> bytes:
    """A digest of an array's values and shape (SHA-256: hardware-accelerated on most CPUs,
    ~3 ms for a float32 embedding)."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
    return h.digest()
