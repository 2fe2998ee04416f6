"""Concepts trained as a user trains them, drawn as a user asks: the scene classifier checks the pictures.

The whole user path on builtin:toy: five ``write_concept_images`` photos per concept, ``train`` at the CLI
defaults, then ``generate --num-images 8``; the classifier (toy/classifier.py) reads what stands at each
position. Each test trains its concepts (under a minute each on two cores).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from spectral_diffusion.frontends import cli
from toy import classifier, scenes

IMAGES = 8


def _train(tmp_path: Path, shape: str) -> Path:
    photos, library = tmp_path / "photos" / shape, tmp_path / "library"
    assert len(scenes.write_concept_images(shape, photos)) == 5
    assert cli.main(["train", "--images", str(photos), "--name", shape, "--library", str(library)]) in (0, None)
    return library


def _generate(capsys, library: Path, out: Path, args: list[str]) -> dict:
    """``generate`` with ``args`` (8 images), read by the scene classifier."""
    capsys.readouterr()
    command = ["generate", *args, "--num-images", str(IMAGES), "--out", str(out), "--library", str(library)]
    assert cli.main(command) in (0, None)
    paths = [Path(line) for line in capsys.readouterr().out.split()]
    assert len(paths) == IMAGES
    return classifier.read(classifier.load(), [Image.open(path).convert("RGB") for path in paths])


def _drawn(reading: dict, image: int, position: str, shape: str, colour: str | None = None) -> bool:
    """Whether the classifier sees ``shape`` (in ``colour``) at ``position`` of image ``image``."""
    where = classifier.POSITION_NAMES.index(position)
    found = bool(reading["where"][image, where] > 0.5)
    found &= int(reading["shape_at"][image, where].argmax()) == scenes.SHAPES.index(shape)
    if colour is not None:
        found &= int(reading["colour_at"][image, where].argmax()) == classifier.COLOUR_NAMES.index(colour)
    return found


def test_a_trained_concept_is_drawn_at_a_new_position_in_a_new_colour(tmp_path, capsys):
    # the heart's photos: blue, yellow, orange, red, purple; on the left and in the centre
    seen = {(scene.objects[0].colour, scene.objects[0].position) for scene in scenes.concept_scenes("heart")}
    assert not any(colour == "green" or where == "right" for colour, where in seen)
    library = _train(tmp_path, "heart")
    prompt = "a green <heart> on the right on a white background"
    reading = _generate(capsys, library, tmp_path / "heart.png", ["--prompt", prompt, "--concepts", "heart"])
    drawn = sum(_drawn(reading, i, "right", "heart", "green") for i in range(IMAGES))
    # before issue 23's augmentation (the whole photo shrunk, no recolouring) the heart never went right: 0
    assert drawn >= 6, f"a green heart on the right in {drawn} of {IMAGES} images"


def test_two_trained_concepts_each_in_its_own_half_of_a_preset_layout(tmp_path, capsys):
    _train(tmp_path, "heart")
    library = _train(tmp_path, "moon")  # the same library: the moon takes the next slot
    prompt = "a red <heart> on the left and a yellow <moon> on the right, on a white background"
    args = ["--prompt", prompt, "--concepts", "heart,moon", "--layout", "left-right"]
    reading = _generate(capsys, library, tmp_path / "pair.png", args)
    both = sum(_drawn(reading, i, "left", "heart") and _drawn(reading, i, "right", "moon") for i in range(IMAGES))
    # one routed pass (the only regional mode before issue 23's passes) drew the pair in 0 of 8 here
    assert both >= 6, f"the heart on the left and the moon on the right in {both} of {IMAGES} images"
