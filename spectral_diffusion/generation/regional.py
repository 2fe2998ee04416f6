"""Regional cross-attention: each region of the image attends to its own prompt.

``RegionalAttnProcessor`` replaces the processor of every cross-attention block (``attn2``) of a
diffusers ``UNet2DConditionModel`` while ``regional_attention(unet, context)`` is active. Per block it
computes the queries once, attention against the context embeddings (the ``encoder_hidden_states``
the pipeline passes) and against every region's embeddings, blends the attention outputs token by
token with the regions' soft masks pooled onto the block's grid (weights summing to at most 1; the
rest follows the context), and applies the output projection once. Inside the box of a region with a
prompt of its own, its prompt's attention is blended with the context prompt's, both read with the
region's concept on (the context keeps ``OWN_PROMPT_CONTEXT_SHARE``). Self-attention is untouched.

Keys and values of a region are computed with only that region's concept switched on in text-side
layers, through an optional ``text_routing(names)`` context manager (``SpectralAdapters.text_only``).
Without one (a plain UNet, a PEFT LoRA UNet) the per-region text routing is simply skipped.

``encode_layout`` encodes a layout's prompts through a pipeline and builds the context; the order of
calls for a whole generation is in its docstring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from spectral_diffusion.core.routing import as_mask, pool_mask, token_grid
from spectral_diffusion.errors import RoutingError
from spectral_diffusion.generation.layout import Layout

TextRouting = Callable[[frozenset | None], contextlib.AbstractContextManager]
CONTEXT_CONCEPTS = ("none", "all")
# Inside a box whose region has a prompt of its own, the attention outputs are blended with this share of
# the context prompt's (A1111 Regional Prompter's "base ratio"): the context describes the whole picture,
# and a model that decides the scene globally (every object, where) needs it in every region. Measured on
# builtin:toy (docs/fusion-quality.md): with one-object region prompts and no share, the second box came out
# empty in most images (base model 1 of 8 with both objects); with 0.7, 8 of 8. Inside a region the context
# is read with the region's concept on: read with none, a trained concept's token lost most of its shape.
OWN_PROMPT_CONTEXT_SHARE = 0.7


@dataclass
class RegionInput:
    """One region's prompt embeddings (batch-aligned with the pipeline's), latent-grid mask, concept."""

    embeddings: torch.Tensor
    mask: torch.Tensor
    concept: str | None = None
    share: float = 1.0  # the region prompt's part of the blend inside the mask; the rest follows the context


@dataclass
class RegionalContext:
    """What the regional processor needs: the regions, and how to switch text-side concepts.

    ``context_concepts``: the concepts on while the context's keys/values are computed, ``"none"``
    (only the base model; default) or ``"all"`` (every live concept, as in global fusion).
    """

    regions: Sequence[RegionInput]
    text_routing: TextRouting | None = None
    context_concepts: str = "none"
    _weights: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        _context_set(self.context_concepts)
        if not self.regions:
            raise RoutingError("a regional context needs at least one region")
        self.regions = [
            RegionInput(
                region.embeddings,
                as_mask(region.mask, region.concept or f"region {i + 1}"),
                region.concept,
                _check_share(region.share),
            )
            for i, region in enumerate(self.regions)
        ]
        sizes = {tuple(region.mask.shape) for region in self.regions}
        if len(sizes) != 1:
            raise RoutingError(f"all region masks must be on one latent grid, got sizes {sorted(sizes)}")

    @property
    def latent_size(self) -> tuple[int, int]:
        return tuple(self.regions[0].mask.shape)

    def weights(self, grid: tuple[int, int], device, dtype) -> tuple[torch.Tensor, list[bool]]:
        """(regions, h*w) blend weights on ``grid`` (pooled masks, scaled where they sum past 1), and
        per region whether it reaches this grid at all; cached per grid, device and dtype."""
        key = (grid, str(device), dtype)
        if key not in self._weights:
            pooled = torch.stack([pool_mask(region.mask, grid).reshape(-1) for region in self.regions])
            total = pooled.sum(dim=0)
            pooled = pooled / torch.where(total > 1, total, torch.ones_like(total))
            reaches = [bool(row.any()) for row in pooled]
            self._weights[key] = (pooled.to(device=device, dtype=dtype), reaches)
        return self._weights[key]

    def region_routing(self, region: RegionInput):
        return _routing(self.text_routing, _concepts_of(region.concept))

    def context_routing(self):
        return _routing(self.text_routing, _context_set(self.context_concepts))


def _check_share(share) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise RoutingError(f"a region's share of the blend must be between 0 and 1, got {share!r}")
    return float(share)


def _concepts_of(concept: str | None) -> frozenset:
    return frozenset() if concept is None else frozenset({concept})


def _context_set(context_concepts: str) -> frozenset | None:
    if context_concepts not in CONTEXT_CONCEPTS:
        raise RoutingError(f"context_concepts must be one of {CONTEXT_CONCEPTS}, got {context_concepts!r}")
    return frozenset() if context_concepts == "none" else None


def _routing(text_routing: TextRouting | None, concepts: frozenset | None):
    """The text routing context for a set of concepts (a no-op without ``text_routing``)."""
    return contextlib.nullcontext() if text_routing is None else text_routing(concepts)


def batch_aligned(embeddings: torch.Tensor, batch_size: int, like: torch.Tensor) -> torch.Tensor:
    """``embeddings`` on ``like``'s device and dtype with the UNet's batch (a batch of 1 is broadcast)."""
    if embeddings.shape[0] == batch_size:
        return embeddings.to(device=like.device, dtype=like.dtype)
    if embeddings.shape[0] == 1:
        return embeddings.to(device=like.device, dtype=like.dtype).expand(batch_size, -1, -1)
    raise RoutingError(
        f"region embeddings have batch {embeddings.shape[0]} but the UNet runs batch {batch_size}; under "
        "classifier-free guidance give each region [its negative; its prompt], each repeated per image"
    )


class RegionalAttnProcessor:
    """Cross-attention with per-region prompts, following diffusers' ``AttnProcessor2_0``."""

    def __init__(self, context: RegionalContext):
        self.context = context
        # keys and values per block and prompt: the prompts (and the concepts each is read with) stay the
        # same through a generation, so they are projected once, not at every denoising step
        self._projected: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._region_states: dict[tuple, torch.Tensor] = {}

    def _keys_values(self, attn, states: torch.Tensor, tag) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, heads, L, d) keys and values of ``states`` read with the concepts of ``tag``; reused while
        the same ``states`` tensor comes back for the same block and tag."""
        cached = self._projected.get((id(attn), tag))
        if cached is not None and cached[0] is states:
            return cached[1], cached[2]
        projected = states
        if attn.norm_cross:
            projected = attn.norm_encoder_hidden_states(projected)
        keys, values = attn.to_k(projected), attn.to_v(projected)
        batch_size, head_dim = states.shape[0], keys.shape[-1] // attn.heads
        keys = keys.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        values = values.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            keys = attn.norm_k(keys)
        self._projected[(id(attn), tag)] = (states, keys, values)
        return keys, values

    def _region(self, index: int, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        """Region ``index``'s embeddings aligned with the UNet batch, one tensor per batch, device and dtype."""
        key = (index, batch_size, str(like.device), like.dtype)
        if key not in self._region_states:
            self._region_states[key] = batch_aligned(self.context.regions[index].embeddings, batch_size, like)
        return self._region_states[key]

    def _attend(self, attn, query, rows, prompts, attention_mask=None) -> list[torch.Tensor]:
        """Attention of the (B, heads, T, d) ``query``'s tokens ``rows`` (a boolean mask over T) to each of
        ``prompts`` ((states, tag) pairs of one length; one SDPA call): per prompt (B, rows, heads * d). A
        token's attention does not depend on the others', so a region's attention is computed only where
        it is blended in."""
        count = len(prompts)
        projected = [self._keys_values(attn, states, tag) for states, tag in prompts]
        keys = torch.cat([k for k, _ in projected]) if count > 1 else projected[0][0]
        values = torch.cat([v for _, v in projected]) if count > 1 else projected[0][1]
        if attention_mask is not None and attention_mask.shape[2] != 1:  # a mask per query token
            attention_mask = attention_mask[:, :, rows]
        batch_size, heads, _, head_dim = query.shape
        query = query[:, :, rows]
        query = query.repeat(count, 1, 1, 1) if count > 1 else query
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        out = out.transpose(1, 2).reshape(batch_size * count, -1, heads * head_dim).to(query.dtype)
        return list(out.chunk(count)) if count > 1 else [out]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:  # not cross-attention: nothing regional to do
            from diffusers.models.attention_processor import AttnProcessor2_0

            return AttnProcessor2_0()(attn, hidden_states, None, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
            grid = (height, width)
        else:
            grid = token_grid(hidden_states.shape[1], *self.context.latent_size)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:  # the pipeline's mask is for the context tokens only
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        head_dim = query.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        hidden_states = self._blend(attn, query, (encoder_hidden_states, attention_mask), grid)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _blend(self, attn, query, context_input, grid):
        """``(1 - sum_i w_i) context + sum_i w_i region_i``, token by token: exactly the context where no
        region reaches and where a region's attention equals the context's. Each attention is computed
        only on the tokens where its weight is above zero. A region with a prompt of its own blends it
        with the context prompt (``share`` of its own), both read with the region's concept on."""
        weights, reaches = self.context.weights(grid, query.device, query.dtype)
        batch_size, heads, tokens, head_dim = query.shape
        out = query.new_zeros(batch_size, tokens, heads * head_dim)
        rest = 1.0 - weights.sum(dim=0)  # the context's share
        context, context_mask = context_input
        base = (context, "context")  # the context prompt as read outside the regions
        rows = rest > 0
        if rows.any():
            with self.context.context_routing():
                out[:, rows] = rest[rows, None] * self._attend(attn, query, rows, [base], context_mask)[0]
        for index, (region, weight, reach) in enumerate(zip(self.context.regions, weights, reaches, strict=True)):
            if not reach:  # the region does not reach this grid: skip its attention
                continue
            rows = weight > 0
            own = (self._region(index, batch_size, query), ("region", index))
            # the context prompt read with the region's concept on (the base context without a concept)
            mixed = (context, ("context", index)) if region.concept else None
            with self.context.region_routing(region):
                if region.share == 1.0:
                    region_out = self._attend(attn, query, rows, [own])[0]
                elif mixed and context_mask is None and own[0].shape == context.shape:
                    region_out, own_context = self._attend(attn, query, rows, [own, mixed])
                else:
                    region_out = self._attend(attn, query, rows, [own])[0]
                    own_context = self._attend(attn, query, rows, [mixed], context_mask)[0] if mixed else None
            if region.share < 1.0:
                if own_context is None:
                    with self.context.context_routing():
                        own_context = self._attend(attn, query, rows, [base], context_mask)[0]
                region_out = region.share * region_out + (1.0 - region.share) * own_context
            out[:, rows] += weight[rows, None] * region_out
        return out


def attention_modules(unet, kind: str) -> list:
    """Every diffusers ``Attention`` of ``unet`` named ``kind`` (``"attn1"``: self, ``"attn2"``: cross)."""
    from diffusers.models.attention_processor import Attention

    return [
        module
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and (name == kind or name.endswith("." + kind))
    ]


@contextmanager
def installed(modules: Sequence, processor):
    """``processor`` on every module of ``modules``; the previous processors come back on exit (also on errors)."""
    previous = [module.processor for module in modules]
    for module in modules:
        module.set_processor(processor)
    try:
        yield processor
    finally:
        for module, old in zip(modules, previous, strict=True):
            module.set_processor(old)


@contextmanager
def regional_attention(unet, context: RegionalContext):
    """Install a ``RegionalAttnProcessor`` on every ``attn2`` of ``unet``; the previous processors
    come back on exit (also on errors)."""
    modules = attention_modules(unet, "attn2")
    if not modules:
        raise RoutingError("the UNet has no cross-attention (attn2) blocks; regional prompts need them")
    with installed(modules, RegionalAttnProcessor(context)) as processor:
        yield processor


def _encode(pipe, prompt: str, negative: str, guidance: bool):
    """(positive, negative) embeddings of one prompt, batch 1, through the pipeline's own encoder."""
    return pipe.encode_prompt(
        prompt=prompt,
        device=pipe._execution_device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=guidance,
        negative_prompt=negative or None,  # None keeps SDXL's zeroed negative, as Studio does
    )


def encode_layout(
    pipe,
    layout: Layout,
    masks: Sequence[torch.Tensor],
    text_routing: TextRouting | None = None,
    num_images_per_prompt: int = 1,
    guidance: bool = True,
    context_concepts: str = "none",
) -> tuple[RegionalContext, dict]:
    """Encode the layout's context and region prompts; return the regional context and the
    embedding keyword arguments for ``pipe(...)`` (``prompt_embeds``, ``negative_prompt_embeds``
    and, for SDXL, the pooled ones).

    ``masks``: ``region_masks(layout, height // vae_scale_factor, width // vae_scale_factor)``.
    ``guidance``: whether the pipeline will use classifier-free guidance (guidance scale > 1).
    A whole generation, with ``adapters`` the pipeline's SpectralAdapters (unmerged)::

        masks = region_masks(layout, latent_h, latent_w)
        context, embeds = encode_layout(pipe, layout, masks, adapters.text_only, n, guidance > 1)
        concept_masks = {r.concept: m for r, m in zip(layout.regions, masks) if r.concept}
        with adapters.routed(concept_masks), regional_attention(pipe.unet, context):
            pipe(**embeds, num_images_per_prompt=n, height=..., width=..., guidance_scale=guidance, ...)
    """
    if len(masks) != len(layout.regions):
        raise RoutingError(f"the layout has {len(layout.regions)} regions but {len(masks)} masks were given")
    with _routing(text_routing, _context_set(context_concepts)):
        context = _encode(pipe, layout.prompt, layout.negative, guidance)
    embeds = {"prompt_embeds": context[0], "negative_prompt_embeds": context[1] if guidance else None}
    if len(context) == 4:  # SDXL: the pooled embeddings condition the UNet's added time embedding
        embeds["pooled_prompt_embeds"] = context[2]
        embeds["negative_pooled_prompt_embeds"] = context[3] if guidance else None
    regions = []
    for region, mask in zip(layout.regions, masks, strict=True):
        with _routing(text_routing, _concepts_of(region.concept)):
            positive, negative = _encode(pipe, layout.region_prompt(region), layout.region_negative(region), guidance)[
                :2
            ]
        # the pipeline's UNet batch is [negative x n; positive x n] (positive x n without guidance)
        halves = [negative, positive] if guidance else [positive]
        stacked = torch.cat([half.expand(num_images_per_prompt, -1, -1) for half in halves])
        own_prompt = layout.region_prompt(region) != layout.prompt
        regions.append(
            RegionInput(stacked, mask, region.concept, 1.0 - OWN_PROMPT_CONTEXT_SHARE if own_prompt else 1.0)
        )
    return RegionalContext(regions, text_routing, context_concepts), embeds
