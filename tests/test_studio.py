"""Studio: fusion of concepts over one loaded base pipeline, generation, fused export and bundles."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from spectral_diffusion.core.config import ConceptInfo
from spectral_diffusion.core.model import SpectralAdapters
from spectral_diffusion.errors import (
    AdapterFormatError,
    BaseModelMismatchError,
    ConceptNotFoundError,
    FusionError,
    RequestError,
)
from spectral_diffusion.formats.adapter_file import adapter_from_model, save_adapter
from spectral_diffusion.formats.bundle import bundle_strengths, read_bundle
from spectral_diffusion.generation.fusion import Studio
from spectral_diffusion.generation.request import GenerationRequest
from spectral_diffusion.generation.schedulers import SCHEDULERS
from spectral_diffusion.models.registry import load_pipeline

from .conftest import randomize_concept, rewrite_safetensors, unet_inputs, unet_output

# name -> (slot, variant, token, seed); "fox" shares cat's slot on purpose
SPECS = {
    "dog": (0, "additive", "<dog1>", 1),
    "cat": (1, "rotational", "<cat1>", 2),
    "mug": (2, "additive", "<mug1>", 3),
    "fox": (1, "additive", "<fox1>", 4),
}
FUSED = {"dog": 1.0, "cat": 0.7, "mug": -0.5}


def _make_concepts(model: str, specs: dict, base_model: str | None = None, perturb: bool = False) -> dict:
    """AdapterData for trained-looking concepts made on a fresh pipeline of ``model``."""
    adapters = SpectralAdapters.from_pipeline(load_pipeline(model))
    if perturb:  # same architecture, other weights: "another base model"
        with torch.no_grad():
            for layer in adapters.layers.values():
                layer.base_layer.weight.mul_(-1.0)
    out = {}
    for name, (slot, variant, token, seed) in specs.items():
        adapters.new_concept(ConceptInfo(name, slot, 4, variant, [token], name))
        randomize_concept(adapters, name, seed=seed, scale=0.1)
        out[name] = adapter_from_model(adapters, name, base_model or model, {"steps": 1})
        adapters.remove_concept(name)  # frees the slot for the next one (fox reuses cat's)
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def concepts(models_home):
    return _make_concepts("builtin:tiny", SPECS)


@pytest.fixture(scope="module")
def studio(concepts):
    studio = Studio("builtin:tiny")
    for name in ("dog", "cat", "mug"):
        studio.load_concept(name, concepts[name])
    return studio


def _request(prompt="<dog1> and <cat1> with <mug1>", **kwargs) -> GenerationRequest:
    # 32 px, half the tiny model's native 64: a quarter of the work, the same code paths
    settings = dict(concepts=FUSED, steps=2, guidance=5.0, seed=0, width=32, height=32)
    settings.update(kwargs)
    return GenerationRequest(prompt, **settings)


def _image(studio, **kwargs) -> np.ndarray:
    return studio.generate(_request(**kwargs), output_type="np")[0]


def test_three_concepts_fuse_to_base_plus_sum_of_deltas(studio):
    studio.activate({})
    adapters, pipe = studio.adapters, studio.pipe
    base = {key: layer.weight_matrix.clone() for key, layer in adapters.layers.items()}
    inputs = unet_inputs(pipe)
    base_out = unet_output(pipe, inputs)
    deltas = {name: adapters.delta_weights(name) for name in FUSED}

    studio.activate(FUSED, mode="live")
    live = unet_output(pipe, inputs)
    assert (live - base_out).abs().max() > 1e-3
    studio.activate(FUSED, mode="baked")
    for key, layer in adapters.layers.items():
        expected = base[key] + sum(s * deltas[n][key].reshape(base[key].shape) for n, s in FUSED.items())
        torch.testing.assert_close(layer.weight_matrix, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(unet_output(pipe, inputs), live, rtol=1e-4, atol=1e-4)

    studio.activate({}, mode="live")  # unbaking restores the base weights bit for bit
    for key, layer in adapters.layers.items():
        assert torch.equal(layer.weight_matrix, base[key]), key


def test_strength_zero_is_the_same_as_absent(studio):
    with_zero = _image(studio, prompt="<dog1> on a sofa", concepts={"dog": 1.0, "cat": 0.0})
    without = _image(studio, prompt="<dog1> on a sofa", concepts={"dog": 1.0})
    with_cat = _image(studio, prompt="<dog1> on a sofa", concepts={"dog": 1.0, "cat": 0.5})
    assert np.array_equal(with_zero, without)
    assert np.abs(with_cat - without).max() > 1e-3
    studio.activate({"dog": 1.0, "cat": 0.0})
    assert studio.active == {"dog": 1.0}


def test_live_and_baked_give_the_same_image(studio):
    live = _image(studio, mode="live")
    baked = _image(studio, mode="baked")
    base = _image(studio, prompt="a dog", concepts={})
    np.testing.assert_allclose(baked, live, rtol=0, atol=1e-4)
    assert np.abs(live - base).max() > 1e-3


def test_same_seed_same_image_and_several_images(studio):
    first, again = _image(studio, seed=7), _image(studio, seed=7)
    assert np.array_equal(first, again)
    assert np.abs(_image(studio, seed=8) - first).max() > 1e-3
    images = studio.generate(_request(seed=7, num_images=2))
    assert len(images) == 2 and images[0].size == (32, 32) and images[0].info["seed"] == "7"
    np.testing.assert_allclose(np.asarray(images[0]) / 255.0, first, atol=1 / 255 + 1e-6)


def test_switching_sets_strengths_and_schedulers_never_reloads(concepts):
    studio = Studio("builtin:tiny")
    assert studio.load_count == 0  # nothing loads before first use
    for name in ("dog", "cat", "mug"):
        studio.load_concept(name, concepts[name])
    pipe, adapters = studio.pipe, studio.adapters
    native = studio.generate(_request("<dog1>", concepts={"dog": 1.0}, width=None, height=None), output_type="np")
    assert native[0].shape == (64, 64, 3)  # no size given: the model's own
    for concept_set, scheduler in [
        ({"dog": 0.3, "cat": 1.0}, "euler"),
        (FUSED, "ddim"),
        ({"mug": 2.0}, "dpm++"),
        ({}, "euler-a"),
    ]:
        prompt = " ".join(SPECS[name][2] for name in concept_set) or "a cat"
        studio.generate(_request(prompt, concepts=concept_set, scheduler=scheduler), output_type="np")
    assert studio.load_count == 1
    assert studio.pipe is pipe and studio.adapters is adapters
    assert studio.pipe.scheduler is studio._default_scheduler


def test_progress_reports_every_step(studio):
    seen = []
    studio.generate(_request(steps=3), progress=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_each_scheduler_generates(studio, scheduler):
    image = _image(studio, scheduler=scheduler)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    assert studio.pipe.scheduler is studio._default_scheduler


# ----- refusals -------------------------------------------------------------------------------------


def test_concept_of_another_base_model_is_refused(studio, models_home):
    alien = _make_concepts("builtin:tiny", {"alien": (3, "additive", "<alien1>", 5)}, "other-model", perturb=True)
    before = dict(studio.concepts)
    with pytest.raises(BaseModelMismatchError, match="concept 'alien', made for other-model.*another base model"):
        studio.load_concept("alien", alien["alien"])
    assert studio.concepts == before and "alien" not in studio.adapters.concepts
    # nor may it replace a concept of the same name: the active one stays as it was
    dog = _image(studio, prompt="<dog1>", concepts={"dog": 1.0})
    with pytest.raises(BaseModelMismatchError, match="concept 'dog', made for other-model"):
        studio.load_concept("dog", alien["alien"])
    assert studio.active == {"dog": 1.0} and studio.concepts == before
    np.testing.assert_allclose(_image(studio, prompt="<dog1>", concepts={"dog": 1.0}), dog, rtol=0, atol=1e-6)


def test_concept_of_another_architecture_is_refused(studio, sdxl_dog):
    with pytest.raises(BaseModelMismatchError, match="concept 'xl-dog', made for builtin:tiny-sdxl"):
        studio.load_concept("xl-dog", sdxl_dog)
    assert "xl-dog" not in studio.concepts


def test_two_concepts_in_one_slot_are_refused_naming_both(studio, concepts, tmp_path):
    studio.load_concept("fox", concepts["fox"])
    with pytest.raises(FusionError, match="'cat' and 'fox' cannot be fused: they both use slot 1"):
        studio.activate({"cat": 1.0, "fox": 1.0})
    with pytest.raises(FusionError, match="'cat' and 'fox'"):
        studio.export_fused({"cat": 1.0, "fox": 1.0}, tmp_path / "x.safetensors")
    # one at a time works: the inactive one makes room, and comes back unchanged
    cat_before = _image(studio, prompt="<cat1>", concepts={"cat": 1.0})
    fox = _image(studio, prompt="<fox1>", concepts={"fox": 1.0})
    assert "cat" not in studio.adapters.concepts and np.isfinite(fox).all()
    assert np.array_equal(_image(studio, prompt="<cat1>", concepts={"cat": 1.0}), cat_before)


def test_prompt_tokens_must_belong_to_selected_concepts(studio):
    with pytest.raises(RequestError, match="prompt uses <cat1> but concept 'cat' is not selected"):
        studio.generate(_request("<dog1> and <cat1>", concepts={"dog": 1.0}))
    with pytest.raises(RequestError, match="prompt uses <cat1> but concept 'cat' is not selected"):
        studio.generate(_request("<cat1>", concepts={"cat": 0.0}))
    with pytest.raises(RequestError, match="prompt uses <zebra> but no loaded concept"):
        studio.generate(_request("a <zebra>", concepts={}, negative_prompt=""))
    with pytest.raises(RequestError, match="<mug1>"):
        studio.generate(_request("<dog1>", concepts={"dog": 1.0}, negative_prompt="<mug1>"))
    with pytest.raises(ConceptNotFoundError, match="'unicorn' is not loaded"):
        studio.generate(_request("a horse", concepts={"unicorn": 1.0}))


def test_a_second_owner_of_a_token_neither_blocks_nor_disturbs_the_active_one(studio, concepts):
    before = _image(studio, prompt="<dog1>", concepts={"dog": 1.0}, mode="baked")
    studio.load_concept("dog-copy", concepts["dog"])  # same slot, same token: it must step aside
    try:
        assert studio.active == {"dog": 1.0} and "dog-copy" in studio.concepts
        assert np.array_equal(_image(studio, prompt="<dog1>", concepts={"dog": 1.0}, mode="baked"), before)
        copy = _image(studio, prompt="<dog1>", concepts={"dog-copy": 1.0}, mode="baked")
        np.testing.assert_allclose(copy, before, rtol=0, atol=1e-6)
    finally:
        studio.unload_concept("dog-copy")
    assert "dog-copy" not in studio.concepts and "dog-copy" not in studio.adapters.concepts


def test_different_adapter_targets_are_refused(studio, concepts):
    data = dataclasses.replace(concepts["mug"], targets={"unet": ["to_q"], "text_encoder": []})
    with pytest.raises(FusionError, match="concept 'narrow' adapts the layers"):
        studio.load_concept("narrow", data)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"width": 60}, "multiple of 8"),
        ({"height": 0}, "height must be"),
        ({"steps": 0}, "steps must be a whole number from 1 to 200"),
        ({"steps": 201}, "steps"),
        ({"num_images": 17}, "num_images"),
        ({"concepts": {"dog": 2.5}}, "strength of concept 'dog'"),
        ({"concepts": {"dog": float("nan")}}, "strength of concept 'dog'"),
        ({"guidance": -1.0}, "guidance"),
        ({"seed": -2}, "seed"),  # -1 means a random seed
        ({"scheduler": "heun"}, "unknown scheduler"),
        ({"mode": "fused"}, "unknown mode"),
    ],
)
def test_bad_requests_are_refused(change, message):
    with pytest.raises(RequestError, match=message):
        _request(**change)


# ----- export and bundles ---------------------------------------------------------------------------


def test_export_fused_lora_and_kohya(studio, tmp_path):
    studio.activate({"dog": 1.0}, mode="baked")
    adapters = studio.adapters
    strengths = {"dog": 1.0, "cat": 0.5}
    key = next(k for k in adapters.layers if k.startswith("unet.") and k.endswith("attn2.to_k"))

    paths = studio.export_fused(strengths, tmp_path / "fused.safetensors", format="lora")
    expected = sum(s * adapters.delta_weights(n)[key] for n, s in strengths.items())
    assert [p.name for p in paths] == ["fused.safetensors", "fused.dog.ti.safetensors", "fused.cat.ti.safetensors"]
    lora = load_file(paths[0])
    assert len(lora) == 2 * len(adapters.layers)
    torch.testing.assert_close(lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"], expected, atol=1e-5, rtol=0)
    assert load_file(paths[1])["emb_params"].shape == (1, 32)

    paths = studio.export_fused(strengths, tmp_path / "kohya.safetensors", format="kohya")
    kohya = load_file(paths[0])
    name = "lora_unet_" + key.removeprefix("unet.").replace(".", "_")
    up, down = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.lora_down.weight"]
    scale = kohya[f"{name}.alpha"] / down.shape[0]
    torch.testing.assert_close(scale * up @ down, expected, atol=1e-5, rtol=0)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn") for k in kohya)
    assert studio.active == {"dog": 1.0} and studio.mode == "baked"


def test_export_of_a_set_clashing_with_the_active_one_leaves_it_active(studio, concepts, tmp_path):
    if "fox" not in studio.concepts:
        studio.load_concept("fox", concepts["fox"])
    before = _image(studio, prompt="<cat1>", concepts={"cat": 1.0}, mode="baked")
    paths = studio.export_fused({"fox": 1.0}, tmp_path / "fox.safetensors", format="lora")
    assert len(paths) == 2
    assert studio.active == {"cat": 1.0} and "cat" in studio.adapters.concepts
    assert np.array_equal(_image(studio, prompt="<cat1>", concepts={"cat": 1.0}, mode="baked"), before)


def test_bundle_round_trip(studio, concepts, tmp_path):
    strengths = {"dog": 1.0, "cat": 0.6, "mug": 1.5}
    [path] = studio.export_fused(strengths, tmp_path / "set.safetensors", format="spectral")
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        keys = list(handle.keys())
    assert meta["format"] == "spectral-bundle" and meta["format_version"] == "1"
    assert set(json.loads(meta["concepts"])) == set(strengths)
    assert json.loads(meta["concepts"])["cat"]["slot"] == "1"
    assert {f"dog/{key}" for key in concepts["dog"].tensors()} <= set(keys)
    assert "dog/text_encoder.token_embeddings" in keys

    datas = read_bundle(path)
    assert [d.info.name for d in datas] == ["dog", "cat", "mug"]
    for data in datas:
        original = concepts[data.info.name].tensors()
        assert data.tensors().keys() == original.keys()
        assert all(torch.equal(t, original[k]) for k, t in data.tensors().items())
    assert bundle_strengths(path) == strengths

    other = Studio("builtin:tiny")
    assert other.load_bundle(path) == strengths
    request = dict(prompt="<dog1> <cat1> <mug1>", concepts=strengths)
    # concepts sit in another order in the layers (install order), so float sums round differently
    np.testing.assert_allclose(_image(other, **request), _image(studio, **request), rtol=0, atol=1e-5)
    assert other.load_count == 1


def test_single_adapter_file_reads_as_a_bundle_of_one(concepts, tmp_path):
    path = save_adapter(concepts["dog"], tmp_path / "dog.safetensors")
    [data] = read_bundle(path)
    assert data.info.name == "dog" and bundle_strengths(path) == {"dog": 1.0}


def test_damaged_bundles_are_refused(studio, tmp_path):
    [path] = studio.export_fused({"dog": 1.0, "mug": 1.0}, tmp_path / "b.safetensors")

    def poison(tensors):
        tensors[next(k for k in tensors if k.startswith("mug/") and k.endswith(".c"))][0] = float("inf")

    def stray(tensors):
        tensors["cow/unet.x.A"] = torch.zeros(1)

    def overlap(meta):
        concepts = json.loads(meta["concepts"])
        concepts["mug"]["slot"] = "0"
        meta["concepts"] = json.dumps(concepts)

    cases = [
        (dict(edit_tensors=poison), r"b2.safetensors \[mug\]: tensor .* NaN or infinite"),
        (dict(edit_tensors=stray), "belongs to no concept of the bundle"),
        (dict(edit_meta=lambda m: m.update(format_version="9")), "format_version '9'.*upgrade"),
        (dict(edit_meta=lambda m: m.update(format="lora")), "is not a spectral bundle"),
        (dict(edit_meta=lambda m: m.update(concepts="[1]")), "should be a JSON object"),
        (dict(edit_meta=overlap), "'dog' and 'mug' overlap"),
    ]
    for edit, message in cases:
        with pytest.raises(AdapterFormatError, match=message):
            read_bundle(rewrite_safetensors(path, tmp_path / "b2.safetensors", **edit))
    torch.save({"a": torch.zeros(1)}, tmp_path / "evil.safetensors")
    with pytest.raises(AdapterFormatError, match="not a safetensors file"):
        read_bundle(tmp_path / "evil.safetensors")


def test_library_concepts_load_on_first_use(concepts):
    class FakeLibrary:
        def __init__(self):
            self.asked = []

        def adapter(self, name):
            self.asked.append(name)
            if name not in concepts:
                raise ConceptNotFoundError(f"no concept {name!r} in the library")
            return concepts[name]

    library = FakeLibrary()
    studio = Studio("builtin:tiny", library=library)
    image = studio.generate(_request("<dog1>", concepts={"dog": 1.0}), output_type="np")[0]
    studio.generate(_request("<dog1>", concepts={"dog": 0.5}), output_type="np")
    assert np.isfinite(image).all() and library.asked == ["dog"]
    with pytest.raises(ConceptNotFoundError, match="no concept 'yak'"):
        studio.activate({"yak": 1.0})


# ----- SDXL -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_dog(models_home):
    return _make_concepts("builtin:tiny-sdxl", {"xl-dog": (0, "additive", "<dog1>", 6)})["xl-dog"]


def test_sdxl_generation_with_a_concept(sdxl_dog):
    studio = Studio("builtin:tiny-sdxl")
    studio.load_concept("dog", sdxl_dog)
    settings = dict(prompt="<dog1> on a beach", steps=2, guidance=3.0, width=32, height=32)
    live = _image(studio, concepts={"dog": 1.0}, **settings)
    baked = _image(studio, concepts={"dog": 1.0}, mode="baked", **settings)
    base = _image(studio, concepts={}, **{**settings, "prompt": "a dog on a beach"})
    assert live.shape == (32, 32, 3)
    np.testing.assert_allclose(baked, live, rtol=0, atol=1e-4)
    assert np.abs(live - base).max() > 1e-3
    assert studio.load_count == 1


def test_capacity_of_a_baked_studio_leaves_its_weights_baked(concepts):
    """Capacity now reads the spectrum (issue 24 item 1), which needs the base weights: the studio computes
    it under its lock and gives the baked weights back."""
    studio = Studio("builtin:tiny")
    for name in ("dog", "cat", "mug"):
        studio.load_concept(name, concepts[name])
    studio.activate(FUSED, mode="baked")
    baked = {key: layer.weight_matrix.clone() for key, layer in studio.adapters.layers.items()}
    assert studio.adapters.merged and studio.capacity(4) == 8
    assert studio.adapters.merged
    for key, layer in studio.adapters.layers.items():
        torch.testing.assert_close(layer.weight_matrix, baked[key], rtol=0, atol=1e-6)
