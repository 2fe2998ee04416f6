"""Shared benchmark machinery: interleaved timing, paired ratios, memory probes, SD1.5-size models.

Timing rules (docs/design.md section 9): every variant runs once per round in a shuffled order, warm-up
rounds are thrown away, and a ratio is the median over rounds of the ratio *within* a round, so that
slow drifts of the machine (other jobs on the same cores, clock changes) cancel out.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

THREADS = 2
# Which clock the ratios use: "wall" on a quiet machine; "cpu" (this process's CPU time) when other
# processes share the cores, since then wall time mostly measures how long we waited for a core.
METRIC = {"key": "wall"}
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

# SD1.5's UNet is diffusers' default UNet2DConditionModel config except for the text width: SD1.5's
# CLIP ViT-L text states are 768 wide (the default config says 1280).
SD15_UNET_OVERRIDES = {"cross_attention_dim": 768, "sample_size": 64}
CLIP_L_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "projection_dim": 768,
}


def setup_torch(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


# ----- timing ------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One timed call: wall-clock seconds and this process's CPU seconds."""

    wall: float
    cpu: float


@dataclass
class Timings:
    """Per variant, one ``Sample`` per timed round (warm-up rounds excluded)."""

    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def walls(self, name: str) -> list[float]:
        return [s.wall for s in self.samples[name]]

    def median(self, name: str, key: str | None = None) -> float:
        key = key or METRIC["key"]
        return statistics.median(getattr(s, key) for s in self.samples[name])

    def ratios(self, num: str, den: str, key: str | None = None) -> list[float]:
        """Per-round ratios num/den (both measured in the same round)."""
        key = key or METRIC["key"]
        return [getattr(a, key) / getattr(b, key) for a, b in zip(self.samples[num], self.samples[den], strict=True)]

    def ratio(self, num: str, den: str, key: str | None = None) -> float:
        return statistics.median(self.ratios(num, den, key))

    def spread(self, num: str, den: str, key: str | None = None) -> tuple[float, float]:
        values = self.ratios(num, den, key)
        return min(values), max(values)

    def merge(self, other: Timings) -> None:
        for name, samples in other.samples.items():
            self.samples.setdefault(name, []).extend(samples)


def time_call(fn: Callable[[], object], inner: int = 1) -> Sample:
    """Time ``inner`` calls of ``fn`` with the garbage collector paused; per-call seconds."""
    gc.disable()
    try:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            fn()
        wall1, cpu1 = time.perf_counter(), time.process_time()
    finally:
        gc.enable()
    return Sample((wall1 - wall0) / inner, (cpu1 - cpu0) / inner)


def run_rounds(
    variants: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    inner: int | Mapping[str, int] = 1,
    seed: int = 0,
    before: Mapping[str, Callable[[], object]] | None = None,
    after: Mapping[str, Callable[[], object]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Timings:
    """Run every variant once per round in a shuffled order; ``before``/``after`` hooks are not timed."""
    rng = random.Random(seed)
    names = list(variants)
    out = Timings({name: [] for name in names})
    for index in range(warmup + rounds):
        order = names[:]
        rng.shuffle(order)
        last = {}
        for name in order:
            if before and name in before:
                before[name]()
            last[name] = time_call(variants[name], inner if isinstance(inner, int) else inner[name])
            if after and name in after:
                after[name]()
            if index >= warmup:
                out.samples[name].append(last[name])
        if progress is not None:
            label = "warm-up" if index < warmup else f"round {index - warmup + 1}/{rounds}"
            progress(f"{label}: " + ", ".join(f"{n} {last[n].wall:.3g}s (cpu {last[n].cpu:.3g})" for n in names))
    return out


def fmt_ratio(value: float, spread: tuple[float, float] | None = None) -> str:
    if spread is None:
        return f"{value:.2f}x"
    return f"{value:.2f}x ({spread[0]:.2f}-{spread[1]:.2f})"


# ----- memory ------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Peak resident set size since the last ``reset_peak_rss`` (or process start)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Give freed heap back to the OS and reset the kernel's peak-RSS mark (Linux >= 4.0)."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# ----- machine -----------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    import diffusers
    import peft
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "unknown"
    try:
        with open("/proc/meminfo") as handle:
            mem = f"{int(handle.readline().split()[1]) / 1024**2:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "memory": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "gpu": "none (CPU only)" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
    }


# ----- models ------------------------------------------------------------------------------------


def build_unet(seed: int = 0, **overrides) -> nn.Module:
    """An SD1.5-size UNet2DConditionModel (859.5M parameters) with random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**SD15_UNET_OVERRIDES, **overrides})
    unet.requires_grad_(False)
    return unet.eval()


def build_clip_text(seed: int = 1) -> nn.Module:
    """A CLIP ViT-L-size text encoder (123M parameters) with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
    model.requires_grad_(False)
    return model.eval()


def target_paths(model: nn.Module, suffixes: Iterable[str]) -> list[str]:
    suffixes = tuple(suffixes)
    return [
        path
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(path == s or path.endswith("." + s) for s in suffixes)
    ]


def get_modules(model: nn.Module, paths: Iterable[str]) -> dict[str, nn.Module]:
    return {path: model.get_submodule(path) for path in paths}


def set_modules(model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    """Put ``modules[path]`` at ``path`` (swapping whole variants in and out of one shared model)."""
    for path, module in modules.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, module)


def peft_lora_modules(model: nn.Module, paths: list[str], rank: int, suffixes=UNET_TARGETS, seed: int = 0):
    """PEFT LoRA layers (r = alpha = rank) for ``paths``; the model is left with its plain layers.

    ``lora_B`` is given small random values as if trained (PEFT starts it at zero).
    """
    from peft import LoraConfig, inject_adapter_in_model

    plain = get_modules(model, paths)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(suffixes))
    inject_adapter_in_model(config, model)
    wrapped = get_modules(model, paths)
    set_modules(model, plain)
    if hasattr(model, "peft_config"):
        del model.peft_config
    generator = torch.Generator().manual_seed(seed)
    params = []
    with torch.no_grad():
        for module in wrapped.values():
            for name, param in module.named_parameters():
                if "lora_" in name:
                    if "lora_B" in name:
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
                    param.requires_grad_(True)
                    params.append(param)
    return wrapped, params


def randomize(params: Iterable[torch.Tensor], scale: float = 0.01, seed: int = 0) -> None:
    """Small random values, as if trained (new concepts start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def count(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


# ----- background load ---------------------------------------------------------------------------


@dataclass
class CpuSnapshot:
    wall: float
    busy_jiffies: int
    own_cpu: float


def cpu_snapshot() -> CpuSnapshot:
    """Machine-wide busy CPU time and this process's CPU time, to tell how loaded the machine was."""
    busy = 0
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]  # everything but idle and iowait
    except (OSError, ValueError, IndexError):
        pass
    return CpuSnapshot(time.perf_counter(), busy, time.process_time())


def background_cores(start: CpuSnapshot, end: CpuSnapshot) -> float | None:
    """Cores kept busy by *other* processes between two snapshots (0 = the machine was ours)."""
    if not start.busy_jiffies or end.wall <= start.wall:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    other = (end.busy_jiffies - start.busy_jiffies) / hz - (end.own_cpu - start.own_cpu)
    return max(0.0, other / (end.wall - start.wall))


def probe_background(seconds: float = 3.0) -> float | None:
    start = cpu_snapshot()
    time.sleep(seconds)
    return background_cores(start, cpu_snapshot())
