"""Spectral adapter layers: a frozen base layer plus any number of concepts, one slot each.

A concept in slot k owns the singular-vector columns ``J_k = [k r, (k+1) r)`` of the base weight.
Both variants write their update as ``dW = L @ R^T`` with thin factors (``L = out_proj Mix^T``,
``R = in_proj``; rank 2r additive, r rotational), built in closed form from the slot's parameters.
That one definition gives the forward pass (``x -> x R -> (x R) L^T``, never an m x n matrix), the
explicit delta (merge, tests) and the exact LoRA export. The maths is in docs/design.md section 2.

The forward pass touches token-sized tensors only in the two thin matrix products: everything else
(building L and R, strengths) works on parameter-sized tensors, and for ``nn.Linear`` the second
product is fused with the addition to the base output (``addmm``), so a concept costs about what a
LoRA of the same rank costs (bench/, docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from torch import nn

from spectral_diffusion.core.config import VARIANTS
from spectral_diffusion.core.routing import IMAGE, TEXT, TOKEN_KINDS, Router
from spectral_diffusion.core.svd import Triplets
from spectral_diffusion.errors import ConceptNotFoundError


def cayley(generator: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``R(P) = (I - P)(I + P)^-1`` of the skew part ``P = G - G^T``; ``R(0) = I``."""
    skew = generator - generator.T
    eye = torch.eye(skew.shape[0], dtype=skew.dtype, device=skew.device)
    # (I - P) and (I + P)^-1 commute, so a solve gives the product without an explicit inverse.
    return torch.linalg.solve(eye + skew, eye - skew)


def cayley_offset(generator: torch.Tensor) -> torch.Tensor:
    """``R(P) - I = -2 P (I + P)^-1``, computed directly: as small as P, with no cancellation."""
    skew = generator - generator.T
    eye = torch.eye(skew.shape[0], dtype=skew.dtype, device=skew.device)
    return -2.0 * torch.linalg.solve(eye + skew, skew)  # P and (I + P)^-1 commute


class SlotAdapter(nn.Module):
    """One concept's trainable update inside one slot of one layer.

    The slot's base triplets are buffers (not saved in the model's state dict, stored in the adapter
    file instead); the trainable tensors are float32 parameters that start at zero, so a new concept
    leaves the layer's output unchanged.
    """

    def __init__(self, triplets: Triplets, variant: str, slot: int):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")
        self.variant = variant
        self.slot = slot
        self.rank = triplets.k
        self.strength = 1.0
        self.enabled = True
        self.register_buffer("U", triplets.U.detach().to(torch.float32).clone(), persistent=False)
        self.register_buffer("s", triplets.s.detach().to(torch.float32).clone(), persistent=False)
        self.register_buffer("V", triplets.V.detach().to(torch.float32).clone(), persistent=False)
        m, n, r = self.U.shape[0], self.V.shape[0], self.rank
        if variant == "additive":
            self.A = nn.Parameter(torch.zeros(m, r))
            self.B = nn.Parameter(torch.zeros(n, r))
        else:
            self.G_U = nn.Parameter(torch.zeros(r, r))
            self.G_V = nn.Parameter(torch.zeros(r, r))
        self.c = nn.Parameter(torch.zeros(r))

    @property
    def triplets(self) -> Triplets:
        return Triplets(self.U, self.s, self.V)

    @property
    def in_width(self) -> int:
        """p, the number of input coordinates ``mix`` reads."""
        return 2 * self.rank if self.variant == "additive" else self.rank

    def trainable_names(self) -> tuple[str, ...]:
        return ("A", "B", "c") if self.variant == "additive" else ("G_U", "G_V", "c")

    def in_proj(self) -> torch.Tensor:
        """n x p: the input directions the update reads."""
        if self.variant == "additive":
            return torch.cat([self.V, self.B.float()], dim=1)
        return self.V

    def out_proj(self) -> torch.Tensor:
        """m x q: the output directions the update writes."""
        if self.variant == "additive":
            return torch.cat([self.U, self.A.float()], dim=1)
        return self.U

    def core(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The rotational variant's r x r core ``M = R_U diag(s+c) R_V^T - diag(s)``.

        Written as a difference, M cancels catastrophically for small updates (two s-sized matrices
        agreeing in most digits). With ``D = R - I`` (``cayley_offset``, as small as the update) it is
        ``diag(c) + D_U S' + S' D_V^T + D_U S' D_V^T`` with ``S' = diag(s + c)``: every term is small.
        Export and merge build it in float64.
        """
        d_u, d_v = cayley_offset(self.G_U.to(dtype)), cayley_offset(self.G_V.to(dtype))
        c = self.c.to(dtype)
        scaled = self.s.to(dtype) + c  # S' as a vector: D S' scales columns, S' D^T scales rows
        return torch.diag(c) + d_u * scaled + scaled[:, None] * d_v.T + (d_u * scaled) @ d_v.T

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """Map input coordinates ``h = x @ in_proj`` (... x p) to output coordinates (... x q).

        Additive: ``dW = U [diag(s) B^T + diag(c)(V+B)^T] + A diag(s+c)(V+B)^T``, the expansion of
        ``(U+A) diag(s+c) (V+B)^T - U diag(s) V^T`` that is exactly zero at zero parameters.
        """
        if self.variant == "rotational":
            return h @ self.core().T
        r = self.rank
        z_v, z_b = h[..., :r], h[..., r:]
        z_vb = z_v + z_b
        c = self.c.float()
        return torch.cat([z_b * self.s + z_vb * c, z_vb * (self.s + c)], dim=-1)

    def lora_factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact ``dW = L @ R^T`` with L (m x p), R (n x p): rank 2r additive, rank r rotational.

        Closed forms of ``L = out_proj @ mix(I)^T``, ``R = in_proj``. Additive, with ``R = [V, B]``:
        ``L = [U diag(c) + A diag(s+c), (U + A) diag(s+c)]``; rotational: ``L = U M``, ``R = V``. Both are
        exactly zero at zero parameters (the first block of L and the second of R vanish, resp. M = 0).
        """
        U, V, s = self.U.to(dtype), self.V.to(dtype), self.s.to(dtype)
        if self.variant == "rotational":
            return U @ self.core(dtype), V
        c, A = self.c.to(dtype), self.A.to(dtype)
        scale = s + c
        left = torch.cat([U * c + A * scale, (U + A) * scale], dim=1)  # no subtraction anywhere
        return left, torch.cat([V, self.B.to(dtype)], dim=1)

    def exact_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``lora_factors`` built in float64 and rounded once to float32: for export and merge."""
        left, right = self.lora_factors(torch.float64)
        return left.float(), right.float()

    def delta_weight(self) -> torch.Tensor:
        """The explicit m x n update (float32, strength not applied; built in float64). For tests."""
        left, right = self.lora_factors(torch.float64)
        return (left @ right.T).float()


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


class SpectralLayer(nn.Module):
    """Wraps an ``nn.Linear`` or a 1x1 ``nn.Conv2d`` (kept as ``base_layer``) with slot adapters.

    ``y = base(x) + sum_i a_i x dW_i^T`` over active, unmerged concepts i, computed in float32 in
    factored form: one stacked input projection and one stacked output projection for all concepts.
    An active ``router`` restricts which concepts act on which tokens (core/routing.py); its
    ``token_kind`` says whether this layer reads image tokens or text tokens.
    """

    def __init__(self, base_layer: nn.Module, router: Router | None = None, token_kind: str = IMAGE):
        super().__init__()
        if token_kind not in TOKEN_KINDS:
            raise ValueError(f"unknown token kind {token_kind!r}; use one of {TOKEN_KINDS}")
        if isinstance(base_layer, nn.Conv2d):
            if base_layer.kernel_size != (1, 1) or base_layer.groups != 1:
                raise ValueError("only 1x1 ungrouped Conv2d layers can be adapted")
        elif not isinstance(base_layer, nn.Linear):
            raise TypeError(f"cannot adapt {type(base_layer).__name__}; use nn.Linear or 1x1 nn.Conv2d")
        self.base_layer = base_layer
        self.concepts = nn.ModuleDict()
        self.merged: dict[str, float] = {}  # concept name -> strength baked into base weight
        self.router = router
        self.token_kind = token_kind

    @property
    def weight_matrix(self) -> torch.Tensor:
        return _as_matrix(self.base_layer.weight)

    @property
    def out_features(self) -> int:
        return self.base_layer.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.base_layer.weight.shape[1]

    def concept(self, name: str) -> SlotAdapter:
        if name not in self.concepts:
            raise ConceptNotFoundError(f"concept {name!r} is not loaded in this layer")
        return self.concepts[name]

    def add_concept(self, name: str, triplets: Triplets, variant: str, slot: int) -> SlotAdapter:
        if name in self.concepts:
            raise ValueError(f"concept {name!r} is already loaded in this layer")
        m, n = self.out_features, self.in_features
        if triplets.U.shape[0] != m or triplets.V.shape[0] != n:
            raise ValueError(
                f"slot triplets of shape U{tuple(triplets.U.shape)}, V{tuple(triplets.V.shape)} "
                f"do not fit a {m} x {n} weight"
            )
        adapter = SlotAdapter(triplets, variant, slot)
        device = self.base_layer.weight.device
        if adapter.U.device != device:  # Module.to walks every tensor; skip it when there is nothing to move
            adapter = adapter.to(device)
        self.concepts[name] = adapter
        self._factor_cache = None  # a new adapter may reuse a freed one's id
        return adapter

    def remove_concept(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        self.concept(name)
        del self.concepts[name]
        self._factor_cache = None

    def set_strength(self, name: str, strength: float) -> None:
        """Change a concept's strength; a merged concept is re-baked at the new strength."""
        adapter = self.concept(name)
        was_merged = name in self.merged
        if was_merged:
            self.unmerge([name])
        adapter.strength = float(strength)
        if was_merged:
            self.merge([name])

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """The concept's update in the base weight's own shape (float32, strength not applied)."""
        return self.concept(name).delta_weight().reshape(self.base_layer.weight.shape)

    @torch.no_grad()
    def _add_deltas(self, items: list[tuple[SlotAdapter, float]], alpha: float) -> None:
        """``W += alpha * sum_i strength_i dW_i`` as one product of the stacked factors.

        For a contiguous float32 weight this is a single in-place ``addmm_``: no m x n temporary per
        concept, one pass over W however many concepts are (un)merged.
        """
        lefts, rights = [], []
        for adapter, strength in items:
            left, right = adapter.exact_factors()
            lefts.append(left * strength)
            rights.append(right)
        left, right = torch.cat(lefts, dim=1), torch.cat(rights, dim=1)
        weight = self.base_layer.weight
        if weight.dtype == torch.float32 and weight.is_contiguous():
            weight.view(weight.shape[0], -1).addmm_(left, right.T, alpha=alpha)
        else:
            weight.add_((left @ right.T).reshape(weight.shape).to(weight.dtype), alpha=alpha)

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Add the active concepts' deltas (times strength) into the base weight."""
        names = [n for n in (names if names is not None else list(self.concepts)) if n not in self.merged]
        adapters = {name: self.concept(name) for name in names}
        items = {name: adapter for name, adapter in adapters.items() if adapter.enabled}
        if not items:
            return
        self._add_deltas([(adapter, adapter.strength) for adapter in items.values()], 1.0)
        for name, adapter in items.items():
            self.merged[name] = adapter.strength

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        """Subtract previously merged deltas again (the exact inverse of ``merge`` up to rounding)."""
        names = [n for n in (names if names is not None else list(self.merged)) if n in self.merged]
        if not names:
            return
        items = [(self.concept(name), self.merged[name]) for name in names]
        self._add_deltas(items, -1.0)
        for name in names:
            del self.merged[name]

    def _live_items(self) -> list[tuple[str, SlotAdapter]]:
        return [
            (name, adapter)
            for name, adapter in self.concepts.items()
            if adapter.enabled and adapter.strength != 0.0 and name not in self.merged
        ]

    def _live_adapters(self) -> list[SlotAdapter]:
        return [adapter for _, adapter in self._live_items()]

    def _factors(self, adapters: list[SlotAdapter]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked ``(L, R)`` of the given adapters with strengths folded into L: ``sum_i a_i dW_i = L R^T``.

        Without autograd (generation) they are cached between denoising steps while the set of
        adapters, their strengths and their parameters (tensor versions) stay the same.
        """
        if torch.is_grad_enabled():
            return self._stack_factors(adapters)
        key = tuple((id(a), a.strength, *(getattr(a, n)._version for n in a.trainable_names())) for a in adapters)
        cached = getattr(self, "_factor_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self._stack_factors(adapters))
            self._factor_cache = cached
        return cached[1]

    @staticmethod
    def _stack_factors(adapters: list[SlotAdapter]) -> tuple[torch.Tensor, torch.Tensor]:
        lefts, rights = [], []
        for adapter in adapters:
            left, right = adapter.lora_factors()
            lefts.append(left if adapter.strength == 1.0 else left * adapter.strength)
            rights.append(right)
        if len(adapters) == 1:
            return lefts[0], rights[0]
        return torch.cat(lefts, dim=1), torch.cat(rights, dim=1)

    def _delta(self, x: torch.Tensor, adapters: list[SlotAdapter]) -> torch.Tensor:
        """``sum_i a_i x dW_i^T`` for x of shape (..., n), in float32."""
        left, right = self._factors(adapters)
        return (x.to(torch.float32) @ right) @ left.T

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.router is not None and self.router.active:
            return self._routed_forward(x, result)
        adapters = self._live_adapters()
        if not adapters:
            return result
        if isinstance(self.base_layer, nn.Conv2d):
            delta = self._delta(x.movedim(1, -1), adapters).movedim(-1, 1)
            return result + delta.to(result.dtype)
        left, right = self._factors(adapters)
        h = x.to(torch.float32) @ right
        return self._add_output(result, h, left)

    @staticmethod
    def _add_output(result: torch.Tensor, h: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        """``result + h L^T`` for an ``nn.Linear`` output."""
        if result.dtype != torch.float32:
            return result + (h @ left.T).to(result.dtype)
        # result + h L^T in one pass over the output (no separate token-sized delta tensor)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), left.T)
        return out.view(result.shape)

    def _routed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The forward pass while the router is active: text layers keep the router's text concepts,
        image layers scale each concept's columns of ``h = x R`` by its pooled mask, token by token."""
        router = self.router
        items = self._live_items()
        if self.token_kind == TEXT:
            items = [(name, adapter) for name, adapter in items if router.keeps_text(name)]
        elif router.routes_images:
            items = [(name, adapter) for name, adapter in items if name in router.masks]  # no mask: weight 0
        if not items:
            return result
        adapters = [adapter for _, adapter in items]
        left, right = self._factors(adapters)
        conv = isinstance(self.base_layer, nn.Conv2d)
        tokens = x.movedim(1, -1) if conv else x
        h = tokens.to(torch.float32) @ right
        if self.token_kind == IMAGE and router.routes_images:
            grid = (x.shape[-2], x.shape[-1]) if conv else router.grid_for(x.shape[-2])
            widths = [adapter.in_width for adapter in adapters]
            weights = router.column_weights([name for name, _ in items], widths, grid, h.device)
            h = h * (weights.view(grid[0], grid[1], -1) if conv else weights)
        if conv:
            return result + (h @ left.T).movedim(-1, 1).to(result.dtype)
        return self._add_output(result, h, left)
