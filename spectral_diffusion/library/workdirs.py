"""Work folders of the library: what crashed writes leave, and how it is cleared.

A concept folder appears, is replaced or vanishes in one rename (``atomic.atomic_dir`` builds it in
``.tmp-<name>-*``, an overwrite moves the old one aside into ``.old-<name>-*`` first;
``atomic.discard_dir`` renames it into ``.trash-<name>-*``). A crash therefore leaves only work folders,
which ``remove_leftovers`` clears, putting back a concept an interrupted overwrite had moved aside.
The caller holds the library lock.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Collection
from pathlib import Path

from spectral_diffusion.atomic import OLD_PREFIX, TMP_PREFIX, WORK_PREFIXES
from spectral_diffusion.library.names import matches_name_pattern

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = ".checkpoints"  # resumable training state, one folder per concept name


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
