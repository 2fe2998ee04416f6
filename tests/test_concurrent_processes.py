"""Issue 17, item 5: processes sharing one library.

- Four CLI ``import`` processes started at once: two different slots and two files for one slot. Both
  different ones land (no lost write), exactly one of the clashing pair does and the other is refused
  with the slot message (exit 2); never two concepts in one slot.
- The app is killed (-9) while it starts, started again on the same library, and while it trains a
  concept for one client and imports for another, the CLI trains into the same library: all of them
  end in their own slots, none lost, the library valid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
from PIL import Image, ImageDraw

from spectral_diffusion.formats.adapter_file import read_adapter, save_adapter
from spectral_diffusion.library.store import Library

from .reliability_helpers import PYTHON, ROOT, child_env, free_port, leftovers, make_adapter, record_stats, renamed


def cli(models_home, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "spectral_diffusion", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(SPECTRAL_DIFFUSION_HOME=str(models_home)),
    )


def assert_valid(root, expected: dict[str, int]) -> None:
    library = Library(root)
    slots = {r.name: r.slot for r in library.list()}
    assert slots == expected
    assert len(set(slots.values())) == len(slots)  # never two concepts in one slot
    for record in library.list():
        assert read_adapter(record.adapter_path).info.name == record.name
    assert leftovers(root) == [] and library.reservations() == []


@pytest.mark.timeout(300)
def test_cli_imports_at_once_lose_nothing_and_never_share_a_slot(tmp_path, models_home):
    root = tmp_path / "concepts"
    Library(root).add(make_adapter("resident", 0))
    files = {
        name: save_adapter(make_adapter(name, slot), tmp_path / f"{name}.safetensors")
        for name, slot in (("cat", 1), ("bird", 2), ("left", 3), ("right", 3))
    }
    processes = {name: cli(models_home, "import", str(path), "--library", str(root)) for name, path in files.items()}
    results = {name: (p.wait(timeout=240), p.stderr.read()) for name, p in processes.items()}
    assert results["cat"][0] == 0 and results["bird"][0] == 0, results
    clash = sorted(name for name in ("left", "right") if results[name][0] == 0)
    assert len(clash) == 1, results
    loser = ({"left", "right"} - set(clash)).pop()
    assert results[loser][0] == 2 and "slot 3" in results[loser][1] and "is taken by" in results[loser][1], results
    assert len(results[loser][1].strip().splitlines()) == 1
    assert_valid(root, {"resident": 0, "cat": 1, "bird": 2, clash[0]: 3})
    record_stats("concurrent-imports", processes=4, imported=3, refused=1)


def photos(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        image = Image.new("RGB", (48, 48), (240, 240, 240))
        ImageDraw.Draw(image).ellipse((4 + 3 * i, 6, 30 + 3 * i, 40), fill=(30, 120, 200))
        image.save(folder / f"{i}.png")
    return folder


@pytest.mark.timeout(600)
def test_cli_training_beside_a_running_app(tmp_path, models_home, monkeypatch):
    from gradio_client import Client, handle_file

    from bench.reliability.run import start_app

    root = tmp_path / "concepts"
    Library(root).add(make_adapter("resident", 0))
    monkeypatch.setenv("SPECTRAL_DIFFUSION_HOME", str(models_home))
    # kill -9 while the app starts (imports done, model and library being opened), then start it again
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        first = subprocess.Popen(
            [
                PYTHON,
                str(ROOT / "app.py"),
                "--model",
                "builtin:tiny",
                "--library",
                str(root),
                "--port",
                str(free_port()),
                "--outputs",
                str(tmp_path / "outputs"),
            ],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(SPECTRAL_DIFFUSION_HOME=str(models_home)),
        )
    time.sleep(4)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert_valid(root, {"resident": 0})

    images = photos(tmp_path / "photos")
    imported = save_adapter(renamed(make_adapter("visitor", 4), "visitor"), tmp_path / "visitor.safetensors")
    process, url = start_app(root, tmp_path)
    try:
        trainer = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "dl"))
        job = trainer.submit(
            [handle_file(str(p)) for p in sorted(images.iterdir())],
            "appcat",
            "",
            "additive",
            4,
            30,
            api_name="/train_concept",
        )
        time.sleep(2)
        cli_training = cli(
            models_home,
            "train",
            "--images",
            str(images),
            "--name",
            "clidog",
            "--steps",
            "4",
            "--library",
            str(root),
            "--model",
            "builtin:tiny",
            "--resolution",
            "32",
        )
        importer_result = {}

        def importer() -> None:
            client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "dl2"))
            importer_result["record"] = client.predict(
                handle_file(str(imported)), "visitor", api_name="/import_concept"
            )

        thread = threading.Thread(target=importer)
        thread.start()
        status = cli_training.wait(timeout=400)
        assert status == 0, cli_training.stderr.read()[-3000:]
        thread.join(timeout=120)
        job.result(timeout=400)
    finally:
        process.terminate()
        process.wait(timeout=30)
    slots = {r.name: r.slot for r in Library(root).list()}
    assert set(slots) == {"resident", "appcat", "clidog", "visitor"}, slots
    assert_valid(root, slots)
    assert importer_result["record"]["slot"] == 4
    record_stats("cli-beside-app", concepts=len(slots), slots=slots, app_killed_at_startup=1)
