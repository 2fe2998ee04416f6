"""The procedural scene generator: deterministic, captions match pictures, held-out combinations held out."""

from __future__ import annotations

import numpy as np
import pytest

from spectral_diffusion.training.data import ConceptDataset
from toy import scenes


def test_scene_is_a_pure_function_of_its_seed():
    a, b = scenes.random_scene(123), scenes.random_scene(123)
    assert a == b and a.caption == b.caption
    assert np.array_equal(np.asarray(scenes.render(a)), np.asarray(scenes.render(b)))
    assert scenes.random_scene(124) != a


def test_captions_name_every_object_and_the_background_words_are_real():
    for seed in range(300):
        scene = scenes.random_scene(seed)
        assert 1 <= len(scene.objects) <= 3
        words = scene.caption.split()
        for obj in scene.objects:
            assert obj.shape in words and obj.colour in words
            if obj.texture != "solid":
                assert obj.texture in words
        if "background" in words:
            assert words[words.index("background") - 1] == scene.background


def test_pretraining_never_shows_novel_shapes_or_held_out_triples():
    seen_pairs = set()
    for seed in range(3000):
        scene = scenes.random_scene(seed)
        for obj in scene.objects:
            assert obj.shape in scenes.PRETRAIN_SHAPES
            assert not scenes.held_out(obj.colour, obj.shape, scene.background)
            seen_pairs.add((obj.colour, obj.shape))
    # Held-out triples remove one background per pair, never a whole (colour, shape) pair.
    assert seen_pairs == {(c, s) for c in scenes.COLOURS for s in scenes.PRETRAIN_SHAPES}
    assert len(scenes.HELD_OUT) == len(scenes.COLOURS) * len(scenes.PRETRAIN_SHAPES)
    assert all(scenes.held_out(*triple) for triple in scenes.HELD_OUT)


def test_rendered_pixels_match_the_description():
    obj = scenes.SceneObject("square", "blue", "large", "solid", "center")
    image = np.asarray(scenes.render(scenes.Scene((obj,), "beige"))).astype(int)
    centre, corner = image[16, 16], image[1, 1]
    assert np.abs(centre - scenes.COLOURS["blue"]).max() <= 2
    assert np.abs(corner - scenes.BACKGROUNDS["beige"]).max() <= 2
    ring = scenes.SceneObject("ring", "red", "large", "solid", "center")
    hole = np.asarray(scenes.render(scenes.Scene((ring,), "black")))[16, 16].astype(int)
    assert np.abs(hole - scenes.BACKGROUNDS["black"]).max() <= 2  # a ring is empty in the middle


def test_large_objects_at_an_edge_stay_inside_the_picture():
    obj = scenes.SceneObject("square", "red", "large", "solid", "left", (-0.04, 0.0))
    image = np.asarray(scenes.render(scenes.Scene((obj,), "white"), size=32)).astype(int)
    red = np.abs(image - scenes.COLOURS["red"]).max(axis=2) < 30
    cols = np.where(red.any(axis=0))[0]
    assert 12 <= cols.max() - cols.min() + 1 <= 17  # cut off at the edge it would be ~9 wide


def test_unknown_attributes_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown shape 'blob'.*circle"):
        scenes.SceneObject("blob", "red")
    with pytest.raises(ValueError, match="unknown background"):
        scenes.Scene((scenes.SceneObject("circle", "red"),), "plaid")


def test_concept_photos_are_a_trainable_folder_with_captions(tmp_path):
    paths = scenes.write_concept_images("heart", tmp_path / "heart", count=5)
    assert len(paths) == 5 and all(p.with_suffix(".txt").is_file() for p in paths)
    dataset = ConceptDataset(tmp_path / "heart", "<heart>", resolution=32)
    captions = [dataset.example(i)["caption"] for i in range(5)]
    assert all("<heart>" in c and "heart " not in c.replace("<heart>", "") for c in captions)
    colours = {scene.objects[0].colour for scene in scenes.concept_scenes("heart")}
    assert len(colours) == 5  # the token must learn the shape, not one colour
    assert scenes.concept_scenes("heart") == scenes.concept_scenes("heart")


def test_built_in_scene_masks_are_exact(tmp_path):
    for scene in scenes.concept_scenes("moon", 4):
        image = np.asarray(scenes.render(scene)).astype(int)
        mask = np.asarray(scenes.render_mask(scene))
        background = np.array(scenes.BACKGROUNDS[scene.background])
        distance = np.abs(image - background).max(axis=-1)
        # No concept outside the mask: the renderer's Lanczos filter only rings a little next to edges.
        assert distance[mask == 0].max() <= 32 and np.median(distance[mask == 0]) == 0
        assert distance[mask == 255].min() > 60  # and all of it inside
        assert 0 < ((mask > 0) & (mask < 255)).sum() < 0.1 * mask.size  # edges: partial coverage
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    scenes.write_concept_images("moon", photos, count=3, mask_folder=masks)
    assert sorted(p.name for p in masks.iterdir()) == sorted(p.name for p in photos.glob("*.png"))


def test_caption_mix_names_positions_as_often_as_asked_and_varies_the_order():
    import random

    pair = scenes.Scene(
        (
            scenes.SceneObject("star", "red", "small", position="left"),
            scenes.SceneObject("circle", "blue", "small", position="right"),
        ),
        "gray",
    )
    always = scenes.CaptionMix(size=0.0, position=1.0, background=1.0, reorder=True)
    rng = random.Random(0)
    captions = {scenes.caption(pair, rng, keep=always) for _ in range(40)}
    assert captions == {
        "a red star on the left and a blue circle on the right on a gray background",
        "a blue circle on the right and a red star on the left on a gray background",
    }
    # without positions the order is the scene's, and without reorder it never changes
    never = scenes.CaptionMix(size=0.0, position=0.0, background=0.0, reorder=True)
    assert {scenes.caption(pair, rng, keep=never) for _ in range(20)} == {"a red star and a blue circle"}
    fixed = scenes.CaptionMix(size=0.0, position=1.0, background=0.0)
    assert {scenes.caption(pair, rng, keep=fixed) for _ in range(20)} == {
        "a red star on the left and a blue circle on the right"
    }
    assert (
        scenes.caption(pair) == "a small red star on the left and a small blue circle on the right on a gray background"
    )
