"""Generation settings carried inside the PNG, as AUTOMATIC1111 does, and read back.

Two text chunks: ``parameters`` in AUTOMATIC1111's own layout (prompt, ``Negative prompt: ...``, then
``Steps: 25, Sampler: ..., CFG scale: ..., Seed: ..., Size: WxH, Model: ...``), which A1111's "PNG
Info" tab and most image viewers show, and ``spectral_diffusion``: the same settings as JSON with
everything A1111 has no field for (concepts and strengths, layout), which ``read_settings`` returns so
a picture can be made again (``generate --from-png FILE``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from spectral_diffusion.atomic import atomic_path
from spectral_diffusion.errors import RequestError

SETTINGS_KEY = "spectral_diffusion"
A1111_KEY = "parameters"
MAX_SETTINGS_CHARS = 1_000_000  # a layout of 8 regions is a few kB; anything near this is not ours


def request_settings(request, seed: int, model: str, width: int, height: int) -> dict:
    """Everything that made an image, as plain JSON types."""
    settings = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "concepts": dict(request.concepts),
        "steps": request.steps,
        "guidance": request.guidance,
        "seed": seed,
        "width": width,
        "height": height,
        "scheduler": request.scheduler,
        "mode": request.mode,
        "model": model,
    }
    layout = getattr(request, "layout", None)
    if layout is not None:
        settings["layout"] = layout.to_json()
        settings["regional_mode"] = request.regional_mode
    return settings


def a1111_parameters(settings: dict) -> str:
    """The settings in AUTOMATIC1111's ``parameters`` text layout."""
    lines = [settings["prompt"]]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = [
        f"Steps: {settings['steps']}",
        f"Sampler: {settings['scheduler']}",
        f"CFG scale: {settings['guidance']:g}",
        f"Seed: {settings['seed']}",
        f"Size: {settings['width']}x{settings['height']}",
        f"Model: {settings['model']}",
    ]
    if settings.get("concepts"):
        fields.append("Concepts: " + "; ".join(f"{n} {s:g}" for n, s in settings["concepts"].items()))
    lines.append(", ".join(fields))
    return "\n".join(lines)


def attach_settings(image: Image.Image, settings: dict) -> None:
    """Put the settings into ``image.info`` so ``save_png`` writes them."""
    image.info[SETTINGS_KEY] = json.dumps(settings)
    image.info[A1111_KEY] = a1111_parameters(settings)


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` as PNG atomically, with its generation settings (if any) in text chunks."""
    chunks = PngImagePlugin.PngInfo()
    for key in (A1111_KEY, SETTINGS_KEY):
        if isinstance(image.info.get(key), str):
            chunks.add_itxt(key, image.info[key])
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=chunks)
    return path


def read_settings(path: str | os.PathLike) -> dict:
    """The settings stored by ``save_png``; ``RequestError`` if the file has none or is not a PNG."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            text = image.text.get(SETTINGS_KEY) if hasattr(image, "text") else None
    except (OSError, ValueError, SyntaxError) as error:
        raise RequestError(f"cannot read {path.name} as a PNG ({error})") from None
    if not isinstance(text, str):
        raise RequestError(
            f"{path.name} carries no Spectral Diffusion settings (only images saved by this tool's generate do)"
        )
    if len(text) > MAX_SETTINGS_CHARS:
        raise RequestError(f"the settings in {path.name} are implausibly large; refused")
    try:
        settings = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise RequestError(f"the settings in {path.name} are damaged (not valid JSON)") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("prompt"), str):
        raise RequestError(f"the settings in {path.name} are damaged (no prompt)")
    return settings
