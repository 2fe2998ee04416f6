"""Does ``builtin:toy`` draw what it is told, and where? Classifier readings of generated images, with grids.

    python -m toy.evaluate                 # writes docs/toy-eval.json, docs/toy-heldout.png, docs/toy-positions.png, docs/toy-loss.png

Captions come in four sets: *held-out* single-object captions (a (colour, shape, background) triple
that pretraining never showed), *seen* single-object captions (triples it did show), *positioned*
single-object captions ("a small red star at the top on a white background": every shape at every
position, both sizes), and two-object captions, side by side and one above the other. For every caption
the model draws ``--seeds`` images (DDIM, fixed seeds) and the scene classifier reads them: shape and
colour of a single object (argmax), the background, where the object stands and how large it is, and
for two objects whether the sets of shapes and colours are exactly right and whether each shape stands
at the position its caption names.
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

from spectral_diffusion.generation.diffusion import decode_latents, generate
from spectral_diffusion.models.registry import load_pipeline
from toy import classifier, scenes

logger = logging.getLogger("toy.evaluate")
DOCS = Path(__file__).resolve().parent.parent / "docs"
PAIR_LAYOUTS = (("left", "right"), ("top", "bottom"))


def single_captions(held: bool) -> list[tuple[str, str, str]]:
    """(colour, shape, background) triples: all held-out ones, or as many seen ones picked at random."""
    if held:
        return list(scenes.HELD_OUT)
    return random.Random(0).sample(_seen_triples(), len(scenes.HELD_OUT))


def _seen_triples() -> list[tuple[str, str, str]]:
    return [
        (c, s, b)
        for s in scenes.PRETRAIN_SHAPES
        for c in scenes.COLOURS
        for b in scenes.BACKGROUNDS
        if not scenes.held_out(c, s, b)
    ]


def _name(names, probabilities) -> str:
    return names[int(probabilities.argmax())]


def single_prompts(triples) -> list[str]:
    return [f"a {colour} {shape} on a {background} background" for colour, shape, background in triples]


def single_scores(model, triples, images_per_caption):
    results = []
    for (colour, shape, background), images in zip(triples, images_per_caption, strict=True):
        read = classifier.read(model, images)
        for i in range(len(images)):
            results.append(
                (
                    _name(scenes.SHAPES, read["shape"][i]) == shape,
                    _name(classifier.COLOUR_NAMES, read["colour"][i]) == colour,
                    _name(classifier.BACKGROUND_NAMES, read["background"][i]) == background,
                )
            )
    return _rates(results, ("shape", "colour", "background"))


def _rates(results, names) -> dict[str, float]:
    rates = {name: sum(r[k] for r in results) / len(results) for k, name in enumerate(names)}
    rates["shape_and_colour"] = sum(r[0] and r[1] for r in results) / len(results)
    rates["images"] = len(results)
    return rates


def position_captions() -> list[tuple[str, str, str, str, str]]:
    """(size, colour, shape, position, background): every shape at every position in both sizes, in
    colour-background pairs pretraining showed (this row measures placement, not composition)."""
    rng = random.Random(2)
    seen = _seen_triples()
    out = []
    for shape in scenes.PRETRAIN_SHAPES:
        for position in scenes.POSITIONS:
            for size in scenes.SIZES:
                colour, _, background = rng.choice([t for t in seen if t[1] == shape])
                out.append((size, colour, shape, position, background))
    return out


def position_prompts(captions) -> list[str]:
    return [
        f"a {size} {colour} {shape} {scenes.POSITION_PHRASES[position]} on a {background} background"
        for size, colour, shape, position, background in captions
    ]


def position_scores(model, captions, images_per_caption):
    """Single objects with a position (and size) named: is the object where, and as large as, it was told?"""
    results = []
    for (size, colour, shape, position, _), images in zip(captions, images_per_caption, strict=True):
        read = classifier.read(model, images)
        slot = classifier.POSITION_NAMES.index(position)
        for i in range(len(images)):
            results.append(
                (
                    _name(scenes.SHAPES, read["shape"][i]) == shape,
                    _name(classifier.COLOUR_NAMES, read["colour"][i]) == colour,
                    _name(classifier.POSITION_NAMES, read["where"][i]) == position,
                    _name(classifier.SIZE_NAMES, read["size_at"][i, slot]) == size,
                )
            )
    rates = _rates(results, ("shape", "colour", "position", "size"))
    seeds = len(images_per_caption[0])
    rates["position_by_word"] = {
        word: sum(r[2] for r, c in zip(results, _repeat(captions, seeds), strict=True) if c[3] == word)
        / (seeds * sum(c[3] == word for c in captions))
        for word in scenes.POSITIONS
    }
    return rates


def _repeat(items, times: int):
    return [item for item in items for _ in range(times)]


def pair_captions(count_per_layout: int = 10) -> list[tuple[tuple[str, str, str], tuple[str, str, str], str]]:
    """((colour, shape, position) twice, background): two objects side by side and one above the other."""
    rng = random.Random(1)
    out = []
    for first, second in PAIR_LAYOUTS:
        for _ in range(count_per_layout):
            a, b = rng.sample(scenes.PRETRAIN_SHAPES, 2)
            ca, cb = rng.sample(list(scenes.COLOURS), 2)
            out.append(((ca, a, first), (cb, b, second), rng.choice(list(scenes.BACKGROUNDS))))
    return out


def pair_prompts(captions) -> list[str]:
    return [
        f"a {ca} {a} {scenes.POSITION_PHRASES[pa]} and a {cb} {b} {scenes.POSITION_PHRASES[pb]}"
        f" on a {background} background"
        for (ca, a, pa), (cb, b, pb), background in captions
    ]


def pair_scores(model, captions, images_per_caption) -> dict[str, float]:
    results, layouts = [], []
    for ((ca, a, pa), (cb, b, pb), _), images in zip(captions, images_per_caption, strict=True):
        read = classifier.read(model, images)
        for i in range(len(images)):
            shapes_seen = {s for k, s in enumerate(scenes.SHAPES) if read["shape"][i, k] > 0.5}
            colours_seen = {c for k, c in enumerate(classifier.COLOUR_NAMES) if read["colour"][i, k] > 0.5}
            placed = all(
                read["where"][i, classifier.POSITION_NAMES.index(p)] > 0.5
                and _name(scenes.SHAPES, read["shape_at"][i, classifier.POSITION_NAMES.index(p)]) == s
                for s, p in ((a, pa), (b, pb))
            )
            results.append((shapes_seen == {a, b}, colours_seen == {ca, cb}, placed))
            layouts.append(pa)
    rates = _rates(results, ("shape", "colour", "positions"))
    rates["positions_by_layout"] = {
        f"{first}/{second}": sum(r[2] for r, lay in zip(results, layouts, strict=True) if lay == first)
        / layouts.count(first)
        for first, second in PAIR_LAYOUTS
    }
    return rates


def draw(pipe, prompts: list[str], seeds: int, steps: int, guidance: float, seed: int = 7, chunk: int = 32):
    """``seeds`` images per prompt, many prompts per pipeline call. Every prompt starts from the same
    ``seeds`` noise latents, the ones ``generate(pipe, prompt, seeds, ..., seed=seed)`` would draw, so the
    images are those of one call per prompt, made several times faster."""
    side = scenes.IMAGE_SIZE // pipe.vae_scale_factor
    noise = torch.randn(
        (seeds, pipe.unet.config.in_channels, side, side), generator=torch.Generator().manual_seed(seed)
    )
    out = []
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        with torch.no_grad():
            latents = pipe(
                prompt=part,
                num_images_per_prompt=seeds,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=scenes.IMAGE_SIZE,
                width=scenes.IMAGE_SIZE,
                latents=noise.repeat(len(part), 1, 1, 1).to(pipe.device),
                output_type="latent",
            ).images
        images = decode_latents(pipe, latents)
        out.extend(images[k * seeds : (k + 1) * seeds] for k in range(len(part)))
    return out


def evaluate(pipe, model, seeds: int = 4, steps: int = 25, guidance: float = 5.0) -> tuple[dict, dict]:
    """Every row of the report, and the images of the held-out and positioned captions (for the grids)."""
    settings = (seeds, steps, guidance)
    held, seen, placed, pairs = (
        single_captions(held=True),
        single_captions(held=False),
        position_captions(),
        pair_captions(),
    )
    held_images = draw(pipe, single_prompts(held), *settings)
    placed_images = draw(pipe, position_prompts(placed), *settings)
    report = {
        "held_out_single": single_scores(model, held, held_images),
        "seen_single": single_scores(model, seen, draw(pipe, single_prompts(seen), *settings)),
        "positioned_single": position_scores(model, placed, placed_images),
        "pairs": pair_scores(model, pairs, draw(pipe, pair_prompts(pairs), *settings)),
    }
    return report, {"held": (held, held_images), "placed": (placed, placed_images)}


def seconds_per_image(pipe, steps: int, guidance: float, repeats: int = 5) -> float:
    """Median wall time of one 32 x 32 image (text encoding, ``steps`` guided steps and decoding)."""
    import statistics
    import time

    times = []
    for k in range(repeats + 1):
        start = time.perf_counter()
        generate(pipe, "a red star on the left on a white background", 1, scenes.IMAGE_SIZE, steps, guidance, seed=k)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first call warms up


def grid(labels: list[str], images_per_caption, scale: int = 3, columns: int = 6) -> Image.Image:
    cell = scenes.IMAGE_SIZE * scale
    seeds = len(images_per_caption[0])
    block_w, label_h = seeds * cell + 8, 14
    rows = (len(labels) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * block_w, rows * (cell + label_h + 6)), "white")
    pen = ImageDraw.Draw(canvas)
    for k, (label, images) in enumerate(zip(labels, images_per_caption, strict=True)):
        x, y = (k % columns) * block_w, (k // columns) * (cell + label_h + 6)
        pen.text((x + 2, y), label, fill="black")
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
        pen.multiline_text((k * width, cell + 2), "\n".join(textwrap.wrap(scene.caption, 22)), fill="black", spacing=1)
    return sheet


def loss_plot(model_folder: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    info = json.loads((model_folder / "training.json").read_text())
    losses = info.get("losses")
    if not losses:
        return
    window = 100
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(np.arange(len(smooth)) + window, smooth)
    restart = info.get("restarted_at")
    if restart:  # where the run moved to another machine, continued from the export
        ax.axvline(restart, color="gray", linestyle=":", label=f"continued from the export at step {restart}")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"step (batch {info.get('diffusion', {}).get('batch', 32)})")
    ax.set_ylabel("weighted v-prediction loss")
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
    parser.add_argument("--classifier", type=Path, default=classifier.WEIGHTS)
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    model = classifier.load(args.classifier)
    rows, grids = evaluate(pipe, model, args.seeds, args.steps, args.guidance)
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **rows}
    if args.device == "cpu":  # the time that matters is a CPU's
        report["seconds_per_image"] = {
            "threads": args.threads,
            "steps": args.steps,
            "median": seconds_per_image(pipe, args.steps, args.guidance),
        }
    (held, held_images), (placed, placed_images) = grids["held"], grids["placed"]
    args.out.mkdir(parents=True, exist_ok=True)
    grid([f"{c} {s} / {b}" for c, s, b in held], held_images).save(args.out / "toy-heldout.png")
    large = [k for k, c in enumerate(placed) if c[0] == "large"]
    grid(
        [f"{placed[k][2]} {placed[k][3]}" for k in large],
        [placed_images[k] for k in large],
        columns=len(scenes.POSITIONS),
    ).save(args.out / "toy-positions.png")
    scenes_sheet().save(args.out / "toy-scenes.png")
    folder = Path(pipe.name_or_path) if getattr(pipe, "name_or_path", None) else None
    if folder and (folder / "training.json").exists():
        loss_plot(folder, args.out / "toy-loss.png")
    (args.out / "toy-eval.json").write_text(json.dumps(report, indent=1) + "\n")
    logger.info("%s", json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
