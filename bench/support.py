"""What the benchmarks share with each other and with the tests: the repository's root, trained-looking
adapters of ``builtin:tiny``, library snapshots, process memory, and hostile or plain upload files.

The tests import these (tests/conftest.py, tests/reliability_helpers.py), so the benchmarks never
import from tests/.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEFTOVER_PREFIXES = (".tmp-", ".trash-", ".old-")


# ----- adapters -------------------------------------------------------------------------------------


def randomize_concept(adapters, name, seed=0, scale=0.05):
    """Give a concept non-zero parameters, as if it had been trained."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.layers.values():
            adapter = layer.concept(name)
            for pname in adapter.trainable_names():
                param = getattr(adapter, pname)
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
        for wrapper in adapters.embeddings.values():
            if name in wrapper.vectors:
                vec = wrapper.vectors[name]
                vec.add_(torch.randn(vec.shape, generator=generator) * scale)


def trained_looking_adapter(adapters, name, slot, rank, variant="additive", seed=0, base_model="builtin:tiny"):
    """AdapterData of a concept with random (non-zero) parameters in ``slot``; the concept is removed again."""
    from spectral_diffusion.core.config import ConceptInfo
    from spectral_diffusion.formats.adapter_file import adapter_from_model

    adapters.new_concept(ConceptInfo(name, slot, rank, variant, [f"<{name}>"], "dog"))
    randomize_concept(adapters, name, seed=seed)
    try:
        return adapter_from_model(adapters, name, base_model, {"steps": 1})
    finally:
        adapters.remove_concept(name)


@functools.cache
def tiny_adapters():
    """One patched builtin:tiny per process: (pipeline, SpectralAdapters)."""
    from spectral_diffusion.core.model import SpectralAdapters
    from spectral_diffusion.models.registry import load_pipeline

    pipe = load_pipeline("builtin:tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe, SpectralAdapters.from_pipeline(pipe)


def make_adapter(name: str, slot: int, rank: int = 4, variant: str = "additive", seed: int = 0):
    """AdapterData of a trained-looking concept of builtin:tiny in ``slot``."""
    return trained_looking_adapter(tiny_adapters()[1], name, slot, rank, variant, seed)


# ----- files and processes --------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a hash of its bytes: equal snapshots = byte-for-byte unchanged."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def leftovers(root: Path) -> list[str]:
    """Work files of interrupted operations anywhere under ``root`` (.tmp-*, .trash-*, .old-*)."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(LEFTOVER_PREFIXES))


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (MB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ----- upload files ---------------------------------------------------------------------------------


def photos(folder: Path, count: int = 3) -> list[Path]:
    """``count`` small photos of a blue block on a light background, as PNG files in ``folder``."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (48, 48), (240, 240, 240))
        ImageDraw.Draw(image).rectangle((4 + 3 * i, 6, 30 + 3 * i, 40), fill=(30, 120, 200))
        image.save(folder / f"{i}.png")
        paths.append(folder / f"{i}.png")
    return paths


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(path: Path, width: int, height: int, rows: int | None = None) -> Path:
    """An all-black 8-bit grey PNG of width x height, compressed row by row (tiny on disk).
    ``rows`` < height writes only the header and that many rows (a 'declared size' bomb)."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    body = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows)) + compressor.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + _chunk(b"IDAT", body)
        + _chunk(b"IEND", b"")
    )
    return path


def png16(path: Path, array) -> Path:
    """A 16-bit PNG (grey if 2-D, RGB if 3-D) written by hand, so PIL's writer cannot down-convert it."""
    height, width = array.shape[:2]
    colour = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(height))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )
    return path


def sparse(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that takes no disk space."""
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.truncate(size)
    return path
