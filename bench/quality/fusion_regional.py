"""Regional rows of the fusion-quality benchmark (imported by ``bench/quality/fusion_quality.py``): a side path that
calls the regional machinery directly; what users get is measured by ``bench/quality/regional_quality.py``.

Pair prompts put concept a on the left half and b on the right half. Methods:

  (e)  regional cross-attention with every slot still global and a prompt per region ("a blue <heart>
       on a gray background"): the anchors' regionally controllable sampling (Mix-of-Show, Orthogonal
       Adaptation, the Spectral Adapter paper's code); with region prompts equal to the whole prompt,
       regional attention would change nothing;
  (e') the same with PEFT LoRAs (the fair LoRA comparison: a LoRA cannot be routed);
  (f)  routed slots + regional cross-attention (ours): each slot only in its own box and on its own
       region prompt's tokens; region prompts = the pair prompt (the default);
  (f2) the same with per-region prompts ("a blue <heart> on a gray background");
  ceiling: each concept alone (only its slot on) on the same pair prompt.

*Placement*: the concept is seen (classifier identity) when the other half of the picture is painted
over with the background colour.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image

from spectral_diffusion.generation.diffusion import decode_latents
from spectral_diffusion.generation.layout import Layout, Region, region_masks
from spectral_diffusion.generation.regional import encode_layout, regional_attention
from toy import classifier, scenes

HALVES = ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0))
REGIONAL_METHODS = {
    "regional_global_slots": "(e) regional cross-attention + region prompts, all slots global (anchors' method)",
    "regional_lora": "(e') PEFT LoRA + regional cross-attention + region prompts",
    "routed": "(f) routed slots + regional cross-attention (ours)",
    "routed_region_prompts": "(f2) routed slots, per-region prompts",
    "alone_on_pair": "ceiling: each concept alone on the pair prompt",
}


def pair_layout(prompt, token, region_prompts: bool) -> Layout:
    regions = []
    for concept, colour, box in zip(prompt.concepts, prompt.colours, HALVES, strict=True):
        text = f"a {colour} {token(concept)} on a {prompt.background} background" if region_prompts else None
        regions.append(Region(concept, box, text))
    return Layout(prompt.text, tuple(regions))


def draw_regional(pipe, layout: Layout, settings, adapters=None, routed: bool = False) -> list[Image.Image]:
    """``settings.seeds`` images of ``layout``; ``adapters`` given and ``routed``: slots routed to boxes."""
    size = scenes.IMAGE_SIZE
    latent = size // pipe.vae_scale_factor
    masks = region_masks(layout, latent, latent)
    routing = adapters.text_only if routed else None
    context, embeds = encode_layout(pipe, layout, masks, routing, settings.seeds, settings.guidance > 1)
    concept_masks = {r.concept: m for r, m in zip(layout.regions, masks, strict=True) if r.concept}
    routing_scope = adapters.routed(concept_masks) if routed else nullcontext()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad(), routing_scope, regional_attention(pipe.unet, context):
        latents = pipe(
            **embeds,
            num_images_per_prompt=settings.seeds,
            num_inference_steps=settings.inference_steps,
            guidance_scale=settings.guidance,
            height=size,
            width=size,
            generator=torch.Generator("cpu").manual_seed(1234),
            output_type="latent",
        ).images
    return decode_latents(pipe, latents)


def _painted_over(image: Image.Image, keep_left: bool, background: str) -> Image.Image:
    out = image.copy()
    width, height = out.size
    box = (width // 2, 0, width, height) if keep_left else (0, 0, width // 2, height)
    out.paste(Image.new("RGB", (box[2] - box[0], height), scenes.BACKGROUNDS[background]), box[:2])
    return out


class PairScores:
    """Identity, placement, bleeding and fidelity of pair images (and time per image)."""

    def __init__(self):
        self.identity, self.placement, self.bleed, self.fidelity, self.seconds = [], [], [], [], []

    def add(self, model, images, prompt, concepts_all, seconds: float) -> None:
        reading = classifier.read(model, images)
        asked = [scenes.SHAPES.index(c) for c in prompt.concepts]
        others = [scenes.SHAPES.index(c) for c in concepts_all if c not in prompt.concepts]
        for i in range(len(images)):
            self.identity.extend(float(reading["shape"][i, j]) for j in asked)
            self.bleed.append(float(reading["shape"][i, others].max()) if others else 0.0)
            colour_ok = all(reading["colour"][i, classifier.COLOUR_NAMES.index(c)] > 0.5 for c in prompt.colours)
            bg_ok = int(reading["background"][i].argmax()) == classifier.BACKGROUND_NAMES.index(prompt.background)
            self.fidelity.append(float(colour_ok and bg_ok))
        for side, concept in enumerate(prompt.concepts):
            halves = [_painted_over(image, side == 0, prompt.background) for image in images]
            seen = classifier.read(model, halves)["shape"][:, scenes.SHAPES.index(concept)]
            self.placement.extend(float(v) for v in seen)
        self.seconds.append(seconds / len(images))

    def add_alone(self, model, images, prompt, concept) -> None:
        reading = classifier.read(model, images)
        self.identity.extend(float(v) for v in reading["shape"][:, scenes.SHAPES.index(concept)])

    def summary(self) -> dict[str, float]:
        return {k: float(np.mean(v)) if v else float("nan") for k, v in self.__dict__.items()}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
