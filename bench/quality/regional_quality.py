"""Multi-concept pictures the way a user makes them, on ``builtin:toy``: ``python -m bench.quality.regional_quality``.

Everything goes through the path the CLI and the app take: concepts are trained by the ``train`` command
with its defaults (5 photos each from ``write_concept_images``), layouts are built by the same
``build_layout`` from what a user types (``--layout auto``, ``--layout left-right``, ``--region`` with and
without prompts), and images come from ``Studio.generate`` with the one set of generation defaults (a
layout drawn by one UNet pass per region, ``--regional-mode passes``); the ``-routed`` paths draw the same
layouts in one pass with routed slots (``--regional-mode routed``).

Rows, per path, over every pair of the four concepts (a on the left, b on the right) and ``--seeds`` seeds:

* both placed: the scene classifier sees concept a on the left and b on the right (each the most likely
  shape at its position, and something there);
* identity: the classifier's probability of each concept's shape, relative to that concept alone (only
  its slot on) on its own half's prompt ("a red <heart> on the left on a white background": a prompt may
  not name a concept that is not selected);
* bleeding: how likely the classifier finds the *other* concept of the pair at each concept's position
  (reported beside the same figure for each concept alone, where the other concept is not on at all: the
  classifier's floor);
* time per image.

Every picture is drawn once and read twice: by ``--classifier`` (``toy/classifier.safetensors``, the
instrument of the documented figures) and by ``--check-classifier`` (``toy/classifier-shapes.safetensors``,
three classifiers trained on varied outlines, averaged), to show which figures depend on the reader. Each
reader is also scored against labels read by eye (``regional_eye_labels.json``) when the run drew the
labelled pictures.

A baseline the ecosystem already has (ComfyUI's hooked LoRAs with masked conditioning, A1111 Regional
Prompter's latent mode): every concept exported as its exact LoRA, one full UNet pass per region with only
that LoRA on (text encoder included) and the region's prompt, the noise predictions blended by the same
masks. And a concept alone: at positions, colours and sizes its photos never showed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from spectral_diffusion import GenerationRequest, Library, Studio
from spectral_diffusion.frontends import cli
from spectral_diffusion.frontends.workflows import build_layout
from spectral_diffusion.generation.layout import region_masks
from spectral_diffusion.generation.request import DEFAULTS
from toy import classifier, scenes

logger = logging.getLogger("bench.quality.regional_quality")
MODEL = "builtin:toy"
CONCEPTS = scenes.NOVEL_SHAPES
SIDES = ("left", "right")
HALVES = ("0,0,0.5,1", "0.5,0,1,1")
PATHS = {
    "global": "no layout (global fusion)",
    "auto": "--layout auto",
    "left-right": "--layout left-right",
    "regions": "--region a:0,0,0.5,1 --region b:0.5,0,1,1 (no region prompts)",
    "region-prompts": "--region a:0,0,0.5,1:PROMPT_A --region b:0.5,0,1,1:PROMPT_B",
    "left-right-routed": "--layout left-right --regional-mode routed (one UNet pass)",
    "region-prompts-routed": "--region ...:PROMPT_A --region ...:PROMPT_B --regional-mode routed",
    "lora-passes": "baseline: exact LoRAs, one UNet pass per region, masks blend the predictions",
}

# The paths whose every image goes into the by-eye sheet, left to right.
EYE_PATHS = ("left-right", "region-prompts", "left-right-routed")
# The paths broken down pair by pair (where identity and bleeding come from): the same three.
PAIR_PATHS = EYE_PATHS
# Not a path a user takes: each pair's two concepts drawn alone, pasted half and half (``side_by_side``).
SIDE_BY_SIDE = "side-by-side"
SIDE_BY_SIDE_WHAT = "reference, not drawn: each concept alone, the two halves pasted side by side"


def token(shape: str) -> str:
    return f"<{shape}>"


def pair_name(concepts) -> str:
    """A pair's name, whichever side each concept is drawn on."""
    return " + ".join(c for c in CONCEPTS if c in concepts)


def scene(a: str, b: str, colour_a: str, colour_b: str, background: str, seed: int) -> dict:
    """``a`` on the left and ``b`` on the right, in these colours, on this background, from ``seed``."""
    return {
        "pair": pair_name((a, b)),
        "concepts": (a, b),
        "colours": (colour_a, colour_b),
        "background": background,
        "seed": seed,
        "prompt": f"{scenes.article(colour_a)} {colour_a} {token(a)} on the left and {scenes.article(colour_b)} "
        f"{colour_b} {token(b)} on the right, on a {background} background",  # set off by a comma: every region gets it
        "region_prompts": tuple(
            f"{scenes.article(c)} {c} {token(s)} {scenes.POSITION_PHRASES[side]} on a {background} background"
            for c, s, side in zip((colour_a, colour_b), (a, b), SIDES, strict=True)
        ),
    }


def pairs(concepts=CONCEPTS, seeds: int = 8) -> list[list[dict]]:
    """Per unordered pair of concepts, ``seeds`` scenes, each its own picture as a user would vary them:
    two different colours and a background drawn at random (fixed per pair), the sides swapped on every
    other seed, and seed k drawn from the generation seed + k. (One fixed prompt drew nearly the same
    picture from every seed on builtin:toy: 8 seeds were one picture, and one colour pair weighed a sixth.)"""
    out = []
    for a, b in itertools.combinations(concepts, 2):
        rng = random.Random(pair_name((a, b)))
        row = []
        for k in range(seeds):
            colour_a, colour_b = rng.sample(list(scenes.COLOURS), 2)
            background = rng.choice(list(scenes.BACKGROUNDS))
            left, right = (a, b) if k % 2 == 0 else (b, a)
            row.append(scene(left, right, colour_a, colour_b, background, k))
        out.append(row)
    return out


def regions_for(pair: dict, path: str) -> tuple[str | None, list[str]]:
    """(``--layout`` value, ``--region`` values) of a path, as a user types them."""
    a, b = pair["concepts"]
    path = path.removesuffix("-routed")
    if path in ("auto", "left-right"):
        return path, []
    if path == "regions":
        return None, [f"{a}:{HALVES[0]}", f"{b}:{HALVES[1]}"]
    if path == "region-prompts":
        return None, [f"{c}:{box}:{text}" for c, box, text in zip((a, b), HALVES, pair["region_prompts"], strict=True)]
    return None, []


# ----- scoring -------------------------------------------------------------------------------------


class Tally:
    """Per path: both placed, identity, bleeding, time per image."""

    def __init__(self):
        self.placed, self.identity, self.bleed, self.seconds = [], [], [], []

    def add(self, readings: tuple[dict, dict], row: list[dict], seconds: float) -> None:
        """Per side (left, right) the reading of one picture per scene of ``row`` (see ``read_sides``),
        drawn in ``seconds`` in all."""
        placed = [placed_by_reader(readings[side], [s["concepts"][side] for s in row], side) for side in (0, 1)]
        for i, drawn in enumerate(row):
            a, b = drawn["concepts"]
            for side, concept, other in ((0, a, b), (1, b, a)):
                where = scenes_position(SIDES[side])
                self.identity.append(float(readings[side]["shape"][i, scenes.SHAPES.index(concept)]))
                self.bleed.append(float(readings[side]["shape_at"][i, where, scenes.SHAPES.index(other)]))
            self.placed.append(float(i in placed[0] and i in placed[1]))
        self.seconds.append(seconds / len(row))

    def summary(self) -> dict:
        return {k: float(np.mean(v)) if v else float("nan") for k, v in self.__dict__.items()}


def scenes_position(side: str) -> int:
    return classifier.POSITION_NAMES.index(side)


# ----- generation ----------------------------------------------------------------------------------


def regional_mode(path: str) -> str:
    return "routed" if path.endswith("-routed") else DEFAULTS.regional_mode


def layout_key(library: Library, pair: dict, path: str) -> str:
    """Paths that build the same layout in the same regional mode (for two concepts ``auto`` and
    ``left-right``) draw the same pictures: they are drawn once."""
    layout = build_layout(library, pair["prompt"], "", *regions_for(pair, path))
    return json.dumps([layout.to_json() if layout else None, regional_mode(path)])


def generate(studio: Studio, library: Library, pair: dict, path: str, concepts=None) -> list:
    """The scene ``pair`` (see ``scene``) drawn by ``path`` from the generation seed + the scene's seed."""
    layout_spec, regions = regions_for(pair, path)
    layout = build_layout(library, pair["prompt"], "", layout_spec, regions)
    chosen = concepts if concepts is not None else pair["concepts"]
    request = GenerationRequest(
        prompt=layout.prompt if layout else pair["prompt"],
        concepts=dict.fromkeys(chosen, 1.0),
        seed=DEFAULTS.seed + pair["seed"],
        num_images=1,
        layout=layout,
        regional_mode=regional_mode(path),
    )
    return studio.generate(request)


class LoraPasses:
    """The baseline: one UNet pass per region with only that region's LoRA on; predictions blended by mask."""

    def __init__(self, library: Library, studio: Studio, work: Path, concepts=CONCEPTS, model: str = MODEL):
        from spectral_diffusion.frontends.workflows import export_concept
        from spectral_diffusion.models.registry import load_pipeline

        self.pipe = load_pipeline(model)
        self.pipe.set_progress_bar_config(disable=True)
        for name in concepts:
            files = export_concept(library, lambda: studio, name, "lora", work / f"{name}.safetensors")
            self.pipe.load_lora_weights(str(files[0]), adapter_name=name)
            self.pipe.load_textual_inversion(str(files[1]), token=token(name))

    @torch.no_grad()
    def __call__(self, pair: dict, seeds: int, size: int = scenes.IMAGE_SIZE, steps: int = DEFAULTS.steps) -> list:
        pipe = self.pipe
        latent = size // pipe.vae_scale_factor
        layout = build_layout(
            None,
            pair["prompt"],
            "",
            None,
            [
                f"{c}:{box}:{text}"
                for c, box, text in zip(pair["concepts"], HALVES, pair["region_prompts"], strict=True)
            ],
        )
        masks = region_masks(layout, latent, latent)
        passes = []
        for region, mask in zip(layout.regions, masks, strict=True):
            pipe.set_adapters([region.concept], [1.0])
            positive, negative = pipe.encode_prompt(layout.region_prompt(region), "cpu", 1, True, None)
            passes.append(
                (region.concept, torch.cat([negative.expand(seeds, -1, -1), positive.expand(seeds, -1, -1)]), mask)
            )
        return self._sample(passes, seeds, latent, steps, DEFAULTS.seed + pair["seed"])

    def _sample(self, passes, seeds: int, latent: int, steps: int, first_seed: int) -> list[Image.Image]:
        """All seeds in one batch, as ``Studio.generate`` draws them (image k from seed + k)."""
        pipe, scheduler = self.pipe, self.pipe.scheduler
        scheduler.set_timesteps(steps)
        shape = (1, pipe.unet.config.in_channels, latent, latent)
        generators = [torch.Generator("cpu").manual_seed(first_seed + k) for k in range(seeds)]
        latents = torch.cat([torch.randn(shape, generator=generator) for generator in generators])
        latents = latents * scheduler.init_noise_sigma
        guidance = DEFAULTS.guidance
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            blended, total = 0, 0
            for name, embeddings, mask in passes:
                pipe.set_adapters([name], [1.0])
                out = pipe.unet(model_input, t, encoder_hidden_states=embeddings).sample
                uncond, cond = out.chunk(2)
                blended = blended + mask * (uncond + guidance * (cond - uncond))
                total = total + mask
            # the boxes cover the image; their feathered seams sum below 1, so normalise there
            latents = scheduler.step(blended / total.clamp_min(1e-6), t, latents).prev_sample
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        return pipe.image_processor.postprocess(images, output_type="pil")


# ----- a concept alone, somewhere new --------------------------------------------------------------


def travel_prompts(shape: str, bg: str = "white") -> list[dict]:
    """Prompts for ``shape`` alone at a position / in a colour / at a size its photos never showed, on
    background ``bg``."""
    seen = scenes.concept_scenes(shape)
    positions = [p for p in scenes.POSITIONS if p not in {s.objects[0].position for s in seen}] or ["bottom"]
    colours = [c for c in scenes.COLOURS if c not in {s.objects[0].colour for s in seen}]
    out = [
        {
            "kind": "new position",
            "position": p,
            "colour": "red",
            "prompt": f"a red {token(shape)} {scenes.POSITION_PHRASES[p]} on a {bg} background",
        }
        for p in positions[:2]
    ]
    out += [
        {
            "kind": "new colour",
            "position": "center",
            "colour": c,
            "prompt": f"{scenes.article(c)} {c} {token(shape)} in the center on a {bg} background",
        }
        for c in colours
    ]
    out += [
        {
            "kind": "new size",
            "position": p,
            "colour": "blue",
            "size": "small",
            "prompt": f"a small blue {token(shape)} {scenes.POSITION_PHRASES[p]} on a {bg} background",
        }
        for p in positions[:1]
    ]
    return out


def draw_travel(studio: Studio, seeds: int, concepts=CONCEPTS) -> list[tuple[str, dict, list]]:
    """(shape, prompt item, images) for every concept alone somewhere its photos never showed: seed k of
    an item on the k-th background in turn (one prompt's seeds draw nearly one picture on builtin:toy)."""
    drawn = []
    backgrounds = list(scenes.BACKGROUNDS)
    for shape in concepts:
        on = {bg: travel_prompts(shape, bg) for bg in backgrounds}
        for index, item in enumerate(on[backgrounds[0]]):
            images = []
            for k in range(seeds):
                prompt = on[backgrounds[k % len(backgrounds)]][index]["prompt"]
                request = GenerationRequest(prompt=prompt, concepts={shape: 1.0}, seed=DEFAULTS.seed + k)
                images += studio.generate(request)
            drawn.append((shape, item, images))
    return drawn


def score_travel(model, drawn: list[tuple[str, dict, list]]) -> dict:
    """Per kind, the share of pictures where the reader sees the concept's shape in the colour asked at
    the position asked (and at the size asked, when the prompt names one)."""
    hits: dict[str, list[float]] = {}
    for shape, item, images in drawn:
        reading = classifier.read(model, images)
        where = classifier.POSITION_NAMES.index(item["position"])
        colour = classifier.COLOUR_NAMES.index(item["colour"])
        sizes = classifier.SIZE_NAMES
        for i in range(len(images)):
            ok = (
                reading["where"][i, where] > 0.5
                and int(reading["shape_at"][i, where].argmax()) == scenes.SHAPES.index(shape)
                and int(reading["colour_at"][i, where].argmax()) == colour
                and ("size" not in item or int(reading["size_at"][i, where].argmax()) == sizes.index(item["size"]))
            )
            hits.setdefault(item["kind"], []).append(float(ok))
    return {kind: float(np.mean(v)) for kind, v in hits.items()}


# ----- the run -------------------------------------------------------------------------------------


def train_concepts(library_dir: Path, photos: Path, concepts=CONCEPTS) -> float | None:
    """Train every concept with the CLI and its defaults; seconds per concept (None: all were there)."""
    start, trained = time.perf_counter(), 0
    for shape in concepts:
        if (library_dir / shape).is_dir():
            continue
        trained += 1
        scenes.write_concept_images(shape, photos / shape)
        code = cli.main(["train", "--images", str(photos / shape), "--name", shape, "--library", str(library_dir)])
        if code not in (0, None):
            raise SystemExit(f"training {shape} failed")
    return (time.perf_counter() - start) / trained if trained else None


def sheet(rows: dict[str, list[Image.Image]], scale: int = 2) -> Image.Image:
    """One row of images per path, labelled."""
    cell = scenes.IMAGE_SIZE * scale
    label = 150
    width = label + cell * max(len(v) for v in rows.values())
    out = Image.new("RGB", (width, cell * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for r, (name, images) in enumerate(rows.items()):
        draw.text((4, r * cell + cell // 2 - 6), name, fill=(0, 0, 0))
        for c, image in enumerate(images):
            out.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (label + c * cell, r * cell))
    return out


def travel_sheet(travelled: list[tuple[str, dict, list]], cell: int = 64) -> Image.Image:
    """Every concept-alone picture: a row per prompt (labelled), a column per seed."""
    label, gap = 190, 2
    columns = max(len(images) for _, _, images in travelled)
    out = Image.new("RGB", (label + columns * (cell + gap), len(travelled) * (cell + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for r, (shape, item, images) in enumerate(travelled):
        text = f"{item['kind']}: {item['colour']} {shape}, {item['position']}"
        draw.text((4, r * (cell + gap) + cell // 2 - 6), text, fill=(0, 0, 0))
        for c, image in enumerate(images):
            cell_image = image.resize((cell, cell), Image.Resampling.NEAREST)
            out.paste(cell_image, (label + c * (cell + gap), r * (cell + gap)))
    return out


def eye_sheet(every: dict[str, list[list[Image.Image]]], paths=EYE_PATHS, cell: int = 64) -> Image.Image:
    """Every image of ``paths`` side by side, a block per path (rows: pairs, columns: seeds), to count
    by eye what the classifier misreads."""
    blocks = [every[path] for path in paths if every.get(path)]
    rows, columns, gap = len(blocks[0]), len(blocks[0][0]), 4
    block_width = columns * (cell + gap) + 6 * gap
    out = Image.new("RGB", (block_width * len(blocks), rows * (cell + gap)), (255, 255, 255))
    for b, block in enumerate(blocks):
        for r, images in enumerate(block):
            for c, image in enumerate(images):
                cell_image = image.resize((cell, cell), Image.Resampling.NEAREST)
                out.paste(cell_image, (b * block_width + c * (cell + gap), r * (cell + gap)))
    return out


def draw(args, library: Library, studio: Studio, rows: list[list[dict]], work: Path) -> list[dict]:
    """Every picture the benchmark reads, per pair (a row of scenes): each concept alone on its half's
    prompt, then every path (paths that build the same layout are drawn once), one picture per scene,
    with the seconds it took."""
    baseline = LoraPasses(library, studio, work, args.concepts) if "lora-passes" in args.paths else None
    drawn_pairs = []
    for row in rows:
        # the ceiling: each concept alone (only its slot on), same colour, position and background
        alone = [
            [
                generate(
                    studio, library, {**one, "prompt": one["region_prompts"][side]}, "global", [one["concepts"][side]]
                )[0]
                for one in row
            ]
            for side in (0, 1)
        ]
        paths = {path: ([], 0.0) for path in args.paths}
        for one in row:
            drawn: dict[str, tuple[Image.Image, float]] = {}
            for path in args.paths:
                key = path if path == "lora-passes" else layout_key(library, one, path)
                if key not in drawn:
                    start = time.perf_counter()
                    images = baseline(one, 1) if path == "lora-passes" else generate(studio, library, one, path)
                    drawn[key] = (images[0], time.perf_counter() - start)
                images, seconds = paths[path]
                paths[path] = (images + [drawn[key][0]], seconds + drawn[key][1])
        logger.info("%s: drawn (%s)", row[0]["pair"], ", ".join(f"{p} {s:.1f} s" for p, (_, s) in paths.items()))
        drawn_pairs.append({"pair": row[0]["pair"], "scenes": row, "alone": alone, "paths": paths})
    return drawn_pairs


EYE_LABELS = Path(__file__).with_name("regional_eye_labels.json")


def same_pictures(images: list, mean_rgb: list) -> bool:
    """Whether ``images`` are the labelled pictures (each one's mean colour within 2 of 255)."""
    means = np.array([np.asarray(image.convert("RGB")).reshape(-1, 3).mean(0) for image in images])
    return len(images) == len(mean_rgb) and bool(np.abs(means - np.array(mean_rgb)).max() < 2.0)


def placed_by_reader(reading: dict, concepts: list[str], side: int) -> set[int]:
    """The pictures where the reader sees ``concepts[i]`` on ``side`` of picture i (the most likely shape
    at that position, and something there)."""
    where = scenes_position(SIDES[side])
    return {
        i
        for i, concept in enumerate(concepts)
        if reading["where"][i, where] > 0.5
        and int(reading["shape_at"][i, where].argmax()) == scenes.SHAPES.index(concept)
    }


def eye_both_placed(labels: dict) -> dict[str, int]:
    """Scenes where the eye saw both concepts, each in its own half: with ``--layout left-right``, and side
    by side (each concept alone, the halves pasted: both seen when each was seen alone)."""
    return {
        key: sum(len(set(sides["left"]) & set(sides["right"])) for sides in labels[part].values())
        for key, part in (("left-right", "left-right"), (SIDE_BY_SIDE, "alone"))
    }


def eye_agreement(model, drawn_pairs: list[dict], labels: dict, halves: bool = False) -> dict | None:
    """On the pictures labelled by eye (``regional_eye_labels.json``): in how many (picture, side) the
    reader and the eye agree on whether the side's concept is there. None when this run drew other
    pictures (other concepts, seeds or defaults): the labels are about those pictures only."""
    agree = total = 0
    for drawn in drawn_pairs:
        name = drawn["pair"]
        images = drawn["paths"].get("left-right", (None,))[0]
        if (
            name not in labels["left-right"]
            or images is None
            or not same_pictures(images, labels["mean_rgb"]["left-right"][name])
        ):
            return None
        sets = [(images, side, labels["left-right"][name][SIDES[side]]) for side in (0, 1)]
        for side in (0, 1):
            alone = drawn["alone"][side]
            if not same_pictures(alone, labels["mean_rgb"]["alone"][name][SIDES[side]]):
                return None
            sets.append((alone, side, labels["alone"][name][SIDES[side]]))
        for pictures, side, eye in sets:
            concepts = [one["concepts"][side] for one in drawn["scenes"]]
            read = placed_by_reader(read_sides(model, pictures, halves)[side], concepts, side)
            agree += sum((i in read) == (i in eye) for i in range(len(pictures)))
            total += len(pictures)
    return {
        "agree": agree,
        "of": total,
        "both_placed": eye_both_placed(labels),
        "scenes": total // 4,
    }  # 2 sides, pair and alone


def side_by_side(alone: list[list[Image.Image]]) -> list[Image.Image]:
    """Per scene, the left half of the left concept drawn alone beside the right half of the right one:
    two concepts that share nothing, so whatever the reader finds of the other concept there is its own
    confusion (and the concepts' own look), not bleeding."""
    pasted = []
    for left, right in zip(*alone, strict=True):
        half = left.width // 2
        image = left.convert("RGB")
        image.paste(right.convert("RGB").crop((half, 0, right.width, right.height)), (half, 0))
        pasted.append(image)
    return pasted


def only_half(image: Image.Image, side: int) -> Image.Image:
    """``image`` with the half that is not ``side`` painted over in the colour of the kept half's border
    (its outer edge, top and bottom): the kept half's background, whatever the model drew there."""
    pixels = np.asarray(image.convert("RGB")).copy()
    half = pixels.shape[1] // 2
    kept = pixels[:, :half] if side == 0 else pixels[:, half:]
    border = np.concatenate([kept[0], kept[-1], kept[:, 0] if side == 0 else kept[:, -1]])
    if side == 0:
        pixels[:, half:] = np.median(border, axis=0)
    else:
        pixels[:, :half] = np.median(border, axis=0)
    return Image.fromarray(pixels)


def read_sides(model, images: list, halves: bool) -> tuple[dict, dict]:
    """The readings of ``images`` for the left and the right side: the whole picture both times, or with
    ``halves`` each side's half alone (``only_half``), so that what stands in one half cannot change how
    the other is read."""
    if not halves:
        reading = classifier.read(model, images)
        return reading, reading
    return tuple(classifier.read(model, [only_half(image, side) for image in images]) for side in (0, 1))


def score(model, drawn_pairs: list[dict], paths, halves: bool = False) -> dict:
    """Both placed, identity (and vs alone), bleeding per path, and pair by pair, as ``model`` reads them
    (the whole picture, or with ``halves`` each half alone: ``read_sides``); the same for each pair's two
    concepts alone pasted side by side (``SIDE_BY_SIDE``)."""
    tallies = {path: Tally() for path in paths}
    tallies[SIDE_BY_SIDE] = Tally()
    alone_all, floor_all, per_pair = [], [], []
    for drawn in drawn_pairs:
        row = drawn["scenes"]
        pair_alone, pair_floor, pair_tallies = [], [], {path: Tally() for path in PAIR_PATHS if path in paths}
        pair_tallies[SIDE_BY_SIDE] = Tally()
        for side, images in enumerate(drawn["alone"]):
            reading = read_sides(model, images, halves)[side]
            for i, one in enumerate(row):
                concept, other = one["concepts"][side], one["concepts"][1 - side]
                pair_alone.append(float(reading["shape"][i, scenes.SHAPES.index(concept)]))
                # the classifier's floor: the other concept "seen" where it is not on at all
                pair_floor.append(
                    float(reading["shape_at"][i, scenes_position(SIDES[side]), scenes.SHAPES.index(other)])
                )
        pasted = {SIDE_BY_SIDE: (side_by_side(drawn["alone"]), float("nan"))}
        for path, (images, seconds) in (drawn["paths"] | pasted).items():
            readings = read_sides(model, images, halves)
            for tally in (tallies[path], pair_tallies.get(path)):
                if tally is not None:
                    tally.add(readings, row, seconds)
        alone_all += pair_alone
        floor_all += pair_floor
        per_pair.append(pair_row(drawn["pair"], pair_alone, pair_floor, pair_tallies))
    ceiling = float(np.mean(alone_all))
    rows = []
    for path in [*paths, SIDE_BY_SIDE]:
        s = tallies[path].summary()
        rows.append(
            {
                "path": path,
                "what": PATHS.get(path, SIDE_BY_SIDE_WHAT),
                "both_placed": s["placed"],
                "identity": s["identity"],
                "identity_vs_alone": s["identity"] / ceiling,
                "bleeding": s["bleed"],
                "seconds": None if path == SIDE_BY_SIDE else s["seconds"],
            }
        )
    labels = json.loads(EYE_LABELS.read_text())
    return {
        "rows": rows,
        "alone_identity": ceiling,
        "alone_bleeding": float(np.mean(floor_all)),
        "per_pair": per_pair,
        "eye_agreement": eye_agreement(model, drawn_pairs, labels, halves),
    }


def run(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="regional-quality-"))
    library_dir = Path(args.library) if args.library else work / "library"
    train_seconds = train_concepts(library_dir, work / "photos", args.concepts)
    library = Library(str(library_dir))
    studio = Studio(MODEL, library=library)
    selected = pairs(args.concepts, args.seeds)[: args.pairs]
    drawn_pairs = draw(args, library, studio, selected, work)
    travelled = draw_travel(studio, args.travel_seeds, args.concepts) if not args.no_travel else []
    readers = {"main": args.classifier} | ({"check": args.check_classifier} if args.check_classifier else {})
    result = {}
    for role, weights in readers.items():
        model = classifier.load(weights)
        reading = score(model, drawn_pairs, args.paths) | {"travel": score_travel(model, travelled)}
        reading["classifier"] = weights.name
        by_half = score(model, drawn_pairs, args.paths, halves=True)
        reading["by_half"] = {key: by_half[key] for key in ("rows", "alone_bleeding", "eye_agreement")}
        if role == "main":
            result.update(reading)
        else:
            result["check"] = reading
    grids = {path: [im for d in drawn_pairs for im in d["paths"][path][0][:2]] for path in args.paths}
    every = {path: [d["paths"][path][0] for d in drawn_pairs] for path in args.paths}
    every[SIDE_BY_SIDE] = [side_by_side(d["alone"]) for d in drawn_pairs]
    return result | {
        "train_seconds": train_seconds,
        "pairs": len(selected),
        "seeds": args.seeds,
        "grids": grids,
        "every": every,
        "drawn": drawn_pairs,
        "travelled": travelled,
    }


def save_pictures(drawn_pairs: list[dict], folder: Path) -> None:
    """Every picture of the pairs as PNG: ``PATH-PAIR-SEED.png`` and ``alone-SIDE-PAIR-SEED.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    for drawn in drawn_pairs:
        name = drawn["pair"].replace(" + ", "_")
        named = [(f"alone-{SIDES[side]}", images) for side, images in enumerate(drawn["alone"])]
        named += [(path, images) for path, (images, _) in drawn["paths"].items()]
        for prefix, images in named:
            for seed, image in enumerate(images):
                image.save(folder / f"{prefix}-{name}-{seed}.png")


def pair_row(name: str, alone: list[float], floor: list[float], tallies: dict[str, Tally]) -> dict:
    """One pair: each concept alone (identity, the classifier's bleeding floor), then per path."""
    row = {"pair": name, "alone_identity": float(np.mean(alone))}
    row["alone_bleeding"] = float(np.mean(floor))
    for path, tally in tallies.items():
        s = tally.summary()
        row[path] = {"both_placed": s["placed"], "identity_vs_alone": s["identity"] / row["alone_identity"]}
        row[path]["bleeding"] = s["bleed"]
    return row


def pair_markdown(rows: list[dict]) -> list[str]:
    paths = [path for path in (*PAIR_PATHS, SIDE_BY_SIDE) if rows and path in rows[0]]
    head = ["pair", "alone: identity", "alone: bleeding"]
    head += [f"{path}: {what}" for path in paths for what in ("placed", "vs alone", "bleeding")]
    lines = ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["pair"], f"{row['alone_identity']:.2f}", f"{row['alone_bleeding']:.3f}"]
        for path in paths:
            r = row[path]
            cells += [f"{r['both_placed']:.0%}", f"{r['identity_vs_alone']:.2f}x", f"{r['bleeding']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    seconds = result["train_seconds"]
    trained = "reused from --library" if seconds is None else f"{seconds:.0f} s each here"
    lines = [
        f"{result['pairs']} concept pairs x {result['seeds']} scenes on `{MODEL}` (each scene its own colours, "
        "background and seed; sides swapped on every other one), concepts trained with the "
        f"CLI defaults ({trained}); identity alone on the pair prompts: "
        f"{result['alone_identity']:.2f}; bleeding alone (the other concept seen where only one is on: the "
        f"classifier's own confusion): {result['alone_bleeding']:.3f}.",
        "",
        "| path | both placed | identity | vs alone | bleeding | s / image |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['what']} | {row['both_placed']:.0%} | {row['identity']:.2f} | "
            f"{row['identity_vs_alone']:.2f}x | {row['bleeding']:.3f} | {seconds_cell(row['seconds'])} |"
        )
    lines += pair_markdown(result.get("per_pair", []))
    lines += agreement_markdown(result)
    if result["travel"]:
        lines += ["", "| a concept alone | drawn as asked |", "|---|---|"]
        lines += [f"| {kind} | {value:.0%} |" for kind, value in result["travel"].items()]
    if result.get("check"):
        lines += check_markdown(result["check"])
    lines += by_half_markdown([result, result.get("check")])
    return "\n".join(lines) + "\n"


def by_half_markdown(readings: list[dict | None]) -> list[str]:
    """Each reader's figures with each half read alone (``read_sides``), beside the whole picture's."""
    readings = [reading for reading in readings if reading and reading.get("by_half")]
    if not readings:
        return []
    lines = [
        "",
        "Each half read alone (the other half painted in the colour of this half's border), so that a concept "
        "in one half cannot change how the other half is read; whole picture -> halves:",
        "",
        "| reader | path | both placed | vs alone | bleeding |",
        "|---|---|---|---|---|",
    ]
    for reading in readings:
        whole = {row["path"]: row for row in reading["rows"]}
        for row in reading["by_half"]["rows"]:
            before = whole[row["path"]]
            lines.append(
                f"| `{reading['classifier']}` | {row['what']} | {before['both_placed']:.0%} -> {row['both_placed']:.0%} | "
                f"{before['identity_vs_alone']:.2f}x -> {row['identity_vs_alone']:.2f}x | "
                f"{before['bleeding']:.3f} -> {row['bleeding']:.3f} |"
            )
    lines.append("")
    for reading in readings:
        found, half = reading.get("eye_agreement"), reading["by_half"]
        agree = (
            f"; agrees with the eye on {found['agree']} -> {half['eye_agreement']['agree']} of {found['of']}"
            if found and half.get("eye_agreement")
            else ""
        )
        lines.append(
            f"`{reading['classifier']}`: bleeding alone {reading['alone_bleeding']:.3f} -> "
            f"{half['alone_bleeding']:.3f}{agree}."
        )
    return lines


def seconds_cell(seconds: float) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def agreement_markdown(reading: dict) -> list[str]:
    found = reading.get("eye_agreement")
    if not found:
        return []
    share = found["agree"] / found["of"]
    return [
        "",
        f"`{reading['classifier']}` and the eye (`{EYE_LABELS.name}`: `left-right` and each concept alone, "
        f"is each side's concept there?) agree on {found['agree']} of {found['of']} ({share:.0%}). By eye, both "
        f"concepts each in its own half: {found['both_placed']['left-right']} of {found['scenes']} with "
        f"`--layout left-right`, {found['both_placed'][SIDE_BY_SIDE]} of {found['scenes']} side by side.",
    ]


def check_markdown(check: dict) -> list[str]:
    """The same pictures read by the second classifier (``--check-classifier``)."""
    lines = [
        "",
        f"The same pictures read by `{check['classifier']}`: identity alone {check['alone_identity']:.2f}, "
        f"bleeding alone {check['alone_bleeding']:.3f}.",
        "",
        "| path | both placed | identity | vs alone | bleeding |",
        "|---|---|---|---|---|",
    ]
    for row in check["rows"]:
        lines.append(
            f"| {row['what']} | {row['both_placed']:.0%} | {row['identity']:.2f} | "
            f"{row['identity_vs_alone']:.2f}x | {row['bleeding']:.3f} |"
        )
    lines += pair_markdown(check["per_pair"])
    lines += agreement_markdown(check)
    if check["travel"]:
        lines += ["", "| a concept alone | drawn as asked |", "|---|---|"]
        lines += [f"| {kind} | {value:.0%} |" for kind, value in check["travel"].items()]
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="scenes per pair (each its own colours and seed)")
    parser.add_argument("--travel-seeds", type=int, default=8, help="seeds per prompt of a concept alone")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--concepts", nargs="+", default=list(CONCEPTS), choices=list(CONCEPTS))
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--library", help="reuse concepts trained earlier (folder of a concept library)")
    parser.add_argument("--work", help="working folder (default: a new temporary folder)")
    parser.add_argument("--no-travel", action="store_true", help="skip the concept-alone rows")
    parser.add_argument("--out", type=Path, help="write the table (.md), the numbers (.json) and grids here")
    parser.add_argument("--save-pictures", action="store_true", help="also every picture, under OUT/pictures")
    parser.add_argument("--classifier", type=Path, default=classifier.WEIGHTS, help="the reader of every figure")
    parser.add_argument(
        "--check-classifier",
        type=lambda value: Path(value) if value else None,
        default=classifier.SHAPES_WEIGHTS,
        help="a second reader of the same pictures (default: classifier-shapes; '' for none)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    result = run(args)
    table = markdown(result)
    logger.info("\n%s", table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "regional-quality-table.md").write_text(table)
        sheet({path: images for path, images in result.pop("grids").items() if images}).save(
            args.out / "regional-quality.png"
        )
        every = result.pop("every")
        if args.save_pictures:
            save_pictures(result.pop("drawn"), args.out / "pictures")
        result.pop("drawn", None)
        travelled = result.pop("travelled")
        if travelled:
            travel_sheet(travelled).save(args.out / "regional-quality-travel.png")
        if all(every.get(path) for path in EYE_PATHS):
            eye_sheet(every).save(args.out / "regional-quality-modes.png")
        if every.get("left-right"):
            eye_sheet(every, ("left-right", SIDE_BY_SIDE)).save(args.out / "regional-quality-side-by-side.png")
        (args.out / "regional-quality.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
