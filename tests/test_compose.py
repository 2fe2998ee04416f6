"""Regional composition through the Studio: layouts in requests, routed slots, settings in the PNG."""

from __future__ import annotations

import numpy as np
import pytest

from spectral_diffusion.core.config import ConceptInfo
from spectral_diffusion.core.model import SpectralAdapters
from spectral_diffusion.errors import LayoutError, RequestError
from spectral_diffusion.formats.adapter_file import adapter_from_model
from spectral_diffusion.generation.fusion import Studio
from spectral_diffusion.generation.layout import Layout, Region, parse_region
from spectral_diffusion.generation.pnginfo import read_settings, save_png
from spectral_diffusion.generation.request import GenerationRequest
from spectral_diffusion.models.registry import load_pipeline

from .conftest import randomize_concept

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "<dog1> on the left and <cat1> on the right"


@pytest.fixture(scope="module")
def studio(models_home):
    adapters = SpectralAdapters.from_pipeline(load_pipeline("builtin:tiny"))
    studio = Studio("builtin:tiny")
    for name, slot, token, seed in (("dog", 0, "<dog1>", 1), ("cat", 1, "<cat1>", 2)):
        adapters.new_concept(ConceptInfo(name, slot, 4, "additive", [token], name))
        randomize_concept(adapters, name, seed=seed, scale=0.2)
        studio.load_concept(name, adapter_from_model(adapters, name, "builtin:tiny", {"steps": 1}))
        adapters.remove_concept(name)
    return studio


def _request(**kwargs) -> GenerationRequest:
    settings = dict(prompt=PROMPT, steps=2, guidance=5.0, seed=3, width=32, height=48)
    settings.update(kwargs)
    return GenerationRequest(**settings)


def _image(studio, **kwargs) -> np.ndarray:
    return studio.generate(_request(**kwargs), output_type="np")[0]


@pytest.mark.parametrize("mode", ["passes", "routed"])
def test_one_whole_image_region_equals_global_fusion(studio, mode):
    prompt = "<dog1> next to a cat"
    global_ = _image(studio, prompt=prompt, concepts={"dog": 1.0})
    whole = Layout(prompt, (Region("dog", (0, 0, 1, 1)),))
    np.testing.assert_allclose(_image(studio, prompt=prompt, layout=whole, regional_mode=mode), global_, atol=1e-5)
    half = Layout(prompt, (Region("dog", (0, 0, 0.5, 1)),))  # the same check can fail
    assert np.abs(_image(studio, prompt=prompt, layout=half, regional_mode=mode) - global_).max() > 1e-3


@pytest.mark.parametrize("steps", [2, 5])  # 2: every call private; 5: 4 private, then together
def test_image_k_of_a_passes_batch_is_the_image_of_seed_plus_k_and_the_passes_start_apart(studio, steps, monkeypatch):
    from spectral_diffusion.generation import passes

    layout = Layout(PROMPT, (Region("dog", (0, 0, 0.5, 1)), Region("cat", (0.5, 0, 1, 1))))
    batch = studio.generate(_request(layout=layout, steps=steps, num_images=2), output_type="np")
    second = _image(studio, layout=layout, steps=steps, seed=4)
    np.testing.assert_allclose(batch[1], second, atol=1e-5)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3
    monkeypatch.setattr(passes, "PRIVATE_SHARE", 0.0)  # every call on the one picture: another image
    # (the tiny random UNet changes little in 2 steps; equal images differ by under 5e-5)
    assert np.abs(_image(studio, layout=layout, steps=steps, seed=4) - second).max() > 3e-4


def test_a_pair_layout_differs_from_global_and_by_mode_and_stays_deterministic(studio):
    assert GenerationRequest(prompt="p").regional_mode == "passes"
    with pytest.raises(RequestError, match="regional mode"):
        GenerationRequest(prompt="p", regional_mode="latent")
    layout = Layout(PROMPT, (Region("dog", (0, 0, 0.5, 1)), Region("cat", (0.5, 0, 1, 1))))
    first = _image(studio, layout=layout)
    again = _image(studio, layout=layout)
    routed = _image(studio, layout=layout, regional_mode="routed")
    global_ = _image(studio, concepts={"dog": 1.0, "cat": 1.0})
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - global_).max() > 1e-3
    assert np.abs(first - routed).max() > 1e-3


def test_layout_concepts_are_selected_and_must_be_loaded(studio):
    layout = Layout(PROMPT, (Region("dog", (0, 0, 0.5, 1)), Region("cat", (0.5, 0, 1, 1))))
    assert _request(layout=layout).concepts == {"dog": 1.0, "cat": 1.0}
    assert _request(layout=layout, concepts={"dog": 0.5, "cat": 1.0}).concepts == {"dog": 0.5, "cat": 1.0}
    with pytest.raises(RequestError, match="places concept 'cat'"):  # chosen concepts must include the placed
        _request(layout=layout, concepts={"dog": 0.5})
    ghost = Layout(PROMPT, (Region("ghost", (0, 0, 1, 1)),))
    with pytest.raises(Exception, match="ghost"):
        studio.generate(_request(layout=ghost, concepts={"dog": 1.0, "cat": 1.0}))
    off = Layout(PROMPT, (Region("dog", (0, 0, 0.5, 1)), Region("cat", (0.5, 0, 1, 1))))
    with pytest.raises(RequestError, match="not selected"):
        studio.generate(_request(layout=off, concepts={"dog": 1.0, "cat": 0.0}))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _request(layout=Layout(PROMPT, (Region("dog", (0, 0, 1, 1)),)), mode="baked"), "live slots"),
        (lambda: _request(layout=Layout("other", (Region("dog", (0, 0, 1, 1)),))), "layout's prompt"),
        (lambda: _request(layout={"prompt": PROMPT}), "must be a Layout"),
        (lambda: Layout(PROMPT, (Region("dog", (0, 0, 1.5, 1)),)), "leaves the image"),
        (lambda: Layout(PROMPT, (Region("dog", (0.5, 0, 0.5, 1)),)), "is empty"),
        (lambda: Layout(PROMPT, ()), "at least one region"),
        (lambda: Layout(PROMPT, tuple(Region(None, (0, 0, 1, 1)) for _ in range(9))), "at most 8"),
        (lambda: parse_region("dog:0,0,1"), "dog"),
        (lambda: Layout.from_json("{not json"), "not valid JSON"),
    ],
)
def test_bad_layout_inputs_give_their_error(build, message):
    with pytest.raises((LayoutError, RequestError), match=message):
        build()


def test_generated_png_carries_its_settings(studio, tmp_path):
    layout = Layout(PROMPT, (Region("dog", (0, 0, 0.5, 1)), Region("cat", (0.5, 0, 1, 1))))
    [image] = studio.generate(_request(layout=layout, seed=-1, regional_mode="routed"))
    seed = int(image.info["seed"])
    path = save_png(image, tmp_path / "out.png")
    settings = read_settings(path)
    assert settings["seed"] == seed and settings["concepts"] == {"dog": 1.0, "cat": 1.0}
    assert settings["regional_mode"] == "routed"
    assert (settings["width"], settings["height"], settings["steps"]) == (32, 48, 2)
    assert Layout.from_json(settings["layout"]) == layout
    from PIL import Image

    with Image.open(path) as reopened:
        assert f"Seed: {seed}" in reopened.text["parameters"] and reopened.text["parameters"].startswith(PROMPT)
    with pytest.raises(RequestError, match="carries no Spectral Diffusion settings"):
        plain = tmp_path / "plain.png"
        Image.new("RGB", (8, 8)).save(plain)
        read_settings(plain)
