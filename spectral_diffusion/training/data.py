"""Training images of one concept: safe loading, captions and augmentation.

Images are opened defensively (a user uploads them): the pixel count is checked before decoding so a
decompression bomb is refused, EXIF orientation is applied, alpha is flattened on white and everything
becomes RGB. Each image is resized once so its short side equals the training resolution; crops and
flips are then drawn per example from a ``torch.Generator`` so a whole run is reproducible from its
seed, whatever the number of processes, and a resumed run sees the very same examples. Optional
foreground masks travel with their images through every crop, flip and zoom (``augment``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from spectral_diffusion.errors import ImageDataError
from spectral_diffusion.images import find_images, flatten_alpha, is_image_list, open_image
from spectral_diffusion.models.captions import CaptionGrammar
from spectral_diffusion.training.augment import (
    find_mask,
    follow_caption,
    foreground,
    load_mask,
    pair,
    recolour,
    zoom,
)

logger = logging.getLogger(__name__)

TOKEN_PLACEHOLDER = "{token}"

# Textual-inversion style prompts; "{}" is the concept phrase, e.g. "<my-dog> dog".
_TEMPLATES = (
    "a photo of {}",
    "a photo of the {}",
    "a close-up photo of the {}",
    "a cropped photo of the {}",
    "a bright photo of the {}",
    "a dark photo of the {}",
    "a good photo of the {}",
    "a photo of a nice {}",
    "a rendering of the {}",
    "a picture of the {}",
    "an image of {}",
    "a photo of my {}",
)


def caption_templates(token_text: str, class_word: str = "") -> list[str]:
    """Captions around the trigger phrase: ``"a photo of <tok> dog"``, ``"a rendering of the <tok> dog"``..."""
    phrase = " ".join(f"{token_text} {class_word}".split())
    return [template.format(phrase) for template in _TEMPLATES]


def read_caption(image_path: Path, token_text: str, class_word: str = "") -> str | None:
    """The caption of a ``photo.txt`` sidecar, with the trigger phrase put in; None if there is none.

    ``{token}`` in the text becomes the trigger token(s); a caption that names neither the placeholder
    nor the token gets the trigger phrase in front, so every caption teaches the token.
    """
    sidecar = image_path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    try:
        text = " ".join(sidecar.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError) as error:
        raise ImageDataError(f"cannot read caption file {sidecar.name} ({error})") from None
    if not text:
        return None
    if TOKEN_PLACEHOLDER in text:
        return text.replace(TOKEN_PLACEHOLDER, token_text)
    if token_text in text:
        return text
    phrase = " ".join(f"{token_text} {class_word}".split())
    return f"{phrase}, {text}"


@dataclass
class _Source:
    image: Image.Image  # resized so its short side is the training resolution
    original_size: tuple[int, int]  # (height, width) as opened, for SDXL's time ids
    caption: str | None
    mask: Image.Image | None = None  # 8-bit, the image's size; white = the concept


def _resize_short_side(image: Image.Image, size: int) -> Image.Image:
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    return image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)


def _mask_tensor(mask: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class Stream:
    """The independent random streams of one training run, each drawn from ``mix_seed(seed, stream, ...)``.

    The numbers only tell the streams apart (any distinct values would do); they stay as they are so that
    a seed keeps giving the same run. Data streams come as (visiting order per epoch, each example's
    crop, flip, caption and augmentation).
    """

    CLASS_IMAGES = 7  # generating the prior-preservation class images (training.prior)
    INSTANCE_DATA = (10, 11)  # the concept's photos
    CLASS_DATA = (20, 21)  # the class images
    NOISE = 30  # each micro-batch's latent sampling, noise and timesteps
    EVAL = 40  # the evaluation batch's fixed noise
    PREVIEW = 50  # the previews' generation


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (seed, step, rank...), stable across processes and runs."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


class ConceptDataset(Dataset):
    """The concept's images at the training resolution, with captions.

    ``example(i, generator)`` is the primitive: image ``i`` with a random crop, a random horizontal
    flip and a random template caption drawn from ``generator`` (or, with no generator, the centre
    crop, no flip and the first caption: the evaluation view). ``dataset[k]`` is example ``k % len``
    with a generator seeded from ``(seed, k)``, for use with a ``DataLoader``.

    ``mask_dir``: a folder of foreground masks, one per image under the same file name; examples then
    carry a ``mask`` (1 x H x W, 0..1). ``augment_p``: the probability that an example is zoomed out
    and moved (scale drawn from ``augment_scale``; to one of the grammar's positions when there is a
    grammar) onto its own background, its caption following.
    ``recolour_p``: the probability that an example's concept is redrawn in another of the grammar's colours,
    its caption's colour word following (the colours the photos show least are picked most). ``pair_p``: the probability that an example shows two of the concept's photos side by side (left and
    right, or top and bottom), each shrunk into its half, with one two-object caption ("a blue <moon> on
    the left and a red <moon> on the right on a white background"), so that the trigger token also
    learns to stand second in a prompt and beside another object. ``captions``: the grammar of the
    model's training scenes (``models.registry.caption_grammar``), in which moved and paired examples'
    captions are rewritten; only one-object captions of it can be joined, and with none (the default)
    captions are kept as they are and examples stay single.
    """

    def __init__(
        self,
        images: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[Image.Image],
        token_text: str,
        class_word: str = "",
        resolution: int = 512,
        *,
        min_size: int | None = None,
        random_crop: bool = True,
        flip_p: float = 0.5,
        templates: Sequence[str] | None = None,
        seed: int = 0,
        mask_dir: str | os.PathLike | None = None,
        augment_p: float = 0.0,
        augment_scale: tuple[float, float] = (0.5, 1.0),
        pair_p: float = 0.0,
        recolour_p: float = 0.0,
        captions: CaptionGrammar | None = None,
    ):
        if resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be between 0 and 1, got {flip_p}")
        self.resolution = resolution
        self.random_crop = random_crop
        self.flip_p = flip_p
        self.seed = seed
        self.mask_dir = mask_dir
        self.augment_p, self.augment_scale = augment_p, augment_scale
        self.pair_p, self.recolour_p, self.captions = pair_p, recolour_p, captions
        self.templates = list(templates) if templates else caption_templates(token_text, class_word)
        min_size = resolution // 2 if min_size is None else min_size
        if is_image_list(images):  # already opened, e.g. generated class images
            self.paths: list[Path] = []
            self.sources = [self._adopt(image, i, min_size) for i, image in enumerate(images)]
        else:
            self.paths = find_images(images)
            self.sources = [self._load(path, token_text, class_word, min_size) for path in self.paths]
        logger.info("loaded %d training images at %d px", len(self.sources), resolution)
        self._recolour_targets = self._recolour_choices()

    def _load(self, path: Path, token_text: str, class_word: str, min_size: int) -> _Source:
        image = open_image(path, min_size)
        original = (image.height, image.width)
        caption = read_caption(path, token_text, class_word)
        mask = None
        if self.mask_dir is not None:
            mask = _resize_short_side(load_mask(find_mask(path, self.mask_dir), image.size), self.resolution)
        return _Source(_resize_short_side(image, self.resolution), original, caption, mask)

    def _adopt(self, image: Image.Image, index: int, min_size: int) -> _Source:
        image = flatten_alpha(ImageOps.exif_transpose(image))
        if min(image.size) < min_size:
            raise ImageDataError(
                f"image {index + 1} is too small ({image.width}x{image.height}); its short side must be at "
                f"least {min_size} pixels"
            )
        return _Source(_resize_short_side(image, self.resolution), (image.height, image.width), None)

    def __len__(self) -> int:
        return len(self.sources)

    def fingerprint(self) -> str:
        """A hash of what training reads: every image (its pixels at the training resolution, in order),
        caption and mask. A checkpoint records it, so a run never resumes from other photos."""
        digest = hashlib.sha256()
        for source in self.sources:
            for part in (source.image, source.mask):
                if part is None:
                    digest.update(b"-")
                    continue
                digest.update(f"{part.mode} {part.size}".encode())
                digest.update(part.tobytes())
            digest.update(f"{source.original_size} {source.caption!r}".encode())
        return digest.hexdigest()[:16]

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, index))
        return self.example(index % len(self.sources), generator)

    def _crop_origin(self, source: _Source, generator: torch.Generator | None) -> tuple[int, int]:
        spare_h = source.image.height - self.resolution
        spare_w = source.image.width - self.resolution
        if generator is None or not self.random_crop:
            return spare_h // 2, spare_w // 2
        top = int(torch.randint(0, spare_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, spare_w + 1, (1,), generator=generator))
        return top, left

    def example(self, index: int, generator: torch.Generator | None = None) -> dict:
        """Image ``index`` augmented with ``generator``; keys pixel_values, caption, original_size, crop_top_left."""
        source = self.sources[index]
        top, left = self._crop_origin(source, generator)
        size = self.resolution
        box = (left, top, left + size, top + size)
        image = source.image.crop(box)
        mask = source.mask.crop(box) if source.mask is not None else None
        # Draw every random number whether used or not: the stream then never depends on the data.
        flip_draw = float(torch.rand((), generator=generator)) if generator is not None else 1.0
        template_draw = (
            int(torch.randint(0, len(self.templates), (1,), generator=generator)) if generator is not None else 0
        )
        zoomed = False
        if self.augment_p > 0 and generator is not None:  # drawn only when augmenting: older runs unchanged
            apply, scale, x, y = (float(v) for v in torch.rand(4, generator=generator))
            if apply < self.augment_p:
                low, high = self.augment_scale
                image, mask = zoom(image, mask, low + (high - low) * scale, (x, y), self._grammar_centre(x))
                zoomed = True
        if flip_draw < self.flip_p:
            image = ImageOps.mirror(image)
            mask = ImageOps.mirror(mask) if mask is not None else None
            left = source.image.width - size - left  # SDXL conditions on where the crop sits
        caption = source.caption if source.caption is not None else self.templates[template_draw]
        if zoomed:
            caption = follow_caption(caption, foreground(image, mask), self.captions)
        if self.recolour_p > 0 and generator is not None:  # drawn only when recolouring: older runs unchanged
            apply, which = (float(v) for v in torch.rand(2, generator=generator))
            colours, weights = self._recolour_targets
            if apply < self.recolour_p and colours:
                pick = min(int(np.searchsorted(np.cumsum(weights), which, side="right")), len(colours) - 1)
                recoloured = recolour(image, mask, caption, self.captions, colours[pick])
                image, caption = recoloured if recoloured is not None else (image, caption)
        if self.pair_p > 0 and generator is not None:  # drawn only when pairing: older runs unchanged
            image, mask, caption = self._maybe_pair(index, (image, mask, caption), generator)
        example = {
            "pixel_values": _to_tensor(image),
            "caption": caption,
            "original_size": source.original_size,
            "crop_top_left": (top, left),
        }
        if self.mask_dir is not None:
            example["mask"] = _mask_tensor(mask) if mask is not None else torch.ones(1, size, size)
        return example

    def _recolour_choices(self) -> tuple[list[str], np.ndarray]:
        """The grammar's colours and how likely each is as a recolour target: a colour the photos show
        less often is picked more often, so that, recoloured examples included, every colour is seen
        about equally (a concept photographed in five colours of six would otherwise see the sixth
        in 1 example of 20 at recolour_p 0.3). Uniform when the captions name no colour."""
        colours = list(self.captions.colours) if self.captions is not None else []
        if not colours:
            return [], np.zeros(0)
        shown = np.zeros(len(colours))
        for source in self.sources:
            words = (source.caption or "").split(" ")
            said = [colours.index(w) for w in words if w in colours]
            if said:
                shown[said[0]] += 1
        if shown.sum() == 0 or self.recolour_p == 0:
            return colours, np.full(len(colours), 1.0 / len(colours))
        # even share 1/K of examples per colour: recolouring makes up what the photos leave short (the
        # shortfalls sum to at least recolour_p > 0)
        short = np.clip(1.0 / len(colours) - (1.0 - self.recolour_p) * shown / shown.sum(), 0.0, None)
        return colours, short / short.sum()

    def _grammar_centre(self, draw: float) -> tuple[float, float] | None:
        """Where a moved concept goes: one of the grammar's positions (so its caption is exactly true),
        picked by ``draw`` in [0, 1); None without a grammar (anywhere in the free room)."""
        if self.captions is None:
            return None
        positions = list(self.captions.positions.values())
        return positions[min(int(draw * len(positions)), len(positions) - 1)]

    def _maybe_pair(self, index: int, single: tuple, generator: torch.Generator) -> tuple:
        """``single`` (image, mask, caption), or with probability ``pair_p`` a pair of it and another photo."""
        apply, other, layout, first_scale, second_scale = (float(v) for v in torch.rand(5, generator=generator))
        if apply >= self.pair_p or self.captions is None:  # no grammar: no caption for two (draws as before)
            return single
        partner = self.sources[(index + 1 + int(other * (len(self.sources) - 1))) % len(self.sources)]
        top, left = self._crop_origin(partner, None)
        box = (left, top, left + self.resolution, top + self.resolution)
        partner_mask = partner.mask.crop(box) if partner.mask is not None else None
        partner_caption = partner.caption if partner.caption is not None else single[2]
        second = (partner.image.crop(box), partner_mask, partner_caption)
        pairs = self.captions.pairs
        positions = pairs[int(layout * len(pairs)) % len(pairs)]
        low, high = self.augment_scale
        scales = (low + (high - low) * first_scale, low + (high - low) * second_scale)
        paired = pair(single, second, positions, scales, self.captions)
        if paired is None:
            return single
        image, both, caption = paired
        return image, (both if single[1] is not None else None), caption


def collate(examples: Sequence[dict]) -> dict:
    """Stack examples into a batch (pixel values and masks as tensors, the rest as lists)."""
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "caption": [e["caption"] for e in examples],
        "original_size": [e["original_size"] for e in examples],
        "crop_top_left": [e["crop_top_left"] for e in examples],
    }
    if any("mask" in e for e in examples):  # an example without a mask is all concept
        shape = (1, *examples[0]["pixel_values"].shape[1:])
        batch["mask"] = torch.stack([e.get("mask", torch.ones(shape)) for e in examples])
    return batch
