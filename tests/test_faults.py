"""Issue 8, item 3 (and the cross-process half of item 4): faults.

kill -9 during a CLI training, during a library write, during an overwrite and during an export; a
full disk while saving (simulated at the Python level, and for real with a file-size limit that makes
the kernel refuse the write). After each, the next start finds a valid library: no half-written
concept, no leaked slot, no temporary files, and the killed concept can be trained or added again.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import signal
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import spectral_diffusion.atomic as atomic_module
import spectral_diffusion.library.records as records_module
from spectral_diffusion.errors import LibraryError, SpectralDiffusionError, StorageError
from spectral_diffusion.formats import adapter_file
from spectral_diffusion.formats import bundle as studio
from spectral_diffusion.formats.adapter_file import read_adapter, save_adapter
from spectral_diffusion.library.store import Library

from .reliability_helpers import (
    PYTHON,
    RANK,
    ROOT,
    child_env,
    leftovers,
    make_adapter,
    record_stats,
    snapshot,
    tiny_fingerprint_and_capacity,
    wait_for,
)

FAULTS = {"kills": 0, "disk_full": 0, "failures": 0}


@pytest.fixture(scope="module", autouse=True)
def figures():
    yield
    record_stats("faults", kill_9=FAULTS["kills"], disk_full=FAULTS["disk_full"], failures=FAULTS["failures"])


def images(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (64, 64), (235, 235, 235))
        ImageDraw.Draw(image).ellipse((6 + 5 * i, 8, 44 + 5 * i, 48), fill=(200, 40, 40))
        image.save(folder / f"{i}.png")
    return folder


def assert_valid_after_restart(root: Path, expected: dict[str, int]) -> Library:
    """The next start: listing valid, exactly ``expected`` (name -> slot), no work files, no reservation."""
    library = Library(root)  # opening cleans up what a dead process left
    assert {r.name: r.slot for r in library.list()} == expected
    for record in library.list():
        read_adapter(record.adapter_path)  # every listed concept is whole
    assert leftovers(root) == []
    assert library.reservations() == []
    assert library.cleanup() == []
    return library


@pytest.fixture(scope="module")
def training_pipeline(models_home):
    """An unpatched builtin:tiny for in-process trainings (a patched one cannot be trained again)."""
    from spectral_diffusion.models.registry import load_pipeline

    pipe = load_pipeline("builtin:tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_into(library: Library, pipe, name: str, image_dir: Path, steps: int = 2):
    """What ``python -m spectral_diffusion train`` does (reserve, train, add), with a 1-step preview."""
    from spectral_diffusion.training.config import TrainConfig
    from spectral_diffusion.training.trainer import train_concept

    fingerprint, capacity = tiny_fingerprint_and_capacity()
    with library.reserve(name, fingerprint, RANK, capacity, tokens=[f"<{name}>"]) as slot:
        config = TrainConfig(name=name, rank=RANK, slot=slot, steps=steps, preview_steps=1, resolution=32)
        result = train_concept(pipe, image_dir, config, base_model_name="builtin:tiny")
        return library.add(result.adapter, sorted(image_dir.iterdir()), result.preview)


# ----- kill -9 during a CLI training, with a second training beside it ----------------------------


@pytest.mark.timeout(400)
def test_kill_9_during_cli_training_leaks_nothing(tmp_path, models_home, training_pipeline):
    root = tmp_path / "concepts"
    library = Library(root)
    library.add(make_adapter("resident", 0))
    image_dir = images(tmp_path / "photos")
    log = tmp_path / "train.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "spectral_diffusion",
                "train",
                "--images",
                str(image_dir),
                "--name",
                "ghost",
                "--steps",
                "200",
                "--library",
                str(root),
                "--model",
                "builtin:tiny",
            ],
            cwd=ROOT,
            env=child_env(SPECTRAL_DIFFUSION_HOME=str(models_home)),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        # clearly inside the training loop: its slot is reserved and steps are being reported
        wait_for(lambda: (root / ".reservations" / "ghost.json").exists(), 180, what="the reservation", process=process)
        wait_for(lambda: re.search(rb"\b[1-9]\d*/200\b", log.read_bytes()), 180, what="training steps", process=process)
        (held,) = library.reservations()
        assert (held.name, held.slot, held.pid) == ("ghost", 1, process.pid)

        # item 4, across processes: a second training of the same name is refused; another concept's
        # training (the app beside the CLI) is given another slot and finishes while the first runs
        fingerprint, capacity = tiny_fingerprint_and_capacity()
        with (
            pytest.raises(LibraryError, match="'ghost' is already being trained: a training of 'ghost' in progress"),
            library.reserve("ghost", fingerprint, RANK, capacity),
        ):
            pass
        with library.reserve("buddy", fingerprint, RANK, capacity, tokens=["<buddy>"]) as slot:
            assert slot == 2
            buddy = library.add(make_adapter("buddy", slot))
        assert process.poll() is None, "the CLI training ended before it could be killed"
        steps_seen = max(int(m) for m in re.findall(rb"\b(\d+)/200\b", log.read_bytes()))
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    FAULTS["kills"] += 1

    assert (root / ".reservations" / "ghost.json").exists()  # the dead training's reservation, stale now
    assert not (root / "ghost").exists()
    library = assert_valid_after_restart(root, {"resident": 0, "buddy": 2})
    assert library.allocate_slot(fingerprint, RANK, capacity) == 1  # the killed training's slot is free again
    again = train_into(library, training_pipeline, "ghost", image_dir)  # and the concept can be trained again
    assert again.slot == 1
    assert_valid_after_restart(root, {"resident": 0, "ghost": 1, "buddy": 2})
    record_stats("kill-training", steps_done_before_kill=steps_seen, concurrent_training_slot=buddy.slot)


# ----- kill -9 during library writes and an export -------------------------------------------------


def start_worker(mode: str, root: Path, adapter: Path, name: str, marker: Path, *extra: str):
    return subprocess.Popen(
        [PYTHON, str(ROOT / "tests" / "fault_worker.py"), mode, str(root), str(adapter), name, str(marker), *extra],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.timeout(300)
def test_kill_9_during_add_overwrite_and_export(tmp_path, models_home):
    adapter = save_adapter(make_adapter("x", 3), tmp_path / "x.safetensors")
    roots = {mode: tmp_path / mode / "concepts" for mode in ("add", "overwrite", "export")}
    opened = {mode: Library(root) for mode, root in roots.items()}  # open before: opening cleans up
    for library in opened.values():
        library.add(make_adapter("dog", 0))
    dog_before = {mode: snapshot(root / "dog") for mode, root in roots.items()}
    export_dir = tmp_path / "downloads"
    export_dir.mkdir()
    previous_export = export_dir / "dog.safetensors"
    previous_export.write_bytes(b"an earlier download the user kept")
    markers = {mode: tmp_path / f"{mode}.marker" for mode in roots}
    workers = {
        "add": start_worker("add", roots["add"], adapter, "cat", markers["add"]),
        "overwrite": start_worker("overwrite", roots["overwrite"], adapter, "dog", markers["overwrite"]),
        "export": start_worker("export", roots["export"], adapter, "dog", markers["export"], str(previous_export)),
    }
    try:  # the three start together: one interpreter start-up's wait for all of them
        for mode, worker in workers.items():
            wait_for(markers[mode].exists, 120, what=f"the {mode} worker to stop half-way", process=worker)
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                os.kill(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
    for mode, worker in workers.items():
        assert worker.returncode == -signal.SIGKILL, (mode, worker.stderr.read().decode()[-2000:])
        FAULTS["kills"] += 1

    # add: a half-written concept folder was left, invisible to readers, removed by the next start
    root = roots["add"]
    assert [p for p in root.iterdir() if p.name.startswith(".tmp-cat-")]
    assert [r.name for r in opened["add"].list()] == ["dog"] and not opened["add"].exists("cat")
    library = assert_valid_after_restart(root, {"dog": 0})
    assert library.import_file(adapter, name="cat").slot == 3  # the same name and slot can be added again

    # overwrite killed between its two renames: the old concept is put back, byte for byte
    root = roots["overwrite"]
    assert not (root / "dog").exists() and [p for p in root.iterdir() if p.name.startswith(".old-dog-")]
    assert_valid_after_restart(root, {"dog": 0})
    assert snapshot(root / "dog") == dog_before["overwrite"]

    # export: the earlier download is untouched; only a hidden .tmp- sibling was left beside it
    root = roots["export"]
    assert previous_export.read_bytes() == b"an earlier download the user kept"
    assert [p.name for p in export_dir.iterdir() if p.name.startswith(".tmp-dog.safetensors.")]
    assert_valid_after_restart(root, {"dog": 0})
    assert snapshot(root / "dog") == dog_before["export"]
    Library(root).export_file("dog", previous_export)
    assert read_adapter(previous_export).info.name == "dog"


# ----- a full disk ------------------------------------------------------------------------------------


def _no_space(path=None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path else None)


def _rust_no_space(*args, **kwargs):
    """What safetensors (Rust) raises when the disk is full: not an OSError, the errno is in the text."""
    if len(args) > 1:
        Path(args[1]).write_bytes(b"\0" * 64)  # half a file first
    raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")


def _partial_png(image, path):
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n")
    raise _no_space(path)


def _partial_text(target, data):
    with atomic_module.atomic_path(target) as tmp:
        tmp.write_bytes(data[:10])
        raise _no_space(tmp)


DISK_FULL_STAGES = {
    "adapter file (safetensors)": (adapter_file, "save_file", _rust_no_space),
    "training image copy": (records_module, "_save_png", _partial_png),
    "export write": (adapter_file, "save_file", _rust_no_space),
    "fused bundle (safetensors)": (studio, "save_file", _rust_no_space),
    "reservation file": (atomic_module, "atomic_write_bytes", _partial_text),
}


@pytest.mark.parametrize("stage", list(DISK_FULL_STAGES))
def test_disk_full_while_saving_gives_a_clear_error_and_changes_nothing(stage, tmp_path, monkeypatch, models_home):
    library = Library(tmp_path / "concepts")
    library.add(make_adapter("dog", 0))
    out_dir = tmp_path / "downloads"
    out_dir.mkdir()
    cat = make_adapter("cat", 1)
    before = snapshot(library.root)
    module, attribute, fake = DISK_FULL_STAGES[stage]
    monkeypatch.setattr(module, attribute, fake)
    fingerprint, capacity = tiny_fingerprint_and_capacity()
    actions = {
        "adapter file (safetensors)": lambda: library.add(cat),
        "training image copy": lambda: library.add(cat, images=[Image.new("RGB", (16, 16))]),
        "export write": lambda: library.export_file("dog", out_dir / "dog.safetensors"),
        "fused bundle (safetensors)": lambda: studio.write_bundle(
            {"dog": library.adapter("dog"), "cat": cat}, out_dir / "fused.safetensors"
        ),
        "reservation file": lambda: library.reserve("cat", fingerprint, RANK, capacity).__enter__(),
    }
    with pytest.raises(StorageError) as caught:
        actions[stage]()
    FAULTS["disk_full"] += 1
    message = str(caught.value)
    assert "No space left on device" in message and "free some disk space" in message
    assert isinstance(caught.value, SpectralDiffusionError) and isinstance(caught.value, OSError)
    assert caught.value.errno == errno.ENOSPC
    after = snapshot(library.root)
    if stage == "reservation file":
        assert after.pop(".reservations") == "dir"  # the empty folder made for it; nothing in it
    assert after == before
    assert leftovers(library.root) == [] and list(out_dir.iterdir()) == []
    monkeypatch.undo()
    assert_valid_after_restart(library.root, {"dog": 0})
    assert library.add(cat).slot == 1  # with space again, the same write works


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.timeout(200)
def test_real_disk_refusal_through_the_cli_is_one_line(tmp_path, models_home):
    """The kernel refuses the write (RLIMIT_FSIZE: EFBIG, as ENOSPC would): the CLI prints one line."""
    root = tmp_path / "concepts"
    Library(root).add(make_adapter("dog", 0))
    adapter = save_adapter(make_adapter("cat", 1), tmp_path / "cat.safetensors")
    before = snapshot(root)
    result = subprocess.run(
        [PYTHON, "-m", "spectral_diffusion", "import", str(adapter), "--library", str(root)],
        cwd=ROOT,
        env=child_env(PYTHONDONTWRITEBYTECODE="1"),
        capture_output=True,
        text=True,
        timeout=150,
        preexec_fn=_file_size_limit(adapter.stat().st_size // 2),
    )
    FAULTS["disk_full"] += 1
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.fullmatch(
        r"error: File too large: cannot write \S*/concepts/cat; free some disk space and try again "
        r"\(nothing was changed\)",
        lines[0],
    ), lines[0]
    assert snapshot(root) == before and leftovers(root) == []
    record_stats("disk-full-cli", exit_status=result.returncode, stderr=lines[0][:160])
