"""Exact numerics of tiny updates: no catastrophic cancellation where a delta is formed (issue: a
rotational concept after a few steps exported with relative error 1e-2 in float32)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spectral_diffusion.core.layers import SpectralLayer, cayley, cayley_offset
from spectral_diffusion.core.svd import top_k_svd

pytestmark = pytest.mark.usefixtures("one_thread")

RANK = 4


def _big_layer(seed=0, scale=1e3):
    """A layer whose singular values are large (about ``scale``), like a pretrained projection's top block."""
    torch.manual_seed(seed)
    base = nn.Linear(48, 64)
    u, _ = torch.linalg.qr(torch.randn(64, 48))
    v, _ = torch.linalg.qr(torch.randn(48, 48))
    s = scale * torch.logspace(0, -2, 48)
    with torch.no_grad():
        base.weight.copy_(u @ torch.diag(s) @ v.T)
    return SpectralLayer(base)


def _tiny_update(layer, variant, relative):
    adapter = layer.add_concept("dog", top_k_svd(layer.weight_matrix, 8).block(0, RANK), variant, 0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name in adapter.trainable_names():  # c moves singular values: relative to s; the rest to 1
            param = getattr(adapter, name)
            size = relative * float(adapter.s.max()) if name == "c" else relative
            param.copy_(torch.randn(param.shape) * size)
    return adapter


def _reference64(adapter) -> torch.Tensor:
    """The design formula, dense, in float64."""
    U, s, V = adapter.U.double(), adapter.s.double(), adapter.V.double()
    c = adapter.c.double()
    if adapter.variant == "additive":
        A, B = adapter.A.double(), adapter.B.double()
        return (U + A) @ torch.diag(s + c) @ (V + B).T - U @ torch.diag(s) @ V.T
    rot_u, rot_v = cayley(adapter.G_U.double()), cayley(adapter.G_V.double())
    return U @ rot_u @ torch.diag(s + c) @ rot_v.T @ V.T - U @ torch.diag(s) @ V.T


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("variant", ["additive", "rotational"])
def test_tiny_update_exports_and_merges_exactly(variant):
    layer = _big_layer()
    adapter = _tiny_update(layer, variant, relative=1e-7)
    reference = _reference64(adapter)
    reference = reference.detach()
    assert float(torch.linalg.norm(reference)) > 0
    left, right = adapter.exact_factors()  # what the LoRA export writes
    assert _relative(left.double() @ right.double().T, reference) < 1e-6
    assert _relative(adapter.delta_weight(), reference) < 1e-6
    before = layer.base_layer.weight.detach().double().clone()
    layer.merge()
    merged = layer.base_layer.weight.detach().double()
    assert _relative(merged, before + reference) < 1e-6
    # the live (factored float32) delta agrees with the float64 reference too
    layer.unmerge()
    x = torch.randn(3, 48)
    with torch.no_grad():
        live = layer._delta(x, layer._live_adapters())
    assert _relative(live, x.double() @ reference.T) < 1e-5


def test_the_old_difference_formula_would_have_failed():
    """The check above can fail: the core as a difference of s-sized matrices loses the update."""
    layer = _big_layer()
    adapter = _tiny_update(layer, "rotational", relative=1e-7)
    s, c = adapter.s, adapter.c
    with torch.no_grad():
        naive = cayley(adapter.G_U) @ torch.diag(s + c) @ cayley(adapter.G_V).T - torch.diag(s)
        exact = adapter.core(torch.float64)
    assert _relative(naive, exact) > 1e-3
    assert _relative(adapter.core().detach(), exact) < 1e-5


def test_cayley_offset_is_r_minus_identity():
    torch.manual_seed(0)
    g = torch.randn(6, 6, dtype=torch.float64) * 0.3
    torch.testing.assert_close(cayley_offset(g), cayley(g) - torch.eye(6, dtype=torch.float64), rtol=1e-12, atol=1e-12)
