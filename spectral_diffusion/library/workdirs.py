"""Work folders: how a concept folder appears, is replaced or vanishes in one rename.

A concept is built in ``.tmp-<name>-*`` and renamed into place only once complete; an overwrite
moves the old concept aside into ``.old-<name>-*`` first (a directory cannot be replaced by a
rename); a delete renames it into ``.trash-<name>-*``. A crash therefore leaves only work folders,
which ``remove_leftovers`` clears, putting back a concept an interrupted overwrite had moved aside.
The caller holds the library lock.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path

from spectral_diffusion.atomic import fsync_path
from spectral_diffusion.library.names import matches_name_pattern

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
OLD_PREFIX = ".old-"  # a concept moved aside by an overwrite; restored by cleanup if the swap died
WORK_PREFIXES = (TMP_PREFIX, TRASH_PREFIX, OLD_PREFIX)
CHECKPOINTS_DIR = ".checkpoints"  # resumable training state, one folder per concept name


def make_workdir(root: Path, prefix: str, name: str) -> Path:
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}{name}-", dir=root))
    work.chmod(0o755)  # mkdtemp makes it private; a concept folder is ordinary data
    return work


def move_into_place(root: Path, work: Path, name: str) -> None:
    """Rename the complete folder ``work`` to ``root/name``, replacing a concept already there."""
    target = root / name
    if not (target.exists() or target.is_symlink()):
        os.replace(work, target)
        fsync_path(root)
        return
    # A directory cannot be replaced by rename: move the old one aside, then swap in the new one.
    old = make_workdir(root, OLD_PREFIX, name)
    os.replace(target, old / name)
    try:
        os.replace(work, target)
    except OSError:
        os.replace(old / name, target)
        raise
    fsync_path(root)
    shutil.rmtree(old, ignore_errors=True)


def discard(root: Path, name: str) -> None:
    """Remove ``root/name``; it vanishes in one rename, the slow removal comes after."""
    trash = make_workdir(root, TRASH_PREFIX, name)
    os.replace(root / name, trash / name)
    fsync_path(root)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(root: Path) -> list[str]:
    """Restore concepts an interrupted overwrite left aside, then remove every work folder; their names."""
    removed = _restore_displaced(root)
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(WORK_PREFIXES):
            remove_path(entry)
            removed.append(entry.name)
    return removed


def remove_checkpoint_leftovers(root: Path, training: Collection[str]) -> list[str]:
    """Half-written checkpoint files (``.checkpoints/<name>/.tmp-*``) of trainings no longer running; a
    running one (a name in ``training``) may be writing its own right now. Their paths, from ``root``."""
    folder = root / CHECKPOINTS_DIR
    removed = []
    for run in sorted(folder.iterdir()) if folder.is_dir() else ():
        if run.name in training or not run.is_dir():
            continue
        for stray in sorted(run.glob(f"{TMP_PREFIX}*")):
            remove_path(stray)
            removed.append(f"{CHECKPOINTS_DIR}/{run.name}/{stray.name}")
    return removed


def remove_checkpoint(root: Path, name: str) -> bool:
    """Remove ``.checkpoints/<name>``: its ``state.json`` first (one unlink), so a crash midway leaves no
    checkpoint that names missing tensors. Whether there was one."""
    folder = root / CHECKPOINTS_DIR / name
    if not folder.is_dir() or folder.is_symlink():
        return False
    (folder / "state.json").unlink(missing_ok=True)  # training.checkpoint.CHECKPOINT_STATE
    shutil.rmtree(folder)
    return True


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _restore_displaced(root: Path) -> list[str]:
    """An overwrite killed between its two renames left the old concept aside: put it back."""
    restored = []
    for old in sorted(root.glob(f"{OLD_PREFIX}*")):
        for child in old.iterdir() if old.is_dir() else ():
            target = root / child.name
            if matches_name_pattern(child.name) and not target.exists():
                os.replace(child, target)
                logger.warning("restored concept %s left aside by an interrupted overwrite", child.name)
                restored.append(child.name)
    return restored
