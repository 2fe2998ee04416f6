"""The web app through its API: gradio_client against app.py launched in-process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_images(folder: Path, count: int = 5, size: int = 64, seed: int = 0) -> list[Path]:
    """Small PNGs of coloured shapes: something to train on."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (size, size), (240 - 30 * i, 200, 40 + 40 * seed))
        draw = ImageDraw.Draw(image)
        draw.ellipse((8 + 2 * i, 10, size - 10, size - 8 - i), fill=(30 + 40 * i, 60, 200 - 30 * seed))
        draw.rectangle((4, 4, 20 + 3 * i, 16), fill=(20, 160, 60))
        path = folder / f"shape-{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny file that declares a huge PNG (a decompression bomb as far as the header goes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for folders)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        out[str(path.relative_to(folder))] = None if path.is_dir() else path.read_bytes()
    return out


def start_app(service, auth: str | None = None):
    import app

    demo = app.build_app(service)
    app.launch(demo, host="127.0.0.1", port=free_port(), auth=auth, prevent_thread_lock=True, quiet=True)
    return demo


def make_client(url: str, downloads: Path, auth: tuple[str, str] | None = None) -> Client:
    return Client(url, verbose=False, auth=auth, download_files=str(downloads), analytics_enabled=False)


@pytest.fixture(scope="module")
def server(models_home, tmp_path_factory):
    from spectral_diffusion.frontends.service import Service

    base = tmp_path_factory.mktemp("app")
    service = Service(
        model="builtin:tiny",
        library=base / "library",
        output_dir=base / "outputs",
        train_defaults={"preview_steps": 1},  # the final preview costs one denoising step
    )
    demo = start_app(service)
    try:
        yield {"url": demo.local_url, "service": service, "library": base / "library", "base": base}
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(server):
    return make_client(server["url"], server["base"] / "downloads")


@pytest.fixture(scope="module")
def dog(server, client):
    """Train "dog" through the API; while it runs, a second training request is made (and refused)."""
    images = make_images(server["base"] / "dog-images")
    job = client.submit([handle_file(p) for p in images], "dog", "dog", "additive", 4, 4, api_name="/train_concept")
    service = server["service"]
    deadline = time.monotonic() + 120
    while not service.training and not job.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.training, "the first training did not start"
    second = make_images(server["base"] / "cat-images", seed=1)
    try:
        client.predict([handle_file(p) for p in second], "cat-two", "cat", "additive", 4, 4,
                       api_name="/train_concept")
        busy = None
    except AppError as error:
        busy = str(error)
    progress, previews, record = job.result(timeout=240)
    return {"record": record, "busy": busy, "previews": previews, "progress": progress}


@pytest.fixture(scope="module")
def cat(server, client, dog):
    """A second concept of the same base model in slot 1, brought in with import_concept."""
    from spectral_diffusion.core.model import ConceptInfo, SpectralAdapters
    from spectral_diffusion.formats.adapter_file import adapter_from_model, save_adapter
    from spectral_diffusion.models.registry import load_pipeline

    from .conftest import randomize_concept

    adapters = SpectralAdapters.from_pipeline(load_pipeline("builtin:tiny"))
    adapters.new_concept(ConceptInfo("whiskers", 1, 4, "rotational", ["<whiskers>"], "cat"))
    randomize_concept(adapters, "whiskers", seed=3)
    data = adapter_from_model(adapters, "whiskers", "builtin:tiny")
    path = save_adapter(data, server["base"] / "whiskers.safetensors")
    return client.predict(handle_file(path), "cat", api_name="/import_concept")


def test_train_concept_lists_it_with_its_slot(dog, client):
    record = dog["record"]
    assert record["name"] == "dog" and record["token"] == "<dog>"
    assert record["slot"] == 0 and record["rank"] == 4 and record["variant"] == "additive"
    assert dog["previews"], "the final preview is shown"
    assert "dog" in dog["progress"]
    listed = client.predict(api_name="/list_concepts")
    assert [c["name"] for c in listed] == ["dog"]
    assert listed[0]["this_model"] is True
    json.dumps(listed)  # plain JSON


def test_a_second_training_is_told_to_wait(dog, server):
    assert dog["busy"] is not None, "the second training should have been refused while the first ran"
    assert "already running" in dog["busy"]
    assert not (server["library"] / "cat-two").exists()


def test_import_then_generate_with_two_concepts(cat, client):
    assert cat["name"] == "cat" and cat["slot"] == 1 and cat["token"] == "<whiskers>"
    names = [c["name"] for c in client.predict(api_name="/list_concepts")]
    assert names == ["dog", "cat"]
    images, info = client.predict("a photo of <dog> and <whiskers>", "dog,cat:0.8", "blurry", 3, 2, 7.5, 0, 0, 2,
                                  "euler-a", api_name="/generate")
    assert len(images) == 2 and "seed 3" in info
    for item in images:
        with Image.open(item["image"]) as image:
            assert image.size == (64, 64)
    # JSON works as well as "a,b:0.8"; a fixed seed repeats the image
    again, _ = client.predict("a photo of <dog> and <whiskers>", '{"dog": 1, "cat": 0.8}', "blurry", 3, 2, 7.5,
                              0, 0, 2, "euler-a", api_name="/generate")
    assert [Path(i["image"]).read_bytes() for i in again] == [Path(i["image"]).read_bytes() for i in images]
    # the concepts change the image: without them the same seed draws something else
    plain, _ = client.predict("a photo of a dog", "", "blurry", 3, 2, 7.5, 0, 0, 2, "euler-a", api_name="/generate")
    assert Path(plain[0]["image"]).read_bytes() != Path(images[0]["image"]).read_bytes()


def test_generate_errors_are_shown_as_messages(cat, client):
    with pytest.raises(AppError, match="<whiskers>.*not selected"):
        client.predict("<dog> and <whiskers>", "dog", "", 0, 1, 7.5, 0, 0, 1, "default", api_name="/generate")
    with pytest.raises(AppError, match="strength"):
        client.predict("<dog>", "dog:lots", "", 0, 1, 7.5, 0, 0, 1, "default", api_name="/generate")
    with pytest.raises(AppError, match="plms"):  # gradio itself checks the choice
        client.predict("<dog>", "dog", "", 0, 1, 7.5, 0, 0, 1, "plms", api_name="/generate")


def test_export_adapter_lora_and_fused_downloads(cat, client):
    from spectral_diffusion.formats.adapter_file import read_adapter
    from spectral_diffusion.formats.bundle import read_bundle

    (spectral,) = client.predict("dog", "spectral", api_name="/export_concept")
    assert read_adapter(spectral).info.name == "dog"
    lora = client.predict("dog", "lora", api_name="/export_concept")
    assert sorted(Path(p).name for p in lora) == ["dog.lora.dog.ti.safetensors", "dog.lora.safetensors"]
    (bundle,) = client.predict("dog,cat:0.8", "spectral", api_name="/export_fused")
    assert sorted(d.info.name for d in read_bundle(bundle)) == ["cat", "dog"]
    fused_lora = client.predict("dog,cat:0.8", "kohya", api_name="/export_fused")
    assert len(fused_lora) == 3 and all(Path(p).stat().st_size > 0 for p in fused_lora)
    with pytest.raises(AppError, match="no concept named 'nope'"):
        client.predict("nope", "spectral", api_name="/export_concept")


def test_eight_concurrent_generations_all_succeed(dog, client):
    def one(seed):
        images, info = client.predict("<dog>", "dog", "", seed, 2, 7.5, 0, 0, 1, "default", api_name="/generate")
        return len(images), info

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert [count for count, _ in results] == [1] * 8
    assert [info for _, info in results] == [f"1 image(s), seed {seed}" for seed in range(8)]


def test_bad_uploads_are_refused_and_leave_the_library_unchanged(dog, server, client, tmp_path):
    before = snapshot(server["library"])
    good = make_images(tmp_path / "good", count=3)
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a picture")
    bomb = png_header_only(tmp_path / "bomb.png", 20000, 20000)

    def train(files, name="newcomer"):
        return client.predict([handle_file(p) for p in files], name, "", "additive", 4, 2, api_name="/train_concept")

    with pytest.raises(AppError, match="fake.png"):
        train([*good, fake])
    with pytest.raises(AppError, match="upload"):
        train([])
    with pytest.raises(AppError, match="bomb.png"):
        train([*good, bomb])
    with pytest.raises(AppError, match="name"):
        train(good, name="../escape")
    with pytest.raises(AppError):
        client.predict(handle_file(fake), "", api_name="/import_concept")
    assert snapshot(server["library"]) == before
    assert not server["service"].training


def test_cancel_stops_a_training_and_leaves_the_library_unchanged(dog, server, client, tmp_path):
    service = server["service"]
    before = snapshot(server["library"])
    images = make_images(tmp_path / "slow", count=3, seed=2)
    job = client.submit([handle_file(p) for p in images], "slowpoke", "", "additive", 4, 500,
                        api_name="/train_concept")
    deadline = time.monotonic() + 60
    while not service.training and not job.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.predict(api_name="/cancel_training").startswith("cancelling")
    with pytest.raises(AppError, match="cancelled"):
        job.result(timeout=240)
    assert service.status.state == "cancelled" and service.status.step < 500
    assert snapshot(server["library"]) == before
    assert client.predict(api_name="/cancel_training") == "no training is running"


def test_delete_needs_confirmation(cat, client, server):
    with pytest.raises(AppError, match="I am sure"):
        client.predict("cat", False, api_name="/delete_concept")
    assert (server["library"] / "cat").is_dir()
    assert client.predict("cat", True, api_name="/delete_concept") == "deleted cat"
    assert [c["name"] for c in client.predict(api_name="/list_concepts")] == ["dog"]
    assert not (server["library"] / "cat").exists()
    with pytest.raises(AppError, match="no concept named 'cat'"):
        client.predict("cat", True, api_name="/delete_concept")


def test_auth_refuses_an_anonymous_client(models_home, tmp_path):
    from spectral_diffusion.frontends.service import Service

    started = time.monotonic()
    service = Service(model="builtin:tiny", library=tmp_path / "library")
    demo = start_app(service, auth="ada:s3cret")
    try:
        assert service.studio._pipe is None, "building the app must not load the model"
        assert time.monotonic() - started < 60
        with pytest.raises(ValueError, match="credentials were not provided"):  # AuthenticationError
            make_client(demo.local_url, tmp_path / "dl")
        with pytest.raises(ValueError, match="Could not login"):
            make_client(demo.local_url, tmp_path / "dl", auth=("ada", "wrong"))
        for path in ("config", "gradio_api/info"):
            assert httpx.get(demo.local_url + path).status_code == 401
        assert httpx.post(demo.local_url + "gradio_api/call/list_concepts", json={"data": []}).status_code == 401
        authed = make_client(demo.local_url, tmp_path / "dl", auth=("ada", "s3cret"))
        assert authed.predict(api_name="/cancel_training") == "no training is running"
    finally:
        demo.close()


def test_app_binds_localhost_by_default(server):
    assert server["url"].startswith("http://127.0.0.1:")


def test_python_app_py_prints_its_url_and_serves_the_page(models_home, tmp_path):
    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--library", str(tmp_path / "library"), "--port", str(port)]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        deadline, seen = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert process.poll() is None, "app.py exited:\n" + "".join(seen)
                continue
            seen.append(line)
            if "running at" in line:
                break
        else:
            pytest.fail("app.py printed no URL:\n" + "".join(seen))
        url = line.split("running at", 1)[1].strip()
        assert url.rstrip("/") == f"http://127.0.0.1:{port}"
        page = httpx.get(url, timeout=30)
        assert page.status_code == 200 and "Spectral Diffusion" in page.text
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_parse_concepts():
    from spectral_diffusion.core.strengths import format_concepts, parse_concepts
    from spectral_diffusion.errors import SpectralDiffusionError

    assert parse_concepts("dog, cat:0.8,") == {"dog": 1.0, "cat": 0.8}
    assert parse_concepts('{"dog": 1, "cat": 0.5}') == {"dog": 1.0, "cat": 0.5}
    assert parse_concepts('["dog", "cat"]') == {"dog": 1.0, "cat": 1.0}
    assert parse_concepts("") == {} and parse_concepts(None) == {}
    assert format_concepts({"dog": 1.0, "cat": 0.8}) == "dog,cat:0.8"
    for bad in ("dog:lots", "dog:nan", ":0.5", "{oops"):
        with pytest.raises(SpectralDiffusionError):
            parse_concepts(bad)


def test_cli_flags():
    import app

    with pytest.raises(SystemExit):
        app.main(["--auth", "no-colon"])
    assert app.parse_auth("ada:pa:ss") == ("ada", "pa:ss")


# ----- the handlers without a server ----------------------------------------------------------------


def test_user_errors_show_bad_input_and_hide_bugs(caplog):
    import gradio as gr

    import app_ui
    from spectral_diffusion.errors import LibraryError

    def raising(error):
        @app_ui.user_errors
        def handler():
            raise error

        return handler

    with pytest.raises(gr.Error, match="name taken"):
        raising(LibraryError("name taken"))()
    with pytest.raises(gr.Error, match="rank must be"):
        raising(app_ui.InputError("rank must be a whole number"))()
    with pytest.raises(gr.Error, match="pick one") as shown:
        raising(gr.Error("pick one"))()
    assert shown.value.message == "pick one"
    caplog.clear()
    for bug in (ValueError("math domain error"), KeyError("oops"), RuntimeError("boom")):
        with pytest.raises(gr.Error) as shown:
            raising(bug)()
        assert shown.value.message == app_ui.INTERNAL_ERROR, bug
    assert [r.exc_info[0] for r in caplog.records] == [ValueError, KeyError, RuntimeError]

    @app_ui.user_errors
    def steps():
        yield 1
        raise ValueError("a bug in a generator")

    progress = steps()
    assert next(progress) == 1
    with pytest.raises(gr.Error) as shown:
        next(progress)
    assert shown.value.message == app_ui.INTERNAL_ERROR


def test_handlers_check_their_input_before_calling_the_service():
    import gradio as gr

    import app_ui

    class NoService:
        def __getattr__(self, name):
            def called(*args, **kwargs):
                raise AssertionError(f"the service was called: {name}")

            return called

    service = NoService()
    with pytest.raises(gr.Error, match="upload"):
        next(app_ui.train_concept(service, [], "dog", "", "additive", 4, 4))
    with pytest.raises(gr.Error, match="give the concept a name"):
        next(app_ui.train_concept(service, ["a.png"], "  ", "", "additive", 4, 4))
    with pytest.raises(gr.Error, match="I am sure"):
        app_ui.delete_concept(service, "dog", False)
    with pytest.raises(gr.Error, match="one adapter file"):
        app_ui.import_concept(service, None, "")
    with pytest.raises(gr.Error, match="at least one concept"):
        app_ui.export_fused(service, "", "spectral")
    with pytest.raises(gr.Error, match="steps must be a whole number of at least 1"):
        app_ui.generate(service, "p", "", "", 0, 0, 7.5, 0, 0, 1, "default")
    with pytest.raises(gr.Error, match="strength"):
        app_ui.generate(service, "p", "dog:lots", "", 0, 1, 7.5, 0, 0, 1, "default")


def test_concept_cards_fill_the_prompt_and_the_rows():
    from types import SimpleNamespace

    import app_ui

    service = SimpleNamespace(concepts=lambda: [SimpleNamespace(name="cat", token="<whiskers>")])
    names = ["dog", "cat"]
    assert app_ui.pick_concept(service, 1, names, "a photo of", "dog", None, None) == (
        "a photo of <whiskers>", "dog", "cat", None)
    assert app_ui.pick_concept(service, 1, names, "<whiskers>", "cat", None) == ("<whiskers>", "cat", None)
    assert app_ui.pick_concept(service, 0, names, "", None) == ("<dog>", "dog")  # unknown record: <name>
    assert app_ui.select_card(1, names) == "cat"
    assert app_ui.rows_to_spec("dog", None, "cat", 1.0, 0.5, 0.8) == "dog,cat:0.8"


def test_generate_is_one_event_for_the_button_and_the_enter_key(models_home, tmp_path):
    import app
    from spectral_diffusion.frontends.service import Service

    demo = app.build_app(Service(model="builtin:tiny", library=tmp_path / "library"))
    events = [d for d in demo.get_config_file()["dependencies"] if d.get("api_name") == "generate"]
    assert len(events) == 1 and len(events[0]["targets"]) == 2
    named = demo.get_api_info()["named_endpoints"]
    assert sorted(named) == ["/cancel_training", "/delete_concept", "/export_concept", "/export_fused", "/generate",
                             "/import_concept", "/list_concepts", "/train_concept"]
    assert [p["parameter_name"] for p in named["/generate"]["parameters"]] == [
        "prompt", "concepts", "negative", "seed", "steps", "guidance", "width", "height", "num_images", "scheduler"]
    assert [p["parameter_name"] for p in named["/train_concept"]["parameters"]] == [
        "images", "name", "class_word", "variant", "rank", "steps"]
