"""Item 5 (memory): peak resident set of a whole training run, one fresh process per variant.

Each variant runs in its own worker process that does what a training run does and nothing else:
build the SD1.5-size UNet from its config (random weights, as in bench_train), adapt the 128
attention linears (PEFT LoRA r=8; ours through ``SpectralAdapters`` + ``new_concept``, so the top-K
SVD of every target, the package's real preparation path, runs in the process, from a cold SVD
cache), then a few real training steps (forward, MSE loss, backward, AdamW step, ``zero_grad``) and
exit. The frozen base (forward + backward to the latents, nothing to train) is the floor.

The figure is the OS's own accounting: ``ru_maxrss`` of the finished worker from ``os.wait4``. Linux
folds the RSS high-water mark of the process that spawned a worker into the worker's ``ru_maxrss``
(``exec`` keeps the old address space's peak in the child's ``signal->maxrss``; with ``vfork`` that is
the spawning process itself), so workers are never spawned by the benchmark process, which holds a
whole UNet: a small launcher (this module, run with ``launch``; it imports only the standard library)
spawns them one after the other and reports their rusage. The worker also reports its own ``VmRSS``
/ ``VmHWM`` (``/proc/self/status``) after every phase, which says where the memory goes.

    python -m bench.speed.memory                 # all four variants, 4 steps each, 1 thread
    python -m bench.speed.memory --steps 2       # what bench/speed/run.py --quick runs
    python -m bench.speed.memory worker lora     # one worker (prints its phases as JSON)

Memory does not depend on the machine's load, so this figure is stable on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from bench.support import ROOT

VARIANTS = ("base", "lora", "additive", "rotational")
LABELS = {
    "base": "frozen base (fwd + bwd to the latents)",
    "lora": "PEFT LoRA",
    "additive": "ours, additive slot",
    "rotational": "ours, rotational slot",
}
RANK = 8
STEPS = 4
QUICK_STEPS = 2
MARK = "BENCH_MEMORY_JSON "
# A tiny UNet (the layout of builtin:tiny) so the test suite can run the whole code path in seconds.
TINY_UNET = {
    "sample_size": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 32,
}


# ----- worker (one training run) -----------------------------------------------------------------


def _status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1])
    return out


def worker(variant: str, steps: int, threads: int, size: str = "sd15", rank: int = RANK) -> dict:
    """One training run of ``variant``; returns its phases (RSS and peak RSS in KiB after each)."""
    phases: list[dict] = []

    def phase(name: str, **extra) -> None:
        phases.append({"phase": name, "t": round(time.perf_counter() - start, 2), **_status_kib(), **extra})

    start = time.perf_counter()
    import torch
    from torch.nn import functional as F

    torch.set_num_threads(threads)
    from bench.common import (
        UNET_TARGETS,
        build_unet,
        count,
        get_modules,
        peft_lora_modules,
        randomize,
        set_modules,
        target_paths,
    )

    phase("imports")
    unet = build_unet(**(TINY_UNET if size == "tiny" else {}))
    phase("model built")
    paths = target_paths(unet, UNET_TARGETS)
    params: list = []
    scratch = tempfile.TemporaryDirectory(prefix="bench-memory-svd-")
    if variant == "lora":
        wrapped, params = peft_lora_modules(unet, paths, rank)
        set_modules(unet, wrapped)
    elif variant in ("additive", "rotational"):
        from spectral_diffusion.core.config import ConceptInfo, TargetConfig
        from spectral_diffusion.core.model import SpectralAdapters
        from spectral_diffusion.core.svd import SvdCache

        adapters = SpectralAdapters(
            {"unet": unet}, targets=TargetConfig(unet=UNET_TARGETS, text_encoder=()), svd_cache=SvdCache(scratch.name)
        )
        phase("patched")
        adapters.new_concept(ConceptInfo("concept", 0, rank, variant))  # runs the top-K SVD (cold cache)
        params = [p for group in adapters.trainable_parameters("concept").values() for p in group]
        randomize(params)
    elif variant != "base":
        raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")
    phase("adapted", trainable=count(params), layers=len(get_modules(unet, paths)))

    cfg = unet.config
    side = 32 if size == "sd15" else cfg.sample_size
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, cfg.in_channels, side, side, generator=generator)
    text = torch.randn(1, 77, cfg.cross_attention_dim, generator=generator)
    target = torch.randn(1, cfg.out_channels, side, side, generator=generator)
    timesteps = torch.tensor([500])
    if not params:
        latents.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    for index in range(steps):
        pred = unet(latents, timesteps, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred, target)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            latents.grad = None
        del pred, loss
        phase(f"step {index + 1}")
    scratch.cleanup()
    return {"variant": variant, "steps": steps, "threads": threads, "size": size, "phases": phases}


# ----- launcher (small process, standard library only) --------------------------------------------


def _spawn(variant: str, steps: int, threads: int, size: str, log) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    cmd = [
        sys.executable,
        "-m",
        "bench.speed.memory",
        "worker",
        variant,
        "--steps",
        str(steps),
        "--threads",
        str(threads),
        "--size",
        size,
    ]
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # the OS's accounting of the finished child
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith(MARK)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory worker {variant} failed (exit {proc.returncode}):\n{err.read()[-4000:]}")
    data = json.loads(lines[-1][len(MARK) :])
    data["ru_maxrss_kib"] = usage.ru_maxrss  # KiB on Linux
    data["cpu_s"] = usage.ru_utime + usage.ru_stime
    log(
        f"  {variant}: peak RSS {usage.ru_maxrss / 1024**2:.3f} GiB (ru_maxrss), "
        f"worker's own VmHWM {data['phases'][-1]['VmHWM'] / 1024**2:.3f} GiB, {data['cpu_s']:.0f} CPU s"
    )
    return data


def launch(steps: int, threads: int, size: str = "sd15", variants=VARIANTS, log=print) -> list[dict]:
    return [_spawn(v, steps, threads, size, log) for v in variants]


# ----- called by bench/speed/run.py (a big process): go through the launcher ----------------------------


@dataclass
class MemoryResult:
    steps: int
    threads: int
    size: str
    runs: dict = field(default_factory=dict)  # variant -> worker data (phases, ru_maxrss_kib)

    def peak_bytes(self, variant: str) -> int:
        return self.runs[variant]["ru_maxrss_kib"] * 1024

    def ratio(self, num: str, den: str = "lora") -> float:
        return self.peak_bytes(num) / self.peak_bytes(den)

    def phase_kib(self, variant: str, name: str, key: str = "VmRSS") -> int | None:
        for entry in self.runs[variant]["phases"]:
            if entry["phase"] == name:
                return entry[key]
        return None

    def setup_peak_bytes(self, variant: str) -> int:
        """Peak RSS before the first training step (model build + adaptation, SVD included)."""
        return self.phase_kib(variant, "adapted", "VmHWM") * 1024


def run(quick: bool = False, threads: int = 1, size: str = "sd15", variants=VARIANTS, log=print) -> MemoryResult:
    """Spawn the small launcher, which spawns one worker per variant; results from its JSON."""
    steps = QUICK_STEPS if quick else STEPS
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [
        sys.executable,
        "-m",
        "bench.speed.memory",
        "launch",
        "--steps",
        str(steps),
        "--threads",
        str(threads),
        "--size",
        size,
        "--variants",
        ",".join(variants),
        "--json",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if not line.startswith(MARK):
            log(line)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory launcher failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    runs = json.loads(lines[-1][len(MARK) :])
    return MemoryResult(steps, threads, size, {r["variant"]: r for r in runs})


def table(result: MemoryResult) -> list[list[str]]:
    """Rows: variant, peak RSS GB (OS), / LoRA, / frozen base, RSS after build, setup peak, step-phase peak."""
    gib = 1024**3
    rows = []
    for variant, data in result.runs.items():
        built = result.phase_kib(variant, "model built") * 1024
        setup = result.setup_peak_bytes(variant)
        rows.append(
            [
                LABELS[variant],
                f"{result.peak_bytes(variant) / gib:.3f}",
                f"{result.ratio(variant, 'lora'):.3f}x" if "lora" in result.runs else "-",
                f"{result.ratio(variant, 'base'):.3f}x" if "base" in result.runs else "-",
                f"{built / gib:.3f}",
                f"{setup / gib:.3f}",
                f"{(result.peak_bytes(variant) - built) / gib:.3f}",
                f"{next(p.get('trainable', 0) for p in data['phases'] if p['phase'] == 'adapted'):,}",
            ]
        )
    return rows


TABLE_HEADER = [
    "variant",
    "peak RSS GB (OS)",
    "/ LoRA",
    "/ frozen base",
    "RSS after model build GB",
    "peak before step 1 GB",
    "peak - model GB",
    "trainable params",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="launch", choices=("launch", "worker"))
    parser.add_argument("variant", nargs="?", default=None, help="worker: one of " + ", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", default="sd15", choices=("sd15", "tiny"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", action="store_true", help="launch: end with one JSON line of all runs")
    args = parser.parse_args(argv)
    if args.mode == "worker":
        data = worker(args.variant, args.steps, args.threads, args.size)
        print(MARK + json.dumps(data), flush=True)
        return 0
    variants = tuple(v for v in args.variants.split(",") if v)
    runs = launch(args.steps, args.threads, args.size, variants, log=lambda m: print(m, flush=True))
    if args.json:
        print(MARK + json.dumps(runs), flush=True)
    else:
        result = MemoryResult(args.steps, args.threads, args.size, {r["variant"]: r for r in runs})
        print(" | ".join(TABLE_HEADER))
        for row in table(result):
            print(" | ".join(row))
        for variant, data in result.runs.items():
            print(
                f"{variant}: "
                + ", ".join(
                    f"{p['phase']} {p['VmRSS'] / 1024**2:.3f}/{p['VmHWM'] / 1024**2:.3f}" for p in data["phases"]
                )
                + " (GiB, VmRSS/VmHWM)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
