"""Do concepts survive fusion? Spectral slots vs the reference fusion vs PEFT LoRA, on ``builtin:toy``.

    python -m bench.quality.fusion_quality            # about 20 minutes on 2 CPU cores; writes docs/fusion-quality.*
    python -m bench.quality.fusion_quality --quick    # fewer steps, seeds and prompts: a smoke run (a few minutes)

Four new concepts, shapes ``builtin:toy`` never saw (heart, moon, cross, ring), are each trained alone
from 5 captioned photos, once as a spectral slot (slots 0-3) and once as a PEFT LoRA of the same rank,
on the same layers, data, steps and learning rates (``bench/baselines/lora_concept.py``). Then images are drawn
for single-concept prompts (the concept in a new colour / background / position) and pair prompts
("a blue <heart> on the left and a red <moon> on the right ..."), over fixed seeds, under:

  (a) spectral slot fusion: all four slots on, ``W + sum_i dW_i`` (the product's fusion);
  (b) the reference implementation's fusion: the mean of the per-concept merged weights,
      ``mean_i (W + dW_i) = W + sum_i dW_i / n`` (same trained slots, strength 1/n);
  (c) PEFT LoRAs summed: ``W + sum_i B_i A_i``;  (d) PEFT LoRAs averaged: ``W + sum_i B_i A_i / n``.

The scene classifier (``toy/classifier.py``) scores every image: *identity* is its probability that
the concept's shape is present; *fidelity* is whether the requested colours and background are there.
"alone" means only that concept's adapter is applied. The drop is alone minus fused.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from bench.baselines.lora_concept import fused_pipeline, train_lora_concept
from bench.quality import fusion_regional as regional_quality
from bench.support import ROOT
from spectral_diffusion.core.model import SpectralAdapters
from spectral_diffusion.formats.adapter_file import install_adapter
from spectral_diffusion.generation.diffusion import generate
from spectral_diffusion.models.registry import default_rank, load_pipeline, training_defaults
from spectral_diffusion.training.config import TrainConfig
from spectral_diffusion.training.trainer import train_concept
from toy import classifier, scenes

logger = logging.getLogger("bench.quality.fusion_quality")

MODEL = "builtin:toy"
CONCEPTS = scenes.NOVEL_SHAPES
METHODS = {
    "spectral_sum": "(a) spectral slots, summed (ours)",
    "spectral_half": "(a') spectral slots, summed at strength 0.5",
    "spectral_mean": "(b) spectral, mean of merged weights (reference)",
    "lora_sum": "(c) PEFT LoRA, summed",
    "lora_half": "(c') PEFT LoRA, summed at weight 0.5",
    "lora_mean": "(d) PEFT LoRA, averaged",
}
# Method -> the factor on every concept's update: 1 (sum), 0.5, or 1 / n (the mean of merged weights).
WEIGHTS = {"sum": 1.0, "half": 0.5, "mean": 1.0 / len(CONCEPTS)}


@dataclass
class Settings:
    steps: int | None = None  # None: builtin:toy's training defaults, as the CLI and the app use them
    seeds: int = 4
    inference_steps: int = 25
    guidance: float = 5.0
    contexts: int = 4  # single-concept prompts per concept

    def train_config(self, shape: str, slot: int) -> TrainConfig:
        """The product's settings for builtin:toy; both adapter kinds get exactly these."""
        options = {**training_defaults(MODEL), "rank": default_rank(MODEL)}
        if self.steps:
            options["steps"] = self.steps
        return TrainConfig(
            name=shape, tokens=[token(shape)], slot=slot, resolution=scenes.IMAGE_SIZE, seed=slot, **options
        )


QUICK = Settings(steps=20, seeds=2, inference_steps=8, contexts=1)


def token(shape: str) -> str:
    return f"<{shape}>"


@dataclass
class Prompt:
    text: str
    concepts: tuple[str, ...]
    colours: tuple[str, ...]
    background: str


def single_prompts(shape: str, count: int) -> list[Prompt]:
    """New contexts: (colour, background) pairs that none of the concept's photos shows, with a position."""
    seen = {(s.objects[0].colour, s.background) for s in scenes.concept_scenes(shape)}
    fresh = [(c, b) for b in scenes.BACKGROUNDS for c in scenes.COLOURS if (c, b) not in seen]
    picked = [fresh[(7 * k + len(shape)) % len(fresh)] for k in range(count)]
    positions = itertools.cycle(("left", "right", "top", "center"))
    return [
        Prompt(
            f"a {c} {token(shape)} {scenes.POSITION_PHRASES[next(positions)]} on a {b} background", (shape,), (c,), b
        )
        for c, b in picked
    ]


def pair_prompts(limit: int | None = None) -> list[Prompt]:
    colours, backgrounds = list(scenes.COLOURS), list(scenes.BACKGROUNDS)
    prompts = []
    for k, (a, b) in enumerate(itertools.combinations(CONCEPTS, 2)):
        ca, cb, bg = colours[k % 6], colours[(k + 3) % 6], backgrounds[k % 4]
        text = f"a {ca} {token(a)} on the left and a {cb} {token(b)} on the right on a {bg} background"
        prompts.append(Prompt(text, (a, b), (ca, cb), bg))
    return prompts[:limit]


@dataclass
class Scores:
    identity: list[float] = field(default_factory=list)
    fidelity: list[float] = field(default_factory=list)
    bleed: list[float] = field(default_factory=list)  # other concepts' shapes seen where not asked for

    def add(self, reading: dict[str, torch.Tensor], prompt: Prompt) -> None:
        shapes, colours, bgs = reading["shape"], reading["colour"], reading["background"]
        asked = [scenes.SHAPES.index(c) for c in prompt.concepts]
        others = [scenes.SHAPES.index(c) for c in CONCEPTS if c not in prompt.concepts]
        for i in range(len(shapes)):
            self.identity.extend(float(shapes[i, j]) for j in asked)
            colour_ok = all(colours[i, classifier.COLOUR_NAMES.index(c)] > 0.5 for c in prompt.colours)
            bg_ok = int(bgs[i].argmax()) == classifier.BACKGROUND_NAMES.index(prompt.background)
            self.fidelity.append(float(colour_ok and bg_ok))
            self.bleed.append(float(shapes[i, others].max()) if others else 0.0)

    def summary(self) -> dict[str, float]:
        return {k: float(np.mean(v)) if v else float("nan") for k, v in self.__dict__.items()}


def draw(pipe, prompt: Prompt, settings: Settings) -> list[Image.Image]:
    return generate(
        pipe, prompt.text, settings.seeds, scenes.IMAGE_SIZE, settings.inference_steps, settings.guidance, seed=1234
    )


def train_all(pipe, settings: Settings, work: Path) -> tuple[dict, dict, dict]:
    spectral, lora, seconds = {}, {}, {"spectral": [], "lora": []}
    for slot, shape in enumerate(CONCEPTS):
        folder = work / shape
        scenes.write_concept_images(shape, folder)
        config = settings.train_config(shape, slot)
        start = time.perf_counter()
        spectral[shape] = train_concept(pipe, folder, config, svd_cache_dir=work / "svd").adapter
        seconds["spectral"].append(time.perf_counter() - start)
        start = time.perf_counter()
        lora[shape] = train_lora_concept(pipe, folder, config)
        seconds["lora"].append(time.perf_counter() - start)
        logger.info("trained %s: spectral %.0f s, LoRA %.0f s", shape, seconds["spectral"][-1], seconds["lora"][-1])
    return spectral, lora, seconds


def evaluate(pipe, spectral, lora, settings: Settings, pairs: list[Prompt], model) -> tuple[dict, dict]:
    """Scores[method][setting] and the pair images per method (for the grid)."""
    singles = {shape: single_prompts(shape, settings.contexts) for shape in CONCEPTS}
    # "alone" is the same for both fusions of one kind of adapter, so it is drawn once and shared.
    spectral_alone, lora_alone = Scores(), Scores()
    results = {
        m: {
            "alone": spectral_alone if m.startswith("spectral") else lora_alone,
            "fused single": Scores(),
            "fused pair": Scores(),
        }
        for m in METHODS
    }
    grids, alone_images = {}, {}
    adapters = SpectralAdapters.from_pipeline(pipe)
    try:
        for shape in CONCEPTS:
            install_adapter(adapters, spectral[shape])
        for shape in CONCEPTS:  # alone: only this slot on
            for other in CONCEPTS:
                adapters.set_enabled(other, other == shape)
            alone_images[shape] = []
            for prompt in singles[shape]:
                images = draw(pipe, prompt, settings)
                spectral_alone.add(classifier.read(model, images), prompt)
                alone_images[shape].append((prompt, images))
        for method in ("spectral_sum", "spectral_half", "spectral_mean"):
            for shape in CONCEPTS:
                adapters.set_enabled(shape, True)
                adapters.set_strength(shape, WEIGHTS[method.split("_")[1]])
            grids[method] = _score_fused(pipe, singles, pairs, settings, results[method], model)
        regional = _score_regional_spectral(pipe, adapters, pairs, settings, model)
    finally:
        adapters.unpatch()
    for shape in CONCEPTS:
        alone = fused_pipeline(pipe, [lora[shape]], 1.0)
        for prompt in singles[shape]:
            lora_alone.add(classifier.read(model, draw(alone, prompt, settings)), prompt)
    concepts = [lora[s] for s in CONCEPTS]
    for method in ("lora_sum", "lora_half", "lora_mean"):
        grids[method] = _score_fused(
            fused_pipeline(pipe, concepts, WEIGHTS[method.split("_")[1]]),
            singles,
            pairs,
            settings,
            results[method],
            model,
        )
    lora_pipe = fused_pipeline(pipe, concepts, 1.0)
    for prompt in pairs:
        layout = regional_quality.pair_layout(prompt, token, region_prompts=True)  # the anchors' regional prompts
        images, seconds = regional_quality.timed(
            lambda lay=layout: regional_quality.draw_regional(lora_pipe, lay, settings)
        )
        regional["regional_lora"].add(model, images, prompt, CONCEPTS, seconds)
    results["regional"] = regional
    return results, grids, alone_images


def _score_regional_spectral(pipe, adapters, pairs, settings, model) -> dict:
    """Global fusion, (e), (f), (f2) and the alone-on-pair ceiling, with all four slots installed."""
    rq = regional_quality
    scores = {"global": rq.PairScores(), **{m: rq.PairScores() for m in rq.REGIONAL_METHODS}}
    for shape in CONCEPTS:
        adapters.set_enabled(shape, True)
        adapters.set_strength(shape, 1.0)
    for prompt in pairs:
        images, seconds = rq.timed(lambda p=prompt: draw(pipe, p, settings))
        scores["global"].add(model, images, prompt, CONCEPTS, seconds)
        for method, routed, region_prompts in (
            ("regional_global_slots", False, True),
            ("routed", True, False),
            ("routed_region_prompts", True, True),
        ):
            layout = rq.pair_layout(prompt, token, region_prompts)
            images, seconds = rq.timed(lambda lay=layout, r=routed: rq.draw_regional(pipe, lay, settings, adapters, r))
            scores[method].add(model, images, prompt, CONCEPTS, seconds)
    for prompt in pairs:  # the ceiling: each concept alone on the pair prompt
        for concept in prompt.concepts:
            for shape in CONCEPTS:
                adapters.set_enabled(shape, shape == concept)
            scores["alone_on_pair"].add_alone(model, draw(pipe, prompt, settings), prompt, concept)
    for shape in CONCEPTS:
        adapters.set_enabled(shape, True)
    return scores


def regional_table(regional: dict) -> list[dict]:
    labels = {"global": "(a) global fusion (all slots everywhere)", **regional_quality.REGIONAL_METHODS}
    base_seconds = regional["global"].summary()["seconds"]
    rows = []
    for key, label in labels.items():
        s = regional[key].summary()
        rows.append(
            {
                "method": label,
                "identity_pair": s["identity"],
                "placement": s["placement"],
                "bleed_pair": s["bleed"],
                "fidelity_pair": s["fidelity"],
                "time_vs_global": s["seconds"] / base_seconds if s["seconds"] == s["seconds"] else float("nan"),
            }
        )
    return rows


def _score_fused(pipe, singles, pairs, settings, scores, model) -> list[list[Image.Image]]:
    for shape in CONCEPTS:
        for prompt in singles[shape]:
            scores["fused single"].add(classifier.read(model, draw(pipe, prompt, settings)), prompt)
    rows = []
    for prompt in pairs:
        images = draw(pipe, prompt, settings)
        scores["fused pair"].add(classifier.read(model, images), prompt)
        rows.append(images)
    return rows


# ---------------------------------------------------------------------------------- report


def table(results: dict) -> list[dict]:
    rows = []
    for method, label in METHODS.items():  # results["regional"] has its own table
        s = {k: v.summary() for k, v in results[method].items()}
        rows.append(
            {
                "method": label,
                "identity_alone": s["alone"]["identity"],
                "identity_fused_single": s["fused single"]["identity"],
                "identity_fused_pair": s["fused pair"]["identity"],
                "identity_drop": s["alone"]["identity"] - s["fused pair"]["identity"],
                "fidelity_alone": s["alone"]["fidelity"],
                "fidelity_fused_single": s["fused single"]["fidelity"],
                "fidelity_fused_pair": s["fused pair"]["fidelity"],
                "bleed_fused_single": s["fused single"]["bleed"],
            }
        )
    return rows


def grid_image(grids: dict, pairs: list[Prompt], scale: int = 2) -> Image.Image:
    """One row per method, the pair prompts side by side (each prompt's seeds in a block)."""
    cell = scenes.IMAGE_SIZE * scale
    seeds = len(next(iter(grids.values()))[0])
    label_w, gap, head = 250, 6, 30
    width = label_w + len(pairs) * (seeds * cell + gap)
    canvas = Image.new("RGB", (width, head + len(grids) * (cell + gap)), "white")
    pen = ImageDraw.Draw(canvas)
    for p, prompt in enumerate(pairs):
        x = label_w + p * (seeds * cell + gap)
        pen.text((x, 2), " + ".join(prompt.concepts), fill="black")
        pen.text((x, 14), ", ".join(prompt.colours) + f" / {prompt.background}", fill="gray")
    for r, (method, rows) in enumerate(grids.items()):
        y = head + r * (cell + gap)
        pen.text((4, y + cell // 2 - 6), METHODS[method], fill="black")
        for p, images in enumerate(rows):
            for s, image in enumerate(images):
                x = label_w + p * (seeds * cell + gap) + s * cell
                canvas.paste(image.resize((cell, cell), Image.NEAREST), (x, y))
    return canvas


def concept_sheet(work: Path, alone_images: dict, scale: int = 2) -> Image.Image:
    """Per concept, one row: its 5 training photos, then what it draws alone for each new-context prompt."""
    cell, gap, label_w = scenes.IMAGE_SIZE * scale, 8, 70
    prompts = max(len(v) for v in alone_images.values())
    seeds = len(next(iter(alone_images.values()))[0][1])
    width = label_w + 5 * cell + gap * 2 + prompts * (seeds * cell + gap)
    sheet = Image.new("RGB", (width, 16 + len(CONCEPTS) * (cell + gap)), "white")
    pen = ImageDraw.Draw(sheet)
    pen.text((label_w, 2), "training photos", fill="black")
    pen.text(
        (label_w + 5 * cell + 2 * gap, 2),
        "spectral slot alone, new contexts (colour, position, background)",
        fill="black",
    )
    for c, shape in enumerate(CONCEPTS):
        y = 16 + c * (cell + gap)
        pen.text((4, y + cell // 2 - 6), token(shape), fill="black")
        for k, path in enumerate(sorted((work / shape).glob("*.png"))):
            sheet.paste(Image.open(path).resize((cell, cell), Image.NEAREST), (label_w + k * cell, y))
        for p, (_, images) in enumerate(alone_images[shape]):
            for s, image in enumerate(images):
                x = label_w + 5 * cell + 2 * gap + p * (seeds * cell + gap) + s * cell
                sheet.paste(image.resize((cell, cell), Image.NEAREST), (x, y))
    return sheet


def _regional_markdown(rows: list[dict]) -> str:
    header = (
        "| method (pair prompts, concept a left, b right) | identity | placement (in its own half) | "
        "other concepts seen | fidelity | time / image vs global |\n|---|---|---|---|---|---|\n"
    )

    def cell(value, fmt):
        return "-" if value != value else format(value, fmt)

    return (
        header
        + "\n".join(
            f"| {r['method']} | {cell(r['identity_pair'], '.2f')} | {cell(r['placement'], '.2f')} | "
            f"{cell(r['bleed_pair'], '.2f')} | {cell(r['fidelity_pair'], '.2f')} | {cell(r['time_vs_global'], '.2f')}x |"
            for r in rows
        )
        + "\n"
    )


def write_report(rows, seconds, settings: Settings, out: Path, quick: bool, regional_rows=()) -> None:
    header = (
        "| method | identity alone | identity fused, single prompt | identity fused, pair prompt | "
        "identity drop (alone - pair) | fidelity alone | fidelity fused single | fidelity fused pair | "
        "other concepts seen (fused single) |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['method']} | {r['identity_alone']:.2f} | {r['identity_fused_single']:.2f} | "
        f"{r['identity_fused_pair']:.2f} | {r['identity_drop']:+.2f} | {r['fidelity_alone']:.2f} | "
        f"{r['fidelity_fused_single']:.2f} | {r['fidelity_fused_pair']:.2f} | {r['bleed_fused_single']:.2f} |"
        for r in rows
    ]
    data = {
        "settings": settings.__dict__,
        "train_config": settings.train_config(CONCEPTS[0], 0).to_json(),
        "quick": quick,
        "rows": rows,
        "regional_rows": list(regional_rows),
        "train_seconds": seconds,
    }
    (out / "fusion-quality.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "fusion-quality-table.md").write_text(header + "\n".join(lines) + "\n")
    if regional_rows:
        (out / "fusion-quality-regional.md").write_text(_regional_markdown(list(regional_rows)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="fusion-quality benchmark on builtin:toy")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--model", default=MODEL, help="a pipeline that knows the scenes (default builtin:toy)")
    parser.add_argument("--classifier", type=Path, default=classifier.WEIGHTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else Settings()
    pairs = pair_prompts(1 if args.quick else None)
    pipe = load_pipeline(args.model)
    model = classifier.load(args.classifier)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fusion-quality-") as tmp:
        work = Path(tmp)
        spectral, lora, seconds = train_all(pipe, settings, work)
        results, grids, alone_images = evaluate(pipe, spectral, lora, settings, pairs, model)
        concept_sheet(work, alone_images).save(args.out / "fusion-quality-concepts.png")
    rows = table(results)
    regional_rows = regional_table(results["regional"])
    grid_image(grids, pairs).save(args.out / "fusion-quality.png")
    write_report(rows, seconds, settings, args.out, args.quick, regional_rows)
    for row in regional_rows:
        logger.info("%s", row)
    for row in rows:
        logger.info("%s", row)


if __name__ == "__main__":
    main()
