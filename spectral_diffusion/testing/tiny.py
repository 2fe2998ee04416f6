"""The tiny seed-built models ``builtin:tiny`` (SD 1.x) and ``builtin:tiny-sdxl`` (SDXL).

Tests and CI need real Stable Diffusion architectures with no network and no weights on disk, so
these small pipelines are built from fixed seeds and saved once through the ordinary
``save_pretrained`` / ``from_pretrained`` path.  Everything downstream (patching, training, export)
then sees what it sees with a real model: the same classes, module paths, configs and loaders.

Sizes (both pipelines): UNet block channels (32, 64), 2 layers per block, latent ``sample_size``
32, a 2-block VAE (``vae_scale_factor`` 2, 4 latent channels), so the default image is 64 x 64
pixels.  Text encoders have hidden size 32, 4 layers, 4 heads and an intermediate size of 37 (not
a multiple of the hidden size, so that m / n shape mix-ups fail loudly).  Their images are noise:
they exercise code paths.
"""

from __future__ import annotations

import torch

from spectral_diffusion.testing.bpe import MAX_LENGTH, build_tokenizer

TEXT_HIDDEN = 32
TINY_SAMPLE_SIZE = 32  # latent pixels; x vae_scale_factor 2 = 64 px images
VAE_SCALE_FACTOR = 2
DEFAULT_IMAGE_SIZE = TINY_SAMPLE_SIZE * VAE_SCALE_FACTOR

_SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


def _text_config(tokenizer, projection_dim: int | None = None):
    """A CLIP text config of 4 small layers whose special ids match ``tokenizer``."""
    from transformers import CLIPTextConfig

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _tiny_vae():
    """A 2-block VAE: downsampling factor 2, 4 latent channels, SD's scaling factor."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=DEFAULT_IMAGE_SIZE,
        scaling_factor=0.18215,
    )


def _tiny_sd_unet():
    """SD 1.x layout in miniature: cross-attention at the high-resolution level."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=TINY_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def _tiny_sdxl_unet():
    """SDXL layout in miniature: linear projections, text_time added conditioning.

    The added embedding input is 6 size/crop numbers x ``addition_time_embed_dim``
    plus the pooled, projected output of the second text encoder.
    """
    from diffusers import UNet2DConditionModel

    time_dim = 8
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=TINY_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * TEXT_HIDDEN,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + TEXT_HIDDEN,
        norm_num_groups=32,
    )


def _tiny_sd_components() -> dict:
    """Components of ``builtin:tiny``, each initialised from its own fixed seed."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    scheduler = DDIMScheduler(
        **_SD_SCHEDULER,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="leading",
    )
    return {
        "unet": _tiny_sd_unet(),
        "vae": _tiny_vae(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def _tiny_sdxl_components() -> dict:
    """Components of ``builtin:tiny-sdxl``; both tokenizers are the built-in one."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, projection_dim=TEXT_HIDDEN))
    scheduler = EulerDiscreteScheduler(**_SD_SCHEDULER, interpolation_type="linear", timestep_spacing="leading")
    return {
        "unet": _tiny_sdxl_unet(),
        "vae": _tiny_vae(),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": build_tokenizer(),
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }


def tiny_pipeline():
    """``builtin:tiny`` (SD 1.x architecture, 64x64 px), in memory; the registry saves it on first use."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**_tiny_sd_components())


def tiny_sdxl_pipeline():
    """``builtin:tiny-sdxl`` (SDXL architecture, 64x64 px), in memory; the registry saves it on first use."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**_tiny_sdxl_components())
