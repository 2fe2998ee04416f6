"""The Stable Diffusion pieces that training and sampling share: prompts, latents and a seeded sampler.

Training encodes captions and images itself (with gradients through the text encoders) and samples
previews and class images with ``generate``; these helpers build the inputs exactly as the diffusers
pipelines do, for SD 1.x / 2.x (one text encoder) and SDXL (two, plus micro-conditioning).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _tokenize(tokenizer, captions: Sequence[str], device) -> torch.Tensor:
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def encode_captions(text_encoders, tokenizers, captions, device, sdxl: bool):
    """Prompt embeddings (and SDXL's pooled embedding) as the pipelines build them, with gradients."""
    if not sdxl:
        return text_encoders[0](_tokenize(tokenizers[0], captions, device))[0], None
    hidden, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers, strict=True):
        out = encoder(_tokenize(tokenizer, captions, device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
        pooled = out[0]  # the last encoder's projected pooled output ("text_embeds")
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(batch: dict, resolution: int, device, dtype) -> torch.Tensor:
    """SDXL micro-conditioning per example: original (h, w), crop top-left (y, x), target (h, w)."""
    rows = [
        list(original) + list(crop) + [resolution, resolution]
        for original, crop in zip(batch["original_size"], batch["crop_top_left"], strict=True)
    ]
    return torch.tensor(rows, device=device, dtype=dtype)


def encode_images(vae, pixel_values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """VAE latents in the UNet's space; ``generator`` None takes the distribution's mean."""
    with torch.no_grad():
        dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = dist.mode() if generator is None else dist.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


def decode_latents(pipe, latents: torch.Tensor, output_type: str = "pil") -> list:
    """Pipeline latents to PIL images (or ``output_type`` "np" arrays), in the VAE's own dtype (it may be
    kept in fp32)."""
    vae = pipe.vae
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean, device=vae.device, dtype=vae.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=vae.device, dtype=vae.dtype).view(1, -1, 1, 1)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        images = vae.decode(latents).sample
    return list(pipe.image_processor.postprocess(images.float(), output_type=output_type))


def generate(pipe, prompt: str, count: int, resolution: int, steps: int, guidance: float, seed: int):
    """``count`` images of ``prompt`` from the pipeline as it is now (patched or not), seeded."""
    generator = torch.Generator("cpu").manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        latents = pipe(
            prompt=[prompt] * count,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
            generator=generator,
            output_type="latent",
        ).images
    return decode_latents(pipe, latents)
