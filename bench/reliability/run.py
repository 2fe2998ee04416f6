"""Reliability at scale (issue 17): fuzzed adapter files and hostile uploads, and the app soak.

    python -m bench.reliability.run fuzz [--long] [--files N] [--uploads N] [--json OUT]
    python -m bench.reliability.run soak [--long] [--seconds S] [--clients N] [--json OUT]

``fuzz`` generates adapter files (random bytes, truncated, bit-flipped, shape- and metadata-mangled,
huge declared sizes, valid but foreign, NaN/inf written into tensors) and passes every one through
``read_adapter``, ``read_bundle``, ``load_adapter`` (into a patched builtin:tiny) and
``Library.import_file``; then hostile uploads (formats, modes, sizes, names, damage) through
``Service.start_training``, whose training itself is replaced by a no-op: only the checks run. Every
outcome must be a success or the documented error (a ``SpectralDiffusionError``; ``AdapterFormatError``
for the two readers), within 5 s, and the process's address space is capped (``RLIMIT_AS``) 1 GB above
its size after warm-up, so a read that allocated what a header declares would fail. The default is a
fast sample (the suite runs it); ``--long`` runs 10 000 files and 2 000 uploads.

``soak`` starts the app (``python app.py --model builtin:tiny``) on 127.0.0.1 and runs ``--clients``
gradio_client clients that generate, list, export, import and delete their own concepts while one
training runs; a second training request must get the "one training at a time" answer. Default 45 s;
``--long`` 5 minutes. It reports calls, refusals, failures (must be 0) and the server's RSS.

Both print one JSON summary (and write it to ``--json``); the exit status is 1 on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import random
import resource
import shutil
import struct
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

from bench.support import ROOT

logger = logging.getLogger("bench.reliability.run")

CALL_LIMIT_S = 5.0
HEADROOM_MB = 1024
FIXED_TIME = "2025-01-01T00:00:00+00:00"


def _vm_kb(field: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


# ----- adapter files -------------------------------------------------------------------------------


def _foreign(rng: random.Random, valid: bytes, bundle: bytes) -> bytes:
    """Valid files, but not what the reader expects: another base model, a bundle, a LoRA, a cache."""
    import torch
    from safetensors.torch import save as save_bytes

    from bench.reliability.mutations import join, split

    choice = rng.randrange(5)
    if choice == 0:  # an adapter trained on another base model
        header, data = split(valid)
        header["__metadata__"]["base_fingerprint"] = f"{rng.getrandbits(64):016x}"
        return join(header, data)
    if choice == 1:  # the other container format
        return bundle if rng.random() < 0.5 else valid
    if choice == 2:  # a LoRA file
        tensors = {
            f"lora_unet_down_{i}.lora_{side}.weight": torch.randn(4, 8)
            for i in range(rng.randint(1, 6))
            for side in ("up", "down")
        }
        return save_bytes(tensors, metadata={"ss_network_dim": "4"})
    if choice == 3:  # a random safetensors file with spectral metadata
        header, _ = split(valid)
        meta = {k: v for k, v in header["__metadata__"].items()}
        return save_bytes({f"unet.x{i}.A": torch.randn(rng.randint(1, 5)) for i in range(3)}, metadata=meta)
    header, data = split(valid)  # the same concept declared in another slot: valid, maybe clashing
    header["__metadata__"]["slot"] = str(rng.randrange(0, 8))
    return join(header, data)


def _huge(rng: random.Random, valid: bytes) -> bytes:
    from bench.reliability.mutations import join, split, tensor_keys

    header, data = split(valid)
    key = rng.choice(tensor_keys(header))
    choice = rng.randrange(6)
    if choice == 0:
        return struct.pack("<Q", rng.choice([2**63 - 1, 2**64 - 1, 2**40, len(valid)])) + valid[8:]
    if choice == 1:
        header[key]["shape"] = rng.choice([[2**31 - 1, 2**31 - 1], [2**62], [2**30] * 4, [2**20, 2**20]])
    elif choice == 2:
        header[key]["data_offsets"] = [0, rng.choice([2**42, 2**64 + 7, 2**63])]
    elif choice == 3:
        header["__metadata__"]["rank"] = str(rng.choice([10**6, 2**31, 10**12]))
    elif choice == 4:
        header["__metadata__"]["tokens"] = json.dumps([f"<t{i}>" for i in range(rng.choice([10**4, 10**5]))])
    else:
        depth = rng.choice([2000, 20000, 100000])
        header["__metadata__"][rng.choice(["tokens", "targets", "train_config"])] = "[" * depth + "]" * depth
    return join(header, data)


def adapter_kinds():
    from bench.reliability.mutations import MUTATORS

    kinds = {name: (lambda rng, valid, bundle, f=f: f(rng, valid)) for name, f in MUTATORS.items()}
    kinds["NaN/inf in tensors"] = kinds.pop("tensor data mangled")
    kinds["huge declared sizes"] = lambda rng, valid, bundle: _huge(rng, valid)
    kinds["valid but foreign"] = _foreign
    kinds["damaged bundle"] = lambda rng, valid, bundle: MUTATORS[rng.choice(sorted(MUTATORS))](rng, bundle)
    return kinds


def _timed(tally: Counter, target: str, call, allowed: tuple[type, ...], slowest: list[float]) -> object | None:
    started = time.perf_counter()
    try:
        result = call()
        tally[(target, "accepted")] += 1
    except allowed as error:
        tally[(target, type(error).__name__)] += 1
        result = None
    except BaseException as error:  # noqa: BLE001 - what the fuzzing looks for
        tally[(target, f"UNEXPECTED {type(error).__name__}")] += 1
        logger.error("%s: unexpected %s: %s", target, type(error).__name__, str(error)[:300])
        result = None
    elapsed = time.perf_counter() - started
    slowest[0] = max(slowest[0], elapsed)
    if elapsed > CALL_LIMIT_S:
        tally[(target, "UNEXPECTED slow")] += 1
    return result


def _valid_files(work: Path):
    from bench.reliability.mutations import join, split
    from bench.support import make_adapter
    from spectral_diffusion.formats.adapter_file import save_adapter
    from spectral_diffusion.formats.bundle import write_bundle

    valid = save_adapter(
        dataclasses.replace(make_adapter("fuzzed", 3), created_at=FIXED_TIME), work / "valid.safetensors"
    ).read_bytes()
    concepts = {"dog": make_adapter("dog", 1), "cat": make_adapter("cat", 2, variant="rotational", seed=1)}
    header, data = split(write_bundle(concepts, work / "bundle.safetensors", {"dog": 1.0, "cat": 0.5}).read_bytes())
    header["__metadata__"]["created_at"] = FIXED_TIME
    return valid, join(header, data)


def fuzz_adapters(count: int, seed: int, work: Path) -> dict:
    from bench.reliability.mutations import check_accepted
    from bench.support import make_adapter, snapshot, tiny_adapters
    from spectral_diffusion.errors import AdapterFormatError, SpectralDiffusionError
    from spectral_diffusion.formats.adapter_file import load_adapter, read_adapter
    from spectral_diffusion.formats.bundle import read_bundle
    from spectral_diffusion.library.store import Library

    valid, bundle = _valid_files(work)
    adapters = tiny_adapters()[1]
    library = Library(work / "library")
    library.add(make_adapter("resident", 0))
    before = snapshot(library.root)
    kinds = adapter_kinds()
    names = sorted(kinds)
    rng = random.Random(seed)
    tally: Counter = Counter()
    by_kind: Counter = Counter()
    slowest = [0.0]
    path = work / "fuzzed.safetensors"
    for index in range(count):
        kind = names[index % len(names)]
        by_kind[kind] += 1
        path.write_bytes(kinds[kind](rng, valid, bundle))
        data = _timed(tally, "read_adapter", lambda: read_adapter(path), (AdapterFormatError,), slowest)
        if data is not None:
            check_accepted(data)
        for data in _timed(tally, "read_bundle", lambda: read_bundle(path), (AdapterFormatError,), slowest) or ():
            check_accepted(data)
        info = _timed(tally, "load_adapter", lambda: load_adapter(adapters, path), (SpectralDiffusionError,), slowest)
        if info is not None:
            adapters.remove_concept(info.name)
        record = _timed(
            tally,
            "import_file",
            lambda: library.import_file(path, base_fingerprint=adapters.fingerprint),
            (SpectralDiffusionError,),
            slowest,
        )
        if record is not None:
            library.delete(record.name)
        if (index % 97 == 0 or record is not None) and snapshot(library.root) != before:
            tally[("import_file", "UNEXPECTED library changed")] += 1
            before = snapshot(library.root)
    return {
        "files": count,
        "by_kind": dict(by_kind),
        "outcomes": _nested(tally),
        "slowest_ms": round(slowest[0] * 1000),
    }


def _nested(tally: Counter) -> dict:
    out: dict[str, dict[str, int]] = {}
    for (target, outcome), number in sorted(tally.items()):
        out.setdefault(target, {})[outcome] = number
    return out


# ----- uploads -------------------------------------------------------------------------------------

FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]
NAMES = [
    "photo",
    "Ünïcödé фото",
    "with space",
    "-leading-dash",
    "x" * 200,
    "UPPER",
    "dots.in.name",
    "emoji-🐶",
    "semi;colon",
    "quote'n\"",
    "tab\tname",
]
EXTENSIONS = [".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".PNG", ".JpG", ".txt", ".zip", ""]
CONCEPT_NAMES = ["upload", "../evil", "", " ", "a" * 300, "con", ".hidden", "ok-name", "evil\0", "名前"]


def _image_bytes(rng: random.Random) -> bytes:
    from PIL import Image

    mode = rng.choice(MODES)
    size = (rng.choice([1, 2, 7, 31, 64, 257]), rng.choice([1, 3, 16, 64, 129]))
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    with contextlib.suppress(ValueError):
        image = image.convert(mode)
    buffer = io.BytesIO()
    for fmt in [rng.choice(FORMATS), "TIFF", "PNG"]:
        try:
            image.save(buffer, format=fmt)
            break
        except (OSError, ValueError, KeyError):
            buffer = io.BytesIO()
    return buffer.getvalue()


def _damaged(rng: random.Random, content: bytes) -> bytes:
    choice = rng.randrange(5)
    if choice == 0 and content:
        return content[: rng.randrange(len(content))]
    if choice == 1 and content:
        buffer = bytearray(content)
        for _ in range(rng.randint(1, 16)):
            buffer[rng.randrange(len(buffer))] ^= 1 << rng.randrange(8)
        return bytes(buffer)
    if choice == 2:
        return rng.randbytes(rng.randint(0, 4096))
    if choice == 3:
        return b""
    return content + rng.randbytes(rng.randint(1, 512))  # trailing garbage


def _upload_file(rng: random.Random, folder: Path, index: int) -> Path:
    from bench.support import png_bomb, sparse

    name = f"{index:05d}-{rng.choice(NAMES)}{rng.choice(EXTENSIONS)}"
    path = folder / name
    roll = rng.random()
    if roll < 0.03:
        return png_bomb(path, rng.choice([20000, 30000]), 30000, rows=1)
    if roll < 0.05:
        return sparse(path, 65 * 2**20)
    if roll < 0.07:
        path.mkdir()
        return path  # a folder where a file should be
    if roll < 0.09:
        path.symlink_to(rng.choice(["/etc/passwd", "/nonexistent", str(folder)]))
        return path
    if roll < 0.10:
        return folder / f"missing-{index}.png"
    content = _image_bytes(rng)
    path.write_bytes(_damaged(rng, content) if rng.random() < 0.4 else content)
    return path


def fuzz_uploads(count: int, seed: int, work: Path) -> dict:
    from spectral_diffusion.errors import SpectralDiffusionError
    from spectral_diffusion.frontends.service import Service
    from spectral_diffusion.frontends.workflows import TrainRequest
    from spectral_diffusion.images import check_uploads

    service = Service(model="builtin:tiny", library=work / "upload-library", output_dir=work / "outputs")
    service._train_locked = lambda request, paths, progress: None  # only the checks: no training
    rng = random.Random(seed)
    tally: Counter = Counter()
    slowest = [0.0]
    folder = work / "uploads"
    for index in range(count):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        files = [_upload_file(rng, folder, i) for i in range(rng.choice([1, 1, 2, 3, 4]))]
        source = folder if rng.random() < 0.2 else files
        name = rng.choice(CONCEPT_NAMES) if rng.random() < 0.3 else f"upload-{index}"
        if rng.random() < 0.5:
            future = _timed(
                tally,
                "start_training",
                lambda name=name, source=source: service.start_training(TrainRequest(name, source)),
                (SpectralDiffusionError,),
                slowest,
            )
            if future is not None:
                future.result(timeout=30)
        else:
            _timed(
                tally, "check_uploads", lambda source=source: check_uploads(source), (SpectralDiffusionError,), slowest
            )
    if (work / "upload-library").exists() and any((work / "upload-library").iterdir()):
        tally[("start_training", "UNEXPECTED library written")] += 1
    return {"uploads": count, "outcomes": _nested(tally), "slowest_ms": round(slowest[0] * 1000)}


def run_fuzz(files: int, uploads: int, seed: int = 17) -> dict:
    import torch

    torch.set_num_threads(1)
    logging.getLogger("spectral_diffusion").setLevel(logging.CRITICAL)  # refusals are logged as warnings
    from bench.support import tiny_adapters

    tiny_adapters()
    with tempfile.TemporaryDirectory(prefix="sd-fuzz-") as tmp:
        work = Path(tmp)
        (work / "warm").mkdir()
        fuzz_adapters(12, seed, work / "warm")  # warm-up: first-call allocations of torch and safetensors
        limit = _vm_kb("VmSize") * 1024 + HEADROOM_MB * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        rss_start = _vm_kb("VmRSS") / 1024
        started = time.perf_counter()
        (work / "a").mkdir()
        (work / "u").mkdir()
        adapters = fuzz_adapters(files, seed, work / "a")
        upload_report = fuzz_uploads(uploads, seed, work / "u")
        try:  # the cap holds: an allocation past the headroom fails
            torch.empty(HEADROOM_MB * 2**20 * 2, dtype=torch.uint8).fill_(1)
            cap_enforced = False
        except (MemoryError, RuntimeError):
            cap_enforced = True
    unexpected = sum(
        n
        for part in (adapters, upload_report)
        for outcomes in part["outcomes"].values()
        for outcome, n in outcomes.items()
        if outcome.startswith("UNEXPECTED")
    )
    return {
        "adapter_files": adapters,
        "uploads": upload_report,
        "unexpected": unexpected,
        "address_space_cap_mb": round(limit / 2**20),
        "cap_enforced": cap_enforced,
        "rss_start_mb": round(rss_start),
        "rss_end_mb": round(_vm_kb("VmRSS") / 1024),
        "rss_peak_mb": round(_vm_kb("VmHWM") / 1024),
        "seconds": round(time.perf_counter() - started, 1),
    }


# ----- soak ----------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(library: Path, work: Path, models_home: str | None = None):
    """``python app.py --model builtin:tiny --library LIBRARY --port N`` on 127.0.0.1; (process, url)."""
    import subprocess
    import urllib.request

    port = _free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_TEMP_DIR=str(work / "gradio-cache"),
        PYTHONUNBUFFERED="1",
    )
    if models_home:
        env["SPECTRAL_DIFFUSION_HOME"] = models_home
    log = open(work / "app.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "app.py"),
            "--model",
            "builtin:tiny",
            "--library",
            str(library),
            "--port",
            str(port),
            "--outputs",
            str(work / "outputs"),
        ],
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited ({process.returncode}): {(work / 'app.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url + "config", timeout=2).read()
            return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the app did not start in 240 s")


SOAK_RSS_GROWTH_LIMIT_MB = 600  # the training's model copy and optimiser included
BUSY = "already running"  # the "one training at a time" answer


class SoakClient:
    """One user: generates with, exports, imports and deletes concepts of its own, and lists."""

    def __init__(
        self,
        index: int,
        url: str,
        work: Path,
        adapter_file: Path,
        deadline: float,
        tally: Counter,
        failures: list,
        lock: threading.Lock,
    ):
        from gradio_client import Client

        self.index, self.work, self.adapter_file, self.deadline = index, work, adapter_file, deadline
        self.tally, self.failures, self.lock = tally, failures, lock
        self.client = Client(url, verbose=False, analytics_enabled=False, download_files=str(work / f"dl-{index}"))

    def call(self, what: str, *args, refusal: str | None = None):
        from gradio_client.exceptions import AppError

        try:
            result = self.client.predict(*args, api_name=f"/{what}")
        except AppError as error:
            if refusal is not None and refusal in str(error):
                with self.lock:
                    self.tally[(what, "refused as documented")] += 1
                return None
            with self.lock:
                self.failures.append(f"{what}: {error}")
            return None
        except Exception as error:  # noqa: BLE001 - counted and reported
            with self.lock:
                self.failures.append(f"{what}: {type(error).__name__}: {error}")
            return None
        with self.lock:
            self.tally[(what, "ok")] += 1
        return result

    def run(self) -> None:
        from gradio_client import handle_file

        round_ = 0
        while time.monotonic() < self.deadline:
            name = f"c{self.index}-{round_}"
            record = self.call("import_concept", handle_file(str(self.adapter_file)), name)
            if record is not None and record.get("name") != name:
                self.failures.append(f"import gave {record!r}")
            listed = self.call("list_concepts")
            if listed is not None and name not in [c["name"] for c in listed]:
                self.failures.append(f"{name} missing from the listing")
            self.call("generate", f"a photo of <c{self.index}>", name, "", round_, 1, 7.5, 32, 32, 1, "default")
            exported = self.call("export_concept", name, "spectral")
            if exported is not None and not Path(exported[0]).is_file():
                self.failures.append(f"export of {name} gave no file")
            self.call("delete_concept", name, True)
            round_ += 1


def run_soak(seconds: float, clients: int) -> dict:
    import torch
    from gradio_client import Client, handle_file

    torch.set_num_threads(1)
    from bench.support import leftovers, make_adapter, rss_mb
    from spectral_diffusion.formats.adapter_file import save_adapter
    from spectral_diffusion.library.store import Library

    with tempfile.TemporaryDirectory(prefix="sd-soak-") as tmp:
        work = Path(tmp)
        library = work / "library"
        Library(library).add(make_adapter("resident", 0))
        files = {}
        for i in range(clients):  # each client imports its own concept file under fresh names
            data = make_adapter(f"c{i}", 4 + i, rank=2)  # rank-2 slots 4-11: columns 8-23, beside slots 0-1
            files[i] = save_adapter(data, work / f"c{i}.safetensors")
        process, url = start_app(library, work, os.environ.get("SPECTRAL_DIFFUSION_HOME"))
        try:
            from bench.support import photos as _photos

            photos = [handle_file(str(p)) for p in _photos(work / "photos")]
            trainer = Client(url, verbose=False, analytics_enabled=False, download_files=str(work / "dl-train"))
            warm = SoakClient(-1, url, work, files[0], 0, Counter(), [], threading.Lock())
            warm.call("generate", "a photo", "resident", "", 0, 1, 7.5, 32, 32, 1, "default")  # loads the model
            rss = [rss_mb(process.pid)]
            steps = max(20, int(seconds * 4))  # longer than the soak: the training runs throughout
            job = trainer.submit(photos, "trainee", "", "additive", 4, steps, api_name="/train_concept")
            tally: Counter = Counter()
            failures: list[str] = []
            lock = threading.Lock()
            time.sleep(3)
            second = SoakClient(-2, url, work, files[0], 0, tally, failures, lock)
            second.call("train_concept", photos, "second", "", "additive", 4, 2, refusal=BUSY)
            if tally[("train_concept", "refused as documented")] != 1:
                failures.append("the second training was not refused with 'already running'")
            deadline = time.monotonic() + seconds
            users = [SoakClient(i, url, work, files[i], deadline, tally, failures, lock) for i in range(clients)]
            threads = [threading.Thread(target=u.run) for u in users]
            stop = threading.Event()

            def monitor() -> None:
                while not stop.wait(1.0):
                    rss.append(rss_mb(process.pid))

            watcher = threading.Thread(target=monitor, daemon=True)
            watcher.start()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=seconds + 300)
            training_running = not job.done()
            Client(url, verbose=False, analytics_enabled=False).predict(api_name="/cancel_training")
            try:
                job.result(timeout=300)
            except Exception as error:  # noqa: BLE001 - a cancel is reported to the client as an error
                if "cancel" not in str(error):
                    failures.append(f"training: {error}")
            stop.set()
            watcher.join()
            rss.append(rss_mb(process.pid))
            alive = process.poll() is None
        finally:
            process.terminate()
            process.wait(timeout=30)
        final = Library(library)
        names = {r.name: r.slot for r in final.list()}
        slots = list(names.values())
        valid = (
            names.get("resident") == 0
            and len(set(slots)) == len(slots)
            and not leftovers(library)
            and final.reservations() == []
            and all(not n.startswith("c") for n in names)
        )
        calls = sum(tally.values())
    return {
        "seconds": seconds,
        "clients": clients,
        "calls": calls + 1,
        "by_call": _nested(tally),
        "failures": len(failures),
        "failure_samples": failures[:5],
        "training_ran_throughout": training_running,
        "server_alive": alive,
        "library_valid": valid,
        "library_at_end": names,
        "rss_start_mb": round(rss[0]),
        "rss_end_mb": round(rss[-1]),
        "rss_peak_mb": round(max(rss)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["fuzz", "soak"])
    parser.add_argument("--long", action="store_true", help="the full counts: 10 000 files + 2 000 uploads; 5 min")
    parser.add_argument("--files", type=int, default=None)
    parser.add_argument("--uploads", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    warnings.simplefilter("ignore")  # PIL's notes on odd images it is asked to write or read
    if args.what == "fuzz":
        files = args.files or (10_000 if args.long else 300)
        uploads = args.uploads or (2_000 if args.long else 150)
        report = run_fuzz(files, uploads)
        ok = report["unexpected"] == 0 and report["cap_enforced"]
    else:
        report = run_soak(args.seconds or (300.0 if args.long else 45.0), args.clients)
        ok = (
            report["failures"] == 0
            and report["library_valid"]
            and report["server_alive"]
            and report["rss_peak_mb"] - report["rss_start_mb"] < SOAK_RSS_GROWTH_LIMIT_MB
        )
    text = json.dumps(report, indent=1, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
