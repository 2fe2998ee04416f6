"""Step sizes of the slot factors that do not depend on the slot's singular values.

Near zero, the additive update is ``dW ~ A diag(s) V^T + U diag(s) B^T``: an Adam step of size lr on
column k of A or B moves dW by about ``lr * s_k``, so the same learning rate means a large step in a
layer with large singular values (and in a top slot) and a small one elsewhere, whereas a LoRA's step
moves ``dW = B A`` by ``lr * |A|`` (about ``0.58 lr`` with PEFT's initialisation) in every layer.
``lr_scale="spectrum"`` divides each column's step by ``s_k`` (the rotational generators' by the
slot's mean singular value): then a step moves dW by about lr per direction in every layer and slot,
which is the parametrisation ``A = A' / s``, ``B = B' / s`` trained with one learning rate. ``c`` needs
no scale: its update ``U diag(c) V^T`` is already independent of ``s``.

Adam's step is invariant to the gradient's scale, so the scale is applied to the step itself: the
optimiser steps as usual, then each factor's change is multiplied by its column's scale (exactly a
per-column learning rate, weight decay included). The caller's layers are never changed.
"""

from __future__ import annotations

import torch

# Columns whose singular value is below this share of the layer's slot maximum get the scale of that
# floor: a near-zero s_k would otherwise give an unbounded step.
SMALL_SINGULAR_VALUE = 1e-2


def _column_scale(s: torch.Tensor) -> torch.Tensor:
    floor = float(s.max()) * SMALL_SINGULAR_VALUE if s.numel() else 0.0
    return 1.0 / s.clamp_min(max(floor, 1e-12))


class StepScale:
    """Per-column step scales of one concept's slot factors: ``before()`` and ``after(before)`` bracket an optimiser
    step, which ``after`` rescales column by column."""

    def __init__(self, adapters, name: str, mode: str):
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        if mode != "spectrum":
            return
        for layer in adapters.layers.values():
            adapter = layer.concept(name)
            scale = _column_scale(adapter.s.float())
            if adapter.variant == "additive":
                self.pairs += [(adapter.A, scale[None, :]), (adapter.B, scale[None, :])]
            else:
                mean = 1.0 / adapter.s.float().mean().clamp_min(1e-12)
                self.pairs += [(adapter.G_U, mean), (adapter.G_V, mean)]

    def before(self) -> list[torch.Tensor]:
        return [param.detach().clone() for param, _ in self.pairs]

    @torch.no_grad()
    def after(self, before: list[torch.Tensor]) -> None:
        for (param, scale), old in zip(self.pairs, before, strict=True):
            param.copy_(old + (param - old) * scale.to(param.device, param.dtype))
