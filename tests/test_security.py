"""Issue 8, item 5: security.

- no pickle loading, ``eval`` or ``exec`` anywhere in the package, app.py or webapp/ (an AST scan), and the
  dependencies' fallback loaders refuse a pickle that carries code;
- the server binds 127.0.0.1 by default (argument default, ``launch`` default, and the real listening
  socket of an app started without a host), and ``--auth`` guards every route, uploads and files too;
- concept names cannot escape the library folder, through any endpoint;
- the file route serves only what the app handed out (copies of library exports and generated
  images), never the library, the outputs folder, the source tree or a traversal;
- uploads cannot overwrite an existing concept.

The HTTP checks run against the app server process shared with test_load (tests/app_server.py).
"""

from __future__ import annotations

import ast
import inspect
import io
import os
import pickle
import socket
import urllib.parse
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from spectral_diffusion.formats.adapter_file import save_adapter

from .reliability_helpers import (
    AUTH,
    ROOT,
    api_client,
    app_server,
    make_adapter,
    record_stats,
    snapshot,
)

pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

pytestmark = pytest.mark.timeout(300)

# ----- the source scan ------------------------------------------------------------------------------

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
DANGEROUS_BUILTINS = {"eval", "exec", "compile", "__import__", "execfile"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def scan_source(path: Path, root: Path = ROOT) -> list[str]:
    """Unsafe deserialisation or dynamic code in one file: ``file:line what`` for each finding."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{path.relative_to(root)}:{node.lineno} {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    report(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLE_MODULES:
                report(node, f"from {node.module} import ...")
            for alias in node.names:
                if alias.name in ("load", "loads") and (node.module or "").split(".")[0] in {"torch", "pickle"}:
                    report(node, f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Name) and node.id in PICKLE_MODULES | {"Unpickler"}:
            report(node, f"uses {node.id}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if isinstance(node.func, ast.Name) and node.func.id in DANGEROUS_BUILTINS:
                report(node, f"calls {node.func.id}()")
            elif name.endswith(("torch.load", "torch.serialization.load")) or name == "load_state_dict_from_url":
                flag = _keyword(node, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    report(node, f"{name}() without weights_only=True")
            elif name.split(".")[-1] == "load" and name.split(".")[0] in {"np", "numpy"}:
                flag = _keyword(node, "allow_pickle")
                if isinstance(flag, ast.Constant) and flag.value is True:
                    report(node, f"{name}(allow_pickle=True)")
            elif name in {"yaml.load", "yaml.unsafe_load", "yaml.full_load"} and _keyword(node, "Loader") is None:
                report(node, f"{name}() without a safe Loader")
            elif name in {"os.system", "os.popen"} or (
                name.startswith("subprocess.")
                and isinstance(_keyword(node, "shell"), ast.Constant)
                and _keyword(node, "shell").value is True
            ):
                report(node, f"{name}() runs a shell")
            elif (
                name.endswith("from_pretrained")
                and isinstance(_keyword(node, "trust_remote_code"), ast.Constant)
                and _keyword(node, "trust_remote_code").value is True
            ):
                report(node, f"{name}(trust_remote_code=True)")
    return found


def scanned_files() -> list[Path]:
    return (
        sorted((ROOT / "spectral_diffusion").rglob("*.py"))
        + [ROOT / "app.py"]
        + sorted((ROOT / "webapp").rglob("*.py"))
    )


def test_the_scanner_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch\nfrom dill import loads\nx = torch.load('f')\ny = torch.load('f', weights_only=False)\n"
        "eval('1')\nexec('pass')\nimport os\nos.system('ls')\nz = torch.load('f', weights_only=True)\nm.eval()\n"
    )
    ordered = sorted(scan_source(bad, tmp_path), key=lambda f: int(f.split(":")[1].split()[0]))
    findings = [f.split(" ", 1)[1] for f in ordered]
    assert findings == [
        "import pickle",
        "from dill import ...",
        "torch.load() without weights_only=True",
        "torch.load() without weights_only=True",
        "calls eval()",
        "calls exec()",
        "os.system() runs a shell",
    ]


def test_no_pickle_eval_or_exec_in_the_package_or_app():
    files = scanned_files()
    assert len(files) > 15 and (ROOT / "app.py").exists()
    findings = [finding for path in files for finding in scan_source(path)]
    lines = sum(len(path.read_text(encoding="utf-8").splitlines()) for path in files)
    record_stats("security-scan", files=len(files), lines=lines, findings=len(findings))
    assert findings == []


def test_dependencies_fall_back_to_pickles_only_with_weights_only(tmp_path):
    """diffusers / transformers load a model's .bin weights with torch.load's default: it must refuse
    a pickle that carries code (torch >= 2.6: weights_only=True by default)."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "model.bin"
    torch.save({"weight": torch.zeros(2), "payload": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") in (None, "", "0")


# ----- binding and auth -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(request):
    from .reliability_helpers import stop_app_server

    yield app_server(request)
    stop_app_server()  # the last user of the shared server: do not keep it through the other modules


def test_app_binds_loopback_by_default(server, monkeypatch):
    import webapp.main as app_main

    assert inspect.signature(app_main.launch).parameters["host"].default == "127.0.0.1"
    seen = {}

    class FakeDemo:
        local_url, share_url = "http://127.0.0.1:1/", None

        def block_thread(self):
            return None

    monkeypatch.setattr(app_main, "Service", lambda **kwargs: None)
    monkeypatch.setattr(app_main, "build_app", lambda service: FakeDemo())
    monkeypatch.setattr(app_main, "launch", lambda demo, host, port, **kwargs: seen.update(host=host, **kwargs))
    assert app_main.main([]) == 0
    assert seen["host"] == "127.0.0.1" and seen["share"] is False and seen["auth"] is None

    # the real server, started with no host at all, listens on the loopback interface only
    listening = [
        c.laddr for c in psutil.Process(server["pid"]).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
    ]
    assert listening and all(address.ip == "127.0.0.1" for address in listening), listening
    outside = [
        a.address
        for addresses in psutil.net_if_addrs().values()
        for a in addresses
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    for address in outside[:2]:  # the same port on another interface of this machine: nobody there
        with socket.socket() as sock, pytest.raises(OSError):
            sock.settimeout(2)
            sock.connect((address, server["port"]))


def login(server) -> httpx.Client:
    client = httpx.Client(base_url=server["url"], timeout=60)
    response = client.post("login", data={"username": AUTH[0], "password": AUTH[1]})
    assert response.status_code == 200 and response.json() == {"success": True}
    return client


def test_auth_guards_every_route(server, tmp_path):
    cached = next((p for p in Path(server["cache"]).rglob("*") if p.is_file()), None)
    anonymous = httpx.Client(base_url=server["url"], timeout=60)
    guarded = {
        ("GET", "config"),
        ("GET", "gradio_api/info"),
        ("POST", "gradio_api/upload"),
        ("POST", "gradio_api/queue/join"),
        ("POST", "gradio_api/call/generate"),
        ("POST", "gradio_api/call/train_concept"),
        ("GET", f"gradio_api/file={server['library'] / 'resident' / 'adapter.safetensors'}"),
    }
    if cached is not None:
        guarded.add(("GET", f"gradio_api/file={cached}"))
    for method, route in sorted(guarded):
        kwargs = {"files": {"files": ("a.png", b"x")}} if route.endswith("upload") else {}
        if route.endswith(("join", "generate", "train_concept")):
            kwargs = {"json": {"data": []}}
        status = anonymous.request(method, route, **kwargs).status_code
        assert status == 401, (method, route, status)
    wrong = anonymous.post("login", data={"username": AUTH[0], "password": "guess"})
    assert wrong.status_code in (400, 401) and "access-token" not in "".join(anonymous.cookies.keys())
    with pytest.raises(ValueError):
        api_client(server, tmp_path / "dl", auth=None)
    authed = login(server)
    assert authed.get("config").status_code == 200 and authed.get("gradio_api/info").status_code == 200
    record_stats("auth", routes_refused_anonymously=len(guarded), wrong_password_refused=True)


# ----- file serving -----------------------------------------------------------------------------------


def test_downloads_serve_only_what_the_app_handed_out(server, tmp_path):
    client = api_client(server, None)  # no download: the answer carries the server's URL of the file
    exported = client.predict("resident", "spectral", api_name="/export_concept")
    http = login(server)
    handed = exported[0]
    served = http.get(handed["url"].split(server["url"].rstrip("/"), 1)[-1].lstrip("/"))
    library_adapter = server["library"] / "resident" / "adapter.safetensors"
    outputs_copy = next(Path(server["outputs"]).rglob("resident.safetensors"))  # what Service wrote
    # the export is the library's adapter plus its card (preview, image count) in the metadata
    assert served.status_code == 200 and served.content == outputs_copy.read_bytes()
    cache = Path(server["cache"])
    forbidden = [
        library_adapter,
        server["library"] / "resident" / "concept.json",
        outputs_copy,
        server["log"],
        ROOT / "app.py",
        ROOT / "spectral_diffusion" / "library" / "store.py",
        Path("/etc/passwd"),
        Path("/proc/self/environ"),
        f"{cache}/../library/resident/adapter.safetensors",
        f"{cache}/../server.log",
        "../../../../etc/passwd",
        "..%2f..%2f..%2fetc%2fpasswd",
        f"{urllib.parse.quote(str(library_adapter))}",
        f"http://127.0.0.1:{server['port']}/config",
        "file:///etc/passwd",
    ]
    refused = 0
    for target in forbidden:
        status = http.get(f"gradio_api/file={target}").status_code
        assert status in (403, 404), (target, status)
        refused += 1
    record_stats("downloads", served_ok=1, refused=refused)


# ----- names and overwrites -------------------------------------------------------------------------


ESCAPING_NAMES = [
    "../evil",
    "..",
    "/tmp/evil",
    "..\\evil",
    "%2e%2e%2fevil",
    ".hidden",
    "con",
    "evil\x00",
    "resident/../../evil",
    "~/evil",
]


def test_concept_names_cannot_escape_the_library(server, tmp_path):
    library = Path(server["library"])
    around = library.parent
    outside_before = sorted(p.name for p in around.iterdir())
    client = api_client(server, tmp_path / "dl")
    adapter = save_adapter(make_adapter("visitor", 6), tmp_path / "visitor.safetensors")
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (48, 48), (10, 200, 10)).save(photo)
    before = snapshot(library)
    refused = 0
    for name in ESCAPING_NAMES:
        for endpoint, args in (
            ("/import_concept", (handle_file(adapter), name)),
            ("/delete_concept", (name, True)),
            ("/export_concept", (name, "spectral")),
            ("/train_concept", ([handle_file(photo)] * 3, name, "", "additive", 4, 1)),
        ):
            with pytest.raises(AppError):
                client.predict(*args, api_name=endpoint)
            refused += 1
    assert snapshot(library) == before
    assert sorted(p.name for p in around.iterdir()) == outside_before
    assert not Path("/tmp/evil").exists()
    record_stats("names", attempts=refused, refused=refused)


def test_uploads_cannot_overwrite_existing_concepts(server, tmp_path):
    library = Path(server["library"])
    resident_before = snapshot(library / "resident")
    client = api_client(server, tmp_path / "dl")
    same_name = save_adapter(make_adapter("resident", 5, seed=9), tmp_path / "resident.safetensors")
    other = make_adapter("other", 0, seed=3)
    same_slot = save_adapter(other, tmp_path / "other.safetensors")
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (48, 48), (200, 200, 10)).save(photo)
    attempts = [
        ("/import_concept", (handle_file(same_name), ""), "already in the library"),
        ("/import_concept", (handle_file(same_slot), "resident"), "already in the library"),
        ("/import_concept", (handle_file(same_slot), "newcomer"), "slot 0 .* is taken by concept 'resident'"),
        ("/train_concept", ([handle_file(photo)] * 3, "resident", "", "additive", 4, 1), "already in the library"),
    ]
    for endpoint, args, message in attempts:
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name=endpoint)
    # a raw upload whose file name tries to climb into the library lands in gradio's cache, renamed
    http = login(server)
    response = http.post(
        "gradio_api/upload",
        files={"files": ("../../library/resident/adapter.safetensors", io.BytesIO(b"overwritten?"))},
    )
    assert response.status_code == 200
    (stored,) = response.json()
    assert Path(stored).resolve().is_relative_to(Path(server["cache"]).resolve()), stored
    assert snapshot(library / "resident") == resident_before
    assert not (library / "newcomer").exists()
    record_stats("overwrites", attempts=len(attempts) + 1, refused=len(attempts) + 1)
