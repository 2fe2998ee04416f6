"""Regional composition by passes: one UNet pass per region, with only that region's concept on.

While ``region_passes(unet, adapters, context, latent_size)`` is active, every call of the UNet runs it
once per region: the region's concept switched on everywhere (image and text side, every other concept
off), its region prompt's embeddings instead of the context prompt's; the predictions are blended by the
regions' soft latent masks (``RegionalContext.weights``; normalised to sum to 1 where the boxes cover the
whole image). Where the boxes leave room, one more pass reads the context prompt with no concept on.
This is what AUTOMATIC1111's Regional Prompter (latent mode) and ComfyUI's masked LoRA hooks do with LoRAs; slots need nothing loaded
or switched but the router, and each pass equals the concept's exact LoRA alone (docs/design.md section 11).

Measured on builtin:toy (docs/fusion-quality.md): both concepts, each in its own half and on one
background, in 35 of 48 images by eye with the left-right preset and with written region prompts (the same
pictures as one LoRA pass per region; 6 pairs x 8 scenes, each its own colours, background and seed) against
7 of 48 for one routed pass (``generation/regional.py``), at 1.35-1.65 times its time (1.8 times at Stable
Diffusion 1.5's size, docs/benchmarks.md).
The pipeline's own denoising loop, schedulers, guidance and callbacks stay as they are: only the UNet's
forward is wrapped, and it comes back on exit (also on errors).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from spectral_diffusion.generation.regional import RegionalContext, batch_aligned


def _pass(forward, adapters, concept: str | None, mask_like: torch.Tensor, args, kwargs):
    """One UNet prediction with only ``concept`` on (None: no concept), everywhere."""
    masks = {concept: torch.ones_like(mask_like)} if concept else {}
    names = {concept} if concept else set()
    with adapters.routed(masks, latent_size=tuple(mask_like.shape)), adapters.text_only(names):
        return forward(*args, **kwargs)[0]


def _pass_weights(context: RegionalContext, latent_size: tuple[int, int], like: torch.Tensor):
    """(regions, 1, 1, h, w) blend weights and per region whether it reaches the image. Where the boxes
    cover the whole image (the presets), the weights are normalised to sum to 1 and need no context pass:
    abutting boxes then meet at a hard seam, their inner ramps cancel (a blurred seam was measured and not
    kept, docs/fusion-quality.md); otherwise the rest goes to the context pass."""
    weights, reaches = context.weights(latent_size, like.device, torch.float32)
    total = weights.sum(dim=0)
    if bool((total > 0).all()):
        weights = weights / total
    return weights.view(-1, 1, 1, *latent_size), reaches


@contextmanager
def region_passes(unet, adapters, context: RegionalContext, latent_size: tuple[int, int]):
    """Wrap ``unet``'s forward so that each call blends one pass per region of ``context`` (see the
    module docstring); ``adapters`` must hold the regions' concepts live (unmerged)."""
    own_forward = "forward" in vars(unet)  # e.g. accelerate's offload hooks set an instance forward
    forward = unet.forward
    latent_size = (int(latent_size[0]), int(latent_size[1]))

    def passes(sample, timestep, encoder_hidden_states=None, *args, return_dict: bool = True, **kwargs):
        weights, reaches = _pass_weights(context, latent_size, sample)
        rest = 1.0 - weights.sum(dim=0)
        blended = torch.zeros_like(sample, dtype=torch.float32)
        like = context.regions[0].mask
        common = dict(kwargs, return_dict=False)
        if bool((rest > 0).any()):
            call = ((sample, timestep, encoder_hidden_states, *args), common)
            blended = blended + rest * _pass(forward, adapters, None, like, *call).float()
        for region, weight, reach in zip(context.regions, weights, reaches, strict=True):
            if not reach:
                continue
            states = batch_aligned(region.embeddings, sample.shape[0], encoder_hidden_states)
            call = ((sample, timestep, states, *args), common)
            blended = blended + weight * _pass(forward, adapters, region.concept, like, *call).float()
        out = blended.to(sample.dtype)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    unet.forward = passes
    try:
        yield
    finally:
        if own_forward:
            unet.forward = forward
        else:
            del unet.forward
