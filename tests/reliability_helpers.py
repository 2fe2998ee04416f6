"""Shared by the reliability tests (test_fuzz_adapter, test_uploads, test_faults, test_load,
test_security): a cached trained-looking adapter of builtin:tiny, library snapshots, figures.

Figures: when ``SD_RELIABILITY_STATS`` names a file, every test module appends one JSON line per
measurement to it (inputs tried, faults injected, requests served, failures, memory); the numbers in
docs/reliability.md come from such a run. Without the variable nothing is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path

from bench.support import ROOT, leftovers, make_adapter, rss_mb, snapshot, tiny_adapters  # noqa: F401 - shared

RANK = 4  # make_adapter's default rank


def record_stats(section: str, **numbers) -> None:
    """Append one measurement to ``$SD_RELIABILITY_STATS`` (JSON lines), if set."""
    path = os.environ.get("SD_RELIABILITY_STATS")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"section": section, "time": time.time(), **numbers}) + "\n")


def tiny_pipeline():
    """The process's patched builtin:tiny (needs the ``models_home`` fixture to have run)."""
    return tiny_adapters()[0]


def tiny_fingerprint_and_capacity(rank: int = RANK) -> tuple[str, int]:
    _, adapters = tiny_adapters()
    return adapters.fingerprint, adapters.capacity(rank)


def renamed(data, name: str):
    info = dataclasses.replace(data.info, name=name, tokens=[f"<{name}>"])
    return dataclasses.replace(data, info=info)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python: offline, one thread, the package importable, quiet."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        GRADIO_ANALYTICS_ENABLED="False",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition", process=None):
    """Poll ``predicate`` until true; fail with ``what`` (and the child's fate) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"child exited with {process.returncode} before {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


PYTHON = sys.executable


# ----- one app server process shared by test_load and test_security -----------------------------

AUTH = ("ada", "s3cret-pass")
_SERVER: dict | None = None


def app_server(request) -> dict:
    """Start ``tests/app_server.py`` once (with --auth, on a free loopback port, host left to app.launch's
    default) and return its facts: url, pid, base, library, outputs, cache, auth. A library concept
    "resident" (slot 0) exists from the start. Stopped by ``stop_app_server`` or at the session's end."""
    global _SERVER
    if _SERVER is not None and _SERVER["process"].poll() is None:
        return _SERVER
    import subprocess

    from spectral_diffusion.library.store import Library

    models_home = request.getfixturevalue("models_home")
    base = request.getfixturevalue("tmp_path_factory").mktemp("app-server")
    library, outputs, cache = base / "library", base / "outputs", base / "gradio-cache"
    Library(library).add(make_adapter("resident", 0))
    port = free_port()
    log = base / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                PYTHON,
                str(ROOT / "tests" / "app_server.py"),
                "--library",
                str(library),
                "--outputs",
                str(outputs),
                "--port",
                str(port),
                "--auth",
                ":".join(AUTH),
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(SPECTRAL_DIFFUSION_HOME=str(models_home), GRADIO_TEMP_DIR=str(cache)),
        )
    ready = wait_for(
        lambda: [line for line in log.read_text(errors="replace").splitlines() if line.startswith("READY ")],
        180,
        what="the app server",
        process=process,
    )
    _SERVER = {
        "url": ready[0].split()[1].rstrip("/") + "/",
        "port": port,
        "pid": process.pid,
        "process": process,
        "base": base,
        "library": library,
        "outputs": outputs,
        "cache": cache,
        "auth": AUTH,
        "log": log,
    }
    request.session.addfinalizer(stop_app_server)
    return _SERVER


def stop_app_server() -> None:
    global _SERVER
    if _SERVER is None:
        return
    process = _SERVER["process"]
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except Exception:  # noqa: BLE001
            process.kill()
            process.wait(timeout=20)
    _SERVER = None


def api_client(server: dict, downloads: Path | None, auth=AUTH):
    """A gradio_client for the shared server; ``downloads`` None: results name files by URL, unfetched."""
    from gradio_client import Client

    return Client(
        server["url"],
        auth=auth,
        verbose=False,
        analytics_enabled=False,
        download_files=str(downloads) if downloads is not None else False,
    )
