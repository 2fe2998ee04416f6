"""The denoising objective of Stable Diffusion training: noisy latents, the UNet's prediction, its target.

The schedule and the prediction type (epsilon or v) are the pipeline's own, so a concept is trained
on the very task the model was pre-trained on; optional Min-SNR-gamma weights rebalance timesteps.
"""

from __future__ import annotations

import torch

from spectral_diffusion.core.config import TEXT_COMPONENTS, TOKENIZER_OF
from spectral_diffusion.generation.diffusion import encode_captions, sdxl_time_ids
from spectral_diffusion.training.config import PREDICTION_TYPES


def noise_scheduler(pipe):
    """A DDPM scheduler with the pipeline's own schedule and prediction type, for training."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(
            f"the model's scheduler predicts {kind!r}; training supports prediction_type {PREDICTION_TYPES}"
        )
    return scheduler


class DenoisingObjective:
    """What the UNet is asked to predict for one batch, on ``device``, at ``resolution`` pixels.

    ``pipe`` is the patched pipeline: its tokenizers already know the concept's trigger tokens.
    """

    def __init__(self, pipe, resolution: int, min_snr_gamma: float | None, device):
        self.pipe, self.resolution, self.min_snr_gamma, self.device = pipe, resolution, min_snr_gamma, device
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.noise_scheduler = noise_scheduler(pipe)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.tokenizers = [
            getattr(pipe, TOKENIZER_OF[name]) for name in TEXT_COMPONENTS if getattr(pipe, name, None) is not None
        ]
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}; use one of {PREDICTION_TYPES}")

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023), for epsilon or v targets."""
        alpha = self.alphas_cumprod[timesteps].float()
        snr = alpha / (1.0 - alpha)
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        return clipped / (snr + 1.0) if self.prediction_type == "v_prediction" else clipped / snr

    def predict(self, unet, text_encoders, batch, latents, noise, timesteps):
        """The UNet's output (fp32) on the noised latents, conditioned on the batch's captions."""
        embeds, pooled = encode_captions(text_encoders, self.tokenizers, batch["caption"], self.device, self.sdxl)
        dtype = self.pipe.unet.dtype
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        kwargs = {}
        if self.sdxl:
            time_ids = sdxl_time_ids(batch, self.resolution, self.device, dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype), "time_ids": time_ids}
        out = unet(noisy.to(dtype), timesteps, encoder_hidden_states=embeds.to(dtype), return_dict=False, **kwargs)
        return out[0].float()

    def sample_noise(self, latents, generator):
        """Noise and one timestep per example, drawn on the CPU from ``generator`` (reproducible anywhere)."""
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        timesteps = torch.randint(0, self.num_train_timesteps, (latents.shape[0],), generator=generator).to(self.device)
        return noise, timesteps


def latent_weights(masks: torch.Tensor, latent_size: tuple[int, int], background_weight: float) -> torch.Tensor:
    """Per-latent loss weights (N x 1 x h x w) from pixel masks (N x 1 x H x W, 1 = concept).

    The mask is area-pooled onto the latent grid (a latent's weight is its share of concept pixels),
    then mapped so that concept latents weigh 1 and background latents ``background_weight``.
    """
    pooled = torch.nn.functional.adaptive_avg_pool2d(masks.float(), latent_size)
    return background_weight + (1.0 - background_weight) * pooled


def per_example_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean squared error of each example, each latent weighted by ``weights`` (broadcast over channels).

    The weighted sum is divided by the number of latents, not by the weights' sum: a background
    latent then contributes exactly ``background_weight`` times what it does unmasked, and an all-white
    mask gives the plain loss.
    """
    error = torch.nn.functional.mse_loss(pred, target, reduction="none")
    if weights is not None:
        error = error * weights.to(error.device)
    return error.mean(dim=tuple(range(1, pred.ndim)))
