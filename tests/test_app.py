"""The web app through its API: gradio_client against the app (``webapp``, what app.py runs) launched in-process on
127.0.0.1."""

from __future__ import annotations

import contextlib
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
    from webapp.main import build_app, launch

    demo = build_app(service)
    launch(demo, host="127.0.0.1", port=free_port(), auth=auth, prevent_thread_lock=True, quiet=True)
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
        client.predict([handle_file(p) for p in second], "cat-two", "cat", "additive", 4, 4, api_name="/train_concept")
        busy = None
    except AppError as error:
        busy = str(error)
    status, previews, record = job.result(timeout=240)
    return {"record": record, "busy": busy, "previews": previews, "status": status, "updates": job.outputs()}


@pytest.fixture(scope="module")
def cat(server, client, dog):
    """A second concept of the same base model in slot 1, brought in with import_concept."""
    return import_whiskers(server, client)


@pytest.fixture
def pair(server, client, cat):
    """dog and cat both in the library (test_delete_needs_confirmation deletes cat: import it again)."""
    if not (server["library"] / "cat").is_dir():
        import_whiskers(server, client)


def import_whiskers(server, client):
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
    # the API's status is data, not the page's HTML: name, state, steps, slot and token
    status = dog["status"]
    assert status == {
        "name": "dog",
        "state": "done",
        "step": 4,
        "total_steps": 4,
        "loss": status["loss"],
        "eta_seconds": status["eta_seconds"],
        "slot": 0,
        "token": "<dog>",
        "message": "trained dog into slot 0",
    }
    assert isinstance(status["loss"], float)
    running = [update[0] for update in dog["updates"][:-1]]
    assert running and all(isinstance(s, dict) and s["state"] in ("preparing", "running") for s in running)
    assert not any("<div" in json.dumps(update) for update in dog["updates"])
    listed = client.predict(api_name="/list_concepts")
    assert [c["name"] for c in listed] == ["dog"]
    assert listed[0]["this_model"] is True
    json.dumps(listed)  # plain JSON


def test_trained_and_imported_concepts_are_summarised_in_words_on_the_page(cat):
    from webapp import page, render

    line = page.imported_summary(cat)
    assert line.startswith(
        "**Imported cat**: trigger token `<whiskers>`, slot 1 of `builtin:tiny` (rank 4, rotational)"
    )
    assert "class word “cat”" in line and "{" not in line
    assert page.imported_summary(None) == ""
    foreign = render.record_summary({**cat, "this_model": False, "class_word": "<b>", "image_count": 1}, "Trained")
    assert "another base model" in foreign and "&lt;b&gt;" in foreign and ", 1 photo." in foreign


def test_a_second_training_is_told_to_wait(dog, server):
    assert dog["busy"] is not None, "the second training should have been refused while the first ran"
    assert "already running" in dog["busy"]
    assert not (server["library"] / "cat-two").exists()


def test_import_then_generate_with_two_concepts(cat, client):
    assert cat["name"] == "cat" and cat["slot"] == 1 and cat["token"] == "<whiskers>"
    names = [c["name"] for c in client.predict(api_name="/list_concepts")]
    assert names == ["dog", "cat"]
    images, info = client.predict(
        "a photo of <dog> and <whiskers>", "dog,cat:0.8", "blurry", 3, 2, 7.5, 0, 0, 2, "euler-a", api_name="/generate"
    )
    assert len(images) == 2 and info.startswith("2 image(s), seeds 3-4 · ")
    assert [item["caption"] for item in images] == ["seed 3", "seed 4"]  # each image its own seed (image k: 3 + k)
    # "Use the selected image's settings": the image clicked (else the first) fills the Generate form
    from webapp import page

    gallery = [(item["image"], item["caption"]) for item in images]
    fields = page.image_settings(gallery, 1)
    assert (fields["prompt"], fields["negative"], fields["seed"]) == ("a photo of <dog> and <whiskers>", "blurry", 4)
    assert page.image_settings(gallery, None)["seed"] == 3
    assert page.image_settings([], None) == {}  # nothing generated yet: nothing changes
    for item in images:
        with Image.open(item["image"]) as image:
            assert image.size == (64, 64)
    # JSON works as well as "a,b:0.8"; a fixed seed repeats the image
    again, _ = client.predict(
        "a photo of <dog> and <whiskers>",
        '{"dog": 1, "cat": 0.8}',
        "blurry",
        3,
        2,
        7.5,
        0,
        0,
        2,
        "euler-a",
        api_name="/generate",
    )
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
    # the info line starts with the count and the seed used, then the settings and the time taken
    assert [info.split(" · ")[0] for _, info in results] == [f"1 image(s), seed {seed}" for seed in range(8)]
    assert all(" · 2 steps · " in info and info.endswith(" s") for _, info in results)


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
    job = client.submit([handle_file(p) for p in images], "slowpoke", "", "additive", 4, 500, api_name="/train_concept")
    deadline = time.monotonic() + 60
    while not service.training and not job.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.predict(api_name="/cancel_training").startswith("cancelling")
    with pytest.raises(AppError, match="cancelled"):
        job.result(timeout=240)
    assert service.status.state == "cancelled" and service.status.step < 500
    assert job.outputs()[-1][0]["state"] == "cancelled"  # the last status sent says so as data
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
    # the output folder lies outside the working folder and the temporary folder, as the default one does
    work, temporary, outputs = (tmp_path / name for name in ("work", "tmp", "outputs"))
    work.mkdir(), temporary.mkdir()
    command = [sys.executable, str(ROOT / "app.py"), "--library", str(tmp_path / "library"), "--port", str(port)]
    command += ["--model", "builtin:tiny", "--outputs", str(outputs)]
    process = subprocess.Popen(
        command,
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(temporary)},
    )
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
        # a request that loads the model, then one with bad input: one log line each, no bars, no traceback
        client = make_client(url, tmp_path / "dl")
        assert client.predict(api_name="/list_concepts") == []
        images, _ = client.predict("a photo", "", "", 2, 1, 7.5, 0, 0, 1, "default", api_name="/generate")
        assert Image.open(images[0]["image"]).size[0] > 0
        assert len(list(outputs.rglob("*.png"))) == 1, "the image is kept in --outputs"
        with pytest.raises(AppError, match="pick the concept"):
            client.predict("", "spectral", api_name="/export_concept")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("export_concept refused" in s for s in seen):
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
        log = "".join(seen)
        assert "list_concepts: 0 concept(s) (" in log and "export_concept refused: pick the concept" in log, log
        assert "Traceback" not in log and "Loading pipeline" not in log and "it/s]" not in log, log
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
    from webapp.main import main, parse_auth

    with pytest.raises(SystemExit):
        main(["--auth", "no-colon"])
    assert parse_auth("ada:pa:ss") == ("ada", "pa:ss")


# ----- the handlers without a server ----------------------------------------------------------------


def test_user_errors_show_bad_input_and_hide_bugs(caplog):
    import gradio as gr

    from spectral_diffusion.errors import LibraryError
    from webapp import calls
    from webapp.forms import InputError

    def raising(error):
        @calls.user_errors
        def handler():
            raise error

        return handler

    with pytest.raises(gr.Error, match="name taken"):
        raising(LibraryError("name taken"))()
    with pytest.raises(gr.Error, match="rank must be"):
        raising(InputError("rank must be a whole number"))()
    with pytest.raises(gr.Error, match="pick one") as shown:
        raising(gr.Error("pick one"))()
    assert shown.value.message == "pick one"
    caplog.clear()
    for bug in (ValueError("math domain error"), KeyError("oops"), RuntimeError("boom")):
        with pytest.raises(gr.Error) as shown:
            raising(bug)()
        assert shown.value.message == calls.INTERNAL_ERROR, bug
    assert [r.exc_info[0] for r in caplog.records] == [ValueError, KeyError, RuntimeError]

    @calls.user_errors
    def steps():
        yield 1
        raise ValueError("a bug in a generator")

    progress = steps()
    assert next(progress) == 1
    with pytest.raises(gr.Error) as shown:
        next(progress)
    assert shown.value.message == calls.INTERNAL_ERROR


def test_error_text_in_angle_brackets_is_escaped_for_the_page_and_plain_for_api_clients():
    """The page renders gr.Error's message as sanitised HTML: "<heart>" would vanish from the toast."""
    from types import SimpleNamespace

    import gradio as gr
    from gradio.context import LocalContext

    from spectral_diffusion.errors import RequestError
    from webapp.calls import user_errors

    @user_errors
    def handler():
        raise RequestError("the prompt uses <heart>, which is not selected")

    def shown(headers):
        token = LocalContext.request.set(None if headers is None else SimpleNamespace(headers=headers))
        try:
            with pytest.raises(gr.Error) as error:
                handler()
        finally:
            LocalContext.request.reset(token)
        return error.value.message

    page = "the prompt uses &lt;heart&gt;, which is not selected"
    assert shown(None) == page  # called directly: gr.Error's message is HTML
    assert shown({"x-gradio-user": "app"}) == page  # the page's own client
    assert shown({"x-gradio-user": "api"}) == "the prompt uses <heart>, which is not selected"  # gradio_client
    assert shown({}) == "the prompt uses <heart>, which is not selected"  # curl


def test_bound_handlers_do_their_model_work_in_a_thread_that_ends():
    """A torch OpenMP team left on a long-lived gradio thread made training 1.76x slower (libgomp throttles
    every team while the teams outnumber the CPUs; bench/profiling/app_training_threads.py): plain handlers run in a
    thread of their own, with the caller's context (request, notices); generators are left alone."""
    import contextvars
    import inspect
    import threading
    from types import SimpleNamespace

    import gradio as gr

    from webapp import page
    from webapp.events import PageEvents

    marker = contextvars.ContextVar("marker", default=None)
    seen = {}

    def handler(service, value):
        seen.update(thread=threading.current_thread(), marker=marker.get(), service=service)
        if value == "bad":
            raise gr.Error("bad value")
        return value * 2

    service = object()
    events = SimpleNamespace(service=service)
    bound = PageEvents.bound(events, handler)
    assert bound.__name__ == "handler" and list(inspect.signature(bound).parameters) == ["value"]
    token = marker.set("request")
    try:
        assert bound(21) == 42
    finally:
        marker.reset(token)
    assert seen["thread"] is not threading.current_thread() and not seen["thread"].is_alive()
    assert seen["marker"] == "request" and seen["service"] is service
    with pytest.raises(gr.Error, match="bad value"):
        bound("bad")
    assert PageEvents.bound(events, page.train_on_page).func is page.train_on_page  # a generator: as is


def test_page_events_read_and_write_widgets_by_name():
    """A page handler gets its inputs as keyword arguments and returns its outputs as a dict, both named
    after the widgets; a name may stand for a list of widgets (the concept rows; a row's box numbers)."""
    import gradio as gr

    from webapp.widgets import Widgets, by_name

    with gr.Blocks():
        prompt, first, second = gr.Textbox(), gr.Dropdown(), gr.Dropdown()
        boxes = [[gr.Number(), gr.Number()], [gr.Number(), gr.Number()]]
    widgets = Widgets(prompt=prompt, row_names=[first, second], row_boxes=boxes)
    assert widgets.components() == [prompt, first, second, *boxes[0], *boxes[1]]
    values = dict(zip(widgets.components(), ["a cat", "dog", None, 0, 1, 2, 3], strict=True))
    assert widgets.read(values) == {"prompt": "a cat", "row_names": ["dog", None], "row_boxes": [[0, 1], [2, 3]]}
    assert widgets.updates({"row_names": ["cat", "dog"], "prompt": "p"}) == {first: "cat", second: "dog", prompt: "p"}
    assert widgets.updates({}) == gr.skip()  # nothing named: every widget stays as it is

    def shout(prompt, row_names, row_boxes):
        return {"prompt": prompt.upper()}

    event = by_name(shout, widgets, Widgets(prompt=prompt))
    assert event["inputs"] == set(widgets.components()) and event["outputs"] == [prompt]
    assert event["fn"](values) == {prompt: "A CAT"} and event["fn"].__name__ == "shout"


def test_handlers_check_their_input_before_calling_the_service():
    import gradio as gr

    from webapp import handlers

    class NoService:
        def __getattr__(self, name):
            def called(*args, **kwargs):
                raise AssertionError(f"the service was called: {name}")

            return called

    service = NoService()
    with pytest.raises(gr.Error, match="upload"):
        next(handlers.train_concept(service, [], "dog", "", "additive", 4, 4))
    with pytest.raises(gr.Error, match="give the concept a name"):
        next(handlers.train_concept(service, ["a.png"], "  ", "", "additive", 4, 4))
    with pytest.raises(gr.Error, match="I am sure"):
        handlers.delete_concept(service, "dog", False)
    with pytest.raises(gr.Error, match="one adapter file"):
        handlers.import_concept(service, None, "")
    with pytest.raises(gr.Error, match="at least one concept"):
        handlers.export_fused(service, "", "spectral")
    with pytest.raises(gr.Error, match="steps must be a whole number of at least 1"):
        handlers.generate(service, "p", "", "", 0, 0, 7.5, 0, 0, 1, "default")
    with pytest.raises(gr.Error, match="strength"):
        handlers.generate(service, "p", "dog:lots", "", 0, 1, 7.5, 0, 0, 1, "default")


def test_concept_cards_fill_the_prompt_and_the_rows():
    from types import SimpleNamespace

    from webapp import page

    service = SimpleNamespace(concepts=lambda: [SimpleNamespace(name="cat", token="<whiskers>")])
    names = ["dog", "cat"]
    # no caret (-1): at the end; the caret after the token comes back for the next click
    assert page.pick_concept(service, 1, names, "a photo of", -1, ["dog", None, None]) == {
        "prompt": "a photo of <whiskers>",
        "prompt_cursor": 21,
        "row_names": ["dog", "cat", None],
    }
    assert page.pick_concept(service, 1, names, "<whiskers>", 3, ["cat", None]) == {
        "row_names": ["cat", None]
    }  # already there: the prompt and its caret unchanged
    assert page.pick_concept(service, 0, names, "", -1, [None]) == {  # unknown record: <name>
        "prompt": "<dog>",
        "prompt_cursor": 5,
        "row_names": ["dog"],
    }
    assert page.pick_concept(service, 5, names, "", -1, [None]) == {}  # the list moved under the click
    # at the caret, not at the end: spaces added only where the token would touch a word
    assert page.pick_concept(service, 0, names, "a photo of on the beach", 11, [None]) == {
        "prompt": "a photo of <dog> on the beach",
        "prompt_cursor": 16,
        "row_names": ["dog"],
    }
    assert page.insert_token("a photo of on the beach", "<dog>", 10) == ("a photo of <dog> on the beach", 16)
    assert page.insert_token("a photoof", "<dog>", 7) == ("a photo <dog> of", 13)
    assert page.insert_token("on the beach", "<dog>", 0) == ("<dog> on the beach", 5)
    assert page.insert_token("a photo of  ", "<dog>", 99) == ("a photo of <dog>", 16)  # past the end: the end
    assert page.insert_token("a photo", "<dog>", None) == ("a photo <dog>", 13)
    assert page.select_card(1, names) == "cat"
    assert page.rows_to_spec(["dog", None, "cat"], [1.0, 0.5, 0.8]) == "dog,cat:0.8"


def test_generate_is_one_event_for_the_button_and_the_enter_key(models_home, tmp_path):
    from spectral_diffusion.frontends.service import Service
    from webapp.main import build_app

    demo = build_app(Service(model="builtin:tiny", library=tmp_path / "library"))
    dependencies = demo.get_config_file()["dependencies"]
    events = [d for d in dependencies if d.get("api_name") == "generate"]
    assert len(events) == 1
    # the endpoint runs right after the step that rewrites the layout text from the picker, which the button
    # and the prompt's Enter key trigger together
    first = [d for d in dependencies if d["id"] == events[0]["trigger_after"]]
    assert len(first) == 1 and sorted(event for _, event in first[0]["targets"]) == ["click", "submit"]
    named = demo.get_api_info()["named_endpoints"]
    assert sorted(named) == [
        "/cancel_training",
        "/delete_concept",
        "/export_concept",
        "/export_fused",
        "/generate",
        "/import_concept",
        "/list_concepts",
        "/train_concept",
    ]
    # the original parameters keep their order; the new ones come last, each with a default (old calls work)
    generate = named["/generate"]["parameters"]
    assert [p["parameter_name"] for p in generate] == [
        "prompt",
        "concepts",
        "negative",
        "seed",
        "steps",
        "guidance",
        "width",
        "height",
        "num_images",
        "scheduler",
        "layout",
        "regional_mode",
    ]
    assert generate[-2]["parameter_has_default"] and generate[-2]["parameter_default"] == ""
    assert generate[-1]["parameter_has_default"] and generate[-1]["parameter_default"] == "passes"
    train = named["/train_concept"]["parameters"]
    assert [p["parameter_name"] for p in train] == [
        "images",
        "name",
        "class_word",
        "variant",
        "rank",
        "steps",
        "lr_unet",
        "lr_text",
        "lr_embedding",
        "batch_size",
        "resolution",
        "seed",
        "masks",
        "captions",
    ]
    assert all(p["parameter_has_default"] for p in train[6:])
    # train_concept returns data (status, previews, record), the page's HTML only goes to the page
    returns = named["/train_concept"]["returns"]
    assert [(r["label"], r["component"]) for r in returns] == [
        ("status", "Json"),
        ("Previews (their step below each)", "Gallery"),
        ("record", "Json"),
    ]


def test_building_the_page_warns_of_nothing(models_home, tmp_path):
    """Start-up printed gradio's col_count deprecation warning (the captions table)."""
    import warnings

    from spectral_diffusion.frontends.service import Service
    from webapp.main import build_app

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        demo = build_app(Service(model="builtin:tiny", library=tmp_path / "library"))
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, ResourceWarning)]
    assert shown == []
    captions = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "train-captions")
    assert captions.static_columns == [0] and captions.column_count[0] == 2  # file names fixed, captions typed


# ----- regional composition, PNG settings, the page-only handlers -----------------------------------


def test_generate_with_a_layout_and_load_its_settings_back(pair, client):
    from spectral_diffusion.generation.pnginfo import read_settings
    from webapp import page

    prompt = "a photo of <dog> and <whiskers>"
    images, info = client.predict(
        prompt, "dog,cat", "", 5, 2, 7.5, 0, 0, 1, "default", "left-right", api_name="/generate"
    )
    assert "seed 5" in info and "layout left-right (passes)" in info
    stored = read_settings(images[0]["image"])
    assert [r["concept"] for r in stored["layout"]["regions"]] == ["dog", "cat"]
    assert stored["regional_mode"] == "passes"
    # the regional mode is the endpoint's last parameter: routed is drawn, stored, said and loaded back
    args = (prompt, "dog,cat", "", 5, 2, 7.5, 0, 0, 1, "default", "left-right")
    routed, info = client.predict(*args, "routed", api_name="/generate")
    assert "layout left-right (routed)" in info and read_settings(routed[0]["image"])["regional_mode"] == "routed"
    assert page.load_settings(routed[0]["image"])["regional_mode"] == "routed"
    with pytest.raises(AppError, match="not in the list of choices"):  # the radio refuses it
        client.predict(*args, "sideways", api_name="/generate")
    # no concepts chosen: the layout selects the ones it places, and the summary says which were drawn
    _, info = client.predict(prompt, "", "", 5, 2, 7.5, 0, 0, 1, "default", "left-right", api_name="/generate")
    assert "concepts dog,cat" in info and "no concepts" not in info, info
    custom = json.dumps(
        {
            "prompt": prompt,
            "negative": "",
            "regions": [
                {"concept": "dog", "box": [0, 0, 0.6, 1]},
                {"concept": "cat", "box": [0.6, 0, 1, 1], "prompt": "a cat"},
            ],
        }
    )
    images, info = client.predict(prompt, "dog,cat", "", 5, 2, 7.5, 0, 0, 1, "default", custom, api_name="/generate")
    assert "custom layout (2 regions)" in info and "overlap" not in info
    overlapping = custom.replace("[0.6, 0, 1, 1]", "[0.4, 0, 1, 1]")
    _, info = client.predict(prompt, "dog,cat", "", 5, 2, 7.5, 0, 0, 1, "default", overlapping, api_name="/generate")
    assert "warning: dog and cat overlap" in info, info
    with pytest.raises(AppError, match="leaves the image"):
        client.predict(
            prompt,
            "dog,cat",
            "",
            5,
            1,
            7.5,
            0,
            0,
            1,
            "default",
            custom.replace("0.6, 1]", "1.6, 1]", 1),
            api_name="/generate",
        )
    # the PNG's settings fill the Generate tab's fields: the custom layout comes back as rows with boxes
    fields = page.load_settings(images[0]["image"])
    settings = [fields[name] for name in ("prompt", "seed", "steps", "guidance", "width", "height", "scheduler")]
    assert settings == [prompt, 5, 2, 7.5, 64, 64, "default"] and "num_images" not in fields
    assert [d["value"] for d in fields["row_names"]][:2] == ["dog", "cat"] and fields["row_strengths"][:2] == [1.0, 1.0]
    assert fields["layout_mode"] == "custom" and fields["row_boxes"][:2] == [(0, 0, 0.6, 1), (0.6, 0, 1, 1)]
    assert fields["region_prompts"][:2] == ["", "a cat"] and "Loaded the settings" in fields["settings_message"]
    assert fields["regional_mode"] == "passes"
    # the result with its boxes drawn over it
    overlay = page.result_overlay([(images[0]["image"], None)])
    assert overlay["visible"] and overlay["value"].size == (480, 480)
    unrelated = page.load_settings(ROOT / "docs" / "app-screenshot.png")
    assert list(unrelated) == ["settings_message"] and "no Spectral Diffusion settings" in unrelated["settings_message"]


def test_layout_editor_draws_presets_and_custom_boxes(pair, server):
    from webapp import page
    from webapp.render import describe_layout

    service = server["service"]

    def editor(mode, prompt, negative, width, height, rows):
        drawn = page.layout_editor(service, mode, prompt, negative, width, height, **rows)
        return drawn["layout_text"], drawn["layout_picture"], drawn["box_rows"]

    empty_rows = {"row_names": [None] * 2, "row_boxes": [[0.0] * 4] * 2, "region_prompts": [""] * 2}
    spec, picture, shown = editor("none", "p", "", 0, 0, empty_rows)
    assert spec == "" and not picture["visible"] and not any(s["visible"] for s in shown)
    spec, picture, _ = editor("thirds", "<dog> and <whiskers>", "", 0, 0, empty_rows)
    assert spec == "thirds" and picture["visible"] and picture["value"].size == (480, 480)
    rows = {"row_names": ["dog", "cat"], "row_boxes": [[0, 0, 0.5, 1], [0.5, 0, 1, 1]], "region_prompts": ["", "a cat"]}
    spec, picture, shown = editor("custom", "<dog> <whiskers>", "ugly", 128, 64, rows)
    layout = json.loads(spec)
    assert layout["prompt"] == "<dog> <whiskers>" and layout["negative"] == "ugly"
    assert layout["regions"] == [
        {"concept": "dog", "box": [0, 0, 0.5, 1]},
        {"concept": "cat", "box": [0.5, 0, 1, 1], "prompt": "a cat"},
    ]
    assert picture["value"].size == (580, 290) and [s["visible"] for s in shown] == [True, True]
    # a bad box is drawn as the reason instead, and the same reason refuses the generation
    rows["row_boxes"][0][2] = 1.5
    spec, picture, _ = editor("custom", "<dog>", "", 0, 0, rows)
    assert json.loads(spec)["regions"][0]["box"] == [0, 0, 1.5, 1] and picture["value"].size[0] == 580
    assert describe_layout(spec) == "custom layout (2 regions)"


def _text_rows(picture, colour) -> int:
    """How many pixel rows of ``picture`` hold ``colour`` (the height of text drawn in that colour)."""
    import numpy as np

    pixels = np.asarray(picture.convert("RGB"), dtype=np.int32)
    rows = np.flatnonzero((np.abs(pixels - np.array(colour)).max(axis=2) <= 24).any(axis=1))  # antialiased edges
    return int(rows[-1] - rows[0] + 1) if rows.size else 0


def test_layout_labels_are_readable_at_the_size_the_page_shows_them():
    """The labels were drawn ~10 px high and shown at 6-10 px: at least 14 px on the page, whatever the shape."""
    from PIL import Image

    from spectral_diffusion.generation.layout import Layout
    from webapp import drawings

    layout = Layout.from_json(
        {
            "prompt": "a dog and a cat on a beach",
            "regions": [{"concept": "dog", "box": [0, 0, 0.5, 1]}, {"concept": "cat", "box": [0.5, 0, 1, 0.5]}],
        }
    )
    for width, height in ((512, 512), (768, 512), (512, 768), (1024, 512), (64, 64)):
        picture = drawings.draw_layout(layout, width, height)
        scale = drawings.shown_scale(picture.size)
        w, h = picture.size
        dog, cat, context = (0, 0, w // 2, h), (w // 2, 0, w, h // 2), (w // 2, h // 2, w, h)
        # a label from the top of "d" to the bottom of "g", white on its box; "cat": ascender to baseline
        assert _text_rows(picture.crop(dog), (255, 255, 255)) * scale >= 14, (width, height)
        assert _text_rows(picture.crop(cat), (255, 255, 255)) * scale >= 10, (width, height)
        assert _text_rows(picture.crop(context), (90, 90, 100)) * scale >= 10, (width, height)  # "...beach"
        over = drawings.overlay_layout(Image.new("RGB", (width, height), (0, 0, 0)), layout)
        assert over.size == picture.size and _text_rows(over.crop(dog), (255, 255, 255)) * scale >= 14
    message = drawings.message_picture("This layout cannot be used yet: a box leaves the image")
    first_line = message.crop((0, 0, message.width, 8 * drawings.PICTURE_SCALE + drawings.LABEL_FONT * 5 // 4))
    assert _text_rows(first_line, (150, 60, 50)) * drawings.shown_scale(message.size) >= 14


def test_page_training_cancel_is_a_notice_and_bad_input_one_message(dog, server, tmp_path, monkeypatch):
    import gradio as gr

    from webapp import handlers, page

    service = server["service"]
    notices = []
    monkeypatch.setattr(gr, "Info", lambda message, *a, **k: notices.append(message))
    images = [str(p) for p in make_images(tmp_path / "page", count=3, seed=4)]
    form = {"images": images, "name": "pagey", "class_word": "", "variant": "additive", "rank": 4}
    run = page.train_on_page(service, **form, steps=500, resolution=0, seed=0)
    outputs = next(run)
    deadline = time.monotonic() + 120
    while service.status.step < 2 and time.monotonic() < deadline:
        outputs = next(run)
    assert handlers.cancel_training(service).startswith("cancelling")
    outputs = [outputs, *run][-1]  # the run ends without raising: no Error toast, no Error badges
    assert "Cancelled pagey at step" in outputs["progress"] and "library is unchanged" in outputs["progress"]
    assert not {"previews", "name", "images"} & set(outputs)  # the previews, the name and the photos stay
    assert outputs["cancel_message"] == "" and outputs["trained"] == "" and outputs["loss_chart"].size == (480, 200)
    assert notices and "cancelled" in notices[0]
    assert not (server["library"] / "pagey").exists()
    # a success says what was trained and empties the name box (no "Name taken" for the concept just trained)
    *_, outputs = page.train_on_page(service, **form, steps=2)
    assert outputs["trained"].startswith("**Trained pagey**: trigger token `<pagey>`, slot ") and outputs["name"] == ""
    assert outputs["images"] is None and outputs["masks"] is None  # the next concept's photos start a new set
    assert "will take **slot" in page.slot_info(service, 4, outputs["name"])
    service.delete_concept("pagey")
    # Cancel with nothing running says so, as a toast too
    notices.clear()
    assert handlers.cancel_training(service) == "no training is running" and "No training is running" in notices[0]
    # bad input: one message in the status line, no raise
    *_, outputs = page.train_on_page(service, **{**form, "name": "dog"}, steps=2)
    assert "already in the library" in outputs["progress"] and "sd-problem" in outputs["progress"]
    (outputs,) = list(page.train_on_page(service, **{**form, "images": []}, steps=2))
    assert "upload the concept&#x27;s images" in outputs["progress"]


def test_the_name_is_checked_as_it_is_typed(dog, server):
    from webapp import page

    service = server["service"]
    assert "Name taken" in page.slot_info(service, 4, "dog")
    assert "Name not usable" in page.slot_info(service, 4, "../evil")
    assert "will take **slot" in page.slot_info(service, 4, "fresh-name")


def test_advanced_training_settings_override_only_what_changed():
    from types import SimpleNamespace

    from webapp.forms import InputError, TrainForm, training_settings

    service = SimpleNamespace(train_defaults={"batch_size": 4, "lr_unet": 1e-3, "resolution": 32})
    defaults = training_settings(service)
    assert defaults == {
        "lr_unet": 1e-3,
        "lr_text": 1e-5,
        "lr_embedding": 1e-3,
        "batch_size": 4,
        "resolution": 32,
        "seed": 0,
    }
    form = {"images": ["a.png"], "name": "dog", "class_word": "", "variant": "additive", "rank": 4, "steps": 0}
    same = TrainForm(**form, **defaults).request(service)
    assert same.overrides == {} and same.resolution is None and same.seed == 0
    changed = TrainForm(
        **form, lr_unet=3e-3, lr_text=1e-5, lr_embedding=1e-2, batch_size=1, resolution=64, seed=7
    ).request(service)
    assert changed.overrides == {"lr_unet": 3e-3, "lr_embedding": 1e-2, "batch_size": 1}
    assert changed.resolution == 64 and changed.seed == 7
    with pytest.raises(InputError, match="batch_size"):
        TrainForm(**form, batch_size=0).request(service)


def test_one_log_line_per_request_and_no_traceback_for_bad_input(caplog):
    import logging

    import gradio as gr

    from webapp import handlers

    caplog.set_level(logging.INFO, logger="webapp")
    with pytest.raises(gr.Error):
        handlers.generate(None, "p", "dog:lots", "", 0, 1, 7.5, 0, 0, 1, "default")
    assert [(r.levelname, r.exc_info) for r in caplog.records] == [("INFO", None)]
    assert "generate refused: " in caplog.records[0].getMessage()


def test_the_app_starts_and_answers_with_the_cpu_saturated(models_home, tmp_path):
    from spectral_diffusion.frontends.service import Service

    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(2, os.cpu_count() or 2))]
    try:
        started = time.monotonic()
        demo = start_app(Service(model="builtin:tiny", library=tmp_path / "library"))
        try:
            assert httpx.get(demo.local_url, timeout=60).status_code == 200
            assert time.monotonic() - started < 120
        finally:
            demo.close()
    finally:
        for process in busy:
            process.kill()
            process.wait(timeout=10)


def test_uploaded_masks_travel_with_the_training_request(tmp_path):
    """Masks uploaded beside the photos land in a folder of their own under their file names."""
    from spectral_diffusion.frontends.service import Service
    from webapp.forms import TrainForm

    service = Service(model="builtin:tiny", library=tmp_path / "lib", output_dir=tmp_path / "out")
    photos, masks = make_images(tmp_path / "photos", 3), []
    for photo in photos:
        mask = tmp_path / "masks" / Path(photo).name
        mask.parent.mkdir(exist_ok=True)
        Image.new("L", (64, 64), 255).save(mask)
        masks.append(str(mask))
    form = {"images": photos, "name": "dog", "class_word": "dog", "variant": "additive", "rank": 4, "steps": 2}
    request = TrainForm(**form, masks=masks).request(service)
    folder = Path(request.masks)
    assert sorted(p.name for p in folder.iterdir()) == sorted(Path(p).name for p in photos)
    assert folder.parent == service.output_dir
    assert TrainForm(**form).request(service).masks is None


def test_captions_typed_per_photo_become_caption_files_beside_copies(tmp_path):
    from spectral_diffusion.frontends.service import Service
    from spectral_diffusion.training.data import read_caption
    from webapp.forms import TrainForm, caption_rows

    service = Service(model="builtin:tiny", library=tmp_path / "lib", output_dir=tmp_path / "out")
    photos = [str(p) for p in make_images(tmp_path / "photos", 3)]
    rows = caption_rows(photos, [[Path(photos[1]).name, "a {token} on a beach"]])
    assert [row[0] for row in rows] == [Path(p).name for p in photos] and rows[1][1] == "a {token} on a beach"
    rows[0][1] = "my dog asleep"
    form = {"images": photos, "name": "dog", "class_word": "dog", "variant": "additive", "rank": 4, "steps": 2}
    request = TrainForm(**form, captions=rows).request(service)
    copies = [Path(p) for p in request.images]
    assert all(p.parent != Path(photos[0]).parent for p in copies)
    assert read_caption(copies[1], "<dog>", "dog") == "a <dog> on a beach"
    assert read_caption(copies[0], "<dog>", "dog") == "<dog> dog, my dog asleep"
    assert read_caption(copies[2], "<dog>", "dog") is None  # no caption typed: the templates
    untouched = TrainForm(**form, captions=[["x", ""]]).request(service)
    assert untouched.images == photos


def test_caption_files_dropped_with_the_photos_fill_the_table_and_train(tmp_path):
    """photo.txt files uploaded with the photos (the kohya_ss / CLI convention) are their captions; a typed
    caption wins; a caption file without its photo, or one that is not UTF-8, is refused by name."""
    from spectral_diffusion.frontends.service import Service
    from spectral_diffusion.training.data import read_caption
    from webapp.forms import InputError, TrainForm, caption_rows
    from webapp.page import upload_thumbnails

    service = Service(model="builtin:tiny", library=tmp_path / "lib", output_dir=tmp_path / "out")
    photos = [str(p) for p in make_images(tmp_path / "photos", 3)]
    uploads = tmp_path / "uploads"  # gradio keeps each upload in a folder of its own
    texts = []
    for index, (path, caption) in enumerate([(photos[0], "a red {token} on the left"), (photos[2], "my dog\n")]):
        text = uploads / str(index) / Path(path).with_suffix(".txt").name
        text.parent.mkdir(parents=True)
        text.write_text(caption, encoding="utf-8")
        texts.append(str(text))
    files = [photos[0], texts[0], photos[1], photos[2], texts[1]]
    assert upload_thumbnails(files) == photos
    rows = caption_rows(files)
    assert rows == [
        [Path(photos[0]).name, "a red {token} on the left"],
        [Path(photos[1]).name, ""],
        [Path(photos[2]).name, "my dog"],
    ]
    rows[2][1] = "my dog asleep"  # typed over the file's caption
    form = {"images": files, "name": "dog", "class_word": "dog", "variant": "additive", "rank": 4, "steps": 2}
    request = TrainForm(**form, captions=rows).request(service)
    copies = [Path(p) for p in request.images]
    assert [p.name for p in copies] == [Path(p).name for p in photos]
    assert read_caption(copies[0], "<dog>", "dog") == "a red <dog> on the left"
    assert read_caption(copies[1], "<dog>", "dog") is None
    assert read_caption(copies[2], "<dog>", "dog") == "<dog> dog, my dog asleep"
    # the API sends no table: the files alone caption the photos
    assert read_caption(Path(TrainForm(**form).request(service).images[0]), "<dog>", "dog") == "a red <dog> on the left"
    orphan = uploads / "2" / "cat.txt"
    orphan.parent.mkdir()
    orphan.write_text("a cat", encoding="utf-8")
    with pytest.raises(InputError, match=r"cat\.txt has no photo named cat"):
        TrainForm(**{**form, "images": [*files, str(orphan)]}).request(service)
    orphan.write_bytes(Path(photos[0]).read_bytes()[:200])
    with pytest.raises(InputError, match="cannot read caption file cat.txt.*UTF-8"):
        TrainForm(**{**form, "images": [*files, str(orphan)]}).request(service)


def test_a_service_own_output_folder_goes_with_it_and_the_app_keeps_outputs_in_the_data_folder(tmp_path, monkeypatch):
    """Without an output folder the service's temporary one is removed with the service; the app gives it
    a lasting one in the user's data folder (``--outputs``), where generated images stay."""
    import gc

    from spectral_diffusion.frontends.service import Service
    from webapp import main as app_main

    service = Service(model="builtin:tiny", library=tmp_path / "lib")
    folder = service.output_dir
    saved = service.save_images([Image.new("RGB", (8, 8))], "a photo")
    assert saved[0].is_file() and saved[0].is_relative_to(folder)
    del service
    gc.collect()
    assert not folder.exists()

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    kept = app_main.service_for(app_main.parse_args(["--library", str(tmp_path / "lib")])).output_dir
    assert kept == tmp_path / "data" / "spectral_diffusion" / "outputs" and kept.is_dir()
    chosen = app_main.service_for(app_main.parse_args(["--outputs", str(tmp_path / "mine")])).output_dir
    assert chosen == tmp_path / "mine" and chosen.is_dir()
