"""Exactness of the LoRA + textual-inversion export, checked inside and, for acceptance, by plain
diffusers: a fresh unpatched pipeline that loads the files with its own loaders must draw the same
image as the project's patched pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from spectral_diffusion.core.config import ConceptInfo, TargetConfig
from spectral_diffusion.core.model import SpectralAdapters
from spectral_diffusion.formats.lora import LORA_STYLES, export_lora, lora_state_dict
from spectral_diffusion.models.registry import load_pipeline

from .conftest import randomize_concept

KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
KOHYA_PREFIX_SDXL = {**KOHYA_PREFIX, "text_encoder": "lora_te1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _patched(model: str, specs: dict, targets: str = "all"):
    """A pipeline with trained-looking concepts: specs[name] = (slot, variant, strength)."""
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    adapters = SpectralAdapters.from_pipeline(pipe, TargetConfig.preset(targets))
    for seed, (name, (slot, variant, strength)) in enumerate(specs.items()):
        adapters.new_concept(ConceptInfo(name, slot, 4, variant, [f"<{name}1>"], name))
        randomize_concept(adapters, name, seed=seed, scale=0.1)
        adapters.set_strength(name, strength)
    return pipe, adapters


def _kohya_name(key: str, sdxl: bool) -> str:
    """Written independently of lora_export: kohya keys always spell ``text_model`` once."""
    component, _, path = key.partition(".")
    if component != "unet" and not path.startswith("text_model."):
        path = "text_model." + path
    return f"{(KOHYA_PREFIX_SDXL if sdxl else KOHYA_PREFIX)[component]}_{path.replace('.', '_')}"


def _lora_delta(state: dict, key: str, style: str, sdxl: bool = False) -> tuple[torch.Tensor, int]:
    """``scale * up @ down`` of one layer as its loaders apply it, and the LoRA rank."""
    if style == "peft":
        down, up, scale = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"], 1.0
    else:
        name = _kohya_name(key, sdxl)
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        scale = float(state[f"{name}.alpha"]) / down.shape[0]
    product = scale * up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return product, down.shape[0]


def _expected(adapters, strengths: dict, key: str) -> torch.Tensor:
    layer = adapters.layers[key]
    total = sum(s * layer.get_delta_weight(name) for name, s in strengths.items())
    return total.reshape(layer.out_features, -1)


# ----- exactness of the tensors ----------------------------------------------------------------------


@pytest.mark.parametrize("style", LORA_STYLES)
@pytest.mark.parametrize("variant, rank", [("additive", 8), ("rotational", 4)])
def test_one_concept_exports_exactly(models_home, variant, rank, style):
    _, adapters = _patched("builtin:tiny", {"dog": (2, variant, 0.7)})
    state = lora_state_dict(adapters, ["dog"], style=style)  # the concept's own strength, 0.7
    assert any(isinstance(layer.base_layer, torch.nn.Conv2d) for layer in adapters.layers.values())
    for key in adapters.layers:
        product, got_rank = _lora_delta(state, key, style)
        assert got_rank == rank, key
        torch.testing.assert_close(product, _expected(adapters, {"dog": 0.7}, key), rtol=0, atol=1e-5)


@pytest.mark.parametrize("style", LORA_STYLES)
def test_fused_set_exports_exactly(models_home, style):
    specs = {"dog": (0, "additive", 1.0), "cat": (1, "rotational", 1.0), "mug": (3, "additive", 1.0)}
    _, adapters = _patched("builtin:tiny", specs)
    strengths = {"dog": 1.0, "cat": -0.5, "mug": 1.3}
    state = lora_state_dict(adapters, list(strengths), strengths, style=style)
    for key in adapters.layers:
        product, rank = _lora_delta(state, key, style)
        assert rank == 8 + 4 + 8
        torch.testing.assert_close(product, _expected(adapters, strengths, key), rtol=0, atol=1e-5)


# ----- acceptance: plain diffusers loads the files and draws the same image --------------------------


def _draw(pipe, prompt: str, size: int, steps: int = 3) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=4.0,
        height=size,
        width=size,
        generator=generator,
        output_type="np",
    ).images[0]


def _check_loaded_lora(plain, adapters, strengths: dict) -> None:
    """Every exported layer was wrapped by diffusers/peft with exactly the fused delta (so its
    alpha / rank scaling matches ours), and nothing else was."""
    wrapped = {
        f"{component}.{path}"
        for component in adapters.components
        for path, module in getattr(plain, component).named_modules()
        if isinstance(module, BaseTunerLayer)
    }
    assert wrapped == set(adapters.layers)
    for key in adapters.layers:
        component, _, path = key.partition(".")
        module = getattr(plain, component).get_submodule(path)
        delta = module.get_delta_weight(module.active_adapters[0])
        torch.testing.assert_close(
            delta.reshape(delta.shape[0], -1), _expected(adapters, strengths, key), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("style", LORA_STYLES)
def test_plain_diffusers_draws_the_same_image(models_home, tmp_path, style):
    specs = {"dog": (0, "additive", 1.0), "cat": (1, "rotational", 0.6)}
    pipe, adapters = _patched("builtin:tiny", specs)
    prompt = "a photo of <dog1> and <cat1> on a sofa"
    expected = _draw(pipe, prompt, 32)
    paths = export_lora(adapters, list(specs), tmp_path / "fused.safetensors", style=style)

    plain = load_pipeline("builtin:tiny")  # no patching: only diffusers' own loaders from here on
    plain.set_progress_bar_config(disable=True)
    base = _draw(plain, "a photo of a dog and a cat on a sofa", 32)
    plain.load_lora_weights(str(paths[0]))
    for name, ti_path in zip(specs, paths[1:], strict=True):
        plain.load_textual_inversion(str(ti_path), token=f"<{name}1>")
    _check_loaded_lora(plain, adapters, {name: s for name, (_, _, s) in specs.items()})
    got = _draw(plain, prompt, 32)
    assert np.abs(expected - base).max() > 1e-2  # the concepts do change the image
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("style", LORA_STYLES)
def test_plain_diffusers_sdxl_draws_the_same_image(models_home, tmp_path, style):
    pipe, adapters = _patched("builtin:tiny-sdxl", {"dog": (1, "additive", 0.8)})
    prompt = "<dog1> on a beach"
    expected = _draw(pipe, prompt, 32, steps=2)
    lora_path, ti_path = export_lora(adapters, ["dog"], tmp_path / "xl.safetensors", style=style)

    plain = load_pipeline("builtin:tiny-sdxl")
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(lora_path))
    embeddings = load_file(ti_path)  # AUTOMATIC1111's SDXL layout: one tensor per text encoder
    plain.load_textual_inversion(
        embeddings["clip_l"], token="<dog1>", text_encoder=plain.text_encoder, tokenizer=plain.tokenizer
    )
    plain.load_textual_inversion(
        embeddings["clip_g"], token="<dog1>", text_encoder=plain.text_encoder_2, tokenizer=plain.tokenizer_2
    )
    _check_loaded_lora(plain, adapters, {"dog": 0.8})
    np.testing.assert_allclose(_draw(plain, prompt, 32, steps=2), expected, rtol=0, atol=1e-4)
