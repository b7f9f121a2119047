"""Writing files so that nothing is ever lost: one atomic-write helper for every output.

A file is written to a temporary name in its final folder, flushed to disk, checked, given
the permissions the user's umask asks for, and only then renamed over the final name.  A
failure at any point (full disk, killed process, a writer that reports success but wrote
nothing) leaves the previous file untouched and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import FoBInputError

_TMP_PREFIX = ".fobsegment-"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def no_space_message(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
        free_txt = f" ({free / 2**20:.0f} MB free)"
    except OSError:
        free_txt = ""
    return (f"Not enough space on the device holding {folder}{free_txt}; nothing was written and any "
            "existing file there is unchanged. Free some space or choose another output folder.")


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: str | Path, write, verify=None, suffix: str = "", mode: int = 0o666) -> Path:
    """Write ``path`` atomically.

    ``write(tmp_path)`` writes the content to a temporary file (it may reopen it by name);
    ``verify(tmp_path)`` (optional) raises if what was written is not what was meant.  The
    file gets ``mode`` minus the umask, like any file the user creates.  Raises
    :class:`FoBInputError` when the disk is full or the folder is not writable."""
    p = Path(path)
    folder = p.parent
    try:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=_TMP_PREFIX, suffix=suffix or ".tmp")
    except OSError as exc:
        raise _write_error(exc, folder, p) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            write(tmp)
            if tmp.stat().st_size == 0:
                # SimpleITK reports success for NIfTI on a full disk and leaves an empty file.
                raise OSError(errno.ENOSPC, "the written file is empty")
            _fsync_file(tmp)
            if verify is not None:
                verify(tmp)
            os.chmod(tmp, mode & ~current_umask())
            os.replace(tmp, p)
        except OSError as exc:
            raise _write_error(exc, folder, p) from None
        except RuntimeError as exc:  # ITK writers raise RuntimeError for I/O failures
            if "space" in str(exc).lower() or _disk_full(folder):
                raise FoBInputError(no_space_message(folder)) from None
            raise FoBInputError(f"Could not write {p}: {str(exc).strip().splitlines()[-1][:200]}. "
                                "Nothing was written; check the folder and the free space.") from None
        _fsync_dir(folder)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return p


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def _write_error(exc: OSError, folder: Path, p: Path) -> FoBInputError:
    if is_no_space(exc):
        return FoBInputError(no_space_message(folder))
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FoBInputError(f"The folder {folder} is not writable ({exc.strerror}); nothing was written. "
                             "Choose another output folder or fix its permissions.")
    return FoBInputError(f"Could not write {p}: {exc.strerror or exc}. Nothing was written; any existing "
                         "file there is unchanged.")


def check_writable_folder(folder: str | Path, what: str = "output") -> None:
    """Fail before any work when ``folder`` cannot take a new file."""
    folder = Path(folder)
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=_TMP_PREFIX, suffix=".probe")
    except OSError as exc:
        if is_no_space(exc):
            raise FoBInputError(no_space_message(folder)) from None
        raise FoBInputError(f"The {what} folder {folder} is not writable ({exc.strerror}). Choose another "
                            "folder or fix its permissions; nothing was computed.") from None
    os.close(fd)
    os.unlink(name)


def _fsync_file(p: Path) -> None:
    with open(p, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Do two paths name the same file (symlinks, '..', case on case-insensitive systems)?"""
    return bool(file_identity(a) & file_identity(b))


def file_identity(path: str | Path) -> set:
    """What names a file: its resolved path (letter case folded where the system folds it) and,
    for a file that exists, its device and inode.  Two paths share an identity exactly when
    they name the same file; a set of identities answers for many paths at once."""
    keys: set = {os.path.normcase(os.path.realpath(path))}
    with contextlib.suppress(OSError):
        st = os.stat(path)
        keys.add((st.st_dev, st.st_ino))
    return keys


def refuse_write_protected(path: str | Path, what: str = "output") -> None:
    """An existing file that nobody may write is not replaced (an atomic rename could)."""
    p = Path(path)
    if p.is_file() and not p.stat().st_mode & 0o222:
        raise FoBInputError(f"The {what} {p} exists and is write-protected: it is not replaced. Choose another "
                            "path, or remove the protection first.")
