import pytest
import torch
from torch import nn

from spectral_diffusion.core.layers import SpectralLayer, cayley
from spectral_diffusion.core.svd import top_k_svd

RANK = 4


def _layer(m=24, n=20, conv=False, seed=0):
    torch.manual_seed(seed)
    base = nn.Conv2d(n, m, 1) if conv else nn.Linear(n, m)
    return SpectralLayer(base)


def _add(layer, name, slot, variant, seed=1, scale=0.1):
    spectrum = top_k_svd(layer.weight_matrix, 16)
    adapter = layer.add_concept(name, spectrum.block(slot * RANK, (slot + 1) * RANK), variant, slot)
    torch.manual_seed(seed)
    with torch.no_grad():
        for pname in adapter.trainable_names():
            getattr(adapter, pname).normal_(0, scale)
    return adapter


def _reference_delta(adapter):
    """docs/design.md section 2, written out literally (dense, no factoring)."""
    U, s, V, c = adapter.U, adapter.s, adapter.V, adapter.c
    if adapter.variant == "additive":
        return (U + adapter.A) @ torch.diag(s + c) @ (V + adapter.B).T - U @ torch.diag(s) @ V.T
    rot_u, rot_v = cayley(adapter.G_U), cayley(adapter.G_V)
    return U @ rot_u @ torch.diag(s + c) @ rot_v.T @ V.T - U @ torch.diag(s) @ V.T


@pytest.mark.parametrize("variant", ["additive", "rotational"])
@pytest.mark.parametrize("conv", [False, True])
def test_zero_init_equals_base(variant, conv):
    layer = _layer(conv=conv)
    x = torch.randn(3, 20, 5, 5) if conv else torch.randn(3, 7, 20)
    expected = layer.base_layer(x)
    spectrum = top_k_svd(layer.weight_matrix, 8)
    layer.add_concept("dog", spectrum.block(0, RANK), variant, 0)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    assert torch.count_nonzero(layer.get_delta_weight("dog")) == 0


@pytest.mark.parametrize("variant", ["additive", "rotational"])
def test_factored_delta_matches_design_formula(variant):
    layer = _layer()
    adapter = _add(layer, "dog", 1, variant)
    with torch.no_grad():
        torch.testing.assert_close(adapter.delta_weight(), _reference_delta(adapter), rtol=1e-5, atol=1e-6)
        x = torch.randn(5, 20)
        torch.testing.assert_close(
            layer(x), layer.base_layer(x) + x @ _reference_delta(adapter).T, atol=1e-5, rtol=1e-5
        )


def test_cayley_is_orthogonal_and_identity_at_zero():
    torch.manual_seed(0)
    assert torch.equal(cayley(torch.zeros(5, 5)), torch.eye(5))
    rot = cayley(torch.randn(5, 5))
    torch.testing.assert_close(rot.T @ rot, torch.eye(5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["additive", "rotational"])
@pytest.mark.parametrize("conv", [False, True])
def test_merge_equals_unmerged_and_unmerge_restores_base(variant, conv):
    layer = _layer(conv=conv)
    base_weight = layer.base_layer.weight.detach().clone()
    _add(layer, "dog", 0, variant)
    _add(layer, "cat", 2, variant, seed=2)
    layer.set_strength("cat", 0.6)
    x = torch.randn(2, 20, 3, 3) if conv else torch.randn(4, 20)
    with torch.no_grad():
        live = layer(x)
        layer.merge()
        assert set(layer.merged) == {"dog", "cat"}
        torch.testing.assert_close(layer(x), live, rtol=1e-5, atol=1e-5)
        layer.set_strength("cat", 0.3)  # re-bakes at the new strength
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, base_weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["additive", "rotational"])
def test_two_slots_add_without_cross_terms(variant):
    layer = _layer()
    dog = _add(layer, "dog", 0, variant)
    cat = _add(layer, "cat", 1, variant, seed=2)
    x = torch.randn(6, 20)
    with torch.no_grad():
        d_dog, d_cat = dog.delta_weight(), cat.delta_weight()
        both = layer(x)
        dog.enabled = False
        only_cat = layer(x)
        dog.enabled, cat.enabled = True, False
        only_dog = layer(x)
        cat.enabled = True
        base = layer.base_layer(x)
        torch.testing.assert_close(both - base, (only_dog - base) + (only_cat - base), atol=1e-5, rtol=1e-5)
        layer.merge()
        torch.testing.assert_close(
            layer.base_layer.weight, _layer().base_layer.weight + d_dog + d_cat, atol=1e-5, rtol=0
        )
    if variant == "rotational":
        assert d_dog.T.matmul(d_cat).abs().max() < 1e-5
        assert d_dog.matmul(d_cat.T).abs().max() < 1e-5


def test_strength_scales_and_zero_strength_is_absent():
    layer = _layer()
    adapter = _add(layer, "dog", 0, "additive")
    x = torch.randn(3, 20)
    with torch.no_grad():
        base = layer.base_layer(x)
        full = layer(x)
        layer.set_strength("dog", 0.5)
        torch.testing.assert_close(layer(x) - base, 0.5 * (full - base), atol=1e-5, rtol=1e-5)
        layer.set_strength("dog", 0.0)
        torch.testing.assert_close(layer(x), base, atol=0, rtol=0)
    assert adapter.strength == 0.0


def test_gradients_reach_only_the_concepts_parameters():
    layer = _layer()
    dog = _add(layer, "dog", 0, "additive")
    cat = _add(layer, "cat", 1, "rotational", seed=2)
    layer.base_layer.requires_grad_(False)
    cat.requires_grad_(False)
    layer(torch.randn(4, 20)).pow(2).sum().backward()
    assert all(getattr(dog, p).grad is not None for p in dog.trainable_names())
    assert all(getattr(cat, p).grad is None for p in cat.trainable_names())
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_run_adapter_math_in_float32(dtype):
    layer = _layer()
    adapter = _add(layer, "dog", 0, "additive")
    x = torch.randn(4, 20)
    with torch.no_grad():
        reference = layer(x)
        layer.base_layer.to(dtype)
        out = layer(x.to(dtype))
    assert out.dtype == dtype
    assert adapter.A.dtype == torch.float32
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)


def test_lora_factors_are_exact():
    layer = _layer()
    for slot, variant in enumerate(["additive", "rotational"]):
        adapter = _add(layer, variant, slot, variant, seed=slot)
        left, right = adapter.lora_factors()
        assert left.shape[1] == (2 * RANK if variant == "additive" else RANK)
        torch.testing.assert_close(left @ right.T, _reference_delta(adapter), atol=1e-5, rtol=1e-5)


def test_bad_layers_and_duplicate_names_are_refused():
    with pytest.raises(TypeError, match="cannot adapt"):
        SpectralLayer(nn.Embedding(4, 4))
    with pytest.raises(ValueError, match="1x1"):
        SpectralLayer(nn.Conv2d(4, 4, 3))
    layer = _layer()
    _add(layer, "dog", 0, "additive")
    with pytest.raises(ValueError, match="already loaded"):
        _add(layer, "dog", 1, "additive")


def test_inference_factor_cache_follows_parameters_and_strengths():
    """Generation reuses the stacked factors between steps; any change of a parameter or strength shows."""
    layer = _layer()
    adapter = _add(layer, "dog", 0, "additive")
    x = torch.randn(4, 20)
    with torch.no_grad():
        first = layer(x)
        torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
        adapter.A.add_(0.5)  # an in-place change, as an optimiser step or a load makes
        moved = layer(x)
        assert not torch.allclose(moved, first)
        torch.testing.assert_close(moved, layer.base_layer(x) + x @ _reference_delta(adapter).T, rtol=1e-5, atol=1e-5)
        layer.set_strength("dog", 0.5)
        half = layer(x)
        torch.testing.assert_close(
            half - layer.base_layer(x), (moved - layer.base_layer(x)) * 0.5, rtol=1e-5, atol=1e-5
        )
