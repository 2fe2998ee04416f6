"""Training images of one concept: safe loading, captions and augmentation.

Images are opened defensively (a user uploads them): the pixel count is checked before decoding so a
decompression bomb is refused, EXIF orientation is applied, alpha is flattened on white and everything
becomes RGB. Each image is resized once so its short side equals the training resolution; crops and
flips are then drawn per example from a ``torch.Generator`` so a whole run is reproducible from its
seed, whatever the number of processes, and a resumed run sees the very same examples.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.images import to_8bit

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ARCHIVE_EXTENSIONS = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar")
# zip, gzip, bzip2, xz, zstd, 7z, rar signatures (tar: "ustar" at byte 257)
_ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd",
                  b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07")
MAX_IMAGES = 100
MAX_PIXELS = 64 * 1024 * 1024  # 64 megapixels: larger than any camera image, far below a bomb
MAX_FILE_BYTES = 64 * 1024 * 1024  # one image file; a 64-megapixel JPEG is about 30 MB
MAX_TOTAL_BYTES = 512 * 1024 * 1024  # all the images of one concept together
FEW_IMAGES = 3
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


class ImageDataError(SpectralDiffusionError, ValueError):
    """The training images cannot be used: none found, unreadable, too small or too many."""


def caption_templates(token_text: str, class_word: str = "") -> list[str]:
    """Captions around the trigger phrase: ``"a photo of <tok> dog"``, ``"a rendering of the <tok> dog"``..."""
    phrase = " ".join(f"{token_text} {class_word}".split())
    return [template.format(phrase) for template in _TEMPLATES]


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.0f} MB"


def _check_upload(path: Path, folder: Path | None) -> None:
    """Refuse archives, symbolic links leading out of the image folder (any link in a list of uploaded
    files), and files larger than ``MAX_FILE_BYTES``."""
    if path.suffix.lower() in ARCHIVE_EXTENSIONS:
        raise ImageDataError(f"{path.name} is an archive: upload images, not archives (unpack it first)")
    if path.is_symlink():
        inside = folder is not None and path.resolve().is_relative_to(folder.resolve())
        if not inside:
            where = "outside the image folder" if folder is not None else "elsewhere"
            raise ImageDataError(
                f"{path.name} is a symbolic link to a file {where}; refused: copy the image itself there"
            )
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ImageDataError(
            f"image {path.name} is {_megabytes(size)}, more than the {_megabytes(MAX_FILE_BYTES)} one image may "
            "have; shrink it first"
        )


def find_images(source: str | os.PathLike | Sequence[str | os.PathLike], max_images: int = MAX_IMAGES) -> list[Path]:
    """The image files of a folder (sorted, not recursive), or a list of files checked to exist.

    Refused, with a message saying why: archives, symbolic links leading outside the folder (or any
    link in a list), files over ``MAX_FILE_BYTES``, more than ``MAX_TOTAL_BYTES`` in all, more than
    ``max_images`` files.
    """
    folder: Path | None = None
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.exists():
            raise ImageDataError(f"image folder {folder} does not exist")
        where = f"in {folder}"
        if folder.is_dir():
            paths = sorted(p for p in folder.iterdir() if _is_image_file(p))
        else:
            paths, folder = [folder], None
    else:
        paths = [Path(p) for p in source]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ImageDataError(f"image file {missing[0]} does not exist")
        where = "in the given list"
    if not paths:
        archives = [p.name for p in folder.iterdir() if p.suffix.lower() in ARCHIVE_EXTENSIONS] if folder else []
        if archives:
            raise ImageDataError(f"no images found {where}, only the archive {archives[0]}: upload images, not archives")
        raise ImageDataError(
            f"no images found {where}; put {', '.join(IMAGE_EXTENSIONS)} files of the concept there"
        )
    if len(paths) > max_images:
        raise ImageDataError(
            f"{len(paths)} images found {where}, more than the {max_images} one concept can use; "
            "pick the best few (3-20 is typical)"
        )
    for path in paths:
        _check_upload(path, folder)
    total = sum(path.stat().st_size for path in paths)
    if total > MAX_TOTAL_BYTES:
        raise ImageDataError(
            f"the {len(paths)} images {where} add up to {_megabytes(total)}, more than "
            f"{_megabytes(MAX_TOTAL_BYTES)}; use fewer or smaller images"
        )
    if len(paths) < FEW_IMAGES:
        logger.warning("only %d image(s) of the concept; %d or more give better results", len(paths), FEW_IMAGES)
    return paths


def is_image_list(images) -> bool:
    """Whether ``images`` is a non-empty list of already opened PIL images."""
    return isinstance(images, (list, tuple)) and bool(images) and all(isinstance(i, Image.Image) for i in images)


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white (a black background would tint the concept)."""
    image = to_8bit(image)  # 16-bit and float images: convert() alone would clip them
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def open_image(path: str | os.PathLike, min_size: int = 0) -> Image.Image:
    """Open one training image safely as RGB; raise ``ImageDataError`` naming the file on any problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageDataError(f"cannot read image {path.name} ({error.strerror})") from None
    if size > MAX_FILE_BYTES:
        raise ImageDataError(
            f"image {path.name} is {_megabytes(size)}, more than the {_megabytes(MAX_FILE_BYTES)} one image may "
            "have; shrink it first"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, do not just warn
            with Image.open(path) as raw:
                width, height = raw.size
                if width * height > MAX_PIXELS:
                    raise ImageDataError(
                        f"image {path.name} is {width}x{height}, more than {MAX_PIXELS // 2**20} megapixels; "
                        "shrink it first"
                    )
                raw.load()  # decode now: a truncated file must fail here, not mid-training
                image = _flatten_alpha(ImageOps.exif_transpose(raw))
    except ImageDataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDataError(f"image {path.name} declares an enormous size (decompression bomb?); refused") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        if _is_archive(path):
            raise ImageDataError(f"{path.name} is an archive, not an image: upload images, not archives") from None
        raise ImageDataError(f"cannot read image {path.name}: not an image or a damaged file ({error})") from None
    if min(image.size) < min_size:
        raise ImageDataError(
            f"image {path.name} is too small ({image.width}x{image.height}); its short side must be at "
            f"least {min_size} pixels"
        )
    return image


def _is_archive(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(262)
    except OSError:
        return False
    return head.startswith(_ARCHIVE_MAGIC) or head[257:262] == b"ustar"


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


def _resize_short_side(image: Image.Image, size: int) -> Image.Image:
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    return image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


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
    ):
        if resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be between 0 and 1, got {flip_p}")
        self.resolution = resolution
        self.random_crop = random_crop
        self.flip_p = flip_p
        self.seed = seed
        self.templates = list(templates) if templates else caption_templates(token_text, class_word)
        min_size = resolution // 2 if min_size is None else min_size
        if is_image_list(images):  # already opened, e.g. generated class images
            self.paths: list[Path] = []
            self.sources = [self._adopt(image, i, min_size) for i, image in enumerate(images)]
        else:
            self.paths = find_images(images)
            self.sources = [self._load(path, token_text, class_word, min_size) for path in self.paths]
        logger.info("loaded %d training images at %d px", len(self.sources), resolution)

    def _load(self, path: Path, token_text: str, class_word: str, min_size: int) -> _Source:
        image = open_image(path, min_size)
        original = (image.height, image.width)
        caption = read_caption(path, token_text, class_word)
        return _Source(_resize_short_side(image, self.resolution), original, caption)

    def _adopt(self, image: Image.Image, index: int, min_size: int) -> _Source:
        image = _flatten_alpha(ImageOps.exif_transpose(image))
        if min(image.size) < min_size:
            raise ImageDataError(
                f"image {index + 1} is too small ({image.width}x{image.height}); its short side must be at "
                f"least {min_size} pixels"
            )
        return _Source(_resize_short_side(image, self.resolution), (image.height, image.width), None)

    def __len__(self) -> int:
        return len(self.sources)

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
        image = source.image.crop((left, top, left + size, top + size))
        # Draw every random number whether used or not: the stream then never depends on the data.
        flip_draw = float(torch.rand((), generator=generator)) if generator is not None else 1.0
        template_draw = (
            int(torch.randint(0, len(self.templates), (1,), generator=generator)) if generator is not None else 0
        )
        if flip_draw < self.flip_p:
            image = ImageOps.mirror(image)
            left = source.image.width - size - left  # SDXL conditions on where the crop sits
        caption = source.caption if source.caption is not None else self.templates[template_draw]
        return {
            "pixel_values": _to_tensor(image),
            "caption": caption,
            "original_size": source.original_size,
            "crop_top_left": (top, left),
        }


def collate(examples: Sequence[dict]) -> dict:
    """Stack examples into a batch (pixel values as one tensor, the rest as lists)."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "caption": [e["caption"] for e in examples],
        "original_size": [e["original_size"] for e in examples],
        "crop_top_left": [e["crop_top_left"] for e in examples],
    }
