"""One concept folder of the library: its layout, reading its ``concept.json``, and writing it.

A concept folder holds::

    adapter.safetensors       the concept (adapter file format v1)
    concept.json              its metadata, decoded, plus image count, image and thumbnail lists
    preview.png               optional
    images/image-000.png      the training images, re-encoded as PNG (no EXIF)
    thumbnails/image-000.png  small copies for the UI

``concept.json`` is written last, so a folder that has it is complete.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import logging
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from spectral_diffusion.atomic import fsync_path
from spectral_diffusion.core.config import ConceptInfo, ConceptInfoView
from spectral_diffusion.errors import ImageDataError, LibraryError
from spectral_diffusion.formats.adapter_file import (
    FORMAT,
    FORMAT_VERSION,
    USABLE_COLUMNS_KEY,
    AdapterData,
    save_adapter,
)
from spectral_diffusion.images import decode_image, to_8bit

logger = logging.getLogger(__name__)

LIBRARY_FORMAT = 1
CONCEPT_FILE = "concept.json"
ADAPTER_FILE = "adapter.safetensors"
PREVIEW_FILE = "preview.png"
IMAGES_DIR = "images"
THUMBNAILS_DIR = "thumbnails"
THUMBNAIL_SIZE = 256


def utc_timestamp() -> str:
    """Now, as the ISO 8601 UTC text concept.json and adapter files record."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----- reading ------------------------------------------------------------------------------------


@dataclass
class ConceptRecord(ConceptInfoView):
    """One concept of the library as described by its folder."""

    info: ConceptInfo  # name, slot, rank, variant, trigger tokens, class word
    base_model: str
    base_fingerprint: str
    created_at: str
    image_count: int
    folder: Path
    adapter_path: Path
    preview_path: Path | None
    thumbnails: list[Path] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # the whole concept.json

    def to_json(self) -> dict:
        """The record as plain JSON values (what ``concepts --json`` prints)."""
        return {
            "name": self.name,
            "tokens": list(self.tokens),
            "slot": self.slot,
            "rank": self.rank,
            "variant": self.variant,
            "class_word": self.class_word,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "created_at": self.created_at,
            "image_count": self.image_count,
            "folder": str(self.folder),
            "adapter_path": str(self.adapter_path),
            "preview_path": None if self.preview_path is None else str(self.preview_path),
            "thumbnails": [str(p) for p in self.thumbnails],
            "images": [str(p) for p in self.images],
            "metadata": copy.deepcopy(self.metadata),
            "token": self.token,
        }

    @classmethod
    def from_folder(cls, folder: Path) -> ConceptRecord:
        """Read ``folder/concept.json``; ``LibraryError`` says what is broken."""
        meta = _read_json(folder / CONCEPT_FILE)
        try:
            name, slot, rank = str(meta["name"]), int(meta["slot"]), int(meta["rank"])
            if name != folder.name:
                raise LibraryError(f"{CONCEPT_FILE} names the concept {name!r}, not {folder.name!r}")
            if slot < 0 or rank < 1:
                raise LibraryError(f"{CONCEPT_FILE} has an impossible slot {slot} or rank {rank}")
            info = ConceptInfo(
                name=name,
                slot=slot,
                rank=rank,
                variant=str(meta["variant"]),
                tokens=[str(t) for t in meta["tokens"]],
                class_word=str(meta["class_word"]),
            )
            record = cls(
                info=info,
                base_model=str(meta["base_model"]),
                base_fingerprint=str(meta["base_fingerprint"]),
                created_at=str(meta["created_at"]),
                image_count=int(meta.get("image_count", 0)),
                folder=folder,
                adapter_path=_inside(folder, meta.get("adapter", ADAPTER_FILE)),
                preview_path=_inside(folder, meta["preview"]) if meta.get("preview") else None,
                thumbnails=[_inside(folder, p) for p in meta.get("thumbnails", [])],
                images=[_inside(folder, p) for p in meta.get("images", [])],
                metadata=meta,
            )
        except LibraryError:
            raise
        except (KeyError, TypeError, ValueError) as error:  # ValueError: also a bad variant or token
            raise LibraryError(f"{CONCEPT_FILE} is incomplete or malformed ({error!r})") from None
        if not record.adapter_path.is_file():
            raise LibraryError(f"{record.adapter_path.name} is missing")
        return record


def _inside(folder: Path, relative: str) -> Path:
    """A path named by concept.json, refused if it points outside the concept folder."""
    path = folder / str(relative)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise LibraryError(f"{CONCEPT_FILE} names a file outside the concept folder: {relative!r}")
    return path


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not path.parent.exists():
            raise
        raise LibraryError(f"{path.name} is missing") from None
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: absurdly deep nesting
        raise LibraryError(f"{path.name} cannot be read ({error})") from None
    if not isinstance(data, dict):
        raise LibraryError(f"{path.name} is not a JSON object")
    return data


# ----- writing ------------------------------------------------------------------------------------


def write_concept(folder: Path, data: AdapterData, images, preview) -> None:
    """Fill a work folder; concept.json goes last, so a complete folder is one that has it."""
    adapter = save_adapter(data, folder / ADAPTER_FILE)
    image_names, thumbnail_names = _write_images(folder, images)
    preview_name = _write_preview(folder, preview)
    meta = _concept_json(data, adapter, image_names, thumbnail_names, preview_name)
    path = folder / CONCEPT_FILE
    path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    fsync_path(path)
    fsync_path(folder)


def _concept_json(data: AdapterData, adapter: Path, images: list[str], thumbnails: list[str], preview) -> dict:
    info = data.info
    return {
        "library_format": LIBRARY_FORMAT,
        "name": info.name,
        "tokens": list(info.tokens),
        "slot": info.slot,
        "rank": info.rank,
        "variant": info.variant,
        "class_word": info.class_word,
        "base_model": data.base_model,
        "base_fingerprint": data.base_fingerprint,
        "created_at": data.created_at,
        "package_version": data.package_version,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "targets": data.targets,
        "train_config": data.train_config,
        "extra_metadata": data.extra_metadata,
        "smallest_dim": _smallest_dim(data),
        "adapter": ADAPTER_FILE,
        "adapter_sha256": _sha256(adapter),
        "adapter_bytes": adapter.stat().st_size,
        "preview": preview,
        # an imported concept has no photos of its own: it keeps the count its export recorded
        "image_count": len(images) or _recorded_image_count(data),
        "images": images,
        "thumbnails": thumbnails,
        "added_at": utc_timestamp(),
    }


def _smallest_dim(data: AdapterData) -> int | None:
    """Columns every adapted layer can give a slot (with the rank: the model's slot capacity): min(m, n),
    or fewer where the training recorded a degenerate tail (``USABLE_COLUMNS_KEY``)."""
    dims = [min(t["U"].shape[0], t["V"].shape[0]) for t in data.layers.values() if "U" in t and "V" in t]
    usable = data.extra_metadata.get(USABLE_COLUMNS_KEY, "")
    if usable.isdigit() and dims:
        dims.append(max(int(usable), data.info.columns.stop))  # never below the concept's own columns
    return min(dims) if dims else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_image(source) -> Image.Image:
    """A PIL image, or a file decoded by the one user-image decoder (size and pixel caps, EXIF rotation)."""
    if isinstance(source, Image.Image):
        image = to_8bit(source.copy())  # 16-bit and float images: convert() alone would clip them
    else:
        try:
            image = decode_image(source)
        except ImageDataError as error:
            raise LibraryError(f"image {Path(source).name} cannot be read ({error})") from None
    if image.mode in ("RGB", "RGBA", "L", "LA"):
        return image
    return image.convert("RGBA" if image.has_transparency_data else "RGB")


def _save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG")  # re-encoding drops EXIF (location, camera) from user photos
    fsync_path(path)


def _write_images(folder: Path, images) -> tuple[list[str], list[str]]:
    names, thumbnails = [], []
    for index, source in enumerate(images):
        image = _load_image(source)
        name, thumb_name = f"{IMAGES_DIR}/image-{index:03d}.png", f"{THUMBNAILS_DIR}/image-{index:03d}.png"
        (folder / IMAGES_DIR).mkdir(exist_ok=True)
        (folder / THUMBNAILS_DIR).mkdir(exist_ok=True)
        _save_png(image, folder / name)
        thumb = image.copy()
        thumb.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        _save_png(thumb, folder / thumb_name)
        names.append(name)
        thumbnails.append(thumb_name)
    return names, thumbnails


def _write_preview(folder: Path, preview) -> str | None:
    if preview is None:
        return None
    _save_png(_load_image(preview), folder / PREVIEW_FILE)
    return PREVIEW_FILE


# metadata keys an exported spectral file carries so an import shows the same card
PREVIEW_KEY = "preview_png"  # base64 PNG, at most THUMBNAIL_SIZE px
IMAGE_COUNT_KEY = "image_count"
MAX_PREVIEW_BYTES = 2 * 1024 * 1024


def _recorded_image_count(data: AdapterData) -> int:
    value = data.extra_metadata.get(IMAGE_COUNT_KEY, "0")
    return int(value) if value.isdigit() else 0


def card_metadata(record: ConceptRecord) -> dict[str, str]:
    """The preview (as a small base64 PNG) and the image count, for an exported adapter's metadata."""
    meta = {IMAGE_COUNT_KEY: str(record.image_count)}
    if record.preview_path is not None and record.preview_path.is_file():
        preview = _load_image(record.preview_path)
        preview.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        buffer = io.BytesIO()
        preview.save(buffer, format="PNG")
        meta[PREVIEW_KEY] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return meta


def preview_from_metadata(data: AdapterData) -> Image.Image | None:
    """The preview an export carried, decoded by the one user-image decoder; None if absent or unusable."""
    text = data.extra_metadata.get(PREVIEW_KEY)
    if not text or len(text) > MAX_PREVIEW_BYTES * 4 // 3 + 4:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        return None
    with tempfile.NamedTemporaryFile(suffix=".png") as handle:  # decode_image reads files, with its caps
        handle.write(raw)
        handle.flush()
        try:
            return decode_image(handle.name)
        except ImageDataError:
            logger.warning("the preview stored in %s's file is unreadable; imported without one", data.info.name)
            return None
