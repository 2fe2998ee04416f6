"""Issue 8, item 4: concurrency and load against the app (app.py) in its own process on 127.0.0.1.

Two trainings requested at the same instant: one runs, the other is refused with a message, and the
library ends with one new concept in its own slot. Then a bounded load: a few gradio_client threads
call ``generate`` back to back for a fixed time; every call must succeed and the server's resident
memory must stay flat. (Across processes, two trainings are covered by test_faults: the second is
refused or given another slot.) Only loopback traffic, bounded in count and time.
"""

from __future__ import annotations

import statistics
import threading
import time

import pytest

from bench.support import photos as images
from spectral_diffusion.library.store import Library

from .reliability_helpers import api_client, app_server, record_stats, rss_mb

pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

THREADS = 4
DURATION_S = 20.0
WARMUP_CALLS = 3
RSS_GROWTH_LIMIT_MB = 150
GENERATE = ("a photo of <resident> on a sofa", "resident", "", 0, 2, 7.5, 32, 32, 1, "default")


@pytest.fixture(scope="module")
def server(request):
    return app_server(request)


@pytest.mark.timeout(300)
def test_two_trainings_requested_at_once(server, tmp_path):
    uploads = images(tmp_path / "photos")
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def request(name: str) -> None:
        client = api_client(server, tmp_path / f"dl-{name}")
        files = [handle_file(p) for p in uploads]
        barrier.wait()  # both requests leave together
        try:
            outcomes[name] = client.predict(files, name, "", "additive", 4, 1, api_name="/train_concept")[2]
        except AppError as error:
            outcomes[name] = error

    threads = [threading.Thread(target=request, args=(name,)) for name in ("racer-a", "racer-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    refused = {n: o for n, o in outcomes.items() if isinstance(o, AppError)}
    trained = {n: o for n, o in outcomes.items() if not isinstance(o, AppError)}
    assert len(refused) == 1 and len(trained) == 1, outcomes
    assert "a training" in str(next(iter(refused.values()))) and "already running" in str(next(iter(refused.values())))
    ((winner, record),) = trained.items()
    library = Library(server["library"])
    slots = {r.name: r.slot for r in library.list()}
    assert slots["resident"] == 0 and slots[winner] == record["slot"] == 1
    assert len(set(slots.values())) == len(slots)  # never two concepts in one slot
    assert next(iter(refused)) not in slots
    record_stats("training-race", requests=2, trained=1, refused=1, refusal=str(next(iter(refused.values())))[:120])


@pytest.mark.timeout(300)
def test_sustained_generate_load_all_succeed_and_memory_stays_flat(server, tmp_path):
    warm = api_client(server, tmp_path / "dl-warm")
    for seed in range(WARMUP_CALLS):  # loads the model; caches fill
        warm.predict(*GENERATE[:3], seed, *GENERATE[4:], api_name="/generate")
    rss_start = rss_mb(server["pid"])
    samples = [rss_start]
    stop = threading.Event()

    def monitor() -> None:
        while not stop.wait(0.5):
            samples.append(rss_mb(server["pid"]))

    served, failures, latencies = [], [], []
    lock = threading.Lock()
    deadline = time.monotonic() + DURATION_S

    def worker(index: int) -> None:
        client = api_client(server, tmp_path / f"dl-{index}")
        seed = 1000 * index
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                gallery, info = client.predict(*GENERATE[:3], seed, *GENERATE[4:], api_name="/generate")
                assert len(gallery) == 1 and info.startswith(f"1 image(s), seed {seed} "), (gallery, info)
                with lock:
                    served.append(seed)
                    latencies.append(time.monotonic() - started)
            except Exception as error:  # noqa: BLE001 - counted, then reported by the assertion
                with lock:
                    failures.append(f"{type(error).__name__}: {error}")
            seed += 1

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=DURATION_S + 180)
    stop.set()
    watcher.join()
    rss_end = rss_mb(server["pid"])
    growth = rss_end - rss_start
    record_stats(
        "load",
        threads=THREADS,
        duration_s=DURATION_S,
        requests=len(served) + len(failures),
        served=len(served),
        failures=len(failures),
        rss_start_mb=round(rss_start),
        rss_end_mb=round(rss_end),
        rss_max_mb=round(max(samples)),
        rss_growth_mb=round(growth, 1),
        latency_median_s=round(statistics.median(latencies), 2) if latencies else None,
        latency_max_s=round(max(latencies), 2) if latencies else None,
    )
    assert failures == [], failures[:5]
    assert len(served) >= THREADS, f"only {len(served)} requests served in {DURATION_S} s"
    assert len(set(served)) == len(served)
    assert growth < RSS_GROWTH_LIMIT_MB, f"server RSS grew {growth:.0f} MB ({rss_start:.0f} -> {rss_end:.0f} MB)"
    assert max(samples) - rss_start < RSS_GROWTH_LIMIT_MB
    assert server["process"].poll() is None
