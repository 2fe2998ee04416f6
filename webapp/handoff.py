"""Files handed to gradio: a link (or copy) of each output in a temporary folder.

gradio serves a returned file only after copying it into its cache, and it takes files only from the
system's temporary folder, the working folder or ``allowed_paths``. The service keeps outputs in the
user's data folder (``--outputs``); naming that folder in ``allowed_paths`` would let gradio serve every
file in it by path, other people's images included. So each output is linked into a folder of its own
under the temporary folder, and gradio serves its cache copy only: what the app handed out, nothing else.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

KEEP_SECONDS = 600  # gradio copies a returned file at once; a hand-off older than this is no longer read

_folder: tempfile.TemporaryDirectory | None = None  # removed when the process exits


def _handoff_folder() -> Path:
    global _folder
    if _folder is None or not Path(_folder.name).is_dir():
        _folder = tempfile.TemporaryDirectory(prefix="spectral-handoff-")
    return Path(_folder.name)


def _drop_old(folder: Path) -> None:
    cutoff = time.time() - KEEP_SECONDS
    for entry in folder.iterdir():
        try:
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:  # removed by another request meanwhile
            continue


def handed_out(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Paths gradio may serve, one per output in ``paths``, with the same file names and bytes."""
    folder = _handoff_folder()
    _drop_old(folder)
    handed = []
    for path in map(Path, paths):
        target = Path(tempfile.mkdtemp(dir=folder)) / path.name
        try:
            os.link(path, target)  # no second copy where the data folder and /tmp share a file system
        except OSError:
            shutil.copy2(path, target)
        handed.append(str(target))
    return handed
