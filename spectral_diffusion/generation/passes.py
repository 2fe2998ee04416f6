"""Regional composition by passes: one UNet pass per region, with only that region's concept on.

While ``region_passes(unet, adapters, context, latent_size)`` is active, every call of the UNet runs it
once per region: the region's concept switched on everywhere (image and text side, every other concept
off), its region prompt's embeddings instead of the context prompt's; the predictions are blended by the
regions' soft latent masks (``RegionalContext.weights``; normalised to sum to 1 where the boxes cover the
whole image). Where the boxes leave room, one more pass reads the context prompt with no concept on.
This is what AUTOMATIC1111's Regional Prompter (latent mode) and ComfyUI's masked LoRA hooks do with
LoRAs; slots need nothing loaded or switched but the router, and each pass equals the concept's exact LoRA
alone (docs/design.md section 11).

Unlike those, the passes start apart: for the first ``PRIVATE_SHARE`` of the steps each pass denoises a
latent of its own (``region_passes(..., private=...)``: the pipeline's batch holds one latent per pass
and image, each from the image's noise), so each concept is drawn as if it were alone; then the
latents are put together by the boxes and every pass predicts on the one picture, which draws over the
seam; ``composite`` gives one latent per image. Sharing one picture from the first step, a pass saw the
other concept's object form beside its own and drew rougher shapes on washed-out backgrounds.

Measured on builtin:toy (docs/fusion-quality.md, 6 pairs x 8 scenes, each its own colours, background
and seed): both concepts, each in its own half and on one background, in 39 of 48 images by eye with
the left-right preset (35 when the passes shared one picture, as the LoRA-pass baseline does) against 7 of
48 for one routed pass (``generation/regional.py``), at 1.35-1.7 times its time (1.8 times at Stable
Diffusion 1.5's size, docs/benchmarks.md).
The pipeline's own denoising loop, schedulers, guidance and callbacks stay as they are: only the UNet's
forward is wrapped, and it comes back on exit (also on errors).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from spectral_diffusion.generation.regional import RegionalContext, batch_aligned

# The first PRIVATE_SHARE of the denoising steps, each pass denoises a latent of its own (the whole
# picture, as if its concept were alone); then the latents are put together by the boxes and every pass
# predicts on the one picture, the predictions blended. Measured on builtin:toy, docs/fusion-quality.md.
PRIVATE_SHARE = 0.8


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


@dataclass(frozen=True)
class Track:
    """One pass: its concept (None: the context pass, no concept on), its prompt embeddings (None: the
    pipeline's own, the context prompt) and its blend weight (1, 1, h, w); the weights of all tracks sum to 1."""

    concept: str | None
    embeddings: torch.Tensor | None
    weight: torch.Tensor


def tracks(context: RegionalContext, latent_size: tuple[int, int], like: torch.Tensor) -> list[Track]:
    """The passes a layout is drawn with, weights on ``like``'s device: the context pass first where the
    boxes leave room, then every region that reaches the image."""
    weights, reaches = _pass_weights(context, (int(latent_size[0]), int(latent_size[1])), like)
    rest = 1.0 - weights.sum(dim=0)
    out = [Track(None, None, rest)] if bool((rest > 0).any()) else []
    for region, weight, reach in zip(context.regions, weights, reaches, strict=True):
        if reach:
            out.append(Track(region.concept, region.embeddings, weight))
    return out


def private_calls(steps: int) -> int:
    """How many of a generation's UNet calls each pass makes on a latent of its own."""
    return round(PRIVATE_SHARE * steps)


def composite(latents: torch.Tensor, context: RegionalContext, latent_size: tuple[int, int]) -> torch.Tensor:
    """One latent per image from the pipeline's latents, one per pass and image (image-major, see
    ``region_passes``): each pass's own latent inside its weight."""
    passes = tracks(context, latent_size, latents)
    per_image = latents.view(-1, len(passes), *latents.shape[1:])
    return sum(track.weight.to(latents) * per_image[:, k] for k, track in enumerate(passes))


@contextmanager
def region_passes(unet, adapters, context: RegionalContext, latent_size: tuple[int, int], private: int = 0):
    """Wrap ``unet``'s forward so that each call blends one pass per region of ``context`` (see the
    module docstring); ``adapters`` must hold the regions' concepts live (unmerged).

    ``private``: for this many calls each pass denoises a latent of its own. The UNet's batch must then
    hold ``len(tracks(context, latent_size, like))`` latents per image, image-major, each image's copies from the
    same noise, and the pipeline's result goes through ``composite``. With 0 the batch is the pipeline's
    own, and every call blends the passes' predictions on it."""
    own_forward = "forward" in vars(unet)  # e.g. accelerate's offload hooks set an instance forward
    forward = unet.forward
    latent_size = (int(latent_size[0]), int(latent_size[1]))
    calls = 0

    def run(track: Track, sample, timestep, states, args, kwargs):
        if track.embeddings is not None:
            states = batch_aligned(track.embeddings, sample.shape[0], states)
        return _pass(
            forward, adapters, track.concept, context.regions[0].mask, (sample, timestep, states, *args), kwargs
        )

    def blend(sample, timestep, states, args, kwargs):
        """Every pass on ``sample``, the predictions blended by the tracks' weights."""
        blended = torch.zeros_like(sample, dtype=torch.float32)
        for track in tracks(context, latent_size, sample):
            blended = blended + track.weight * run(track, sample, timestep, states, args, kwargs).float()
        return blended

    def on_copies(sample, timestep, states, args, kwargs, is_private: bool):
        """The batch holds one latent per pass and image: each pass on its own latents (private), or
        every pass on the blend of them, the prediction given to every copy. Under guidance the batch is
        [negative; positive], each image-major, so it splits into groups of one latent per pass as well."""
        passes_ = tracks(context, latent_size, sample)
        n = len(passes_)
        images = sample.shape[0] // n
        copies = sample.view(images, n, *sample.shape[1:])
        if torch.is_tensor(timestep) and timestep.ndim and timestep.numel() == sample.shape[0]:
            timestep = timestep.view(images, n)[:, 0]
        own_states = states.view(images, n, *states.shape[1:])[:, 0] if states is not None else None
        own_kwargs = dict(kwargs)
        if kwargs.get("added_cond_kwargs"):  # SDXL: pooled embeddings and time ids, one row per latent
            own_kwargs["added_cond_kwargs"] = {
                key: value.view(images, n, *value.shape[1:])[:, 0] for key, value in kwargs["added_cond_kwargs"].items()
            }
        out = torch.empty_like(copies, dtype=torch.float32)
        if is_private:
            for k, track in enumerate(passes_):
                out[:, k] = run(track, copies[:, k], timestep, own_states, args, own_kwargs).float()
        else:
            together = sum(track.weight.to(sample) * copies[:, k] for k, track in enumerate(passes_))
            out[:] = blend(together, timestep, own_states, args, own_kwargs).unsqueeze(1)
        return out.view_as(sample)

    def passes(sample, timestep, encoder_hidden_states=None, *args, return_dict: bool = True, **kwargs):
        nonlocal calls
        common = dict(kwargs, return_dict=False)
        if private:
            out = on_copies(sample, timestep, encoder_hidden_states, args, common, calls < private)
        else:
            out = blend(sample, timestep, encoder_hidden_states, args, common)
        calls += 1
        out = out.to(sample.dtype)
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
