"""Items 1, 5 (parameters, memory) and 7 (rank sweep): one training step of an SD1.5-size UNet.

A step is forward + MSE loss + backward + AdamW step + zero_grad, on 32 x 32 latents, batch 1, 77
text states. All variants share one UNet: their wrapper layers (PEFT ``lora.Linear``, our
``SpectralLayer``, the reference layer) all hold the same frozen ``nn.Linear`` and are swapped in at
the 128 attention-linear paths before each timed step, so the comparison runs on the very same weights
and memory. "Frozen base" has nothing to train: its step is forward + backward down to the input
latents, the least any adapter step can cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from bench.baselines.reference import ReferenceSpectralLinear
from bench.common import (
    UNET_TARGETS,
    Timings,
    count,
    get_modules,
    peak_rss_bytes,
    peft_lora_modules,
    randomize,
    reset_peak_rss,
    rss_bytes,
    run_rounds,
    set_modules,
    target_paths,
)
from spectral_diffusion.core.config import ConceptInfo, TargetConfig
from spectral_diffusion.core.model import SpectralAdapters
from spectral_diffusion.core.svd import SvdCache

SPECTRAL = ("additive", "rotational")


@dataclass
class TrainContext:
    unet: torch.nn.Module
    paths: list[str]
    plain: dict
    adapters: SpectralAdapters
    spectral: dict
    inputs: dict
    reference: dict | None = None
    reference_params: list = field(default_factory=list)
    peft: dict = field(default_factory=dict)  # rank -> (modules, params)
    rank: int | None = None  # rank of the spectral concepts now installed


def build_context(unet, svd_cache_dir, full_svd=None, reference_rank: int = 8, seed: int = 0) -> TrainContext:
    """Patch ``unet`` with our layers (spectrum from the cache when item 3 filled it), then unswap them."""
    paths = target_paths(unet, UNET_TARGETS)
    plain = get_modules(unet, paths)
    adapters = SpectralAdapters(
        {"unet": unet}, targets=TargetConfig(unet=UNET_TARGETS, text_encoder=()), svd_cache=SvdCache(svd_cache_dir)
    )
    spectral = {path: adapters.layers[f"unet.{path}"] for path in paths}
    set_modules(unet, plain)
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "latents": torch.randn(1, 4, 32, 32, generator=generator),
        "timesteps": torch.tensor([500]),
        "text": torch.randn(1, 77, 768, generator=generator),
        "target": torch.randn(1, 4, 32, 32, generator=generator),
    }
    inputs["latents_grad"] = inputs["latents"].clone().requires_grad_(True)
    ctx = TrainContext(unet, paths, plain, adapters, spectral, inputs)
    if full_svd is not None:
        ctx.reference = {}
        for path in paths:
            U, S, V = full_svd[path]
            ctx.reference[path] = ReferenceSpectralLinear(plain[path], U, S, V, reference_rank)
            ctx.reference_params.extend(ctx.reference[path].trainable())
        randomize(ctx.reference_params, seed=seed + 3)
        for param in ctx.reference_params:
            param.requires_grad_(True)
    return ctx


def concept_name(variant: str, rank: int) -> str:
    return f"{variant}-r{rank}"


def install_rank(ctx: TrainContext, rank: int, seed: int = 0) -> dict[str, list]:
    """One additive (slot 0) and one rotational (slot 1) concept of this rank, random as if trained."""
    for name in list(ctx.adapters.concepts):
        if name.startswith(SPECTRAL):
            ctx.adapters.remove_concept(name)
    params = {}
    for slot, variant in enumerate(SPECTRAL):
        name = concept_name(variant, rank)
        ctx.adapters.new_concept(ConceptInfo(name, slot, rank, variant))
        groups = ctx.adapters.trainable_parameters(name)
        params[variant] = [p for group in groups.values() for p in group]
        randomize(params[variant], seed=seed + slot)
    ctx.rank = rank
    return params


def ensure_peft(ctx: TrainContext, rank: int):
    if rank not in ctx.peft:
        set_modules(ctx.unet, ctx.plain)  # PEFT must wrap the plain layers, not whichever variant ran last
        ctx.peft[rank] = peft_lora_modules(ctx.unet, ctx.paths, rank)
    return ctx.peft[rank]


def _step(ctx: TrainContext, params: list, base: bool = False):
    inp = ctx.inputs
    latents = inp["latents_grad"] if base else inp["latents"]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        pred = ctx.unet(latents, inp["timesteps"], encoder_hidden_states=inp["text"]).sample
        loss = F.mse_loss(pred, inp["target"])
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            latents.grad = None

    return step


def _activate_spectral(ctx: TrainContext, variant: str | None):
    def activate():
        set_modules(ctx.unet, ctx.spectral)
        for name in ctx.adapters.concepts:
            if name.startswith(SPECTRAL):
                ctx.adapters.set_enabled(name, variant is not None and name.startswith(variant))

    return activate


@dataclass
class TrainResult:
    rank: int
    timings: Timings
    peak_bytes: dict = field(default_factory=dict)  # variant -> peak RSS during its steps
    work_bytes: dict = field(default_factory=dict)  # variant -> peak minus RSS right before the step
    trainable: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict, repr=False)  # the step functions and swap-in hooks, for profiling
    before: dict = field(default_factory=dict, repr=False)


def variants_for_rank(ctx: TrainContext, rank: int, with_base=True, with_reference=False):
    """Step functions and their swap-in hooks for every variant at this rank."""
    spectral_params = install_rank(ctx, rank)
    lora_modules, lora_params = ensure_peft(ctx, rank)
    steps, before, trainable = {}, {}, {}
    if with_base:
        steps["base"] = _step(ctx, [], base=True)
        before["base"] = lambda: set_modules(ctx.unet, ctx.plain)
    steps["lora"] = _step(ctx, lora_params)
    before["lora"] = lambda: set_modules(ctx.unet, lora_modules)
    trainable["lora"] = count(lora_params)
    for variant in SPECTRAL:
        steps[variant] = _step(ctx, spectral_params[variant])
        before[variant] = _activate_spectral(ctx, variant)
        trainable[variant] = count(spectral_params[variant])
    if with_reference and ctx.reference is not None and rank == ctx.reference[ctx.paths[0]].rank:
        steps["reference"] = _step(ctx, ctx.reference_params)
        before["reference"] = lambda: set_modules(ctx.unet, ctx.reference)
        trainable["reference"] = count(ctx.reference_params)
    return steps, before, trainable


def run_main(ctx: TrainContext, rank=8, rounds=4, warmup=1, with_reference=True, log=print) -> TrainResult:
    """Item 1 (+ item 5's memory and parameter counts): every variant at rank 8."""
    steps, before, trainable = variants_for_rank(ctx, rank, with_reference=with_reference)
    result = TrainResult(rank, Timings(), trainable=trainable, steps=steps, before=before)
    marks: dict[str, int] = {}

    def wrap_before(name):
        def hook():
            before[name]()
            reset_peak_rss()
            marks[name] = rss_bytes() or 0

        return hook

    def wrap_after(name):
        def hook():
            peak = peak_rss_bytes() or 0
            result.peak_bytes[name] = max(result.peak_bytes.get(name, 0), peak)
            result.work_bytes[name] = max(result.work_bytes.get(name, 0), peak - marks[name])

        return hook

    result.timings = run_rounds(
        steps,
        rounds=rounds,
        warmup=warmup,
        before={n: wrap_before(n) for n in steps},
        after={n: wrap_after(n) for n in steps},
        progress=lambda msg: log(f"    {msg}"),
    )
    set_modules(ctx.unet, ctx.plain)
    return result


def run_sweep(ctx: TrainContext, ranks, rounds=2, warmup=0, known: dict | None = None, log=print) -> dict:
    """Item 7: training-step ratios vs rank (base, LoRA and both spectral variants in each round)."""
    results = dict(known or {})
    for rank in ranks:
        if rank in results:
            continue
        steps, before, _ = variants_for_rank(ctx, rank)
        timings = run_rounds(
            steps,
            rounds=rounds,
            warmup=warmup,
            before=before,
            seed=rank,
            progress=lambda msg, r=rank: log(f"    r={r} {msg}"),
        )
        results[rank] = TrainResult(rank, timings)
        ctx.peft.pop(rank, None)  # free this rank's LoRA layers
        log(
            f"  rank {rank:>2}: additive/lora {timings.ratio('additive', 'lora'):.2f}x, "
            f"rotational/lora {timings.ratio('rotational', 'lora'):.2f}x, lora/base {timings.ratio('lora', 'base'):.2f}x"
        )
    set_modules(ctx.unet, ctx.plain)
    return results
