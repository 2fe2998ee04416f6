"""Routed slots: which concepts act on which tokens while a regional layout is being generated.

One ``Router`` is shared by all spectral layers of one ``SpectralAdapters``. Inactive (the default) it
changes nothing: every live concept acts everywhere (global fusion). Active, it holds

* per concept a soft mask on the latent grid: layers whose input is IMAGE tokens scale each
  concept's block of input coordinates ``h = x R`` by that concept's mask, pooled onto the layer's
  own token grid, so a concept's delta is zero outside its region (a concept with no mask: zero);
* ``text_concepts``: the concepts switched on for layers whose input is TEXT tokens (text encoders,
  cross-attention keys and values); ``None`` means every live concept.

Masks are area-pooled (adaptive average pooling) onto coarse grids: nearest sampling would make a
thin box vanish at the 1/8 level, and averaging keeps the region's share of every coarse token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from spectral_diffusion.errors import RoutingError

IMAGE = "image"
TEXT = "text"
TOKEN_KINDS = (IMAGE, TEXT)
# cross-attention reads keys and values from the text embeddings; everything else in a UNet
# transformer block (queries, outputs, self-attention, feed-forward, proj_in/out) reads image tokens
_TEXT_SIDE_UNET_SUFFIXES = ("attn2.to_k", "attn2.to_v")
_MAX_LEVELS = 8


def token_kind_of(key: str) -> str:
    """``"text"`` or ``"image"`` for a layer key ``"<component>.<module path>"`` of SpectralAdapters."""
    component, _, path = key.partition(".")
    if component != "unet":
        return TEXT
    return TEXT if any(path == s or path.endswith("." + s) for s in _TEXT_SIDE_UNET_SUFFIXES) else IMAGE


def token_grid(n_tokens: int, latent_h: int, latent_w: int) -> tuple[int, int]:
    """The (h, w) grid of a UNet level with ``n_tokens`` image tokens for a latent of latent_h x latent_w.

    Diffusers downsamples with stride-2 convolutions (padding 1), so level d is
    ceil(h / 2^d) x ceil(w / 2^d); the sizes strictly shrink until 1 x 1, so at most one level fits.
    """
    h, w = int(latent_h), int(latent_w)
    if h < 1 or w < 1:
        raise RoutingError(f"the latent size must be positive, got {latent_h} x {latent_w}")
    seen = []
    for _ in range(_MAX_LEVELS + 1):
        if h * w == n_tokens:
            return h, w
        seen.append(f"{h}x{w}")
        if h == 1 and w == 1:
            break
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise RoutingError(
        f"a layer has {n_tokens} image tokens, which fits no UNet level of a {latent_h} x {latent_w} latent "
        f"(levels {', '.join(seen)}); give routed() the latent size of the image being generated"
    )


def pool_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area-average a (H, W) mask onto ``grid`` (identity when the grid is the mask's own size)."""
    if tuple(mask.shape) == tuple(grid):
        return mask
    return F.adaptive_avg_pool2d(mask[None, None], grid)[0, 0]


def as_mask(mask, name: str) -> torch.Tensor:
    """A float32 CPU (H, W) tensor with values in [0, 1], or a RoutingError saying what is wrong."""
    tensor = torch.as_tensor(mask).detach().to("cpu", torch.float32)
    if tensor.ndim != 2 or tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise RoutingError(
            f"the mask of {name!r} must be a 2-D (height, width) tensor, got shape {tuple(tensor.shape)}"
        )
    if not bool(torch.isfinite(tensor).all()) or tensor.min() < 0 or tensor.max() > 1:
        raise RoutingError(f"the mask of {name!r} must hold values in [0, 1]")
    return tensor


class Router:
    """Routing state shared by the spectral layers of one pipeline (see the module docstring)."""

    def __init__(self):
        self.masks: dict[str, torch.Tensor] | None = None  # None: image layers are not routed
        self.latent_size: tuple[int, int] | None = None
        self.text_concepts: frozenset[str] | None = None  # None: text layers use every live concept
        self._pooled: dict[tuple, dict[str, torch.Tensor]] = {}
        self._weights: dict[tuple, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.masks is not None or self.text_concepts is not None

    @property
    def routes_images(self) -> bool:
        return self.masks is not None

    def set_masks(self, masks: Mapping[str, object] | None, latent_size: Sequence[int] | None = None) -> None:
        """Route image layers by ``masks`` (concept -> (H, W) latent-grid mask); ``None`` stops routing."""
        self._pooled.clear()
        self._weights.clear()
        if masks is None:
            self.masks, self.latent_size = None, None
            return
        checked = {name: as_mask(mask, name) for name, mask in masks.items()}
        sizes = {tuple(mask.shape) for mask in checked.values()}
        if latent_size is not None:
            sizes.add((int(latent_size[0]), int(latent_size[1])))
        if len(sizes) != 1:
            raise RoutingError(
                f"all masks must be on the latent grid of the image ({sorted(sizes)} given); build them with "
                "region_masks(layout, latent_height, latent_width)"
            )
        self.masks, self.latent_size = checked, sizes.pop()

    def set_text_concepts(self, names: Iterable[str] | None) -> None:
        self.text_concepts = None if names is None else frozenset(names)

    def keeps_text(self, name: str) -> bool:
        return self.text_concepts is None or name in self.text_concepts

    def pooled(self, grid: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
        """Every concept's mask pooled onto ``grid``, flattened to (h*w,), cached per grid and device."""
        key = (grid, str(device))
        if key not in self._pooled:
            self._pooled[key] = {
                name: pool_mask(mask, grid).reshape(-1).to(device) for name, mask in self.masks.items()
            }
        return self._pooled[key]

    def grid_for(self, n_tokens: int) -> tuple[int, int]:
        return token_grid(n_tokens, *self.latent_size)

    def column_weights(
        self, names: Sequence[str], widths: Sequence[int], grid: tuple[int, int], device: torch.device
    ) -> torch.Tensor:
        """(h*w, sum(widths)) float32: concept i's pooled mask repeated over its ``widths[i]`` columns of h.

        Token-sized like h itself (never m x n); cached, as the same layers repeat every step.
        """
        key = (tuple(names), tuple(widths), grid, str(device))
        weights = self._weights.get(key)
        if weights is None:
            pooled = self.pooled(grid, device)
            columns = [pooled[name][:, None].expand(-1, width) for name, width in zip(names, widths, strict=True)]
            weights = torch.cat(columns, dim=1) if len(columns) > 1 else columns[0].contiguous()
            self._weights[key] = weights
        return weights
