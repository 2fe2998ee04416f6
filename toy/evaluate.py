"""Does ``builtin:toy`` draw what it is told? Classifier accuracy on generated images, with a grid.

    python -m toy.evaluate                 # writes docs/toy-eval.json, docs/toy-heldout.png, docs/toy-loss.png

Captions come in three sets: *held-out* single-object captions (a (colour, shape, background) triple
that pretraining never showed), *seen* single-object captions (triples it did show), and two-object
captions. For every caption the model draws ``--seeds`` images (DDIM, fixed seeds) and the scene
classifier reads them: shape and colour of a single object (argmax), the background, and for two
objects whether the set of shapes is exactly right.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from spectral_diffusion.generation.diffusion import generate
from spectral_diffusion.models import scenes
from spectral_diffusion.models.registry import load_pipeline
from toy import classifier

logger = logging.getLogger("toy.evaluate")
DOCS = Path(__file__).resolve().parent.parent / "docs"


def single_captions(held: bool) -> list[tuple[str, str, str]]:
    """(colour, shape, background) triples: all held-out ones, or as many seen ones picked at random."""
    if held:
        return list(scenes.HELD_OUT)
    seen = [(c, s, b) for s in scenes.PRETRAIN_SHAPES for c in scenes.COLOURS for b in scenes.BACKGROUNDS
            if not scenes.held_out(c, s, b)]
    return random.Random(0).sample(seen, len(scenes.HELD_OUT))


def single_scores(pipe, model, triples, seeds: int, steps: int, guidance: float):
    results, images_per_caption = [], []
    for colour, shape, background in triples:
        images = generate(pipe, f"a {colour} {shape} on a {background} background", seeds,
                          scenes.IMAGE_SIZE, steps, guidance, seed=7)
        read = classifier.read(model, images)
        for i in range(seeds):
            shape_ok = scenes.SHAPES[int(read["shape"][i].argmax())] == shape
            colour_ok = classifier.COLOUR_NAMES[int(read["colour"][i].argmax())] == colour
            bg_ok = classifier.BACKGROUND_NAMES[int(read["background"][i].argmax())] == background
            results.append((shape_ok, colour_ok, bg_ok))
        images_per_caption.append(images)
    return _rates(results, ("shape", "colour", "background")), images_per_caption


def _rates(results, names) -> dict[str, float]:
    rates = {name: sum(r[k] for r in results) / len(results) for k, name in enumerate(names)}
    rates["shape_and_colour"] = sum(r[0] and r[1] for r in results) / len(results)
    rates["images"] = len(results)
    return rates


def pair_scores(pipe, model, count: int, seeds: int, steps: int, guidance: float) -> dict[str, float]:
    rng = random.Random(1)
    results = []
    for _ in range(count):
        a, b = rng.sample(scenes.PRETRAIN_SHAPES, 2)
        ca, cb = rng.sample(list(scenes.COLOURS), 2)
        background = rng.choice(list(scenes.BACKGROUNDS))
        prompt = f"a {ca} {a} on the left and a {cb} {b} on the right on a {background} background"
        read = classifier.read(model, generate(pipe, prompt, seeds, scenes.IMAGE_SIZE, steps, guidance, seed=7))
        for i in range(seeds):
            shapes_seen = {s for k, s in enumerate(scenes.SHAPES) if read["shape"][i, k] > 0.5}
            colours_seen = {c for k, c in enumerate(classifier.COLOUR_NAMES) if read["colour"][i, k] > 0.5}
            results.append((shapes_seen == {a, b}, colours_seen == {ca, cb}, True))
    rates = _rates(results, ("shape", "colour", "background"))
    rates.pop("background")
    return rates


def grid(triples, images_per_caption, scale: int = 3, columns: int = 6) -> Image.Image:
    cell = scenes.IMAGE_SIZE * scale
    seeds = len(images_per_caption[0])
    block_w, label_h = seeds * cell + 8, 14
    rows = (len(triples) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * block_w, rows * (cell + label_h + 6)), "white")
    pen = ImageDraw.Draw(canvas)
    for k, ((colour, shape, background), images) in enumerate(zip(triples, images_per_caption, strict=True)):
        x, y = (k % columns) * block_w, (k // columns) * (cell + label_h + 6)
        pen.text((x + 2, y), f"{colour} {shape} / {background}", fill="black")
        for s, image in enumerate(images):
            canvas.paste(image.resize((cell, cell), Image.NEAREST), (x + s * cell, y + label_h))
    return canvas


def scenes_sheet(count: int = 8, scale: int = 4) -> Image.Image:
    """Pretraining scenes with their captions (wrapped), for the docs."""
    import textwrap

    cell = scenes.IMAGE_SIZE * scale
    width = cell + 8
    sheet = Image.new("RGB", (count * width, cell + 70), "white")
    pen = ImageDraw.Draw(sheet)
    for k in range(count):
        scene = scenes.random_scene(k + 3)
        sheet.paste(scenes.render(scene).resize((cell, cell), Image.NEAREST), (k * width, 0))
        pen.multiline_text((k * width, cell + 2), "\n".join(textwrap.wrap(scene.caption, 22)), fill="black",
                           spacing=1)
    return sheet


def loss_plot(model_folder: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    losses = json.loads((model_folder / "training.json").read_text()).get("losses")
    if not losses:
        return
    window = 100
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(np.arange(len(smooth)) + window, smooth)
    ax.set_xlabel("step (batch 32)")
    ax.set_ylabel("min-SNR weighted loss")
    ax.set_title("builtin:toy pretraining, 100-step mean")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:toy")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(os.cpu_count())
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    model = classifier.load()
    held = single_captions(held=True)
    report = {"settings": vars(args) | {"out": str(args.out)}}
    report["held_out_single"], held_images = single_scores(pipe, model, held, args.seeds, args.steps, args.guidance)
    report["seen_single"], _ = single_scores(pipe, model, single_captions(held=False), args.seeds, args.steps,
                                             args.guidance)
    report["pairs"] = pair_scores(pipe, model, 20, args.seeds, args.steps, args.guidance)
    args.out.mkdir(parents=True, exist_ok=True)
    grid(held, held_images).save(args.out / "toy-heldout.png")
    scenes_sheet().save(args.out / "toy-scenes.png")
    folder = Path(pipe.name_or_path) if getattr(pipe, "name_or_path", None) else None
    if folder and (folder / "training.json").exists():
        loss_plot(folder, args.out / "toy-loss.png")
    (args.out / "toy-eval.json").write_text(json.dumps(report, indent=1) + "\n")
    logger.info("%s", json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
