"""Issue 17, item 4: a full disk and a read-only library at every write, not only image saves.

Each operation that writes (add with images and a preview, import, overwrite, delete, reservation,
export, fused bundle, LoRA export, training checkpoint, SVD cache, generated images) is run once to
count its file-system writes (opens for writing, mkdir, rename/replace, unlink, chmod, truncate and
safetensors' Rust writer). Then, for every one of those writes in turn, the operation runs again on
a fresh library with that write failing: ENOSPC (disk full), EROFS (read-only file system) or
EACCES (permission denied). Outcomes checked each time:

- the error is a ``StorageError`` (a ``SpectralDiffusionError`` and an ``OSError``) whose one-line
  message names the path and says what to do; or the operation succeeded, because the failed write
  was best effort (removing a work folder after the rename that published the result);
- nothing is half-written: the library is byte-for-byte as before (or, on success, holds the whole
  result), and after the next open no temporary file is left in it;
- with the fault gone, the same operation succeeds.

The tests run as root here, where ``chmod a-w`` does not stop writes, so a read-only folder is
simulated by failing the writes in Python (``os.open``, ``io.open`` ...) with EROFS; as another user
a real ``chmod`` read-only library is also tried.
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import io
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import spectral_diffusion.core.svd as svd_module
import spectral_diffusion.formats.adapter_file as adapter_module
import spectral_diffusion.formats.bundle as bundle_module
import spectral_diffusion.formats.lora as lora_module
import spectral_diffusion.training.checkpoint as checkpoint_module
from spectral_diffusion.errors import SpectralDiffusionError, StorageError
from spectral_diffusion.formats.adapter_file import save_adapter
from spectral_diffusion.library.store import Library

from .reliability_helpers import RANK, leftovers, make_adapter, record_stats, snapshot, tiny_fingerprint_and_capacity

FAULTS = {"ENOSPC": errno.ENOSPC, "EROFS": errno.EROFS, "EACCES": errno.EACCES}
TALLY = {"operations": 0, "writes": 0, "injected": 0, "refused": 0, "succeeded": 0, "failures": 0}
SAVE_FILE_MODULES = (adapter_module, bundle_module, lora_module, checkpoint_module, svd_module)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@pytest.fixture(scope="module", autouse=True)
def figures():
    yield
    record_stats("storage-faults", **TALLY)


class FailingWrites:
    """Counts the file-system writes made while active; the ``fail_at``-th one (1-based) raises ``code``."""

    def __init__(self, monkeypatch, fail_at: int | None = None, code: int = errno.ENOSPC):
        self.count, self.fail_at, self.code, self.failed = 0, fail_at, code, None
        real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

        def check(what, path) -> None:
            self.count += 1
            if self.count == self.fail_at:
                self.failed = f"{what} {path}"
                raise OSError(self.code, os.strerror(self.code), str(path))

        def writing(mode) -> bool:
            return any(c in str(mode) for c in "wax+")

        def opener(real):
            def patched(file, mode="r", *args, **kwargs):
                if writing(mode) and not isinstance(file, int):
                    check("open", file)
                return real(file, mode, *args, **kwargs)

            return patched

        def os_open(path, flags, *args, **kwargs):
            if flags & _WRITE_FLAGS:
                check("os.open", path)
            return real_os_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", opener(real_open))
        monkeypatch.setattr(io, "open", opener(real_io_open))
        monkeypatch.setattr(os, "open", os_open)

        def failing(name, real):
            def patched(path, *args, **kwargs):
                check(name, path)
                return real(path, *args, **kwargs)

            return patched

        for name in ("mkdir", "replace", "rename", "unlink", "remove", "rmdir", "chmod", "truncate"):
            monkeypatch.setattr(os, name, failing(name, getattr(os, name)))
        for module in SAVE_FILE_MODULES:  # safetensors writes from Rust: its error names the errno in the text
            real = module.save_file

            def save_file(tensors, filename, metadata=None, real=real):
                self.count += 1
                if self.count == self.fail_at:
                    self.failed = f"safetensors {filename}"
                    raise Exception(
                        f"Error while serializing: I/O error: {os.strerror(self.code)} (os error {self.code})"
                    )
                return real(tensors, filename, metadata=metadata)

            monkeypatch.setattr(module, "save_file", save_file)


# ----- the operations ---------------------------------------------------------------------------------


def _pictures():
    return [Image.new("RGB", (24, 24), (200, 0, 0)), Image.new("RGBA", (24, 24), (0, 0, 200, 128))]


def _checkpoint(library: Library, out: Path):
    from spectral_diffusion.training.config import TrainConfig

    config = TrainConfig(
        name="cat",
        rank=RANK,
        slot=1,
        steps=4,
        checkpoint_every=1,
        checkpoint_dir=str(library.root / ".checkpoints" / "cat"),
    )
    param = torch.nn.Parameter(torch.ones(3, 2))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(3, 2)
    optimizer.step()
    checkpoint_module.Checkpoints(config, "fp", [param], optimizer, None, torch.device("cpu")).save(2, [0.5, 0.4], {})


def _fused_lora(library: Library, out: Path):
    from spectral_diffusion.generation.fusion import Studio

    Studio("builtin:tiny", library=library).export_fused(["dog", "cat"], out / "fused.safetensors", format="lora")


def _svd_cache(library: Library, out: Path):
    svd_module.SvdCache(out / "svd").save(
        "fp", {"layer": svd_module.Triplets(torch.ones(4, 2), torch.ones(2), torch.ones(3, 2))}
    )


def _save_images(library: Library, out: Path):
    from spectral_diffusion.frontends.service import Service

    Service(model="builtin:tiny", library=library.root, output_dir=out).save_images(_pictures(), "a photo")


OPERATIONS = {
    # name: (action(library, out folder, cat adapter file), concepts after success, needs "cat" in the library)
    "add with images and preview": (
        lambda lib, out, cat: lib.add(make_adapter("cat", 1), _pictures(), Image.new("RGB", (16, 16))),
        {"dog": 0, "cat": 1},
    ),
    "import": (lambda lib, out, cat: lib.import_file(cat), {"dog": 0, "cat": 1}),
    "overwrite": (
        lambda lib, out, cat: lib.add(dataclasses.replace(make_adapter("dog", 0, seed=3)), overwrite=True),
        {"dog": 0},
    ),
    "delete": (lambda lib, out, cat: lib.delete("dog"), {}),
    "reservation": (lambda lib, out, cat: lib.reserve("cat", *_fp_rank_capacity()).__enter__(), {"dog": 0}),
    "export": (lambda lib, out, cat: lib.export_file("dog", out / "dog.safetensors"), {"dog": 0}),
    "fused bundle": (
        lambda lib, out, cat: bundle_module.write_bundle(
            {"dog": lib.adapter("dog"), "cat": make_adapter("cat", 1)}, out / "fused.safetensors"
        ),
        {"dog": 0},
    ),
    "fused LoRA export": (lambda lib, out, cat: _fused_lora(lib, out), {"dog": 0, "cat": 1}),
    "training checkpoint": (lambda lib, out, cat: _checkpoint(lib, out), {"dog": 0}),
    "SVD cache": (lambda lib, out, cat: _svd_cache(lib, out), {"dog": 0}),
    "generated images": (lambda lib, out, cat: _save_images(lib, out), {"dog": 0}),
}


def _fp_rank_capacity():
    fingerprint, capacity = tiny_fingerprint_and_capacity()
    return fingerprint, RANK, capacity


@pytest.fixture(scope="module")
def template(tmp_path_factory, models_home):
    base = tmp_path_factory.mktemp("storage-template")
    library = Library(base / "concepts")
    library.add(make_adapter("dog", 0), [_pictures()[0]], Image.new("RGB", (16, 16)))
    cat = save_adapter(make_adapter("cat", 1), base / "cat.safetensors")
    cat_library = Library(base / "with-cat")
    cat_library.add(make_adapter("dog", 0))
    cat_library.add(make_adapter("cat", 1))
    return {"dog": base / "concepts", "with-cat": base / "with-cat", "cat": cat}


def _fresh(template, where: Path, operation: str) -> tuple[Library, Path]:
    if where.exists():
        shutil.rmtree(where)
    root = where / "concepts"
    shutil.copytree(template["with-cat" if operation == "fused LoRA export" else "dog"], root)
    out = where / "out"
    out.mkdir()
    return Library(root), out


def _empty_work_folder(path: Path) -> bool:
    """An empty .reservations/ or .checkpoints/ folder, or a checkpoint's complete tensor file that no
    state.json names yet (its state write failed; the next checkpoint replaces it)."""
    inside = any(part in (".reservations", ".checkpoints") for part in path.parts)
    if inside and path.is_file() and path.name.startswith("checkpoint-") and not (path.parent / "state.json").exists():
        return bool(load_file(str(path)))
    return inside and path.is_dir() and not any(p.is_file() and not _empty_work_folder(p) for p in path.rglob("*"))


def _assert_consistent(root: Path, before: dict, expected_after: dict[str, int], refused: bool, operation: str):
    library = Library(root)  # the next start: its cleanup removes work files
    names = {r.name: r.slot for r in library.list()}
    if refused:  # byte for byte; only an empty .reservations/ or .checkpoints/ folder may have been made
        after = {k: v for k, v in snapshot(root).items() if not _empty_work_folder(root / k)}
        assert after == before, f"{operation}: the library changed although the write failed"
    else:
        assert names == expected_after or names == {r: s for r, s in expected_after.items()}, names
    assert leftovers(root) == [], leftovers(root)
    assert library.cleanup() == []
    for record in library.list():
        adapter_module.read_adapter(record.adapter_path)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_every_write_failing_gives_a_clear_error_and_leaves_nothing_half_written(
    operation, template, tmp_path, monkeypatch
):
    action, after = OPERATIONS[operation]
    if operation == "fused LoRA export":
        after = {"dog": 0, "cat": 1}
    library, out = _fresh(template, tmp_path / "count", operation)
    with monkeypatch.context() as patch:
        counter = FailingWrites(patch)
        action(library, out, template["cat"])
    writes = counter.count
    assert writes >= 1
    TALLY["operations"] += 1
    TALLY["writes"] += writes
    outcomes = []
    for index in range(1, writes + 1):
        for fault, code in FAULTS.items():
            if fault == "EACCES" and index > 2:  # a permission refusal comes at the first writes into a folder
                continue
            library, out = _fresh(template, tmp_path / "run", operation)
            root = library.root
            before = snapshot(root)
            with monkeypatch.context() as patch:
                failing = FailingWrites(patch, fail_at=index, code=code)
                try:
                    action(library, out, template["cat"])
                    refused = False
                except StorageError as error:
                    refused = True
                    message = str(error)
                    assert os.strerror(code) in message and "cannot write" in message, message
                    assert "(nothing was changed)" in message and "\n" not in message, message
                    assert isinstance(error, SpectralDiffusionError) and error.errno == code
                except Exception as error:  # noqa: BLE001 - anything else is a failure; say where
                    TALLY["failures"] += 1
                    raise AssertionError(
                        f"{operation}: {fault} at write {index} ({failing.failed}) gave {type(error).__name__}: {error}"
                    ) from error
            TALLY["injected"] += 1
            TALLY["refused" if refused else "succeeded"] += 1
            outcomes.append((index, fault, failing.failed, refused))
            if operation == "reservation" and not refused:
                Library(root)._reservations_dir()  # our own live reservation: drop it like the block's exit would
                for held in Library(root).reservations():
                    from spectral_diffusion.library.reservations import drop_reservation

                    drop_reservation(root / ".reservations", held)
            _assert_consistent(
                root, before, after, refused, f"{operation}, {fault} at write {index} ({failing.failed})"
            )
            if refused:  # with the fault gone, the same operation works
                action(Library(root), out, template["cat"])
    if operation == "SVD cache":  # only saves time: a failed write is a warning, the work goes on
        assert not any(refused for *_, refused in outcomes)
    else:
        assert any(refused for *_, refused in outcomes), outcomes


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the simulation above covers it")
def test_a_really_read_only_library_gives_a_clear_error(template, tmp_path):
    library, out = _fresh(template, tmp_path / "ro", "add")
    before = snapshot(library.root)
    for path in [library.root, *library.root.rglob("*")]:
        if path.is_dir():
            path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(StorageError, match="cannot write"):
            library.add(make_adapter("cat", 1))
        assert snapshot(library.root) == before
    finally:
        for path in [library.root, *library.root.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
