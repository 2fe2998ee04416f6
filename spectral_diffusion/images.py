"""User images, checked once by one decoder: file limits, pixel-count cap, EXIF rotation, 8-bit pixels.

Images come from users (uploads, folders), so they are opened defensively: archives, links leading
out of the folder and oversized files are refused before anything is decoded, and the pixel count is
checked before decoding so a decompression bomb is refused. ``Image.convert("RGB")`` clips 16-bit and
32-bit integer images at 255 (a 16-bit grey photo turns white) and truncates float images in [0, 1] to
black, so every decoded image goes through ``to_8bit`` first. Training, the library and the service
all use these functions.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from spectral_diffusion.errors import ImageDataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ARCHIVE_EXTENSIONS = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar")
# zip, gzip, bzip2, xz, zstd, 7z, rar signatures (tar: "ustar" at byte 257)
_ARCHIVE_MAGIC = (
    b"PK\x03\x04",
    b"PK\x05\x06",
    b"\x1f\x8b",
    b"BZh",
    b"\xfd7zXZ\x00",
    b"\x28\xb5\x2f\xfd",
    b"7z\xbc\xaf\x27\x1c",
    b"Rar!\x1a\x07",
)
MAX_IMAGES = 100  # training photos per concept (generation.request.MAX_NUM_IMAGES: images per generation)
MAX_PIXELS = 64 * 1024 * 1024  # 64 megapixels: larger than any camera image, far below a bomb
MAX_FILE_BYTES = 64 * 1024 * 1024  # one image file; a 64-megapixel JPEG is about 30 MB
MAX_TOTAL_BYTES = 512 * 1024 * 1024  # all the images of one concept together
MIN_IMAGES = 3  # fewer photos of a concept are refused: one or two teach that picture, not the concept
RECOMMENDED_IMAGES = (MIN_IMAGES, 20)  # what the CLI help, the README and the app recommend

WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _scaled_to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    peak = float(finite.max()) if finite.size else 0.0
    low = min(float(finite.min()), 0.0) if finite.size else 0.0
    if image.mode == "F" and low >= 0.0 and peak <= 1.0:
        scale = 255.0  # a float image in [0, 1]
    elif image.mode.startswith("I;16") or (low >= 0.0 and 255.0 < peak <= 65535.0):
        scale = 255.0 / 65535.0  # 16 bits per sample
    elif low >= 0.0 and peak <= 255.0:
        scale = 1.0  # already 8-bit values in a wide container
    else:
        values = values - low  # anything else: stretch its range onto 0-255
        peak = peak - low
        scale = 255.0 / peak if peak > 0 else 1.0
    eight = np.clip(np.nan_to_num(values * scale), 0.0, 255.0).round().astype(np.uint8)
    return Image.fromarray(eight)  # 2-D uint8: mode L


def to_8bit(image: Image.Image) -> Image.Image:
    """``image`` unchanged, or as 8-bit L when PIL's ``convert`` would damage it."""
    if image.mode in WIDE_MODES:
        return _scaled_to_8bit(image)
    return image


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.0f} MB"


def check_upload(path: Path, folder: Path | None) -> None:
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
            raise ImageDataError(
                f"no images found {where}, only the archive {archives[0]}: upload images, not archives"
            )
        raise ImageDataError(f"no images found {where}; put {', '.join(IMAGE_EXTENSIONS)} files of the concept there")
    if len(paths) > max_images:
        raise ImageDataError(
            f"{len(paths)} images found {where}, more than the {max_images} one concept can use; "
            "pick the best few (3-20 is typical)"
        )
    for path in paths:
        check_upload(path, folder)
    total = sum(path.stat().st_size for path in paths)
    if total > MAX_TOTAL_BYTES:
        raise ImageDataError(
            f"the {len(paths)} images {where} add up to {_megabytes(total)}, more than "
            f"{_megabytes(MAX_TOTAL_BYTES)}; use fewer or smaller images"
        )
    return paths


def is_image_list(images) -> bool:
    """Whether ``images`` is a non-empty list of already opened PIL images."""
    return isinstance(images, (list, tuple)) and bool(images) and all(isinstance(i, Image.Image) for i in images)


def flatten_alpha(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white (a black background would tint the concept)."""
    image = to_8bit(image)  # 16-bit and float images: convert() alone would clip them
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def decode_image(path: str | os.PathLike) -> Image.Image:
    """Decode one uploaded image file safely, EXIF rotation applied, at 8 bits per channel (alpha kept).

    The one decoder for user images: size and pixel count are checked before decoding, so a
    decompression bomb is refused; a truncated file fails here. ``ImageDataError`` names the file.
    """
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
                return to_8bit(ImageOps.exif_transpose(raw))
    except ImageDataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDataError(f"image {path.name} declares an enormous size (decompression bomb?); refused") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        if _is_archive(path):
            raise ImageDataError(f"{path.name} is an archive, not an image: upload images, not archives") from None
        raise ImageDataError(f"cannot read image {path.name}: not an image or a damaged file ({error})") from None


def open_image(path: str | os.PathLike, min_size: int = 0) -> Image.Image:
    """Open one training image safely as RGB; raise ``ImageDataError`` naming the file on any problem."""
    path = Path(path)
    image = flatten_alpha(decode_image(path))
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


def check_uploads(images: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """``find_images`` and decode every file once: the checked list, or the first problem as an error.

    Decoding catches what the file checks cannot (not an image, truncated, decompression bomb), so a
    bad upload is refused before any model is loaded or anything is written. The entry points (CLI,
    service) call this once; it is also the one place that refuses too few images (``MIN_IMAGES``).
    """
    paths = find_images(images if isinstance(images, (str, os.PathLike)) else [Path(p) for p in images])
    for path in paths:
        decode_image(path).close()
    if len(paths) < MIN_IMAGES:  # said after the images proved usable: a broken file is named first
        raise ImageDataError(
            f"only {len(paths)} image(s) of the concept; training needs at least {MIN_IMAGES} "
            f"({RECOMMENDED_IMAGES[0]}-{RECOMMENDED_IMAGES[1]} work best): add photos of it from other angles "
            "and on other backgrounds"
        )
    return paths
