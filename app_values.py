"""The web app's widget values, without gradio: numbers and files from widgets or API arguments, the
Train tab's request, the Generate tab's layout editor rows as a layout spec, the info line of a
generation, and the settings of a generated PNG spread back over the Generate tab's fields.

app_ui.py wires these into widgets; keeping them plain makes them testable without a page.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from spectral_diffusion.core.strengths import format_concepts
from spectral_diffusion.frontends.workflows import TrainRequest
from spectral_diffusion.generation.layout import PRESETS
from spectral_diffusion.generation.request import DEFAULTS

ADVANCED = ("lr_unet", "lr_text", "lr_embedding", "batch_size", "resolution", "seed")  # the Train tab's Advanced


class InputError(ValueError):
    """A widget or API value the app itself refuses (missing, not a number, out of range)."""


# ----- widget values --------------------------------------------------------------------------------


def file_paths(files) -> list[str]:
    """Paths of gr.File values (str paths, FileData-like dicts or objects with ``.name``)."""
    if files is None:
        return []
    if not isinstance(files, (list, tuple)):
        files = [files]
    paths = []
    for item in files:
        if isinstance(item, dict):
            item = item.get("path") or item.get("name")
        elif not isinstance(item, (str, os.PathLike)):
            item = getattr(item, "path", None) or getattr(item, "name", None)
        if item:
            paths.append(str(item))
    return paths


def whole(label: str, value, minimum: int = 0) -> int:
    """An int from a number widget or an API argument (None and "" mean 0)."""
    if value is None or value == "":
        return 0
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{label} must be a whole number, got {value!r}") from None
    if number != int(number) or number < minimum:
        raise InputError(f"{label} must be a whole number of at least {minimum}, got {value!r}")
    return int(number)


def real(label: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{label} must be a number, got {value!r}") from None




# ----- the Train tab's values


def training_settings(service) -> dict:
    """The Advanced settings' defaults for the service's model: TrainConfig's, then the model's own."""
    from spectral_diffusion.training.config import TrainConfig

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    defaults = {name: fields.get(name) for name in ADVANCED}
    defaults.update({k: v for k, v in service.train_defaults.items() if k in ADVANCED})
    defaults["resolution"] = defaults.get("resolution") or 0  # 0 = the model's own
    return defaults


def mask_folder(service, masks) -> str | None:
    """Uploaded masks copied into a folder of their own under their file names (training pairs each photo
    with the mask of the same name); None without masks."""
    paths = file_paths(masks)
    if not paths:
        return None
    folder = Path(tempfile.mkdtemp(prefix="masks-", dir=service.output_dir))
    for path in paths:
        shutil.copyfile(path, folder / Path(path).name)
    return str(folder)


def _caption_map(captions) -> dict[str, str]:
    rows = captions.values.tolist() if hasattr(captions, "values") else (captions or [])
    return {str(row[0]): str(row[1]).strip() for row in rows if len(row) >= 2 and row[0] and str(row[1] or "").strip()}


def caption_rows(files, current=None) -> list[list[str]]:
    """The caption table for the uploaded photos: (file name, caption), typed captions kept by name."""
    typed = _caption_map(current)
    return [[Path(path).name, typed.get(Path(path).name, "")] for path in file_paths(files)]


def captioned_photos(service, paths: list[str], captions) -> list[str]:
    """The photos as they go to training: unchanged without captions; with captions, copied into a
    folder of their own, each caption written beside its photo as ``photo.txt`` (the caption file
    convention of the CLI's image folders)."""
    typed = _caption_map(captions)
    if not typed:
        return paths
    folder = Path(tempfile.mkdtemp(prefix="photos-", dir=service.output_dir))
    copies = []
    for path in paths:
        copy = folder / Path(path).name
        shutil.copyfile(path, copy)
        if typed.get(copy.name):
            copy.with_suffix(".txt").write_text(typed[copy.name] + "\n", encoding="utf-8")
        copies.append(str(copy))
    return copies


def train_request(service, images, name, class_word, variant, rank, steps, lr_unet=None, lr_text=None,
                  lr_embedding=None, batch_size=None, resolution=None, seed=None, masks=None,
                  captions=None) -> TrainRequest:
    """The request of the Train tab's (or the API's) values; Advanced values equal to the defaults (or
    None) leave the service's own settings in force."""
    paths = file_paths(images)
    if not paths:
        raise InputError("upload the concept's images first (3-20 photos work best)")
    name = (name or "").strip()
    if not name:
        raise InputError("give the concept a name, e.g. my-dog (its trigger token will be <my-dog>)")
    defaults = training_settings(service)
    chosen = {"lr_unet": lr_unet, "lr_text": lr_text, "lr_embedding": lr_embedding}
    overrides = {k: real(k, v) for k, v in chosen.items() if v not in (None, "") and real(k, v) != defaults[k]}
    if batch_size not in (None, "") and whole("batch_size", batch_size, 1) != defaults["batch_size"]:
        overrides["batch_size"] = whole("batch_size", batch_size, 1)
    size = whole("resolution", resolution)
    return TrainRequest(
        name=name,
        images=captioned_photos(service, paths, captions),
        class_word=(class_word or "").strip(),
        variant=variant or "additive",
        rank=whole("rank", rank) or None,
        steps=whole("steps", steps) or None,
        resolution=size if size and size != defaults["resolution"] else None,
        seed=whole("seed", seed) if seed not in (None, "") else 0,
        overrides=overrides,
        masks=mask_folder(service, masks),
    )


# ----- the Generate tab's values


NO_LAYOUT = "none"
CUSTOM = "custom"
LAYOUT_MODES = (NO_LAYOUT, "auto", *PRESETS, CUSTOM)
BOX_FIELDS = 4  # x0, y0, x1, y1 per concept row


def default_box(row: int) -> tuple[float, float, float, float]:
    """A new row's box: the first two rows split the image in halves, the others cover it."""
    if row == 0:
        return 0.0, 0.0, 0.5, 1.0
    if row == 1:
        return 0.5, 0.0, 1.0, 1.0
    return 0.0, 0.0, 1.0, 1.0


@dataclass
class LayoutRows:
    """The layout editor's values: per concept row its name, box and region prompt."""

    names: list
    boxes: list[tuple]
    prompts: list

    @classmethod
    def split(cls, values: Sequence) -> LayoutRows:
        """From the widget values in wiring order: every row's name, then 4 box numbers per row, then
        every row's region prompt."""
        rows = len(values) // (2 + BOX_FIELDS)
        names = list(values[:rows])
        numbers = values[rows:rows + BOX_FIELDS * rows]
        boxes = [tuple(numbers[BOX_FIELDS * i:BOX_FIELDS * (i + 1)]) for i in range(rows)]
        return cls(names, boxes, list(values[rows + BOX_FIELDS * rows:]))


def _number(value):
    """A box value as a number where it is one (the layout's own check reports anything else)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def layout_spec(mode: str, prompt: str, negative: str, rows: LayoutRows) -> str:
    """The ``layout`` text of the generate endpoint: "" (global fusion), ``auto``, a preset name, or for
    ``custom`` the layout JSON of the rows that name a concept, with the page's prompt as its context."""
    if not mode or mode == NO_LAYOUT:
        return ""
    if mode != CUSTOM:
        return mode
    regions = []
    for name, box, region_prompt in zip(rows.names, rows.boxes, rows.prompts, strict=True):
        if not name:
            continue
        region = {"concept": name, "box": [_number(v) for v in box]}
        if region_prompt and str(region_prompt).strip():
            region["prompt"] = str(region_prompt).strip()
        regions.append(region)
    return json.dumps({"prompt": prompt or "", "negative": negative or "", "regions": regions})


def describe_layout(spec: str) -> str:
    """A few words for the info line: the preset's name, or how many regions a custom layout has."""
    spec = (spec or "").strip()
    if not spec:
        return ""
    if not spec.startswith("{"):
        return f"layout {spec}"
    try:
        count = len(json.loads(spec).get("regions", []))
    except (ValueError, AttributeError, TypeError):
        return "custom layout"
    return f"custom layout ({count} region{'s' if count != 1 else ''})"


def info_line(count: int, seed, size: tuple[int, int] | None, steps: int, guidance: float, scheduler: str,
              concepts: Mapping[str, float], layout: str, seconds: float) -> str:
    """What the Generate tab says after a generation: the seeds used (image k: ``seed`` + k), the settings,
    the time taken."""
    try:
        seeds = f"seeds {int(seed)}-{int(seed) + count - 1}" if count > 1 else f"seed {seed}"
    except (TypeError, ValueError):
        seeds = f"seed {seed}"
    parts = [f"{count} image(s), {seeds}"]
    if size:
        parts.append(f"{size[0]}×{size[1]}")
    parts += [f"{steps} steps", f"guidance {guidance:g}", f"scheduler {scheduler}",
              f"concepts {format_concepts(dict(concepts))}" if concepts else "no concepts"]
    described = describe_layout(layout)
    if described:
        parts.append(described)
    parts.append(f"{seconds:.1f} s")
    return " · ".join(parts)


@dataclass
class LoadedSettings:
    """A PNG's settings laid out over the Generate tab's fields (plain values, every field set)."""

    prompt: str
    negative: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str
    names: list
    strengths: list[float]
    layout_mode: str
    boxes: list[tuple[float, float, float, float]]
    region_prompts: list[str]
    message: str


def _layout_rows(layout: Mapping, names: list, rows: int) -> tuple[list, list, list]:
    """Place a stored layout's regions on the concept rows (a region's concept gets its row's box)."""
    boxes = [default_box(i) for i in range(rows)]
    prompts = [""] * rows
    dropped = []
    for region in layout.get("regions", []):
        concept = region.get("concept")
        if not concept:
            dropped.append("a region without a concept")
            continue
        if concept not in names:
            free = next((i for i, v in enumerate(names) if not v), None)
            if free is None:
                dropped.append(concept)
                continue
            names[free] = concept
        row = names.index(concept)
        boxes[row] = tuple(float(v) for v in region.get("box", boxes[row]))
        prompts[row] = region.get("prompt") or ""
    return boxes, prompts, dropped


def loaded_settings(settings: Mapping, rows: int, file_name: str) -> LoadedSettings:
    """The fields for ``settings`` (from ``pnginfo.read_settings``) on a tab with ``rows`` concept rows."""
    concepts = dict(settings.get("concepts") or {})
    names = list(concepts)[:rows]
    skipped = list(concepts)[rows:]
    strengths = [float(concepts[n]) for n in names] + [1.0] * (rows - len(names))
    names += [None] * (rows - len(names))
    layout = settings.get("layout")
    mode, boxes, prompts, dropped = NO_LAYOUT, [default_box(i) for i in range(rows)], [""] * rows, []
    if isinstance(layout, Mapping):
        mode = CUSTOM
        boxes, prompts, dropped = _layout_rows(layout, names, rows)
    notes = [f"Loaded the settings of {file_name} (seed {settings.get('seed')}, model {settings.get('model')})."]
    if skipped or dropped:
        notes.append(f"Not placed (no free concept row): {', '.join(map(str, skipped + dropped))}.")
    return LoadedSettings(
        prompt=str(settings.get("prompt", "")),
        negative=str(settings.get("negative_prompt", "")),
        seed=int(settings.get("seed", DEFAULTS.seed)),
        steps=int(settings.get("steps", DEFAULTS.steps)),
        guidance=float(settings.get("guidance", DEFAULTS.guidance)),
        width=int(settings.get("width") or 0),
        height=int(settings.get("height") or 0),
        scheduler=str(settings.get("scheduler", DEFAULTS.scheduler)),
        names=names,
        strengths=strengths,
        layout_mode=mode,
        boxes=boxes,
        region_prompts=prompts,
        message=" ".join(notes),
    )
