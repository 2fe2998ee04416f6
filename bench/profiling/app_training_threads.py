"""Why training in the web app ran 1.4-1.7x slower than the CLI (issue 24), measured.

    python -m bench.profiling.app_training_threads [--steps 40] [--model builtin:toy] [--json OUT]

The same training (previews off) three ways, each in a fresh process, reporting the median seconds per
optimiser step and the training thread's voluntary context switches per step:

- ``cli``: the training runs in the only thread that ever ran torch (as ``spectral-diffusion train``);
- ``app-before``: a long-lived thread (what a gradio worker thread is) first runs the page's refresh
  (the model's fingerprint and spectrum: torch work), then ``Service.train`` trains in its own thread
  while that worker thread lives on, as the app did before this fix;
- ``app-now``: the same, the refresh run through ``webapp.calls.in_own_thread``, as the app binds every
  plain handler now.

torch's OpenMP runtime (libgomp) gives each thread that runs torch ops a team of helper threads for the
thread's life; while the live teams hold more threads than the machine has CPUs it spins only briefly
between parallel regions and then sleeps, so every region of the training pays a sleep and a wake-up
(the context switches). Prints one JSON object; run it on a quiet machine (another busy process changes
the picture: see the README's "Web app" section).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.support import ROOT

VARIANTS = ("cli", "app-before", "app-now")


def _photos(folder: Path) -> list[Path]:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(5):
        image = Image.new("RGB", (64, 64), (240 - 30 * i, 200, 40))
        ImageDraw.Draw(image).ellipse((8 + 2 * i, 10, 54, 56 - i), fill=(30 + 40 * i, 60, 200))
        paths.append(folder / f"shape-{i}.png")
        image.save(paths[-1])
    return paths


def _one(variant: str, model: str, steps: int) -> dict:
    """Run one variant in this process; returns its step timings."""
    from spectral_diffusion.frontends.workflows import TrainRequest

    work = Path(tempfile.mkdtemp(prefix="app-threads-"))
    photos = _photos(work / "photos")
    request = TrainRequest(name="probe", images=[str(p) for p in photos], steps=steps, preview_every=0)
    stamps: list[tuple[float, int]] = []

    def on_step(_update) -> None:  # called in the training thread after every step
        stamps.append((time.perf_counter(), resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw))

    if variant == "cli":
        from spectral_diffusion.core.model import SpectralAdapters
        from spectral_diffusion.frontends.workflows import train_into_library
        from spectral_diffusion.library import Library
        from spectral_diffusion.models.registry import load_pipeline

        pipe = load_pipeline(model)
        probe = SpectralAdapters.from_pipeline(pipe)
        fingerprint, capacity = probe.fingerprint, probe.capacity(request.rank_for(model))
        probe.unpatch()
        train_into_library(
            Library(work / "library"),
            pipe,
            request,
            photos,
            model=model,
            fingerprint=fingerprint,
            capacity=capacity,
            progress=on_step,
        )
    else:
        from spectral_diffusion.frontends.service import Service
        from webapp import page
        from webapp.calls import in_own_thread
        from webapp.forms import CONCEPT_ROWS

        service = Service(model=model, library=work / "library", output_dir=work / "outputs")
        refresh = page.refresh if variant == "app-before" else in_own_thread(page.refresh)
        ready, stop = threading.Event(), threading.Event()

        def gradio_worker() -> None:  # a worker thread of the server: it outlives every request
            refresh(service, None, [None] * CONCEPT_ROWS)
            ready.set()
            stop.wait()

        worker = threading.Thread(target=gradio_worker, daemon=True)
        worker.start()
        ready.wait()
        try:
            service.train(request, on_step)
        finally:
            stop.set()
            worker.join()
    steady = stamps[2:]  # no first-step warm-up
    durations = [b[0] - a[0] for a, b in zip(steady, steady[1:], strict=False)]
    switches = (stamps[-1][1] - stamps[2][1]) / max(len(stamps) - 3, 1)
    return {
        "variant": variant,
        "s_per_step": round(statistics.median(durations), 4),
        "switches_per_step": round(switches, 1),
        "steps_timed": len(durations),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--model", default="builtin:toy")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(_one(args.variant, args.model, args.steps)), flush=True)
        return 0
    runs = []
    for _ in range(args.rounds):
        for variant in VARIANTS:
            load = os.getloadavg()[0]
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.profiling.app_training_threads",
                    "--variant",
                    variant,
                    "--model",
                    args.model,
                    "--steps",
                    str(args.steps),
                ],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            ).stdout
            runs.append({**json.loads(out.strip().splitlines()[-1]), "load1_before": round(load, 2)})
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    best = {v: min(r["s_per_step"] for r in runs if r["variant"] == v) for v in VARIANTS}
    summary = {
        "model": args.model,
        "steps": args.steps,
        "cpus": os.cpu_count(),
        "runs": runs,
        "fastest_s_per_step": best,
        "app_before_vs_cli": round(best["app-before"] / best["cli"], 2),
        "app_now_vs_cli": round(best["app-now"] / best["cli"], 2),
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        from spectral_diffusion.atomic import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
