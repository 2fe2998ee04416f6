"""A library operation that stops half-way and waits to be killed (kill -9) by tests/test_faults.py.

    python tests/fault_worker.py MODE LIBRARY ADAPTER_FILE NAME MARKER [OUT]

MODE:
  add        ``Library.add`` of NAME with two images: the first image is written, then it stops
  overwrite  ``Library.add(..., overwrite=True)`` of an existing NAME: stops between its two renames,
             when the old concept has been moved aside and the new one is not yet in place
  export     ``Library.export_file(NAME, OUT)``: stops with half of the file copied

When it has stopped, it writes MARKER and sleeps; the parent then kills it with SIGKILL, so no
``finally`` block or context-manager exit runs, exactly as with a power cut or the OOM killer.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path


def _stop_here(marker: Path) -> None:
    marker.write_text(str(os.getpid()))
    while True:
        time.sleep(60)


def main() -> int:
    mode, root, adapter_file, name, marker = sys.argv[1:6]
    marker = Path(marker)
    from PIL import Image

    import spectral_diffusion.library.records as records_module
    import spectral_diffusion.library.store as library_module
    from spectral_diffusion.formats.adapter_file import read_adapter
    from spectral_diffusion.library.store import Library

    library = Library(root)
    data = read_adapter(adapter_file)
    data = dataclasses.replace(data, info=dataclasses.replace(data.info, name=name, tokens=[f"<{name}>"]))

    if mode == "add":
        real_save_png = records_module._save_png
        saved = []

        def save_png(image, path):
            if saved:
                Path(path).write_bytes(b"\x89PNG\r\n\x1a\n half an image")
                _stop_here(marker)
            real_save_png(image, path)
            saved.append(path)

        records_module._save_png = save_png
        library.add(data, images=[Image.new("RGB", (32, 32), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 200))])
    elif mode == "overwrite":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            src, dst = Path(src), Path(dst)
            if src.name.startswith(".tmp-") and dst == library.root / name:
                _stop_here(marker)  # the old concept sits in .old-NAME-*/, the new one is still in .tmp-*
            return real_replace(src, dst, *args, **kwargs)

        library_module.os.replace = replace
        library.add(data, overwrite=True)
    elif mode == "export":
        out = sys.argv[6]

        import spectral_diffusion.formats.adapter_file as adapter_module

        def save_file(tensors, filename, metadata=None):
            content = (library.root / name / "adapter.safetensors").read_bytes()
            Path(filename).write_bytes(content[: len(content) // 2])
            _stop_here(marker)

        adapter_module.save_file = save_file
        library.export_file(name, out)
    else:
        raise SystemExit(f"unknown mode {mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
