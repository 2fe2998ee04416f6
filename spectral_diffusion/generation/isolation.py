"""Self-attention that keeps the concepts' regions apart while a layout is drawn.

Routed slots confine each concept's delta to its box, and regional cross-attention gives each box its
own prompt, but self-attention still lets every image token read every other: the picture on the left
reads the one on the right while both are being decided. ``isolated_self_attention(unet, masks,
latent_size)`` installs ``IsolatedSelfAttnProcessor`` on every ``attn1`` of a diffusers UNet: a token
that belongs to one concept's region (its pooled mask above one half) attends to the tokens of
another concept's region with its attention logits lowered by ``ISOLATION``; tokens outside every
concept region, and every token's attention to them, are untouched. With fewer than two concept regions
nothing changes.

Measured on builtin:toy (docs/fusion-quality.md): two concepts each in its own region with its own prompt,
both placed in 35% of images instead of 21%; with the layout presets, 23% instead of 19%. A hard wall
(logits lowered by 10^4) did no better than 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from spectral_diffusion.core.routing import as_mask, pool_mask, token_grid
from spectral_diffusion.generation.regional import attention_modules, installed

ISOLATION = 3.0  # how far the attention logits between two concepts' regions are lowered


class IsolatedSelfAttnProcessor:
    """Self-attention with the logits between different concepts' regions lowered by ``isolation``."""

    def __init__(self, masks: Sequence[torch.Tensor], latent_size: tuple[int, int], isolation: float = ISOLATION):
        self.masks = [as_mask(mask, f"region {i + 1}") for i, mask in enumerate(masks)]
        self.latent_size = (int(latent_size[0]), int(latent_size[1]))
        self.isolation = float(isolation)
        self._biases: dict[tuple, torch.Tensor] = {}

    def bias(self, grid: tuple[int, int], device, dtype) -> torch.Tensor:
        """(h*w, h*w) additive logits: ``-isolation`` from a token of one concept region to another's."""
        key = (grid, str(device), dtype)
        if key not in self._biases:
            pooled = torch.stack([pool_mask(mask, grid).reshape(-1) for mask in self.masks])
            strongest, region = pooled.max(dim=0)
            owner = torch.where(strongest > 0.5, region, torch.full_like(region, -1))
            owned = owner >= 0
            apart = owned[:, None] & owned[None, :] & (owner[:, None] != owner[None, :])
            self._biases[key] = (apart.to(torch.float32) * -self.isolation).to(device=device, dtype=dtype)
        return self._biases[key]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        from diffusers.models.attention_processor import AttnProcessor2_0

        plain = encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None
        if plain or hidden_states.ndim != 3:  # transformer blocks' attn1 get (batch, tokens, channels)
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        grid = token_grid(hidden_states.shape[1], *self.latent_size)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = query.shape[-1] // attn.heads
        query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        bias = self.bias(grid, query.device, query.dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def isolated_self_attention(unet, masks: Sequence[torch.Tensor], latent_size: tuple[int, int]):
    """Keep the regions of ``masks`` (the concept regions' latent-grid masks) apart in every ``attn1`` of
    ``unet``; with fewer than two masks nothing is installed. The previous processors come back on exit."""
    modules = attention_modules(unet, "attn1") if len(masks) >= 2 else []
    with installed(modules, IsolatedSelfAttnProcessor(masks, latent_size)) as processor:
        yield processor
