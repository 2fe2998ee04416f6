"""GPU benchmark: SD1.5- and SDXL-size UNets built from configs (no downloads), fp16/bf16.

    bash bench/speed/gpu.sh                         # on a GPU machine: both sizes, bf16, a few minutes
    python -m bench.speed.gpu --device cpu --tiny   # a seconds-long smoke run of every code path

Per model it prints: the training step (forward, loss, backward, AdamW) of PEFT LoRA and of an additive
spectral slot at the same rank and their ratio; UNet evaluations and images/s (at 30 denoising steps,
UNet only) for the base model, 4 live concepts and the same 4 baked; the cold SVD preparation
(``SpectralAdapters.spectrum``) with how many layers took the fast path; and peak GPU memory per phase.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from bench.common import UNET_TARGETS, get_modules, peft_lora_modules, randomize, set_modules, target_paths
from spectral_diffusion.core import svd
from spectral_diffusion.core.config import ConceptInfo, TargetConfig
from spectral_diffusion.core.model import SpectralAdapters

logger = logging.getLogger("bench.speed.gpu")
DENOISING_STEPS = 30
SD15 = {"cross_attention_dim": 768, "sample_size": 64}
SDXL = {
    "sample_size": 128,
    "cross_attention_dim": 2048,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
TINY = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
TINY_SD15 = {**TINY, "cross_attention_dim": 32, "sample_size": 8}
TINY_SDXL = {
    **TINY,
    "cross_attention_dim": 64,
    "sample_size": 8,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}


class Clock:
    """Seconds of device work: synchronises CUDA before reading the clock."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn, rounds: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rounds):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def peak_memory(device: torch.device, reset: bool = False) -> float | None:
    """Peak allocated GPU memory in GB since the last reset (None on CPU)."""
    if device.type != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def build(config: dict, dtype: torch.dtype, device: torch.device):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device=device, dtype=dtype)
    unet.requires_grad_(False)
    return unet.eval()


def unet_inputs(unet, batch: int, latent: int, dtype, device) -> dict:
    config = unet.config
    inputs = {
        "sample": torch.randn(batch, config.in_channels, latent, latent, device=device, dtype=dtype),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, device=device, dtype=dtype),
    }
    if config.addition_embed_type == "text_time":
        text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text, device=device, dtype=dtype),
            "time_ids": torch.randn(batch, 6, device=device, dtype=dtype),
        }
    return inputs


def train_step_fn(unet, params, inputs):
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    target = torch.randn_like(inputs["sample"])

    def step():
        out = unet(**inputs).sample
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_model(label: str, config: dict, args, log) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    clock = Clock(device)
    rounds = 1 if args.tiny else args.rounds
    unet = build(config, dtype, device)
    paths = target_paths(unet, UNET_TARGETS)
    plain = get_modules(unet, paths)
    latent = config.get("sample_size", 64) // (1 if args.tiny else 2)
    inputs = unet_inputs(unet, args.batch, latent, dtype, device)
    out: dict = {"model": label, "layers": len(paths)}

    peak_memory(device, reset=True)
    clock.sync()
    start = time.perf_counter()
    adapters = SpectralAdapters({"unet": unet}, targets=TargetConfig(unet=UNET_TARGETS, text_encoder=()))
    counted: dict = {}
    checked = svd.top_k_svd_checked

    def counting(weight, k, method="auto"):
        trip, path = checked(weight, k, method)
        counted[path] = counted.get(path, 0) + 1
        return trip, path

    svd.top_k_svd_checked = counting
    try:
        adapters.spectrum(args.rank * 8)
    finally:
        svd.top_k_svd_checked = checked
    clock.sync()
    out["svd_s"], out["svd_paths"], out["svd_peak_gb"] = time.perf_counter() - start, counted, peak_memory(device)
    spectral = get_modules(unet, paths)

    adapters.new_concept(ConceptInfo("fit", 0, args.rank, "additive"))
    ours_params = [p for group in adapters.trainable_parameters("fit").values() for p in group]
    randomize(ours_params)
    set_modules(unet, plain)
    lora, lora_params = peft_lora_modules(unet, paths, args.rank)
    for name, modules, params in (("lora", lora, lora_params), ("ours", spectral, ours_params)):
        set_modules(unet, modules)
        peak_memory(device, reset=True)
        out[f"train_{name}_s"] = clock.time(train_step_fn(unet, params, inputs), rounds)
        out[f"train_{name}_peak_gb"] = peak_memory(device)
    adapters.remove_concept("fit")

    names = [f"live{i}" for i in range(4)]
    for slot, name in enumerate(names):
        adapters.new_concept(ConceptInfo(name, slot, args.rank, "additive"))
        randomize([p for g in adapters.trainable_parameters(name).values() for p in g], seed=slot)
        for group in adapters.trainable_parameters(name).values():
            for param in group:
                param.requires_grad_(False)

    def evaluate():
        with torch.no_grad():
            unet(**inputs)

    set_modules(unet, plain)
    out["infer_base_s"] = clock.time(evaluate, rounds)
    set_modules(unet, spectral)
    out["infer_live4_s"] = clock.time(evaluate, rounds)
    adapters.merge(names)
    out["infer_baked_s"] = clock.time(evaluate, rounds)
    out["infer_peak_gb"] = peak_memory(device)
    adapters.unpatch()
    del adapters, lora, spectral, plain
    if device.type == "cuda":
        torch.cuda.empty_cache()
    report(out, args, log)
    return out


def report(r: dict, args, log) -> None:
    per_image = DENOISING_STEPS / args.batch
    log(f"== {r['model']} ({r['layers']} attention linears, {args.dtype}, batch {args.batch}, rank {args.rank})")
    log(
        f"  SVD prep (cold, K={args.rank * 8}): {r['svd_s']:.2f} s, paths {r['svd_paths']}, "
        f"peak {_gb(r['svd_peak_gb'])}"
    )
    log(
        f"  training step: LoRA {r['train_lora_s'] * 1e3:.1f} ms, ours {r['train_ours_s'] * 1e3:.1f} ms, "
        f"ours / LoRA {r['train_ours_s'] / r['train_lora_s']:.3f}x; peak {_gb(r['train_lora_peak_gb'])} vs "
        f"{_gb(r['train_ours_peak_gb'])}"
    )
    for key, label in (("base", "base"), ("live4", "4 live"), ("baked", "4 baked")):
        t = r[f"infer_{key}_s"]
        log(
            f"  inference {label}: {t * 1e3:.1f} ms per UNet evaluation, {1 / (t * per_image):.2f} images/s "
            f"at {DENOISING_STEPS} steps, / base {t / r['infer_base_s']:.3f}x"
        )
    log(f"  inference peak {_gb(r['infer_peak_gb'])}")


def _gb(value) -> str:
    return "n/a (CPU)" if value is None else f"{value:.2f} GB"


def main(argv=None, log=print) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    parser.add_argument("--tiny", action="store_true", help="tiny UNets, one round: a smoke run of every path")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    if args.tiny:
        args.rank = min(args.rank, 2)
    configs = {"sd15": TINY_SD15 if args.tiny else SD15, "sdxl": TINY_SDXL if args.tiny else SDXL}
    device = torch.device(args.device)
    log(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")
    return [bench_model(name, configs[name], args, log) for name in args.models.split(",")]


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
