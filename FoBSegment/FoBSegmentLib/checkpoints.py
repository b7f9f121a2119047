"""Checkpoint catalogue, user cache folder and a safe downloader.

Downloads stream in chunks into a temporary file next to the destination
(``<name>.part-<random>``), report progress, honour a cancel check between chunks, verify
size and SHA-256, and only then rename the file into place atomically.  Under any failure
the temporary file is removed, so the cache never holds a partial checkpoint.

Hashing a 2.5 GB checkpoint takes seconds, so a verified file gets a small sidecar
``<file>.sha256-ok`` holding ``<sha256> <size> <mtime_ns>``; it is trusted only while the
file's size and modification time are unchanged.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import CancelledError, CheckpointError, DownloadError, FoBInputError

SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
#: environment variable replacing :data:`SAM_BASE_URL` (mirrors)
ENV_SAM_BASE_URL = "FOBSEGMENT_SAM_BASE_URL"
#: environment variable overriding the cache folder
ENV_CACHE_DIR = "FOBSEGMENT_CACHE_DIR"
SIDECAR_SUFFIX = ".sha256-ok"
# a .part file untouched for this long belongs to a dead process and may be removed
_STALE_PART_S = 3600.0

ProgressFn = Callable[[int, "int | None"], None]
CancelFn = Callable[[], bool]


@dataclass(frozen=True)
class CheckpointInfo:
    """One known checkpoint."""

    name: str
    filename: str
    url: str | None  # None: no public download, the user supplies a local file
    size: int | None  # bytes; None if unknown
    sha256: str | None  # hex digest; None if unknown
    variant: str  # segment-anything architecture: vit_b | vit_l | vit_h
    box_trained: bool = False
    pixel_norm: str = "sam"  # "sam": ImageNet mean/std on 0..255; "unit": [0, 1] as is
    description: str = ""


CATALOGUE: dict[str, CheckpointInfo] = {
    "sam_vit_b": CheckpointInfo(
        name="sam_vit_b",
        filename="sam_vit_b_01ec64.pth",
        url=SAM_BASE_URL + "sam_vit_b_01ec64.pth",
        size=375_042_383,
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        variant="vit_b",
        description="Segment Anything ViT-B (Meta, Apache-2.0)",
    ),
    "sam_vit_l": CheckpointInfo(
        name="sam_vit_l",
        filename="sam_vit_l_0b3195.pth",
        url=SAM_BASE_URL + "sam_vit_l_0b3195.pth",
        size=1_249_524_607,
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        variant="vit_l",
        description="Segment Anything ViT-L (Meta, Apache-2.0)",
    ),
    "sam_vit_h": CheckpointInfo(
        name="sam_vit_h",
        filename="sam_vit_h_4b8939.pth",
        url=SAM_BASE_URL + "sam_vit_h_4b8939.pth",
        size=2_564_550_879,
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        variant="vit_h",
        description="Segment Anything ViT-H (Meta, Apache-2.0)",
    ),
    "medsam_vit_b": CheckpointInfo(
        name="medsam_vit_b",
        filename="medsam_vit_b.pth",
        url=None,
        size=None,
        sha256=None,
        variant="vit_b",
        box_trained=True,
        pixel_norm="unit",
        description="MedSAM ViT-B (box-trained SAM ViT-B; local file only)",
    ),
}


# --- folders -------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$FOBSEGMENT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fobsegment``, else ``~/.cache/fobsegment``."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fobsegment"


def check_cache_dir(cache_dir: str | Path | None) -> None:
    """A cache folder that exists must be a folder: a file given as one (``--cache-dir``,
    ``FOBSEGMENT_CACHE_DIR``) is refused before any work.  One that cannot be written is
    allowed: the caches then stay in memory."""
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    if Path(cache_dir).expanduser().exists() and not Path(cache_dir).expanduser().is_dir():
        raise FoBInputError(f"The cache folder {cache_dir} is a file, not a folder. Give a folder with --cache-dir "
                            f"(or {ENV_CACHE_DIR}); it is created if missing.")


def checkpoint_dir(cache_dir: str | Path | None = None) -> Path:
    """``<cache>/checkpoints`` (not created)."""
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "checkpoints"


def _info(name: str) -> CheckpointInfo:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise FoBInputError(
            f"Unknown checkpoint '{name}'. Known checkpoints: {', '.join(sorted(CATALOGUE))}."
        ) from None


def resolve_url(info: CheckpointInfo) -> str | None:
    """The download URL of ``info``, with ``$FOBSEGMENT_SAM_BASE_URL`` replacing Meta's prefix."""
    url = info.url
    base = os.environ.get(ENV_SAM_BASE_URL)
    if url and base and url.startswith(SAM_BASE_URL):
        url = base.rstrip("/") + "/" + url[len(SAM_BASE_URL):]
    return url


# --- hashing -------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def read_sidecar(path: str | Path) -> str | None:
    """The SHA-256 remembered for ``path`` if its sidecar matches the file's size and mtime."""
    path = Path(path)
    try:
        st = path.stat()
        digest, size, mtime = _sidecar(path).read_text().split()
        if int(size) == st.st_size and int(mtime) == st.st_mtime_ns and len(digest) == 64:
            return digest.lower()
    except (OSError, ValueError):
        pass
    return None


def write_sidecar(path: str | Path, digest: str) -> None:
    """Remember that ``path`` (as it is now) has SHA-256 ``digest``.  Best effort."""
    path = Path(path)
    try:
        st = path.stat()
        _sidecar(path).write_text(f"{digest} {st.st_size} {st.st_mtime_ns}\n")
    except OSError:
        pass


_MEMO: dict = {}  # (resolved path, size, mtime_ns) -> sha256, for files outside the cache


def file_sha256(path: str | Path) -> str:
    """SHA-256 of ``path``, from its sidecar or an in-process memo when possible."""
    path = Path(path)
    digest = read_sidecar(path)
    if digest:
        return digest
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MEMO:
        _MEMO[key] = sha256_file(path)
    return _MEMO[key]


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:  # pragma: no cover - e.g. a file still open on Windows
        pass


# --- download ------------------------------------------------------------------------
def _local_file_hint() -> str:
    return (
        "If you are behind a firewall or proxy, download the file with a web browser and use it "
        "directly: pass it with --checkpoint PATH on the command line, or choose "
        "'local checkpoint file' in Slicer."
    )


def download(
    url: str,
    dest: str | Path,
    *,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    progress: ProgressFn | None = None,
    is_cancelled: CancelFn | None = None,
    chunk_size: int = 1 << 20,
    timeout: float = 30,
) -> str:
    """Download ``url`` (http, https or file) to ``dest`` atomically; return its SHA-256.

    ``progress(done_bytes, total_bytes_or_None)`` is called after each chunk and
    ``is_cancelled()`` is checked between chunks (:class:`CancelledError`).  A size or
    checksum mismatch raises :class:`CheckpointError`; a network failure or a truncated
    transfer raises :class:`DownloadError`.  ``dest`` is only ever created complete and
    verified; no temporary file survives a failure.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"Cannot create the checkpoint folder {dest.parent}: {exc}. "
            f"Set {ENV_CACHE_DIR} to a writable folder."
        ) from exc
    expected_sha256 = expected_sha256.lower() if expected_sha256 else None
    tmp = dest.with_name(f"{dest.name}.part-{secrets.token_hex(6)}")
    h = hashlib.sha256()
    done = 0
    total: int | None = None

    def net_error(what: str) -> DownloadError:
        return DownloadError(
            f"Downloading {url} failed: {what}. Check your internet connection and try again. "
            + _local_file_hint()
        )

    try:
        try:
            resp = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise net_error(f"the server answered HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise net_error(f"{reason}") from exc
        with resp:
            length = resp.headers.get("Content-Length")
            try:
                total = int(length) if length is not None else None
            except ValueError:
                total = None
            if total is not None and expected_size is not None and total != expected_size:
                raise CheckpointError(
                    f"The server at {url} offers {total} bytes but the checkpoint has "
                    f"{expected_size} bytes: this is not the expected file (a proxy error page or "
                    "a wrong mirror?). Try again later. " + _local_file_hint()
                )
            if total is None:
                total = expected_size
            with open(tmp, "xb") as out:
                while True:
                    if is_cancelled is not None and is_cancelled():
                        raise CancelledError("Download cancelled by the user; nothing was kept.")
                    try:
                        chunk = resp.read(chunk_size)
                    except (http.client.HTTPException, OSError, ValueError) as exc:
                        raise net_error(f"the transfer broke off after {done} bytes ({exc!r})") from exc
                    if not chunk:
                        break
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        raise CheckpointError(
                            f"Cannot write the checkpoint to {dest.parent}: {exc}. Free disk space "
                            f"or set {ENV_CACHE_DIR} to another folder."
                        ) from exc
                    h.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        if length is not None and total is not None and done < total:
            raise net_error(f"the transfer broke off after {done} of {total} bytes")
        if expected_size is not None and done != expected_size:
            raise CheckpointError(
                f"The file downloaded from {url} has {done} bytes, expected {expected_size}: it is "
                "not the expected checkpoint. Retry the download. " + _local_file_hint()
            )
        digest = h.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise CheckpointError(
                f"The file downloaded from {url} failed its checksum (SHA-256 {digest[:16]}..., "
                f"expected {expected_sha256[:16]}...): it is corrupt or not the official checkpoint. "
                "Retry the download. " + _local_file_hint()
            )
        os.replace(tmp, dest)
        return digest
    except BaseException:
        _unlink(tmp)
        raise


# --- cache ---------------------------------------------------------------------------
def _clean_stale_parts(folder: Path, filename: str) -> None:
    now = time.time()
    for part in folder.glob(filename + ".part-*"):
        try:
            if now - part.stat().st_mtime > _STALE_PART_S:
                part.unlink()
        except OSError:
            pass


def _cached_ok(path: Path, info: CheckpointInfo) -> bool:
    """Is the cached ``path`` the right file?  Hashes at most once (sidecar)."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if info.size is not None and size != info.size:
        return False
    if info.sha256 is None:
        return True
    if read_sidecar(path) == info.sha256:
        return True
    digest = sha256_file(path)
    if digest != info.sha256:
        return False
    write_sidecar(path, digest)
    return True


def ensure_checkpoint(
    name: str,
    *,
    cache_dir: str | Path | None = None,
    url: str | None = None,
    progress: ProgressFn | None = None,
    is_cancelled: CancelFn | None = None,
) -> Path:
    """Path of the verified checkpoint ``name`` in the cache, downloading it if needed.

    ``url`` overrides the catalogue URL; ``$FOBSEGMENT_SAM_BASE_URL`` replaces Meta's
    prefix.  A cached file with a wrong size or checksum is deleted and downloaded again.
    """
    info = _info(name)
    folder = checkpoint_dir(cache_dir)
    dest = folder / info.filename
    if folder.is_dir():
        _clean_stale_parts(folder, info.filename)
    if dest.exists():
        if _cached_ok(dest, info):
            return dest
        _unlink(dest)
        _unlink(_sidecar(dest))
    src = url or resolve_url(info)
    if not src:
        raise CheckpointError(
            f"The checkpoint '{name}' ({info.description or info.filename}) cannot be downloaded "
            f"automatically. Download '{info.filename}' yourself and pass it with --checkpoint PATH "
            f"on the command line, or choose 'local checkpoint file' in Slicer (or place it at {dest})."
        )
    digest = download(src, dest, expected_sha256=info.sha256, expected_size=info.size,
                      progress=progress, is_cancelled=is_cancelled)
    write_sidecar(dest, digest)
    return dest


def verify_local_checkpoint(path: str | Path, name: str) -> Path:
    """Check a user-supplied checkpoint file for backbone ``name``; return its path.

    Missing file -> :class:`FoBInputError`; a file that is not the official checkpoint
    (size or SHA-256 known and different) -> :class:`CheckpointError`.
    """
    info = _info(name)
    p = Path(path).expanduser()
    if not p.is_file():
        raise FoBInputError(
            f"The checkpoint file {p} does not exist (or is not a file). Check the path given "
            f"for the '{name}' backbone ({info.filename})."
        )
    if info.sha256 is None:
        return p
    mismatch = info.size is not None and p.stat().st_size != info.size
    if not mismatch:
        mismatch = file_sha256(p) != info.sha256
    if mismatch:
        raise CheckpointError(
            f"{p} is not the official '{name}' checkpoint ({info.filename}): its size or SHA-256 "
            "differs from the published file. It may be corrupt (an incomplete download) or "
            "belong to another backbone. Download it again, or choose the backbone that matches it."
        )
    return p


def cached_status(cache_dir: str | Path | None = None) -> dict[str, bool]:
    """``{name: present in the cache}`` for every catalogue entry (size check only, no hashing)."""
    folder = checkpoint_dir(cache_dir)
    out = {}
    for name, info in CATALOGUE.items():
        p = folder / info.filename
        try:
            size = p.stat().st_size
        except OSError:
            out[name] = False
            continue
        out[name] = p.is_file() and (info.size is None or size == info.size)
    return out
