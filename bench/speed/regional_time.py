"""Time per image of a two-concept layout at Stable Diffusion 1.5 size: ``python -m bench.speed.regional_time``.

builtin:toy is small enough that a routed pass's extra cross-attention reads (two prompts per box) weigh
like a UNet pass; what a user feels is the time at a real model's size. This builds an SD1.5-architecture pipeline with random weights (UNet
859.5M parameters, CLIP ViT-L-size text encoder with builtin:toy's tokenizer, SD's VAE; nothing is
downloaded) as a diffusers folder, trains two concepts on it with the ``train`` command (two steps:
only the time of generation is measured, not what it draws), and times, interleaved round by round,
``Studio.generate`` on the prompt the regional benchmark uses with ``--layout left-right``:

* ``passes``: one UNet pass per region, only its concept on (the default ``--regional-mode``);
* ``routed``: one UNet pass, each concept's slot routed to its box (``--regional-mode routed``);
* ``lora-passes``: the baseline of bench/quality/regional_quality.py (each concept exported as its exact
  LoRA, loaded into diffusers, one pass per region, predictions blended by the masks);
* ``global``: no layout, both concepts everywhere (the floor: one pass, no routing).

Ratios are taken within one run on one machine; absolute seconds are this CPU's.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from bench.common import CLIP_L_TEXT, build_unet, machine_info, setup_torch
from bench.quality.regional_quality import LoraPasses, scene
from spectral_diffusion import GenerationRequest, Library, Studio
from spectral_diffusion.frontends import cli
from spectral_diffusion.frontends.workflows import build_layout
from spectral_diffusion.generation.request import DEFAULTS
from spectral_diffusion.models.registry import SHIPPED_MODELS
from toy import scenes

logger = logging.getLogger("bench.speed.regional_time")
MODES = ("passes", "routed", "lora-passes", "global")
CONCEPTS = ("heart", "moon")
# Stable Diffusion's VAE (AutoencoderKL with four levels); the defaults of AutoencoderKL are one level
SD_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}


def build_model_folder(folder: Path) -> Path:
    """An SD1.5-architecture pipeline with random (seeded) weights saved as a diffusers folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if (folder / "model_index.json").is_file():
        return folder
    toy = SHIPPED_MODELS["builtin:toy"]
    tokenizer = CLIPTokenizer.from_pretrained(toy / "tokenizer")
    toy_text = json.loads((toy / "text_encoder" / "config.json").read_text())
    ids = {key: toy_text[key] for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**CLIP_L_TEXT, **ids}))
    torch.manual_seed(3)
    vae = AutoencoderKL(**SD_VAE)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=build_unet(),
        scheduler=DDIMScheduler.from_pretrained(toy / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging)
    staging.rename(folder)
    return folder


def train_concepts(model: Path, library_dir: Path, photos: Path, steps: int) -> None:
    for shape in CONCEPTS:
        if (library_dir / shape).is_dir():
            continue
        scenes.write_concept_images(shape, photos / shape)
        for path in (photos / shape).glob("*.png"):  # the train command wants photos of 128 px or more
            with Image.open(path) as image:
                image.convert("RGB").resize((256, 256), Image.Resampling.NEAREST).save(path)
        argv = ["train", "--images", str(photos / shape), "--name", shape, "--library", str(library_dir)]
        argv += ["--model", str(model), "--steps", str(steps), "--resolution", "256"]
        if cli.main(argv) not in (0, None):
            raise SystemExit(f"training {shape} on {model} failed")


def run(args) -> dict:
    setup_torch(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="regional-time-"))
    model = build_model_folder(work / "sd15-size-random")
    library_dir = work / "library"
    train_concepts(model, library_dir, work / "photos", args.train_steps)
    library = Library(str(library_dir))
    studio = Studio(str(model), library=library)
    pair = scene(*CONCEPTS, "red", "yellow", "white", seed=0)  # time does not depend on the colours
    layout = build_layout(library, pair["prompt"], "", "left-right")
    baseline = LoraPasses(library, studio, work, CONCEPTS, model=str(model)) if "lora-passes" in args.modes else None

    def draw(mode: str, steps: int) -> None:
        if mode == "lora-passes":
            baseline(pair, 1, size=args.size, steps=steps)
            return
        request = GenerationRequest(
            prompt=layout.prompt,
            concepts=dict.fromkeys(CONCEPTS, 1.0),
            steps=steps,
            width=args.size,
            height=args.size,
            num_images=1,
            layout=None if mode == "global" else layout,
            regional_mode="passes" if mode == "global" else mode,
        )
        studio.generate(request)

    for mode in args.modes:  # warm-up (one step is enough): SVD caches, first-call allocations
        draw(mode, 1)
    seconds: dict[str, list[float]] = {mode: [] for mode in args.modes}
    for round_index in range(args.rounds):
        for mode in args.modes:
            start = time.perf_counter()
            draw(mode, args.steps)
            seconds[mode].append(time.perf_counter() - start)
            logger.info("round %d %s: %.1f s", round_index + 1, mode, seconds[mode][-1])
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    return {
        "size": args.size,
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": args.threads,
        "machine": machine_info(),
        "seconds": seconds,
        "median": median,
        "ratios": {
            f"{a} / {b}": median[a] / median[b]
            for a, b in (
                ("routed", "lora-passes"),
                ("passes", "lora-passes"),
                ("routed", "passes"),
                ("routed", "global"),
            )
            if a in median and b in median
        },
    }


def markdown(result: dict) -> str:
    rounds = "one round" if result["rounds"] == 1 else f"median of {result['rounds']} interleaved rounds"
    lines = [
        f"SD1.5-size pipeline (random weights), {result['size']} x {result['size']} px, {result['steps']} DDIM steps, "
        f"one image, {rounds} on {result['threads']} CPU threads.",
        "",
        "| mode | s / image |",
        "|---|---|",
    ]
    lines += [f"| {mode} | {value:.1f} |" for mode, value in result["median"].items()]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {value:.2f}x |" for name, value in result["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (SD1.5: 512)")
    parser.add_argument("--steps", type=int, default=DEFAULTS.steps, help="denoising steps per image (the default's)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--work", help="working folder, reused between runs (default: a new temporary folder)")
    parser.add_argument("--out", type=Path, help="write the table (.md) and the numbers (.json) here (a stem)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args)
    text = markdown(result)
    logger.info("\n%s", text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
