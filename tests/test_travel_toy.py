"""A concept trained as a user trains it is drawn where, and in the colour, its prompt says.

The whole user path on builtin:toy: five ``write_concept_images`` photos (the heart: blue, yellow, orange,
red, purple; left and centre), ``train`` at the CLI defaults, then ``generate --num-images 8`` of a green
heart on the right, a colour and a position none of its photos show. The scene classifier
(toy/classifier.py) reads what stands on the right. Multi-concept layouts start from this: a concept that
cannot be drawn somewhere new cannot be drawn in its half of a layout. It takes a minute or two of CPU.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from spectral_diffusion.frontends import cli
from toy import classifier, scenes

SHAPE = "heart"
PROMPT = "a green <heart> on the right on a white background"
IMAGES = 8
NEEDED = 6  # of 8; with the whole photo shrunk and no recolouring (before issue 23) the heart never went right


def test_a_trained_concept_is_drawn_at_a_new_position_in_a_new_colour(tmp_path, capsys):
    photos, library = tmp_path / "photos", tmp_path / "library"
    written = scenes.write_concept_images(SHAPE, photos)
    seen = {(scene.objects[0].colour, scene.objects[0].position) for scene in scenes.concept_scenes(SHAPE)}
    assert len(written) == 5 and not any(colour == "green" or where == "right" for colour, where in seen)
    assert cli.main(["train", "--images", str(photos), "--name", SHAPE, "--library", str(library)]) in (0, None)
    capsys.readouterr()
    out = str(tmp_path / "heart.png")
    args = ["generate", "--prompt", PROMPT, "--concepts", SHAPE, "--num-images", str(IMAGES), "--out", out]
    assert cli.main([*args, "--library", str(library)]) in (0, None)
    paths = [Path(line) for line in capsys.readouterr().out.split()]
    assert len(paths) == IMAGES
    reading = classifier.read(classifier.load(), [Image.open(path).convert("RGB") for path in paths])
    right = classifier.POSITION_NAMES.index("right")
    drawn = [
        bool(reading["where"][i, right] > 0.5)
        and int(reading["shape_at"][i, right].argmax()) == scenes.SHAPES.index(SHAPE)
        and int(reading["colour_at"][i, right].argmax()) == classifier.COLOUR_NAMES.index("green")
        for i in range(IMAGES)
    ]
    assert sum(drawn) >= NEEDED, f"a green heart on the right in {sum(drawn)} of {IMAGES} images"
