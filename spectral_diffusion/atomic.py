"""Atomic writes of files and folders: write to a temporary sibling, fsync, then rename into place.

A crash or a killed process leaves either the old file (folder) or the new one, never half of one, and
at worst a ``.tmp-*`` sibling that readers ignore and cleaners may remove. A folder cannot replace
another by one rename, so ``atomic_dir`` first moves the old one aside into ``.old-<name>-*``; a crash
between the two renames leaves it there, for the owner's cleanup to put back.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spectral_diffusion.errors import StorageError

TMP_PREFIX = ".tmp-"  # a file or folder being written
OLD_PREFIX = ".old-"  # a folder moved aside by atomic_dir while its replacement is renamed in
TRASH_PREFIX = ".trash-"  # a folder being removed by discard_dir
WORK_PREFIXES = (TMP_PREFIX, OLD_PREFIX, TRASH_PREFIX)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask needs setting it; put it straight back
    os.umask(mask)
    return mask


# what open() would give a new file under the process's umask (0o644 for the usual 022)
_ORDINARY_MODE = 0o666 & ~_umask()
# errno values meaning "the disk cannot take this write": full, over quota, file size limit
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# errno values meaning "this folder may not be written": a read-only mount, missing permissions
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
_OS_ERROR_CODE = re.compile(r"os error (\d+)")  # how Rust I/O errors (safetensors) name their errno


def storage_error(error: BaseException, target: str | os.PathLike) -> StorageError | None:
    """A clear ``StorageError`` naming ``target`` for a write that failed because the disk is full or the
    folder is read-only; None for other errors.

    Python raises ``OSError`` with an errno; safetensors (Rust) raises its own error type whose message
    ends with ``(os error 28)``.
    """
    code = error.errno if isinstance(error, OSError) else None
    if code is None:
        found = _OS_ERROR_CODE.search(str(error))
        code = int(found.group(1)) if found else None
    if code in READ_ONLY_ERRNOS:
        return StorageError(
            code,
            f"{os.strerror(code)}: cannot write {target}; make its folder writable or use another one "
            "(nothing was changed)",
        )
    if code not in DISK_FULL_ERRNOS:
        return None
    return StorageError(
        code, f"{os.strerror(code)}: cannot write {target}; free some disk space and try again (nothing was changed)"
    )


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file or folder to disk before a rename publishes it (best effort on odd filesystems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target`` atomically."""
    target = Path(target)
    try:  # a read-only or full folder refuses already here
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{target.name}.", dir=target.parent)
    except OSError as error:
        raise (storage_error(error, target) or error) from error
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _ORDINARY_MODE)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, target)
        fsync_path(target.parent)
    except Exception as error:
        clear = storage_error(error, target)
        if clear is None:
            raise
        raise clear from error
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def work_dir(parent: str | os.PathLike, prefix: str, name: str) -> Path:
    """A new empty folder ``parent/<prefix><name>-<random>``: where a folder named ``name`` is built,
    moved aside or thrown away."""
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}{name}-", dir=parent))
    work.chmod(0o755)  # mkdtemp makes it private; the folders we publish hold ordinary data
    return work


def work_dirs_of(target: str | os.PathLike) -> list[Path]:
    """The work folders ``work_dir`` made for ``target`` beside it, and no other's: ``.tmp-a-*`` would
    also match ``.tmp-a-b-*`` of a folder ``a-b``, but mkdtemp's random part has no ``-``."""
    target = Path(target)
    found = []
    for prefix in WORK_PREFIXES:
        start = f"{prefix}{target.name}-"
        found += [p for p in target.parent.glob(f"{start}*") if "-" not in p.name[len(start) :]]
    return sorted(found)


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside ``target``; when the block ends without an error it is renamed to
    ``target``, replacing a folder already there. A full or read-only disk becomes a ``StorageError``."""
    target = Path(target)
    try:  # a read-only or full folder refuses already here
        target.parent.mkdir(parents=True, exist_ok=True)
        work = work_dir(target.parent, TMP_PREFIX, target.name)
    except OSError as error:
        raise (storage_error(error, target) or error) from error
    try:
        yield work
        _replace_dir(work, target)
    except Exception as error:
        clear = storage_error(error, target)
        if clear is None:
            raise
        raise clear from error
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already after a successful rename


def _replace_dir(work: Path, target: Path) -> None:
    if not (target.exists() or target.is_symlink()):
        os.replace(work, target)
        fsync_path(target.parent)
        return
    old = work_dir(target.parent, OLD_PREFIX, target.name)
    os.replace(target, old / target.name)
    try:
        os.replace(work, target)
    except OSError:
        os.replace(old / target.name, target)
        raise
    fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def discard_dir(target: str | os.PathLike) -> None:
    """Remove the folder ``target``: it vanishes in one rename (into ``.trash-<name>-*``), so no reader
    sees it half deleted; the slow removal comes after."""
    target = Path(target)
    trash = work_dir(target.parent, TRASH_PREFIX, target.name)
    os.replace(target, trash / target.name)
    fsync_path(target.parent)
    shutil.rmtree(trash, ignore_errors=True)
