"""Why does a toy model put objects where it does? Three cheap measurements, no classifier needed.

    python -m toy.positions [--model builtin:toy]      # a minute or two; prints a JSON report

1. **Captions**: how often pretraining captions name an object's position, and whether the order of
   mention gives the positions away (two-object scenes list the left or top object first).
2. **Text encoder**: do prompts that differ only in the position word get different encodings? The
   change at the position word and after it, against the change from swapping the colour word.
3. **What the noise leaves**: how well the position of an object (left or right) can be told from the
   noisy latent at the noisiest training step and at the first sampling step, by the best linear rule
   (nearest class mean). Well above 50% means a denoiser can learn to read the layout from the noise
   instead of the caption, and at sampling time, when it starts from pure noise, find one there.
4. **Prompt or noise**: the horizontal and vertical centre of the object in images drawn from the
   same seeds with different position words. If the prompt decided where the object goes, centres
   would follow the word; if the starting noise decided, they would follow the seed. Measured on the
   denoiser's first prediction of the clean image (step 1 of 25) and on the finished image.

An object's centre is the mean position of the pixels that differ from the background (the colour of
the image's border), so no classifier is involved.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random

import numpy as np
import torch

from spectral_diffusion.models.registry import load_pipeline
from toy import scenes

logger = logging.getLogger("toy.positions")
PROBE_PROMPTS = {
    "left": "a large red circle on the left on a white background",
    "right": "a large red circle on the right on a white background",
    "top": "a large red circle at the top on a white background",
    "bottom": "a large red circle at the bottom on a white background",
}


def caption_statistics(count: int = 4000, keep: scenes.CaptionMix | None = None) -> dict[str, float]:
    """Share of objects whose position is named, and of named pairs listed left/top first."""
    rng = random.Random(0)
    named = objects = pairs_first = pairs = 0
    for seed in range(count):
        scene = scenes.random_scene(seed)
        text = scenes.caption(scene, rng, keep=keep)
        said = [p for p, phrase in scenes.POSITION_PHRASES.items() if phrase in text]
        objects += len(scene.objects)
        named += len(said) and len(scene.objects)
        if len(scene.objects) == 2 and said:
            pairs += 1
            first = min(said, key=lambda p: text.index(scenes.POSITION_PHRASES[p]))
            pairs_first += first in ("left", "top")
    return {
        "objects_with_position_named": named / objects,
        "named_pairs_listing_left_or_top_first": pairs_first / pairs,
    }


@torch.no_grad()
def text_encoder_contrast(pipe) -> dict[str, float]:
    """Relative change of the text encoding from swapping the position word vs the colour word."""

    def encode(prompt):
        ids = pipe.tokenizer(
            prompt,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return pipe.text_encoder(ids)[0][0]

    base = encode(PROBE_PROMPTS["left"])
    position = encode(PROBE_PROMPTS["right"])
    colour = encode(PROBE_PROMPTS["left"].replace("red", "blue"))
    scale = base.norm()
    return {
        "position_word_swap": float((position - base).norm() / scale),
        "colour_word_swap": float((colour - base).norm() / scale),
    }


@torch.no_grad()
def layout_left_in_noise(pipe, count: int = 400) -> dict[str, float]:
    """Accuracy of telling left from right in noisy latents at the first steps, for this model's schedule."""
    from diffusers import DDPMScheduler

    rng = random.Random(5)
    shapes, colours, backgrounds = scenes.PRETRAIN_SHAPES, list(scenes.COLOURS), list(scenes.BACKGROUNDS)
    objects = [
        (rng.choice(shapes), rng.choice(colours), rng.choice(backgrounds), rng.choice(("left", "right")))
        for _ in range(count)
    ]
    pictures = [
        scenes.render(scenes.Scene((scenes.SceneObject(s, c, "large", "solid", p),), b)) for s, c, b, p in objects
    ]
    x = torch.from_numpy(np.stack([np.asarray(im) for im in pictures])).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    left = torch.tensor([o[3] == "left" for o in objects])
    train, test = slice(0, count // 2), slice(count // 2, count)
    alphas = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    pipe.scheduler.set_timesteps(25)
    first = int(pipe.scheduler.timesteps[0])
    generator = torch.Generator().manual_seed(0)
    out = {"first_sampling_step": first}
    for name, t in (("at_t_999", 999), (f"at_first_step_t_{first}", first)):
        a = float(alphas[t])
        noisy = a**0.5 * latents + (1 - a) ** 0.5 * torch.randn(latents.shape, generator=generator)
        flat = noisy.flatten(1)
        direction = (latents[train][left[train]].mean(0) - latents[train][~left[train]].mean(0)).flatten() * a**0.5
        middle = ((latents[train][left[train]].mean(0) + latents[train][~left[train]].mean(0)) / 2).flatten() * a**0.5
        says_left = (flat[test] - middle) @ direction > 0
        out[name] = float((says_left == left[test]).float().mean())
        out[f"snr_{t}"] = a / (1 - a) if a < 1 else float("inf")
    return out


def object_centre(image) -> tuple[float, float] | None:
    """(x, y) of the object as fractions of the image; None when nothing stands out from the border."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]).mean(axis=0)
    mask = np.abs(a - border).max(axis=2) > 60
    if mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean() + 0.5) / a.shape[1], float(ys.mean() + 0.5) / a.shape[0]


@torch.no_grad()
def _images(pipe, prompt: str, seeds: range, steps: int, guidance: float, first_step_only: bool):
    from spectral_diffusion.generation.diffusion import decode_latents

    generator = torch.Generator("cpu").manual_seed(seeds.start)
    captured = {}

    def stop_after_first(pipeline, step, timestep, kwargs):
        if first_step_only and "x0" not in captured:
            latents = kwargs["latents"]
            captured["x0"] = latents
        return kwargs

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if first_step_only:
        # the first DDIM step's prediction of the clean image (the scheduler exposes it as pred_original_sample)
        pipe.scheduler.set_timesteps(steps)
        latents = torch.randn(
            (len(seeds), pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size),
            generator=generator,
        )
        t = pipe.scheduler.timesteps[0]
        ids = pipe.tokenizer(
            [prompt, ""],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        cond, uncond = pipe.text_encoder(ids)[0].split(1)
        eps_c = pipe.unet(latents, t, cond.expand(len(seeds), -1, -1)).sample
        eps_u = pipe.unet(latents, t, uncond.expand(len(seeds), -1, -1)).sample
        eps = eps_u + guidance * (eps_c - eps_u)
        x0 = pipe.scheduler.step(eps, t, latents).pred_original_sample
        return decode_latents(pipe, x0)
    out = pipe(
        prompt=[prompt] * len(seeds),
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=size,
        width=size,
        generator=generator,
        output_type="latent",
    ).images
    return decode_latents(pipe, out)


def prompt_or_noise(pipe, seeds: int = 8, steps: int = 25, guidance: float = 5.0) -> dict[str, dict[str, float]]:
    """For each stage: how far the mean centre moves with the word, and how much it varies with the seed."""
    report = {}
    for stage, first in (("first_step", True), ("final", False)):
        centres = {}
        for word, prompt in PROBE_PROMPTS.items():
            # one seed per image, so that image k of every prompt starts from the same noise
            centres[word] = [
                object_centre(_images(pipe, prompt, range(s, s + 1), steps, guidance, first)[0]) for s in range(seeds)
            ]
        report[stage] = _separation(centres)
    return report


def _separation(centres) -> dict[str, float]:
    def axis(words, k):
        found = [[c[k] for c in centres[w] if c is not None] for w in words]
        if not all(found):
            return float("nan"), float("nan")
        word_effect = abs(np.mean(found[1]) - np.mean(found[0]))
        seed_spread = float(np.mean([np.std(f) for f in found]))
        return float(word_effect), seed_spread

    horizontal, horizontal_spread = axis(("left", "right"), 0)
    vertical, vertical_spread = axis(("top", "bottom"), 1)
    same_seed = [abs(a[0] - b[0]) for a, b in zip(centres["left"], centres["right"], strict=True) if a and b]
    return {
        "left_right_shift": horizontal,
        "left_right_seed_spread": horizontal_spread,
        "top_bottom_shift": vertical,
        "top_bottom_seed_spread": vertical_spread,
        "named_shift_wanted": 0.5,  # the probe's large objects stand at 0.25 and 0.75 (pushed in from the edge)
        "same_seed_left_vs_right_distance": float(np.mean(same_seed)) if same_seed else float("nan"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:toy")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    report = {
        "captions_v1": caption_statistics(),
        "text_encoder": text_encoder_contrast(pipe),
        "layout_left_in_noise": layout_left_in_noise(pipe),
        "prompt_or_noise": prompt_or_noise(pipe, args.seeds),
    }
    print(json.dumps(report, indent=1))  # noqa: T201 (a command-line report)


if __name__ == "__main__":
    main()
