"""The web app's forms, without gradio: widget values (or API arguments) checked and turned into requests.

Numbers and files from widgets, the Train tab's ``TrainForm`` as a ``TrainRequest``, the layout editor's
rows as the generate endpoint's layout text, and a generated PNG's settings spread back over the
Generate tab's fields (``LoadedSettings``). Plain values in and out: testable without a page.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from spectral_diffusion.frontends.workflows import TrainRequest
from spectral_diffusion.generation.layout import PRESETS
from spectral_diffusion.generation.request import DEFAULTS, REGIONAL_MODES

ADVANCED = ("lr_unet", "lr_text", "lr_embedding", "batch_size", "resolution", "seed")  # the Train tab's Advanced
CONCEPT_ROWS = 8  # concept rows on the Generate tab (4 shown, 4 more folded)
NO_LAYOUT = "none"
CUSTOM = "custom"
LAYOUT_MODES = (NO_LAYOUT, "auto", *PRESETS, CUSTOM)
CAPTION_SUFFIX = ".txt"  # photo.txt beside photo.png: the caption file of kohya_ss and the CLI's folders


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


# ----- the Train tab --------------------------------------------------------------------------------


def training_settings(service) -> dict:
    """The Advanced settings' defaults for the service's model: TrainConfig's, then the model's own."""
    from spectral_diffusion.training.config import TrainConfig

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    defaults = {name: fields.get(name) for name in ADVANCED}
    defaults.update({k: v for k, v in service.train_defaults.items() if k in ADVANCED})
    defaults["resolution"] = defaults.get("resolution") or 0  # 0 = the model's own
    return defaults


def split_uploads(files, strict: bool = True) -> tuple[list[str], dict[str, str]]:
    """The uploaded photos, and the text of each ``photo.txt`` dropped with them by stem (unreadable: raises)."""
    photos, dropped = [], {}
    for path in map(Path, file_paths(files)):
        if path.suffix.lower() != CAPTION_SUFFIX:
            photos.append(str(path))
            continue
        try:
            dropped[path.stem] = " ".join(path.read_text(encoding="utf-8").split())
        except (OSError, UnicodeDecodeError) as error:
            if strict:
                raise InputError(f"cannot read caption file {path.name} ({error}); save it as UTF-8 text") from None
    return photos, dropped


def caption_map(captions) -> dict[str, str]:
    """The caption table's typed captions by photo file name (empty captions left out)."""
    rows = captions.values.tolist() if hasattr(captions, "values") else (captions or [])
    return {str(row[0]): str(row[1]).strip() for row in rows if len(row) >= 2 and row[0] and str(row[1] or "").strip()}


def caption_rows(files, current=None) -> list[list[str]]:
    """The caption table of the uploaded photos: (file name, the caption typed, else its ``photo.txt``)."""
    typed = caption_map(current)
    photos, dropped = split_uploads(files, strict=False)  # an unreadable one is told when training starts
    return [[Path(p).name, typed.get(Path(p).name) or dropped.get(Path(p).stem, "")] for p in photos]


def photo_captions(photos: Sequence[str], dropped: Mapping[str, str], typed: Mapping[str, str]) -> dict[str, str]:
    """Each photo's caption by file name: typed, else its caption file's. A caption file without its photo
    is refused: misnamed, it would leave its photo on the templates without a word."""
    orphans = sorted(set(dropped) - {Path(p).stem for p in photos})
    if orphans:
        raise InputError(f"caption file {orphans[0]}.txt has no photo named {orphans[0]}.*; rename it or remove it")
    from_files = {Path(p).name: dropped[Path(p).stem] for p in photos if dropped.get(Path(p).stem)}
    return {**from_files, **typed}


@dataclass
class TrainForm:
    """The Train tab's values, or the ``train_concept`` endpoint's arguments, as the widgets give them.
    Its fields are the endpoint's parameters and the Train tab's widget names."""

    images: object = None
    name: str | None = None
    class_word: str | None = None
    variant: str | None = None
    rank: object = None
    steps: object = None
    lr_unet: object = None
    lr_text: object = None
    lr_embedding: object = None
    batch_size: object = None
    resolution: object = None
    seed: object = None
    masks: object = None
    captions: object = None

    def request(self, service) -> TrainRequest:
        """The request; Advanced values equal to the defaults (or None) leave the service's own settings in
        force. Typed captions and uploaded masks are copied into folders of their own (``Service``)."""
        paths, dropped = split_uploads(self.images)
        if not paths:
            raise InputError("upload the concept's images first (3-20 photos work best)")
        name = (self.name or "").strip()
        if not name:
            raise InputError("give the concept a name, e.g. my-dog (its trigger token will be <my-dog>)")
        defaults = training_settings(service)
        chosen = {"lr_unet": self.lr_unet, "lr_text": self.lr_text, "lr_embedding": self.lr_embedding}
        overrides = {k: real(k, v) for k, v in chosen.items() if v not in (None, "") and real(k, v) != defaults[k]}
        if self.batch_size not in (None, "") and whole("batch_size", self.batch_size, 1) != defaults["batch_size"]:
            overrides["batch_size"] = whole("batch_size", self.batch_size, 1)
        size = whole("resolution", self.resolution)
        captions = photo_captions(paths, dropped, caption_map(self.captions))
        masks = file_paths(self.masks)
        return TrainRequest(
            name=name,
            images=service.captioned_photos(paths, captions) if captions else paths,
            class_word=(self.class_word or "").strip(),
            variant=self.variant or "additive",
            rank=whole("rank", self.rank) or None,
            steps=whole("steps", self.steps) or None,
            resolution=size if size and size != defaults["resolution"] else None,
            seed=whole("seed", self.seed) if self.seed not in (None, "") else 0,
            overrides=overrides,
            masks=service.mask_folder(masks) if masks else None,
        )


# ----- the Generate tab's layout editor -------------------------------------------------------------


def default_box(row: int) -> tuple[float, float, float, float]:
    """A new row's box: the first two rows split the image in halves, the others cover it."""
    if row == 0:
        return 0.0, 0.0, 0.5, 1.0
    if row == 1:
        return 0.5, 0.0, 1.0, 1.0
    return 0.0, 0.0, 1.0, 1.0


def _number(value):
    """A box value as a number where it is one (the layout's own check reports anything else)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def layout_spec(
    mode: str, prompt: str, negative: str, row_names: Sequence, row_boxes: Sequence[Sequence], region_prompts: Sequence
) -> str:
    """The ``layout`` text of the generate endpoint: "" (global fusion), ``auto``, a preset name, or for
    ``custom`` the layout JSON of the rows that name a concept (each row: its concept, its box x0, y0, x1,
    y1 and its region prompt), with the page's prompt as its context."""
    if not mode or mode == NO_LAYOUT:
        return ""
    if mode != CUSTOM:
        return mode
    regions = []
    for name, box, region_prompt in zip(row_names, row_boxes, region_prompts, strict=True):
        if not name:
            continue
        region = {"concept": name, "box": [_number(v) for v in box]}
        if region_prompt and str(region_prompt).strip():
            region["prompt"] = str(region_prompt).strip()
        regions.append(region)
    return json.dumps({"prompt": prompt or "", "negative": negative or "", "regions": regions})


# ----- a generated PNG's settings back into the Generate tab ----------------------------------------


@dataclass
class LoadedSettings:
    """A PNG's settings laid out over the Generate tab's fields (plain values, every field set); the
    field names are the Generate tab's widget names (the image count is not restored)."""

    prompt: str
    negative: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str
    row_names: list
    row_strengths: list[float]
    layout_mode: str
    row_boxes: list[tuple[float, float, float, float]]
    region_prompts: list[str]
    regional_mode: str
    settings_message: str


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


def _known(value, choices: Sequence[str], default: str) -> str:
    """``value`` if it is one of ``choices`` (a PNG may come from another version), else ``default``."""
    return value if value in choices else default


def loaded_settings(settings: Mapping, file_name: str, rows: int = CONCEPT_ROWS) -> LoadedSettings:
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
        row_names=names,
        row_strengths=strengths,
        layout_mode=mode,
        row_boxes=boxes,
        region_prompts=prompts,
        regional_mode=_known(settings.get("regional_mode"), REGIONAL_MODES, DEFAULTS.regional_mode),
        settings_message=" ".join(notes),
    )
