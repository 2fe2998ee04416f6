"""A library operation that stops half-way and waits to be killed (kill -9) by tests/test_faults.py.

    python tests/fault_worker.py MODE LIBRARY ADAPTER_FILE NAME MARKER [OUT]

MODE:
  add        ``Library.add`` of NAME with two images: the first image is written, then it stops
  overwrite  ``Library.add(..., overwrite=True)`` of an existing NAME: stops between its two renames,
             when the old concept has been moved aside and the new one is not yet in place
  export     ``Library.export_file(NAME, OUT)``: stops with half of the file copied

When it has stopped, it writes MARKER and sleeps; the parent then kills it with SIGKILL, so no
``finally`` block or context-manager exit runs, exactly as with a power cut or the OOM killer.

    python tests/fault_worker.py serve

The kill-point server of tests/test_kill_points.py: it imports the package and loads builtin:tiny
once, then reads one JSON command per line on stdin. ``{"op": "run", "scenario": ..., "point": ...,
"root": ..., "marker": ..., ...}`` forks a child that runs the scenario (a training into the
library, an import, an export, a delete, an overwrite, a fused export, a bundle write, a library
open) and stops at the named point (``None``: runs to the end); it answers ``{"pid": N}``.
``{"op": "wait", "pid": N}`` reaps that child and answers ``{"pid": N, "status": ...}``. Forking
saves an interpreter start and a model load per kill point; each child is a real process that
the test kills with SIGKILL. The points are ``POINTS`` below.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path


def _write_marker(marker: Path, text: str) -> None:
    """Publish the marker whole: the test polls for it and must never read it half-written."""
    part = marker.with_name(marker.name + ".part")
    part.write_text(text)
    os.replace(part, marker)


def _stop_here(marker: Path) -> None:
    _write_marker(marker, str(os.getpid()))
    while True:
        time.sleep(60)


def main() -> int:
    if sys.argv[1] == "serve":
        return serve()
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


# ----- the kill-point server (tests/test_kill_points.py) ------------------------------------------


class _Stop:
    """Where a forked child stops: the marker to write, and the patches that lead there."""

    marker: Path

    @classmethod
    def here(cls) -> None:
        _stop_here(cls.marker)


def _nth_call(owner, attribute: str, n: int = 1, before=None, matches=None) -> None:
    """Patch ``owner.attribute``: its ``n``-th matching call runs ``before`` (a half write), then stops."""
    real = getattr(owner, attribute)
    calls = [0]

    def patched(*args, **kwargs):
        if matches is None or matches(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                if before is not None:
                    before(real, *args, **kwargs)
                _Stop.here()
        return real(*args, **kwargs)

    setattr(owner, attribute, patched)


def _half_safetensors(real, tensors, filename, metadata=None):
    """The real write, then cut to half its length: a write the kill interrupted."""
    real(tensors, filename, metadata=metadata)
    size = os.path.getsize(filename)
    os.truncate(filename, size // 2)


def _half_atomic_text(real, target, text):
    from spectral_diffusion.atomic import atomic_path

    with atomic_path(target) as tmp:  # the kill comes inside the block: the temporary file stays
        tmp.write_text(text[: len(text) // 2])
        _Stop.here()


def _half_png(real, image, path):
    real(image, path)
    os.truncate(path, os.path.getsize(path) // 2)


def _half_file_fsync(real, path):
    os.truncate(path, os.path.getsize(path) // 2)


def _half_rmtree(real, path, *args, **kwargs):
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    for victim in files[: max(1, len(files) // 2)]:
        victim.unlink()


def _install(point: str, root: Path) -> None:
    """Set up the patches of ``point`` (see POINTS) in this child."""
    import shutil as shutil_module

    import spectral_diffusion.atomic as atomic_module
    import spectral_diffusion.core.svd as svd_module
    import spectral_diffusion.formats.adapter_file as adapter_module
    import spectral_diffusion.formats.bundle as bundle_module
    import spectral_diffusion.formats.lora as lora_module
    import spectral_diffusion.library.records as records_module
    import spectral_diffusion.library.reservations as reservations_module
    import spectral_diffusion.library.store as store_module
    import spectral_diffusion.library.workdirs as workdirs_module
    import spectral_diffusion.training.checkpoint as checkpoint_module
    import spectral_diffusion.training.data as data_module
    import spectral_diffusion.training.trainer as trainer_module

    def named(file_name):
        return lambda *args, **kwargs: Path(args[-1] if file_name != "concept.json" else args[0]).name == file_name

    def publishing(src, dst, *args, **kwargs):
        return Path(src).name.startswith(".tmp-") and Path(dst) == root / Path(dst).name and Path(src).is_dir()

    def published(path, *args, **kwargs):
        return Path(path) == root and any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())

    def trashing(src, dst, *args, **kwargs):
        return Path(dst).parent.name.startswith(".trash-")

    def in_trash(path, *args, **kwargs):
        return Path(path).name.startswith(".trash-")

    table = {
        "data loading": lambda: _nth_call(data_module, "open_image", 2),
        "svd compute": lambda: _nth_call(svd_module, "top_k_svd_many", 1),
        "svd cache write": lambda: _nth_call(svd_module, "save_file", 1, _half_safetensors),
        "checkpoint 1 tensors": lambda: _nth_call(checkpoint_module, "save_file", 1, _half_safetensors),
        "checkpoint 1 state": lambda: _nth_call(checkpoint_module, "atomic_write_text", 1, _half_atomic_text),
        "checkpoint 2 tensors": lambda: _nth_call(checkpoint_module, "save_file", 2, _half_safetensors),
        "checkpoint 2 state": lambda: _nth_call(checkpoint_module, "atomic_write_text", 2, _half_atomic_text),
        "training step": lambda: _nth_call(trainer_module._Trainer, "train_step", 2),
        "final preview render": lambda: _nth_call(trainer_module._Trainer, "preview", 1),
        "reservation write": lambda: _nth_call(reservations_module, "atomic_write_text", 1, _half_atomic_text),
        "adapter write": lambda: _nth_call(
            records_module,
            "save_adapter",
            1,
            lambda real, data, path: _half_safetensors(lambda t, f, metadata=None: real(data, f), None, path),
        ),
        "image copy": lambda: _nth_call(records_module, "_save_png", 1, _half_png),
        "preview write": lambda: _nth_call(records_module, "_save_png", 1, _half_png, named("preview.png")),
        "concept.json write": lambda: _nth_call(
            records_module, "fsync_path", 1, _half_file_fsync, named("concept.json")
        ),
        "index rename": lambda: _nth_call(os, "replace", 1, None, publishing),
        # the library folder synced right after a concept folder was renamed into it (atomic_dir)
        "after index rename": lambda: _nth_call(atomic_module, "fsync_path", 1, None, published),
        "reservation drop": lambda: _nth_call(store_module, "drop_reservation", 1),
        "export write": lambda: _nth_call(adapter_module, "save_file", 1, _half_safetensors),
        "delete rename": lambda: _nth_call(os, "replace", 1, None, trashing),
        "delete removal": lambda: _nth_call(shutil_module, "rmtree", 1, _half_rmtree, in_trash),
        "overwrite swap": lambda: _nth_call(os, "replace", 1, None, publishing),
        "fused LoRA write": lambda: _nth_call(lora_module, "save_file", 1, _half_safetensors),
        "bundle write": lambda: _nth_call(bundle_module, "save_file", 1, _half_safetensors),
        "startup cleanup": lambda: _nth_call(workdirs_module, "remove_path", 2),
    }
    table[point]()


def _scenario(command: dict, pipe, facts) -> None:
    """Run one library operation to its end (unless a patch stops it first)."""
    from spectral_diffusion.formats.adapter_file import read_adapter
    from spectral_diffusion.formats.bundle import write_bundle
    from spectral_diffusion.library.store import Library

    root = Path(command["root"])
    scenario = command["scenario"]
    library = Library(root)
    if scenario == "open":
        return
    if scenario == "train":
        from spectral_diffusion.frontends.workflows import TrainRequest, train_into_library

        request = TrainRequest(
            command["name"],
            command["images"],
            rank=4,
            steps=3,
            resolution=32,
            checkpoint_every=1,
            resume=command.get("resume", False),
        )
        train_into_library(
            library,
            pipe,
            request,
            sorted(Path(command["images"]).iterdir()),
            model="builtin:tiny",
            fingerprint=facts[0],
            capacity=facts[1],
            extra_config={"preview_steps": 1, "cpu": True},
            svd_cache_dir=command["svd_cache"],
        )
    elif scenario == "import":
        library.import_file(command["file"], name=command["name"])
    elif scenario == "export":
        library.export_file(command["name"], command["out"])
    elif scenario == "delete":
        library.delete(command["name"])
    elif scenario == "overwrite":
        data = read_adapter(command["file"])
        data = dataclasses.replace(
            data, info=dataclasses.replace(data.info, name=command["name"], tokens=[f"<{command['name']}>"])
        )
        library.add(data, overwrite=True)
    elif scenario == "bundle":
        write_bundle({n: library.adapter(n) for n in command["names"]}, command["out"])
    elif scenario == "fused lora":
        from spectral_diffusion.generation.fusion import Studio

        Studio("builtin:tiny", library=library).export_fused(command["names"], command["out"], format="lora")
    else:
        raise SystemExit(f"unknown scenario {scenario}")


def _child(command: dict, pipe, facts) -> None:
    marker = Path(command["marker"])
    _Stop.marker = marker
    try:
        if command.get("point"):
            _install(command["point"], Path(command["root"]))
        _scenario(command, pipe, facts)
    except BaseException as error:  # noqa: BLE001 - reported through the marker, then a failing exit
        _write_marker(marker, f"error {type(error).__name__}: {error}")
        os._exit(1)
    _write_marker(marker, "done")
    os._exit(0)


def serve() -> int:
    """The fork server: see the module docstring."""
    import json

    import torch

    torch.set_num_threads(1)  # forked children must not inherit a busy OpenMP pool
    from spectral_diffusion.core.model import SpectralAdapters
    from spectral_diffusion.models.registry import load_pipeline

    facts_pipe = load_pipeline("builtin:tiny")
    adapters = SpectralAdapters.from_pipeline(facts_pipe)
    facts = (adapters.fingerprint, adapters.capacity(4))
    pipe = load_pipeline("builtin:tiny")  # unpatched: each training patches (a copy of) it
    pipe.set_progress_bar_config(disable=True)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "run":
            pid = os.fork()
            if pid == 0:
                sys.stdin.close()
                _child(command, pipe, facts)
            print(json.dumps({"pid": pid}), flush=True)
        elif command["op"] == "wait":
            _, status = os.waitpid(command["pid"], 0)
            signalled = os.WIFSIGNALED(status)
            print(
                json.dumps(
                    {
                        "pid": command["pid"],
                        "signal": os.WTERMSIG(status) if signalled else None,
                        "exit": os.WEXITSTATUS(status) if not signalled else None,
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
