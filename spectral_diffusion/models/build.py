"""Saving a built pipeline into its folder atomically, with a marker that says the build is complete.

Concurrent builders (two app workers, the CLI) may race for the same folder, and a crash may stop a
build half way; readers must only ever see a complete folder of the current builder version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from spectral_diffusion.atomic import atomic_dir, discard_dir, work_dirs_of
from spectral_diffusion.testing.bpe import write_clip_vocab

logger = logging.getLogger(__name__)

# Bump when a builder's output changes, so stale cached folders are rebuilt.
BUILD_VERSION = 2
MARKER_FILE = "spectral_diffusion_builtin.json"


def _write_marker(folder: Path, name: str) -> None:
    """Written last: its presence means a complete build of this builder version."""
    marker = {"name": name, "build_version": BUILD_VERSION}
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def is_complete_build(path: str | os.PathLike, name: str | None = None) -> bool:
    """Whether ``path`` holds a finished current-version build (of ``name``)."""
    try:
        marker = json.loads((Path(path) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("build_version") != BUILD_VERSION:
        return False
    return name is None or marker.get("name") == name


def _save_pipeline(pipe, folder: Path) -> None:
    """Save through diffusers, plus CLIP vocab files that older loaders can read."""
    pipe.save_pretrained(folder, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        if (folder / sub).is_dir():
            write_clip_vocab(folder / sub)


def _clear_destination(path: Path) -> None:
    """Make room for a fresh build, refusing to delete anything that is not ours."""
    if not path.exists():
        return
    if path.is_dir() and ((path / MARKER_FILE).exists() or not any(path.iterdir())):
        logger.info("replacing outdated build in %s", path)
        discard_dir(path)
        return
    raise FileExistsError(f"{path} exists and is not a built-in model folder; remove it or choose another path")


def _remove_stale_temporaries(path: Path) -> None:
    """Delete what crashed builds left beside ``path`` (only called under the lock)."""
    legacy = [
        *path.parent.glob(f".{path.name}.tmp-*"),
        *path.parent.glob(f".{path.name}.old-*"),
    ]  # earlier versions named them so
    for stale in work_dirs_of(path) + legacy:
        shutil.rmtree(stale, ignore_errors=True)


def build_atomically(path, name: str, make_pipeline: Callable[[], object]) -> Path:
    """Build into a temporary sibling, then rename into place (``atomic.atomic_dir``), under a sibling lock.

    Concurrent builders (two app workers, the CLI) wait on the lock; the later one finds
    the marker and returns.  A crash never leaves a half model at ``path``; its stray
    temporary folder is removed by the next build.
    """
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock")):
        if is_complete_build(path, name):
            return path
        _clear_destination(path)
        _remove_stale_temporaries(path)
        logger.info("building %s into %s", name, path)
        with atomic_dir(path) as tmp:
            _save_pipeline(make_pipeline(), tmp)
            _write_marker(tmp, name)  # last: its presence means the build is complete
    return path
