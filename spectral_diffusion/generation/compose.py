"""One request through the pipeline: globally fused, or composed regionally.

Global: every active concept acts everywhere (the weights are exactly W + sum of deltas). Regional
(``request.layout``): region prompts are encoded with only their concept's text-encoder slot on, then
``request.regional_mode`` draws the layout: ``passes`` runs the UNet once per region with only that
region's concept on and blends the predictions by the boxes (``passes``); ``routed`` runs it once, each
concept's slot acting only inside its own box and on its own region prompt's tokens, inside each box the
image attending to that region's prompt, and self-attention between two concepts' boxes damped
(``regional``, ``isolation``; docs/design.md section 11).
"""

from __future__ import annotations

import torch

from spectral_diffusion.generation.diffusion import decode_latents
from spectral_diffusion.generation.isolation import isolated_self_attention
from spectral_diffusion.generation.layout import region_masks
from spectral_diffusion.generation.passes import composite, private_calls, region_passes, tracks
from spectral_diffusion.generation.regional import encode_layout, regional_attention


def _common_kwargs(pipe, request, seed: int, progress, output_type: str) -> dict:
    kwargs = {
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "width": request.width,
        "height": request.height,
        "num_images_per_prompt": request.num_images,
        # one generator per image, image k seeded with seed + k (as AUTOMATIC1111 does), so image k of a
        # batch is the image of seed + k alone; a CPU generator gives the same noise on every device
        "generator": [torch.Generator("cpu").manual_seed(seed + k) for k in range(request.num_images)],
        "output_type": output_type,
    }
    if progress is not None:

        def on_step(pipeline, step, timestep, callback_kwargs):
            progress(step + 1, pipeline.num_timesteps)
            return {}

        kwargs["callback_on_step_end"] = on_step
    return kwargs


def image_size(pipe, request) -> tuple[int, int]:
    """(height, width) in pixels: the request's, else the model's native size."""
    size = pipe.unet.config.sample_size
    native = (size, size) if isinstance(size, int) else tuple(size)
    scale = pipe.vae_scale_factor
    return request.height or native[0] * scale, request.width or native[1] * scale


def run_global(pipe, request, seed: int, progress=None, output_type: str = "pil") -> list:
    result = pipe(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,  # None keeps SDXL's zeroed negative
        **_common_kwargs(pipe, request, seed, progress, output_type),
    )
    return list(result.images)


def _run_passes(pipe, adapters, request, context, embeds, kwargs, latent_size, seed: int) -> list:
    """The layout by passes (``generation/passes.py``): one latent per pass and image, the copies of an
    image from the same noise, denoised privately for the first steps, then together; put together by
    the boxes and decoded once per image."""
    private = private_calls(request.steps)
    if not private:  # every call on the one picture: the pipeline's own batch
        with region_passes(pipe.unet, adapters, context, latent_size):
            return list(pipe(**embeds, **kwargs).images)
    copies = len(tracks(context, latent_size, context.regions[0].mask))
    output_type = kwargs["output_type"]
    kwargs.update(
        num_images_per_prompt=request.num_images * copies,
        generator=[
            torch.Generator("cpu").manual_seed(seed + k) for k in range(request.num_images) for _ in range(copies)
        ],
        output_type="latent",
    )
    with region_passes(pipe.unet, adapters, context, latent_size, private):
        latents = pipe(**embeds, **kwargs).images
    latents = composite(latents, context, latent_size)
    return list(latents) if output_type == "latent" else decode_latents(pipe, latents, output_type)


def run_regional(pipe, adapters, request, seed: int, progress=None, output_type: str = "pil") -> list:
    """``request.layout`` with routed slots; ``adapters`` must hold the layout's concepts live (unmerged)."""
    layout = request.layout
    height, width = image_size(pipe, request)
    scale = pipe.vae_scale_factor
    masks = region_masks(layout, height // scale, width // scale)
    guidance = request.guidance > 1.0  # the pipeline's own test for classifier-free guidance
    context, embeds = encode_layout(pipe, layout, masks, adapters.text_only, request.num_images, guidance)
    concept_masks = {region.concept: mask for region, mask in zip(layout.regions, masks, strict=True) if region.concept}
    kwargs = _common_kwargs(pipe, request, seed, progress, output_type)
    kwargs.update(height=height, width=width)
    latent_size = (height // scale, width // scale)
    if request.regional_mode == "passes":
        return _run_passes(pipe, adapters, request, context, embeds, kwargs, latent_size, seed)
    with (
        adapters.routed(concept_masks, latent_size=latent_size),
        regional_attention(pipe.unet, context),
        isolated_self_attention(pipe.unet, list(concept_masks.values()), latent_size),
    ):
        result = pipe(**embeds, **kwargs)
    return list(result.images)
