"""Run every benchmark, print a table, write docs/benchmarks.md (+ plot), end with the RATIO line.

python -m bench.speed.run            # full run (about 15 minutes on 2 CPU cores)
python -m bench.speed.run --quick    # a few minutes: fewer rounds and shapes, no rank sweep, no reference step
                               # (prints only; add --write-docs to write docs/benchmarks.md anyway)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (
    METRIC,
    TEXT_TARGETS,
    THREADS,
    UNET_TARGETS,
    background_cores,
    build_clip_text,
    build_unet,
    cpu_snapshot,
    get_modules,
    machine_info,
    probe_background,
    set_modules,
    setup_torch,
    target_paths,
)
from bench.profiling import profiles
from bench.speed import files as bench_files
from bench.speed import infer as bench_infer
from bench.speed import layers as bench_layers
from bench.speed import memory as bench_memory
from bench.speed import report
from bench.speed import svd as bench_svd
from bench.speed import train as bench_train
from bench.support import ROOT

GPU_NOTE = "none (no GPU machine was available to this session through the device tool, so there is no GPU run)"


def log(message: str) -> None:
    print(message, flush=True)


def choose_threads(arg: str, background: float | None) -> tuple[int, str]:
    cores = os.cpu_count() or 1
    if arg != "auto":
        return int(arg), "set with --threads"
    want = min(THREADS, cores)
    if background is not None and background >= 0.5:
        free = max(1, round(cores - background))
        if free < want:
            return free, (
                f"other processes kept {background:.1f} of {cores} cores busy, and multi-threaded ops "
                "stall whenever one of their threads waits for a core, so one thread per free core, at "
                "least one"
            )
    return want, "all cores"


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def should_write_docs(args) -> bool:
    """A smoke run (--quick) must not replace the full run's figures unless asked to."""
    if args.no_write:
        return False
    return args.write_docs or not args.quick


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (fewer rounds, no rank sweep)")
    parser.add_argument("--threads", default="auto", help="torch threads (default: auto = free cores, at most 2)")
    parser.add_argument(
        "--metric",
        default="auto",
        choices=("auto", "wall", "cpu"),
        help="clock for the ratios (default: auto = wall, or this process's CPU time when other "
        "processes load the machine)",
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown report to write")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write the report or plot")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="write the report even for a --quick run (a full run writes it by default)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    started = time.perf_counter()

    loadavg_before = _loadavg()
    log("probing background load ...")
    background_before = probe_background(3.0)
    threads, threads_note = choose_threads(args.threads, background_before)
    setup_torch(threads)
    metric = args.metric
    if metric == "auto":
        metric = "cpu" if threads == 1 and (background_before or 0) >= 0.5 else "wall"
    METRIC["key"] = metric
    run_start = cpu_snapshot()
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m bench.speed.run"
        + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "quick": quick,
        "threads": threads,
        "threads_note": threads_note,
        "metric": metric,
        "gpu_note": GPU_NOTE if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "background_before": "unknown" if background_before is None else f"{background_before:.2f} cores",
        "loadavg_before": loadavg_before,
    }
    meta["command"] = meta["command"].strip()
    meta["machine"] = machine_info()
    log(f"threads: {threads} ({threads_note}); background load {meta['background_before']}; clock: {metric}")
    results: dict = {"meta": meta, "profiles": {}, "notes": []}
    scratch = tempfile.TemporaryDirectory(prefix="spectral-bench-")
    work = Path(scratch.name)
    cache_dir = work / "svd-cache"

    log("\n[2] per-layer forward + backward")
    results["layers"] = bench_layers.run(quick=quick, log=log)

    log(
        f"\n[5] memory of a training run: one process per variant, {bench_memory.QUICK_STEPS if quick else bench_memory.STEPS}"
        " steps each (peak RSS from the OS)"
    )
    results["memory"] = bench_memory.run(quick=quick, threads=threads, log=log)

    log("\n[3] SVD preparation: building an SD1.5-size UNet and a CLIP ViT-L text encoder (random weights) ...")
    unet = build_unet()
    clip = build_clip_text()
    results["svd"] = bench_svd.run(unet, clip, cache_dir, quick=quick, keep_full_unet=not quick, log=log)
    if results["svd"].speedup < report.SVD_GOAL and not quick:
        log("  goal missed: profiling per weight shape")
        weights = {
            f"unet.{p}": m.weight.detach() for p, m in get_modules(unet, target_paths(unet, UNET_TARGETS)).items()
        }
        weights.update(
            {f"text.{p}": m.weight.detach() for p, m in get_modules(clip, target_paths(clip, TEXT_TARGETS)).items()}
        )
        results["svd_profile"] = profiles.svd_profile(weights, log=log)
        del weights
    del clip
    gc.collect()

    log("\n[1] training step, rank 8")
    ctx = bench_train.build_context(unet, cache_dir, full_svd=results["svd"].full_svd or None)
    results["svd"].full_svd = {}
    gc.collect()
    rounds, warmup = (1, 1) if quick else (5, 1)
    train = bench_train.run_main(ctx, rank=8, rounds=rounds, warmup=warmup, with_reference=not quick, log=log)
    results["train"] = train
    if not quick and any(train.timings.ratio(v, "lora") > report.TRAIN_GOAL for v in bench_train.SPECTRAL):
        log("  goal missed: profiling one step of LoRA and of each spectral variant")
        results["profiles"].update(
            profiles.train_profiles(train.steps, train.before, names=("lora", *bench_train.SPECTRAL), log=log)
        )
    train.steps, train.before = {}, {}

    log("\n[5] adapter files")
    results["sizes"] = bench_files.file_sizes(ctx, work / "files")

    sweep = {8: train}
    if not quick:
        log("\n[7] training step vs rank")
        sweep = bench_train.run_sweep(ctx, ranks=(1, 2, 4, 8, 16, 32), rounds=2, known=sweep, log=log)
    results["sweep"] = sweep
    # free what only training needed
    set_modules(unet, ctx.plain)
    plain = ctx.plain
    ctx.peft.clear()
    ctx.reference = None
    ctx.reference_params = []
    del ctx
    gc.collect()

    log("\n[6] fusion of 8 concepts")
    fusion, adapters, layers = bench_files.fusion(
        unet, plain, cache_dir, work / "concepts", repeats=2 if quick else 3, log=log
    )
    results["fusion"] = fusion

    log("\n[4] inference per denoising step")
    lives, baked = ((4,), (4,)) if quick else ((1, 2, 4, 8), (1, 4, 8))
    results["infer"] = bench_infer.run(
        unet, plain, adapters, layers, lives=lives, baked=baked, rounds=2 if quick else 7, log=log
    )

    infer = results["infer"]
    infer_missed = infer.ratio("live 4", "base") > report.LIVE4_GOAL or report.baked_ratio(infer) > report.BAKED_GOAL
    if infer_missed and not quick:
        log("  goal missed: profiling base and live-4 inference steps")
        results["profiles"].update(bench_infer.profile(unet, plain, adapters, layers, log=log))

    results["notes"] = profiles.notes(results)
    end = cpu_snapshot()
    during = background_cores(run_start, end)
    meta["background_during"] = "unknown" if during is None else f"{during:.2f} cores"
    meta["total_s"] = time.perf_counter() - started
    meta["loadavg_after"] = _loadavg()

    log(report.console(results))
    if should_write_docs(args):
        out = Path(args.out)
        plot_path = out.parent / "benchmarks.png"
        report.plot(results, plot_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        kept = report.kept_sections(out.read_text()) if out.exists() else {}  # hand-written profiling sections
        out.write_text(report.markdown(results, os.path.relpath(plot_path, out.parent), kept))
        log(f"\nwrote {out} and {plot_path}")
    scratch.cleanup()
    log(f"RATIO train_step spectral/lora = {train.timings.ratio('additive', 'lora'):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
