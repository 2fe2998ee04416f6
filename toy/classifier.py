"""A small CNN that reads procedural scenes: which shapes and colours are present, the background, and
what stands where: for each of the five positions, whether an object is there and its shape, colour and size.

    python -m toy.classifier            # trains on fresh scenes (about 15 minutes on 2 busy cores), writes toy/classifier.safetensors
    python -m toy.classifier --shape-variation --members 3 --out toy/classifier-shapes.safetensors  # 3x as long

It is the measuring instrument for ``builtin:toy`` (does it draw what it is told?) and for the fusion
benchmark (does a fused concept still look like itself?). It is trained on every shape, novel ones
included, and on every (colour, shape, background) triple, held-out ones included, since it must
judge exactly those. Generated images are softer than rendered ones, so training adds blur and noise,
and objects are placed less exactly than in pretraining (jitter up to 8% of the image instead of 4%), so
that an object drawn near a position is read as standing there.

``--shape-variation`` also varies the outlines as the diffusion model varies them: strokes thicker or
thinner (the masks dilated or eroded by up to 14% / 8% of the radius), a ring's hole 0.35-0.65 of its radius
instead of 0.55, a moon's bite moved 0.35-0.65 instead of 0.5. ``--members 3`` trains three from seeds
0-2, each on its own scenes, and averages their probabilities. ``classifier-shapes`` (both together) is a
second reader for checking the first on builtin:toy's own two-concept pictures (docs/fusion-quality.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from spectral_diffusion.atomic import atomic_path
from toy import scenes

logger = logging.getLogger("toy.classifier")

WEIGHTS = Path(__file__).resolve().parent / "classifier.safetensors"
COLOUR_NAMES = tuple(scenes.COLOURS)
BACKGROUND_NAMES = tuple(scenes.BACKGROUNDS)
POSITION_NAMES = tuple(scenes.POSITIONS)
SIZE_NAMES = tuple(scenes.SIZES)
READ_JITTER = 0.08
SHAPES_WEIGHTS = WEIGHTS.with_name("classifier-shapes.safetensors")


class SceneClassifier(nn.Module):
    def __init__(self, width: int = 24):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
            )

        # No global pooling: where an edge is matters for telling a small star from a small diamond.
        self.features = nn.Sequential(
            block(3, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, 2 * width),
            nn.Flatten(),
        )
        side = scenes.IMAGE_SIZE // 4
        self.hidden = nn.Sequential(nn.Linear(2 * width * side * side, 256), nn.SiLU())
        self.shape_head = nn.Linear(256, len(scenes.SHAPES))
        self.colour_head = nn.Linear(256, len(COLOUR_NAMES))
        self.background_head = nn.Linear(256, len(BACKGROUND_NAMES))
        slots = len(POSITION_NAMES)
        self.where_head = nn.Linear(256, slots)
        self.shape_at_head = nn.Linear(256, slots * len(scenes.SHAPES))
        self.colour_at_head = nn.Linear(256, slots * len(COLOUR_NAMES))
        self.size_at_head = nn.Linear(256, slots * len(SIZE_NAMES))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.hidden(self.features(x))
        slots = len(POSITION_NAMES)
        return {
            "shape": self.shape_head(h),
            "colour": self.colour_head(h),
            "background": self.background_head(h),
            "where": self.where_head(h),
            "shape_at": self.shape_at_head(h).view(-1, slots, len(scenes.SHAPES)),
            "colour_at": self.colour_at_head(h).view(-1, slots, len(COLOUR_NAMES)),
            "size_at": self.size_at_head(h).view(-1, slots, len(SIZE_NAMES)),
        }


class ReaderEnsemble(nn.Module):
    """Several classifiers trained alike from different seeds; ``read`` averages their probabilities (one
    training's quirks, a shape it happens to misread, weigh less)."""

    def __init__(self, count: int):
        super().__init__()
        self.members = nn.ModuleList(SceneClassifier() for _ in range(count))


def to_input(images) -> torch.Tensor:
    """PIL images or a uint8 (N, H, W, 3) array -> a float batch in [-1, 1] at the scene size."""
    if isinstance(images, np.ndarray):
        arrays = images
    else:
        arrays = np.stack(
            [np.asarray(im.convert("RGB").resize((scenes.IMAGE_SIZE,) * 2, Image.BICUBIC)) for im in images]
        )
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def labels(scene: scenes.Scene) -> dict[str, torch.Tensor]:
    shape = torch.zeros(len(scenes.SHAPES))
    colour = torch.zeros(len(COLOUR_NAMES))
    where = torch.zeros(len(POSITION_NAMES))
    # -100: no object at that position, nothing to learn there (cross_entropy's ignore_index)
    shape_at, colour_at, size_at = (torch.full((len(POSITION_NAMES),), -100) for _ in range(3))
    for obj in scene.objects:
        shape[scenes.SHAPES.index(obj.shape)] = 1
        colour[COLOUR_NAMES.index(obj.colour)] = 1
        slot = POSITION_NAMES.index(obj.position)
        where[slot] = 1
        shape_at[slot] = scenes.SHAPES.index(obj.shape)
        colour_at[slot] = COLOUR_NAMES.index(obj.colour)
        size_at[slot] = SIZE_NAMES.index(obj.size)
    return {
        "shape": shape,
        "colour": colour,
        "background": torch.tensor(BACKGROUND_NAMES.index(scene.background)),
        "where": where,
        "shape_at": shape_at,
        "colour_at": colour_at,
        "size_at": size_at,
    }


def _loosely_placed(scene: scenes.Scene, rng: random.Random) -> scenes.Scene:
    objects = tuple(
        replace(o, jitter=(rng.uniform(-READ_JITTER, READ_JITTER), rng.uniform(-READ_JITTER, READ_JITTER)))
        for o in scene.objects
    )
    return replace(scene, objects=objects)


def _degrade(image: Image.Image, rng: random.Random) -> np.ndarray:
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.6)))
    array = np.asarray(image).astype(np.float32)
    if rng.random() < 0.5:
        array += np.random.default_rng(rng.randrange(2**31)).normal(0, rng.uniform(2, 12), array.shape)
    return np.clip(array, 0, 255).astype(np.uint8)


def _varied_outline(rng: random.Random):
    """A ``scenes.shape_mask`` whose strokes, ring holes and moon bites vary from object to object."""

    def outline(shape: str, size: int, cx: float, cy: float, r: float) -> Image.Image:
        mask = scenes.shape_mask(
            shape,
            size,
            cx,
            cy,
            r,
            hole=rng.uniform(0.35, 0.65),
            bite=rng.uniform(0.35, 0.65),
            bite_lift=rng.uniform(0, 0.3),
        )
        change = rng.random()
        if change < 0.35:
            grow = 2 * int(rng.uniform(0.04, 0.14) * r) + 1
            return mask.filter(ImageFilter.MaxFilter(grow)) if grow > 1 else mask
        if change < 0.55:
            shrink = 2 * int(rng.uniform(0.03, 0.08) * r) + 1
            return mask.filter(ImageFilter.MinFilter(shrink)) if shrink > 1 else mask
        return mask

    return outline


def make_batch(seeds, rng: random.Random, shape_variation: bool = False):
    picked = [_loosely_placed(scenes.random_scene(s, shapes=scenes.SHAPES, exclude_held_out=False), rng) for s in seeds]
    outline = _varied_outline(rng) if shape_variation else None
    images = np.stack([_degrade(scenes.render(s, outline=outline), rng) for s in picked])
    ys = [labels(s) for s in picked]
    return to_input(images), {k: torch.stack([y[k] for y in ys]) for k in ys[0]}


def loss_fn(out, y):
    def at(name):
        return F.cross_entropy(out[name].flatten(0, 1), y[name].flatten(), ignore_index=-100)

    return (
        F.binary_cross_entropy_with_logits(out["shape"], y["shape"])
        + F.binary_cross_entropy_with_logits(out["colour"], y["colour"])
        + 0.5 * F.cross_entropy(out["background"], y["background"])
        + F.binary_cross_entropy_with_logits(out["where"], y["where"])
        + 0.5 * (at("shape_at") + at("colour_at") + at("size_at"))
    )


def train(
    steps: int = 4000, batch: int = 64, lr: float = 2e-3, seed: int = 0, shape_variation: bool = False
) -> SceneClassifier:
    torch.manual_seed(seed)
    model = SceneClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    rng = random.Random(seed)
    # scene numbers far from the diffusion model's training scenes and from `accuracy`'s; each seed its own
    start = 10_000_000 + seed * steps * batch
    for step in tqdm(range(steps), desc="classifier", mininterval=10):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        x, y = make_batch(range(start + step * batch, start + (step + 1) * batch), rng, shape_variation)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def train_ensemble(members: int, steps: int = 4000, shape_variation: bool = False) -> ReaderEnsemble:
    """``members`` classifiers, seeds 0 .. members - 1, each on its own scenes."""
    ensemble = ReaderEnsemble(members)
    for seed in range(members):
        ensemble.members[seed].load_state_dict(train(steps, seed=seed, shape_variation=shape_variation).state_dict())
    return ensemble.eval()


@torch.no_grad()
def accuracy(model: SceneClassifier | ReaderEnsemble, count: int = 2000, seed: int = 20_000_000) -> dict[str, float]:
    """Accuracy on fresh clean renders: shape and colour sets exact (threshold 0.5), background, the set
    of occupied positions exact, and shape and size read right at every occupied position."""
    x, y = make_batch(range(seed, seed + count), random.Random(seed))
    out = probabilities(model, x)
    shape_ok = ((out["shape"] > 0.5) == (y["shape"] > 0.5)).all(dim=1).float().mean().item()
    colour_ok = ((out["colour"] > 0.5) == (y["colour"] > 0.5)).all(dim=1).float().mean().item()
    background_ok = (out["background"].argmax(1) == y["background"]).float().mean().item()
    where_ok = ((out["where"] > 0.5) == (y["where"] > 0.5)).all(dim=1).float().mean().item()
    occupied = y["where"] > 0.5
    shape_at_ok = (out["shape_at"].argmax(-1) == y["shape_at"])[occupied].float().mean().item()
    size_at_ok = (out["size_at"].argmax(-1) == y["size_at"])[occupied].float().mean().item()
    return {
        "shape_set": shape_ok,
        "colour_set": colour_ok,
        "background": background_ok,
        "positions": where_ok,
        "shape_at_position": shape_at_ok,
        "size_at_position": size_at_ok,
    }


def save(model: SceneClassifier | ReaderEnsemble, path: Path, metrics: dict, shape_variation: bool = False) -> None:
    meta = {
        "members": json.dumps(len(model.members) if isinstance(model, ReaderEnsemble) else 1),
        "shape_variation": json.dumps(shape_variation),
        "shapes": json.dumps(scenes.SHAPES),
        "colours": json.dumps(COLOUR_NAMES),
        "positions": json.dumps(POSITION_NAMES),
        "backgrounds": json.dumps(BACKGROUND_NAMES),
        "metrics": json.dumps(metrics),
    }
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)


def load(path: Path = WEIGHTS) -> SceneClassifier | ReaderEnsemble:
    """The trained classifier (several averaged, when the file holds an ensemble); refuses weights made
    for another label set."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; train it with: python -m toy.classifier")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if json.loads(meta.get("shapes", "[]")) != list(scenes.SHAPES) or json.loads(
            meta.get("positions", "[]")
        ) != list(POSITION_NAMES):
            raise ValueError(
                f"{path} was trained for other shapes or positions; retrain with: python -m toy.classifier"
            )
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    members = int(json.loads(meta.get("members", "1")))
    model = ReaderEnsemble(members) if members > 1 else SceneClassifier()
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def read(model: SceneClassifier | ReaderEnsemble, images) -> dict[str, torch.Tensor]:
    """Probabilities: ``shape`` and ``colour`` (independent, N x classes), ``background`` (softmax),
    ``where`` (independent, N x positions) and, per position, ``shape_at``, ``colour_at`` and ``size_at``
    (softmax, N x positions x classes: what would stand there if something does). An ensemble gives the
    mean of its members' probabilities."""
    return probabilities(model, to_input(images))


@torch.no_grad()
def probabilities(model: SceneClassifier | ReaderEnsemble, x: torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(model, ReaderEnsemble):
        each = [probabilities(member, x) for member in model.members]
        return {key: torch.stack([p[key] for p in each]).mean(0) for key in each[0]}
    out = model(x)
    return {
        "shape": out["shape"].sigmoid(),
        "colour": out["colour"].sigmoid(),
        "background": out["background"].softmax(-1),
        "where": out["where"].sigmoid(),
        "shape_at": out["shape_at"].softmax(-1),
        "colour_at": out["colour_at"].softmax(-1),
        "size_at": out["size_at"].softmax(-1),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="train the scene classifier")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument(
        "--shape-variation", action="store_true", help="vary strokes, ring holes and moon bites (classifier-shapes)"
    )
    parser.add_argument("--members", type=int, default=1, help="train this many (seeds 0, 1, ...) and average them")
    args = parser.parse_args(argv)
    if args.members < 1:
        parser.error("--members must be at least 1")
    logging.basicConfig(level=logging.INFO)
    model = (
        train_ensemble(args.members, args.steps, args.shape_variation)
        if args.members > 1
        else train(args.steps, shape_variation=args.shape_variation)
    )
    metrics = accuracy(model)
    save(model, args.out, metrics, args.shape_variation)
    logger.info("classifier written to %s; accuracy on fresh renders %s", args.out, metrics)


if __name__ == "__main__":
    main()
