"""Issue 17, item 2: kill -9 at 27 named points of training, import, export, delete, overwrite, fused
export, bundle write and a library open (app start-up), and after each the next start is clean.

A fork server (``tests/fault_worker.py serve``) loads builtin:tiny once; for each point it forks a child
that runs the operation and stops at the point (mid-write where the point is a write: the file is cut
to half its length first). The test kills the child with SIGKILL, so no ``finally`` or ``with`` exit
runs. Then, for every point:

- the library opens, lists exactly the expected concepts, each whole (``read_adapter`` of each);
- no temporary file (``.tmp-*``, ``.trash-*``, ``.old-*``) is left anywhere in it after the open's
  cleanup, and no reservation: the killed training's slot is free (``allocate_slot`` gives it again);
- the interrupted operation, repeated, succeeds.

A training killed at any point and then run again with ``resume`` gives the same adapter, tensor for
tensor, as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from spectral_diffusion.formats.adapter_file import read_adapter, save_adapter
from spectral_diffusion.formats.bundle import read_bundle
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

BEFORE, AFTER = "before", "after"  # whether the killed operation had taken effect (published) or not
# point -> (scenario, taken effect?)
TRAINING_POINTS = {
    "reservation write": BEFORE,
    "data loading": BEFORE,
    "svd compute": BEFORE,
    "svd cache write": BEFORE,
    "checkpoint 1 tensors": BEFORE,
    "checkpoint 1 state": BEFORE,
    "training step": BEFORE,
    "checkpoint 2 tensors": BEFORE,
    "checkpoint 2 state": BEFORE,
    "final preview render": BEFORE,
    "adapter write": BEFORE,
    "image copy": BEFORE,
    "preview write": BEFORE,
    "concept.json write": BEFORE,
    "index rename": BEFORE,
    "after index rename": AFTER,
    "reservation drop": AFTER,
}
OTHER_POINTS = {
    ("import", "adapter write"): BEFORE,
    ("import", "preview write"): BEFORE,
    ("import", "index rename"): BEFORE,
    ("export", "export write"): BEFORE,
    ("delete", "delete rename"): BEFORE,
    ("delete", "delete removal"): AFTER,
    ("overwrite", "overwrite swap"): BEFORE,
    ("fused lora", "fused LoRA write"): BEFORE,
    ("bundle", "bundle write"): BEFORE,
    ("open", "startup cleanup"): BEFORE,
}
KILLS: list[str] = []


class ForkServer:
    def __init__(self, process: subprocess.Popen):
        self.process = process

    def _ask(self, command: dict) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"the fork server died: {self.process.stderr.read()[-3000:]}")
        return json.loads(line)

    def run(self, scenario: str, point: str | None, root: Path, marker: Path, **fields) -> dict:
        """Fork a child for ``scenario``; with a ``point``, kill it there (-9). Returns its wait status."""
        marker.unlink(missing_ok=True)
        pid = self._ask(
            {"op": "run", "scenario": scenario, "point": point, "root": str(root), "marker": str(marker), **fields}
        )["pid"]
        try:
            wait_for(marker.exists, 120, interval=0.02, what=f"{scenario} to reach {point or 'its end'}")
            text = marker.read_text()
            if point is not None:
                assert text.strip().isdigit(), f"{scenario} at {point}: {text}"  # stopped at the point
                os.kill(pid, signal.SIGKILL)
        finally:
            if not marker.exists():
                os.kill(pid, signal.SIGKILL)
        status = self._ask({"op": "wait", "pid": pid})
        if point is None:
            assert status["exit"] == 0, f"{scenario} failed: {marker.read_text()}"
        else:
            assert status["signal"] == signal.SIGKILL, status
        return status


@pytest.fixture(scope="module")
def server(models_home):
    process = subprocess.Popen(
        [PYTHON, str(ROOT / "tests" / "fault_worker.py"), "serve"],
        cwd=ROOT,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(SPECTRAL_DIFFUSION_HOME=str(models_home)),
    )
    fork_server = ForkServer(process)
    line = process.stdout.readline()
    assert line and json.loads(line)["ready"], process.stderr.read()[-3000:]
    yield fork_server
    process.stdin.close()
    process.wait(timeout=60)
    record_stats("kill-points", kill_9=len(KILLS), distinct_points=len(set(KILLS)), failures=0)


@pytest.fixture(scope="module")
def template(tmp_path_factory, models_home) -> dict:
    """A library with "resident" (slot 0) and "victim" (slot 2), training photos, an adapter file to import."""
    base = tmp_path_factory.mktemp("kill-template")
    root = base / "concepts"
    library = Library(root)
    preview = Image.new("RGB", (32, 32), (10, 200, 10))
    library.add(make_adapter("resident", 0), preview=preview)
    library.add(make_adapter("victim", 2))
    photos = base / "photos"
    photos.mkdir()
    for i in range(3):
        image = Image.new("RGB", (48, 48), (235, 235, 235))
        ImageDraw.Draw(image).ellipse((4 + 4 * i, 6, 36 + 4 * i, 42), fill=(200, 40, 40))
        image.save(photos / f"{i}.png")
    source = base / "source" / "concepts"
    Library(source).add(make_adapter("cat", 3), preview=preview)
    cat_file = Library(source).export_file("cat", base / "cat.safetensors")  # carries a preview: imports write one
    other = save_adapter(make_adapter("resident", 0, seed=5), base / "resident-v2.safetensors")
    return {"root": root, "photos": photos, "cat": cat_file, "other": other}


def fresh(template: dict, where: Path) -> Path:
    root = where / "concepts"
    shutil.copytree(template["root"], root)
    return root


def assert_clean_start(root: Path, expected: dict[str, int]) -> Library:
    """The next start: exactly ``expected`` (name -> slot), each whole; no work file, no reservation."""
    library = Library(root)  # opening cleans up what the killed process left
    assert {r.name: r.slot for r in library.list()} == expected
    for record in library.list():
        read_adapter(record.adapter_path)
        assert (record.folder / "concept.json").is_file()
    assert leftovers(root) == [], leftovers(root)
    assert library.reservations() == []
    assert library.cleanup() == []
    return library


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.fixture(scope="module")
def uninterrupted(server, template, tmp_path_factory) -> dict[str, torch.Tensor]:
    where = tmp_path_factory.mktemp("kill-reference")
    root = fresh(template, where)
    server.run(
        "train",
        None,
        root,
        where / "marker",
        name="ghost",
        images=str(template["photos"]),
        svd_cache=str(where / "svd"),
    )
    return adapter_tensors(root / "ghost" / "adapter.safetensors")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("point", list(TRAINING_POINTS))
def test_kill_9_during_training(point, server, template, uninterrupted, tmp_path):
    root = fresh(template, tmp_path)
    svd_cache = tmp_path / "svd"
    fields = {"name": "ghost", "images": str(template["photos"]), "svd_cache": str(svd_cache)}
    server.run("train", point, root, tmp_path / "marker", **fields)
    KILLS.append(f"train: {point}")
    published = TRAINING_POINTS[point] == AFTER
    expected = {"resident": 0, "victim": 2, **({"ghost": 1} if published else {})}
    library = assert_clean_start(root, expected)
    fingerprint, capacity = tiny_fingerprint_and_capacity()
    if not published:
        assert library.allocate_slot(fingerprint, RANK, capacity) == 1  # the killed training's slot is free
        server.run("train", None, root, tmp_path / "marker", resume=True, **fields)  # repeated: resumes
    assert_clean_start(root, {"resident": 0, "victim": 2, "ghost": 1})
    again = adapter_tensors(root / "ghost" / "adapter.safetensors")
    assert again.keys() == uninterrupted.keys()
    for key, tensor in uninterrupted.items():  # the same adapter as a run never interrupted
        assert torch.equal(again[key], tensor), (point, key)
    if point == "svd cache write":  # outside the library: the cache ignores a half-written temporary file
        assert [p.name for p in svd_cache.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scenario,point", list(OTHER_POINTS))
def test_kill_9_during_library_operations(scenario, point, server, template, tmp_path):
    root = fresh(template, tmp_path)
    out = tmp_path / "downloads"
    out.mkdir()
    before = snapshot(root)
    base = {"resident": 0, "victim": 2}
    fields, after_repeat = {}, dict(base)
    if scenario == "import":
        fields, after_repeat = {"file": str(template["cat"]), "name": "cat"}, {**base, "cat": 3}
    elif scenario == "export":
        fields = {"name": "resident", "out": str(out / "resident.safetensors")}
    elif scenario == "delete":
        fields, after_repeat = {"name": "victim"}, {"resident": 0}
    elif scenario == "overwrite":
        fields = {"name": "resident", "file": str(template["other"])}
    elif scenario in ("bundle", "fused lora"):
        fields = {"names": ["resident", "victim"], "out": str(out / "fused.safetensors")}
    elif scenario == "open":  # what start-up finds after crashes: work folders and a stale reservation
        for leftover in (".tmp-a-1", ".trash-b-2", ".tmp-c-3"):
            (root / leftover).mkdir()
            (root / leftover / "adapter.safetensors").write_bytes(b"\0" * 100)
    marker = tmp_path / "marker"
    server.run(scenario, point, root, marker, **fields)
    KILLS.append(f"{scenario}: {point}")
    if scenario == "open":
        assert len([p for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]) == 2  # stopped midway
    published = OTHER_POINTS[(scenario, point)] == AFTER
    assert_clean_start(root, after_repeat if published else base)
    if scenario in ("export", "bundle", "fused lora", "overwrite", "open") or not published:
        assert snapshot(root) == before  # byte for byte: nothing half-written, an overwrite's old concept back
    assert not (out / "resident.safetensors").exists() and not (out / "fused.safetensors").exists()

    # the interrupted operation, repeated, succeeds
    if published:  # the kill came after the delete took effect: delete again after adding it back
        Library(root).add(make_adapter("victim", 2))
    server.run(scenario, None, root, marker, **fields)
    library = assert_clean_start(root, after_repeat)
    if scenario == "export":
        assert read_adapter(out / "resident.safetensors").info.name == "resident"
    elif scenario == "bundle":
        assert sorted(d.info.name for d in read_bundle(out / "fused.safetensors")) == ["resident", "victim"]
    elif scenario == "fused lora":
        assert load_file(str(out / "fused.safetensors"))
    elif scenario == "overwrite":
        assert library.adapter("resident").layers.keys() == read_adapter(template["other"]).layers.keys()
        assert snapshot(root) != before
    elif scenario == "import":
        assert (root / "cat" / "preview.png").is_file()
