"""Spectral adapter layers: a frozen base layer plus any number of concepts, one slot each.

A concept in slot k owns the singular-vector columns ``J_k = [k r, (k+1) r)`` of the base weight.
Both variants write their update as ``dW = out_proj @ Mix^T @ in_proj^T`` with thin factors, which
gives the factored forward pass (``x -> x in_proj -> mix -> out_proj^T``, never an m x n matrix),
the explicit delta (merge, tests) and the exact LoRA export (``L = out_proj Mix^T, R = in_proj``) from
one definition. The maths is in DESIGN.md section 2.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConceptNotFoundError
from .svd import Triplets

VARIANTS = ("additive", "rotational")


def cayley(generator: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``R(P) = (I - P)(I + P)^-1`` of the skew part ``P = G - G^T``; ``R(0) = I``."""
    skew = generator - generator.T
    eye = torch.eye(skew.shape[0], dtype=skew.dtype, device=skew.device)
    # (I - P) and (I + P)^-1 commute, so a solve gives the product without an explicit inverse.
    return torch.linalg.solve(eye + skew, eye - skew)


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

    def core(self) -> torch.Tensor:
        """The rotational variant's r x r core ``M = R_U diag(s+c) R_V^T - diag(s)``."""
        rot_u, rot_v = cayley(self.G_U.float()), cayley(self.G_V.float())
        return rot_u @ torch.diag(self.s + self.c.float()) @ rot_v.T - torch.diag(self.s)

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

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact ``dW = L @ R^T`` with L (m x p), R (n x p): rank 2r additive, rank r rotational."""
        in_proj = self.in_proj()
        eye = torch.eye(in_proj.shape[1], dtype=in_proj.dtype, device=in_proj.device)
        mix_matrix = self.mix(eye)  # p x q, h' = h @ mix_matrix
        return self.out_proj() @ mix_matrix.T, in_proj

    def delta_weight(self) -> torch.Tensor:
        """The explicit m x n update (float32, strength not applied). For merge, export and tests."""
        left, right = self.lora_factors()
        return left @ right.T


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


class SpectralLayer(nn.Module):
    """Wraps an ``nn.Linear`` or a 1x1 ``nn.Conv2d`` (kept as ``base_layer``) with slot adapters.

    ``y = base(x) + sum_i a_i x dW_i^T`` over active, unmerged concepts i, computed in float32 in
    factored form: one stacked input projection and one stacked output projection for all concepts.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if isinstance(base_layer, nn.Conv2d):
            if base_layer.kernel_size != (1, 1) or base_layer.groups != 1:
                raise ValueError("only 1x1 ungrouped Conv2d layers can be adapted")
        elif not isinstance(base_layer, nn.Linear):
            raise TypeError(f"cannot adapt {type(base_layer).__name__}; use nn.Linear or 1x1 nn.Conv2d")
        self.base_layer = base_layer
        self.concepts = nn.ModuleDict()
        self.merged: dict[str, float] = {}  # concept name -> strength baked into base weight

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
        adapter = SlotAdapter(triplets, variant, slot).to(self.base_layer.weight.device)
        self.concepts[name] = adapter
        return adapter

    def remove_concept(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        self.concept(name)
        del self.concepts[name]

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
    def merge(self, names: list[str] | None = None) -> None:
        """Add the active concepts' deltas (times strength) into the base weight."""
        names = [n for n in (names if names is not None else list(self.concepts)) if n not in self.merged]
        weight = self.base_layer.weight
        for name in names:
            adapter = self.concept(name)
            if not adapter.enabled:
                continue
            delta = adapter.strength * self.get_delta_weight(name)
            weight.add_(delta.to(weight.dtype))
            self.merged[name] = adapter.strength

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        """Subtract previously merged deltas again (the exact inverse of ``merge`` up to rounding)."""
        names = [n for n in (names if names is not None else list(self.merged)) if n in self.merged]
        weight = self.base_layer.weight
        for name in names:
            strength = self.merged.pop(name)
            delta = strength * self.get_delta_weight(name)
            weight.sub_(delta.to(weight.dtype))

    def _live_adapters(self) -> list[SlotAdapter]:
        return [
            adapter
            for name, adapter in self.concepts.items()
            if adapter.enabled and adapter.strength != 0.0 and name not in self.merged
        ]

    def _delta(self, x: torch.Tensor, adapters: list[SlotAdapter]) -> torch.Tensor:
        """``sum_i a_i x dW_i^T`` for x of shape (..., n), in float32."""
        x32 = x.to(torch.float32)
        in_proj = torch.cat([adapter.in_proj() for adapter in adapters], dim=1)
        h = x32 @ in_proj
        mixed, start = [], 0
        for adapter in adapters:
            width = adapter.in_width
            mixed.append(adapter.strength * adapter.mix(h[..., start : start + width]))
            start += width
        out_proj = torch.cat([adapter.out_proj() for adapter in adapters], dim=1)
        return torch.cat(mixed, dim=-1) @ out_proj.T

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        adapters = self._live_adapters()
        if not adapters:
            return result
        if isinstance(self.base_layer, nn.Conv2d):
            delta = self._delta(x.movedim(1, -1), adapters).movedim(-1, 1)
        else:
            delta = self._delta(x, adapters)
        return result + delta.to(result.dtype)
