"""Procedural scenes: small pictures of coloured shapes with captions that describe them.

They are the pretraining data of ``builtin:toy``, the labels of the classifier that checks what it
draws, and the source of new concepts (shapes it never saw) for training and fusion benchmarks.
Everything is a pure function of a seed, so any image can be made again from its number.

A scene has one to three objects on a plain background.  An object has a shape, a colour, a size, a
texture (solid, striped, dotted) and a position.  Shapes in ``NOVEL_SHAPES`` never appear in
pretraining; ``HELD_OUT`` (colour, shape, background) triples never appear either, so captions such
as "a red star on a gray background" test composition rather than memory. Position and size words
are the model's caption grammar (``BUILTIN_CAPTIONS["builtin:toy"]`` in spectral_diffusion/models/registry.py),
which training's augmentation follows when it moves, shrinks or pairs a concept.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from spectral_diffusion.models.registry import caption_grammar

PRETRAIN_SHAPES = ("circle", "square", "triangle", "star", "diamond")
NOVEL_SHAPES = ("heart", "moon", "cross", "ring")
SHAPES = PRETRAIN_SHAPES + NOVEL_SHAPES

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "beige": (222, 205, 170),
}
TEXTURES = ("solid", "striped", "dotted")
GRAMMAR = caption_grammar("builtin:toy")
COLOURS: dict[str, tuple[int, int, int]] = dict(GRAMMAR.colours)
SIZES = dict(GRAMMAR.sizes)  # object width as a fraction of the image
POSITIONS: dict[str, tuple[float, float]] = dict(GRAMMAR.positions)  # position word -> centre (x, y), fractions
POSITION_PHRASES = dict(GRAMMAR.phrases)
# Positions of multi-object scenes, chosen so that small objects never overlap.
LAYOUTS = {2: GRAMMAR.pairs, 3: (("left", "center", "right"), ("top", "center", "bottom"))}

IMAGE_SIZE = 32
_SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, for clean anti-aliased edges


def held_out(colour: str, shape: str, background: str) -> bool:
    """Whether a (colour, shape, background) triple is reserved for evaluation.

    One background in four per (colour, shape) pair, spread so that every pair, every
    colour-background pair and every shape-background pair still appears in training.
    """
    c, s, b = list(COLOURS).index(colour), SHAPES.index(shape), list(BACKGROUNDS).index(background)
    return (c + 2 * s) % len(BACKGROUNDS) == b


HELD_OUT = tuple((c, s, b) for s in PRETRAIN_SHAPES for c in COLOURS for b in BACKGROUNDS if held_out(c, s, b))


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str = "large"
    texture: str = "solid"
    position: str = "center"
    jitter: tuple[float, float] = (0.0, 0.0)  # centre offset, fraction of the image

    def __post_init__(self):
        for value, allowed, what in (
            (self.shape, SHAPES, "shape"),
            (self.colour, COLOURS, "colour"),
            (self.size, SIZES, "size"),
            (self.texture, TEXTURES, "texture"),
            (self.position, POSITIONS, "position"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str = "white"
    caption: str = ""
    extras: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose from {', '.join(BACKGROUNDS)}")


# ----------------------------------------------------------------------------- shapes


def _polygon(points, cx, cy, r):
    return [(cx + x * r, cy + y * r) for x, y in points]


def _star_points(n=5, inner=0.45):
    return [
        (
            (1.0 if k % 2 == 0 else inner) * math.sin(math.pi * k / n),
            -(1.0 if k % 2 == 0 else inner) * math.cos(math.pi * k / n) + 0.08,
        )
        for k in range(2 * n)
    ]


def _heart_points(count=48):
    pts = []
    for k in range(count):
        t = 2 * math.pi * k / count
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17.0, -y / 17.0 + 0.05))
    return pts


_UNIT_POLYGONS = {
    "square": [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)],
    "triangle": [(0.0, -0.95), (0.95, 0.8), (-0.95, 0.8)],
    "diamond": [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)],
    "star": _star_points(),
    "heart": _heart_points(),
    "cross": [
        (-0.3, -0.95),
        (0.3, -0.95),
        (0.3, -0.3),
        (0.95, -0.3),
        (0.95, 0.3),
        (0.3, 0.3),
        (0.3, 0.95),
        (-0.3, 0.95),
        (-0.3, 0.3),
        (-0.95, 0.3),
        (-0.95, -0.3),
        (-0.3, -0.3),
    ],
}


def shape_mask(
    shape: str,
    size: int,
    cx: float,
    cy: float,
    r: float,
    hole: float = 0.55,
    bite: float = 0.5,
    bite_lift: float = 0.15,
) -> Image.Image:
    """An 8-bit mask (255 inside) of ``shape`` centred at (cx, cy) with radius ``r`` pixels. ``hole``: a
    ring's inner radius; ``bite`` and ``bite_lift``: how far right and up the disc that cuts a moon is
    moved (all as fractions of ``r``)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inner = hole * r
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "moon":
        draw.ellipse(box, fill=255)
        shift, lift = bite * r, bite_lift * r
        draw.ellipse((cx - r + shift, cy - r - lift, cx + r + shift, cy + r - lift), fill=0)
    elif shape in _UNIT_POLYGONS:
        draw.polygon(_polygon(_UNIT_POLYGONS[shape], cx, cy, r), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _texture(texture: str, colour: tuple[int, int, int], size: int, period: int) -> Image.Image:
    """The fill of an object: its colour, with darker stripes or dots."""
    fill = Image.new("RGB", (size, size), colour)
    if texture == "solid":
        return fill
    dark = tuple(int(v * 0.35) for v in colour)
    draw = ImageDraw.Draw(fill)
    if texture == "striped":
        for offset in range(-size, size, period):
            draw.polygon(
                [(offset, 0), (offset + period // 2, 0), (offset + period // 2 + size, size), (offset + size, size)],
                fill=dark,
            )
    elif texture == "dotted":
        dot = period * 0.28
        for y in range(period // 2, size, period):
            for x in range(period // 2, size, period):
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=dark)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return fill


def render(scene: Scene, size: int = IMAGE_SIZE, outline=None) -> Image.Image:
    """The picture of ``scene``, ``size`` x ``size`` pixels, RGB. ``outline``: a function with the
    signature of ``shape_mask`` that draws the objects instead (the classifier's training varies them)."""
    outline = outline or shape_mask
    big = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    for obj in scene.objects:
        fill = _texture(obj.texture, COLOURS[obj.colour], big, period=max(4, big // 8))
        canvas.paste(fill, (0, 0), outline(obj.shape, big, *_placement(obj, big)))
    return canvas.resize((size, size), Image.LANCZOS)


def _placement(obj: SceneObject, big: int) -> tuple[float, float, float]:
    """Centre (x, y) and radius of ``obj`` in pixels of a ``big`` x ``big`` canvas."""
    px, py = POSITIONS[obj.position]
    r = SIZES[obj.size] * big / 2
    # A large object at an edge position moves inwards rather than being cut off.
    cx = min(max((px + obj.jitter[0]) * big, r), big - r)
    cy = min(max((py + obj.jitter[1]) * big, r), big - r)
    return cx, cy, r


def render_mask(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The exact foreground mask of ``render(scene, size)``: 8-bit coverage of the objects (255 inside)."""
    big = size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    for obj in scene.objects:
        mask.paste(255, (0, 0), shape_mask(obj.shape, big, *_placement(obj, big)))
    return mask.resize((size, size), Image.BOX)  # area coverage of each pixel


# ---------------------------------------------------------------------------- captions


def describe(obj: SceneObject, with_size: bool = True, with_position: bool = True, noun: str | None = None) -> str:
    """ "a small red striped star on the left"; ``noun`` replaces the shape word (a concept token)."""
    words = []
    if with_size:
        words.append(obj.size)
    words.append(obj.colour)
    if obj.texture != "solid":
        words.append(obj.texture)
    words.append(noun or obj.shape)
    if with_position:
        words.append(POSITION_PHRASES[obj.position])
    return " ".join([article(words[0]), *words])


def article(word: str) -> str:
    """ "an" before a vowel ("an orange star"), else "a": as the captions builtin:toy learned say it."""
    return "an" if word[0] in "aeiou" else "a"


def caption(
    scene: Scene, rng: random.Random | None = None, nouns: dict[str, str] | None = None, keep: CaptionMix | None = None
) -> str:
    """A caption of ``scene``; with ``rng``, size, position and background words are sometimes left out
    (as often as ``keep`` says), so that short prompts ("a red star") are in the training distribution
    too, and objects whose positions are named are sometimes mentioned in another order."""
    mix = keep or CaptionMix()
    chance = (lambda p: rng.random() < p) if rng else (lambda p: True)
    nouns = nouns or {}
    with_size, with_position = chance(mix.size), chance(mix.position)
    objects = list(scene.objects)
    if rng and with_position and mix.reorder and rng.random() < 0.5:
        objects.reverse()  # the order of mention must not stand in for the position words
    text = " and ".join(describe(o, with_size, with_position, nouns.get(o.shape)) for o in objects)
    if chance(mix.background):
        text += f" on a {scene.background} background"
    return text


@dataclass(frozen=True)
class CaptionMix:
    """How often a random caption keeps each kind of word (the rest describe colour and shape only)."""

    size: float = 0.6
    position: float = 0.6
    background: float = 0.8
    reorder: bool = False


# ----------------------------------------------------------------------------- sampling


def _random_object(
    rng: random.Random, shapes, position: str, size: str, background: str, exclude_held_out: bool
) -> SceneObject:
    while True:
        shape, colour = rng.choice(shapes), rng.choice(list(COLOURS))
        if not (exclude_held_out and shape in PRETRAIN_SHAPES and held_out(colour, shape, background)):
            break
    texture = rng.choices(TEXTURES, weights=(0.7, 0.15, 0.15))[0]
    jitter = (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
    return SceneObject(shape, colour, size, texture, position, jitter)


def random_scene(seed: int, shapes=PRETRAIN_SHAPES, max_objects: int = 3, exclude_held_out: bool = True) -> Scene:
    """Scene number ``seed``; by default of the pretraining distribution (no held-out triple, no novel shape)."""
    rng = random.Random(seed)
    background = rng.choice(list(BACKGROUNDS))
    count = rng.choices((1, 2, 3)[:max_objects], weights=(0.55, 0.3, 0.15)[:max_objects])[0]
    if count == 1:
        positions, sizes = [rng.choice(list(POSITIONS))], [rng.choice(list(SIZES))]
    else:
        positions = list(rng.choice(LAYOUTS[count]))
        sizes = ["small"] * count
    objects = tuple(
        _random_object(rng, shapes, p, s, background, exclude_held_out) for p, s in zip(positions, sizes, strict=True)
    )
    scene = Scene(objects, background)
    return Scene(objects, background, caption(scene, rng))


def render_batch(seeds, size: int = IMAGE_SIZE, shapes=PRETRAIN_SHAPES) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Images (uint8, N x size x size x 3), captions and scenes of ``seeds``."""
    scenes = [random_scene(int(s), shapes) for s in seeds]
    images = np.stack([np.asarray(render(scene, size)) for scene in scenes])
    return images, [scene.caption for scene in scenes], scenes


def concept_scenes(shape: str, count: int = 5, seed: int = 0) -> list[Scene]:
    """``count`` single-object scenes of ``shape`` in varied colours, sizes, positions and backgrounds:
    the training photos of a new concept."""
    rng = random.Random(f"{shape}-{seed}")
    colours = rng.sample(list(COLOURS), k=min(count, len(COLOURS)))
    scenes = []
    for k in range(count):
        background = list(BACKGROUNDS)[k % len(BACKGROUNDS)]
        obj = SceneObject(
            shape,
            colours[k % len(colours)],
            "large",
            "solid",
            rng.choice(list(POSITIONS)),
            (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)),
        )
        scenes.append(Scene((obj,), background))
    return scenes


def concept_caption(scene: Scene) -> str:
    """The sidecar caption of a concept photo: its context in words, ``{token}`` where the shape goes."""
    obj = scene.objects[0]
    return f"{describe(obj, with_size=False, noun='{token}')} on a {scene.background} background"


def write_concept_images(
    shape: str, folder, count: int = 5, seed: int = 0, size: int = IMAGE_SIZE, mask_folder=None
) -> list:
    """Save ``count`` photos of ``shape`` as PNGs with caption sidecars (``.txt``) into ``folder``; with
    ``mask_folder``, also their exact foreground masks there, under the same file names."""
    import io
    from pathlib import Path

    from spectral_diffusion.atomic import atomic_write_bytes, atomic_write_text

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if mask_folder is not None:
        Path(mask_folder).mkdir(parents=True, exist_ok=True)
    paths = []
    for k, scene in enumerate(concept_scenes(shape, count, seed)):
        path = folder / f"{shape}-{k}.png"
        atomic_write_bytes(path, png(render(scene, size)))
        atomic_write_text(path.with_suffix(".txt"), concept_caption(scene) + "\n")
        if mask_folder is not None:
            atomic_write_bytes(Path(mask_folder) / path.name, png(render_mask(scene, size)))
        paths.append(path)
    return paths
