"""Foreground masks of training photos, and the zoom-out / shift / recolour augmentation they make exact.

A mask is a user image beside the photos (same file name in the masks folder; white = the concept,
black = background), decoded by the one upload decoder. It weights the loss (``objective``) and,
when a photo is zoomed out or moved, says exactly which pixels are the concept: the concept alone
is pasted onto the photo's own background colour. Without a mask, a photo on a plain background (the
built-in scenes') is cut out by colour and moved the same way; any other photo is shrunk whole onto a
canvas of its border colour.

Captions follow in the grammar of the model's training scenes (``models.captions``, from the model's
registry entry): a position phrase ("on the left", "at the top") becomes the one nearest the concept's
new centre, the size word the one nearest its new size, the colour word the new colour. With no
grammar, or a caption outside it, captions are kept as they are (and nothing is recoloured).
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from spectral_diffusion.errors import ImageDataError
from spectral_diffusion.images import IMAGE_EXTENSIONS, decode_image
from spectral_diffusion.models.captions import CaptionGrammar

logger = logging.getLogger(__name__)

_FOREGROUND_DISTANCE = 40  # 8-bit colour distance from the background that counts as concept (no mask)
_PLAIN_BORDER_SHARE = 0.9  # share of border pixels near their median colour that makes a background plain


# ----- masks ----------------------------------------------------------------------------------------


def find_mask(image_path: Path, mask_dir: str | Path) -> Path:
    """The mask of ``image_path``: the same file name in ``mask_dir``, or the same stem with any image suffix."""
    folder = Path(mask_dir)
    if not folder.is_dir():
        raise ImageDataError(f"the masks folder {folder} does not exist")
    exact = folder / image_path.name
    if exact.is_file():
        return exact
    for candidate in sorted(folder.glob(glob.escape(image_path.stem) + ".*")):
        if candidate.suffix.lower() in IMAGE_EXTENSIONS and candidate.is_file():
            return candidate
    raise ImageDataError(
        f"no mask for image {image_path.name} in {folder}; give every image a mask of the same file name "
        "(white = the concept, black = background)"
    )


def load_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    """Mask ``path`` as an 8-bit image of ``size`` (width, height); transparent pixels count as background."""
    image = decode_image(path)
    luminance = image.convert("L")
    if "A" in image.getbands():
        alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
        luminance = Image.fromarray((np.asarray(luminance, dtype=np.float32) * alpha).round().astype(np.uint8))
    if luminance.size != size:
        logger.info("mask %s is %dx%d, resized to its image's %dx%d", path.name, *luminance.size, *size)
        luminance = luminance.resize(size, Image.Resampling.BILINEAR)
    return luminance


# ----- zoom-out / shift -----------------------------------------------------------------------------


def background_colour(image: Image.Image, mask: Image.Image | None) -> tuple[int, int, int]:
    """The photo's background: the median of the unmasked pixels, or of the border without a mask."""
    pixels = np.asarray(image.convert("RGB"))
    if mask is not None:
        outside = np.asarray(mask) < 128
        if outside.any():
            return tuple(int(v) for v in np.median(pixels[outside], axis=0))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def plain_background(image: Image.Image) -> bool:
    """Whether ``image`` stands on one plain colour: nine in ten border pixels within the foreground
    distance of their median. The concept can then be cut out by colour alone."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.abs(border - np.median(border, axis=0)).max(axis=-1)
    return float((distance <= _FOREGROUND_DISTANCE).mean()) >= _PLAIN_BORDER_SHARE


def _corner(centre: tuple[float, float], piece: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The top-left pixel that puts a ``piece`` (width, height) centred nearest ``centre`` (fractions of
    the image ``size``) while keeping it whole."""
    return tuple(
        min(max(0, round(c * whole - part / 2)), whole - part)
        for c, part, whole in zip(centre, piece, size, strict=True)
    )


def zoom(
    image: Image.Image,
    mask: Image.Image | None,
    scale: float,
    where: tuple[float, float],
    centre: tuple[float, float] | None = None,
):
    """``image`` (and ``mask``) with the concept scaled by ``scale`` and placed on the photo's background
    colour, at ``where`` (fractions of the free room, 0..1 each) or, when given, with its centre nearest
    ``centre`` (fractions of the image) that keeps it whole; returns (image, mask or None).

    The concept is what the mask covers, or on a plain background what differs from it (so it really
    moves); otherwise the whole photo is shrunk."""
    size = image.size
    fill = background_colour(image, mask)
    cut = _cut(image, mask, rim=True) if mask is not None or plain_background(image) else None
    piece, piece_mask = cut if cut is not None else (image, None)
    width, height = max(1, round(piece.width * scale)), max(1, round(piece.height * scale))
    piece = piece.resize((width, height), Image.Resampling.BICUBIC)
    if centre is None:
        left, top = round(where[0] * (size[0] - width)), round(where[1] * (size[1] - height))
    else:
        left, top = _corner(centre, (width, height), size)
    canvas = Image.new("RGB", size, fill)
    if piece_mask is None:
        canvas.paste(piece, (left, top))
        return canvas, None
    piece_mask = piece_mask.resize((width, height), Image.Resampling.BILINEAR)
    canvas.paste(piece, (left, top), piece_mask)
    if mask is None:
        return canvas, None
    moved = Image.new("L", size, 0)
    moved.paste(piece_mask, (left, top))
    return canvas, moved


def recolour(image: Image.Image, mask: Image.Image | None, caption: str, grammar: CaptionGrammar | None, word: str):
    """``image`` with the concept drawn in ``grammar``'s colour ``word`` and ``caption`` saying so, or None
    when the caption names none of the grammar's colours (it could not follow) or nothing is in front.

    Each pixel keeps how far it lies from the background toward the concept's own colour (its
    anti-aliasing and shading), and moves that far toward the new colour instead."""
    if grammar is None or word not in grammar.colours:
        return None
    words = caption.split(" ")
    said = [i for i, w in enumerate(words) if w in grammar.colours]
    inside = foreground(image, mask)
    if not said or not inside.any():
        return None
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    background = np.array(background_colour(image, mask), dtype=np.float32)
    own = np.median(pixels[inside], axis=0)
    towards = own - background
    if float(towards @ towards) < 1.0:
        return None
    share = np.clip((pixels - background) @ towards / float(towards @ towards), 0.0, 1.0)[..., None]
    recoloured = pixels + share * (np.array(grammar.colours[word], dtype=np.float32) - own)
    words[said[0]] = word
    if said[0] > 0 and words[said[0] - 1].lower() in ("a", "an"):
        words[said[0] - 1] = "an" if word[0] in "aeiou" else "a"
    image = Image.fromarray(recoloured.round().clip(0, 255).astype(np.uint8))
    return image, " ".join(words)


def foreground(image: Image.Image, mask: Image.Image | None) -> np.ndarray:
    """A boolean map of the concept's pixels: the mask, or what differs from the background colour."""
    if mask is not None:
        return np.asarray(mask) >= 128
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    distance = np.abs(pixels - np.array(background_colour(image, None), dtype=np.int16)).max(axis=-1)
    return distance > _FOREGROUND_DISTANCE


def follow_caption(caption: str, inside: np.ndarray, grammar: CaptionGrammar | None) -> str:
    """``caption`` with ``grammar``'s position and size words made true of the concept ``inside``."""
    if grammar is None or not inside.any():
        return caption
    ys, xs = np.nonzero(inside)
    height, width = inside.shape
    nearest = grammar.nearest_position(((xs.mean() + 0.5) / width, (ys.mean() + 0.5) / height))
    for phrase in grammar.phrases.values():
        if phrase in caption:
            caption = caption.replace(phrase, grammar.phrases[nearest], 1)
            break
    size_word = grammar.size_word(max((xs.max() - xs.min() + 1) / width, (ys.max() - ys.min() + 1) / height))
    words = caption.split(" ")
    for i, word in enumerate(words):
        if word in grammar.sizes:
            words[i] = size_word
            return " ".join(words)
    # no size word says the largest size: a smaller one is said after the article
    if size_word != max(grammar.sizes, key=grammar.sizes.get) and words and words[0].lower() in ("a", "an"):
        words = ["a", size_word, *words[1:]]
    return " ".join(words)


# ----- pairs ----------------------------------------------------------------------------------------


def split_caption(caption: str, grammar: CaptionGrammar | None) -> tuple[str, str, str] | None:
    """A one-object caption of ``grammar`` as (object words, position phrase, the rest):
    ``"a blue <moon> on the left on a white background"`` -> ``("a blue <moon>", "on the left",
    " on a white background")``; None for any other caption (it cannot be joined with another)."""
    if grammar is None:
        return None
    found = [(caption.find(f" {phrase}"), phrase) for phrase in grammar.phrases.values()]
    found = [(at, phrase) for at, phrase in found if at > 0]
    if len(found) != 1 or " and " in caption:
        return None
    at, phrase = found[0]
    return caption[:at], phrase, caption[at + 1 + len(phrase) :]


def _cut(image: Image.Image, mask: Image.Image | None, rim: bool = False) -> tuple[Image.Image, Image.Image] | None:
    """The concept's bounding box of ``image`` and its 8-bit mask (the given mask, else the foreground;
    ``rim``: grown by a pixel, so the anti-aliased rim comes along onto the same background)."""
    inside = foreground(image, mask)
    if not inside.any():
        return None
    cut = Image.fromarray(inside.astype(np.uint8) * 255)
    if mask is None and rim:
        cut = cut.filter(ImageFilter.MaxFilter(3))
    box = cut.getbbox()
    return image.crop(box), cut.crop(box)


def pair(first, second, positions: tuple[str, str], scales: tuple[float, float], grammar: CaptionGrammar | None):
    """Two photos' concepts side by side on the first photo's background, with one caption for both.

    ``first`` / ``second``: (image, mask or None, caption), the same size; ``positions``: one of
    ``grammar.pairs``; ``scales``: each concept's size as a fraction of its own. Returns (image, mask,
    caption), the mask covering both concepts, or None when a caption is not a one-object caption of
    ``grammar`` (or there is no grammar) or a photo has no visible concept: such examples stay as they are.
    """
    parts = [split_caption(caption, grammar) for _, _, caption in (first, second)]
    cuts = [_cut(image, mask) for image, mask, _ in (first, second)]
    if None in parts or None in cuts:
        return None
    size = first[0].size
    canvas = Image.new("RGB", size, background_colour(first[0], first[1]))
    both = Image.new("L", size, 0)
    words = []
    for (piece, piece_mask), scale, position, (noun, _, _) in zip(cuts, scales, positions, parts, strict=True):
        # the pair shares the image: each concept fits in its own half
        fit = min(scale, size[0] * 0.45 / piece.width, size[1] * 0.45 / piece.height)
        width, height = max(1, round(piece.width * fit)), max(1, round(piece.height * fit))
        piece = piece.resize((width, height), Image.Resampling.BICUBIC)
        piece_mask = piece_mask.resize((width, height), Image.Resampling.BILINEAR)
        left, top = _corner(grammar.positions[position], (width, height), size)
        canvas.paste(piece, (left, top), piece_mask)
        both.paste(piece_mask, (left, top), piece_mask)
        alone = np.zeros((size[1], size[0]), dtype=bool)
        alone[top : top + height, left : left + width] = np.asarray(piece_mask) >= 128
        said = follow_caption(f"{noun} {grammar.phrases[position]}", alone, grammar)  # size words follow
        words.append(said)
    return canvas, both, " and ".join(words) + parts[0][2]
