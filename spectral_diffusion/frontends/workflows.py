"""What the CLI and the web app both do, written once: check and train into the library, export, build
layouts, summarise the slots of each base model.

The CLI (``cli_commands``) and the app's service (``service``) turn their inputs into these calls and
their results into text or widgets; neither repeats a rule that is written here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spectral_diffusion.core.tokens import default_token
from spectral_diffusion.errors import ConfigError, LayoutError, LibraryError
from spectral_diffusion.formats import check_export_format
from spectral_diffusion.formats.bundle import is_bundle
from spectral_diffusion.generation.layout import PRESETS, Layout, Region, auto_layout, parse_region, preset_layout
from spectral_diffusion.images import check_uploads
from spectral_diffusion.library.allocation import SlotReport
from spectral_diffusion.library.workdirs import CHECKPOINTS_DIR
from spectral_diffusion.models.registry import default_rank, training_defaults

MAX_LAYOUT_BYTES = 256 * 1024


def concept_tokens(name: str, token: str | None = None) -> list[str]:
    """The trigger tokens of a new concept: the one given, else ``<name>``."""
    return [token] if token else [default_token(name)]


# TrainConfig fields a user may set besides the request's own (the app's "Advanced" settings)
OVERRIDABLE = (
    "lr_unet",
    "lr_text",
    "lr_embedding",
    "batch_size",
    "gradient_accumulation",
    "lr_warmup_steps",
    "targets",
    "prior_preservation",
    "min_snr_gamma",
    "flip_p",
    "random_crop",
    "preview_prompt",
    "lr_scale",
    "background_weight",
    "augment_p",
    "pair_p",
    "recolour_p",
)


@dataclass
class TrainRequest:
    """One concept to train into the library, as a user asks for it (CLI flags or the Train tab).

    ``rank`` None: the model's default; ``steps`` None or 0 and ``resolution`` None: automatic;
    ``preview_every`` None: about four previews during the run (only the final one for short runs).
    """

    name: str
    images: str | os.PathLike | Sequence[str | os.PathLike]
    class_word: str = ""
    variant: str = "additive"
    rank: int | None = None
    steps: int | None = None
    resolution: int | None = None
    seed: int = 0
    slot: int | None = None
    token: str | None = None
    mixed_precision: str = "no"
    checkpoint_every: int = 0
    resume: bool = False
    masks: str | os.PathLike | None = None  # folder of foreground masks (same file names as the images)
    preview_every: int | None = None
    overrides: Mapping = field(default_factory=dict)  # further TrainConfig fields: lr_unet, batch_size, ...

    def __post_init__(self):
        if self.steps == 0:
            self.steps = None
        unknown = sorted(set(self.overrides) - set(OVERRIDABLE))
        if unknown:
            raise ConfigError(f"unknown training setting {unknown[0]!r}; settable: {', '.join(OVERRIDABLE)}")

    @property
    def tokens(self) -> list[str]:
        return concept_tokens(self.name, self.token)

    def rank_for(self, model: str) -> int:
        return default_rank(model) if self.rank is None else self.rank

    def config(self, model: str, library_root: str | os.PathLike, slot: int = 0, extra: Mapping | None = None):
        """The ``TrainConfig`` of this request (validated: a bad setting raises before any work)."""
        from spectral_diffusion.training.config import TrainConfig

        chosen = {"steps": self.steps, "resolution": self.resolution}
        checkpoints = self.checkpoint_every or self.resume
        settings = {**training_defaults(model), **dict(extra or {}), **dict(self.overrides)}
        return TrainConfig(
            **{**settings, **{k: v for k, v in chosen.items() if v is not None}},
            name=self.name,
            tokens=self.tokens,
            class_word=self.class_word,
            rank=self.rank_for(model),
            slot=slot,
            variant=self.variant,
            seed=self.seed,
            mixed_precision=self.mixed_precision,
            checkpoint_every=self.checkpoint_every,
            resume=self.resume,
            mask_dir=str(self.masks) if self.masks else None,
            checkpoint_dir=str(Path(library_root) / CHECKPOINTS_DIR / self.name) if checkpoints else None,
        )


def prepare_training(library, request: TrainRequest, model: str, extra_config: Mapping | None = None) -> list[Path]:
    """Check a training before any model is loaded or anything is written: the name, every setting and
    the images (decoded once, ``images.check_uploads``). Returns the checked image files."""
    library.validate_name(request.name)
    request.config(model, library.root, extra=extra_config)
    return check_uploads(request.images)


def base_model_facts(pipe, rank: int, svd_cache_dir: str | os.PathLike | None = None) -> tuple[str, int]:
    """(base fingerprint, slot capacity at ``rank``) of a pipeline no studio has patched: patched to
    measure, then given back unchanged; the capacity's SVD lands in ``svd_cache_dir`` for the training."""
    from spectral_diffusion.core.model import SpectralAdapters
    from spectral_diffusion.core.svd import SvdCache

    probe = SpectralAdapters.from_pipeline(pipe, svd_cache=SvdCache(svd_cache_dir))
    try:
        return probe.fingerprint, probe.capacity(rank)
    finally:
        probe.unpatch()


def _with_previews(config, pipe, preview_every: int | None):
    config = config.resolved(pipe)
    if preview_every is None:
        preview_every = config.steps // 4 if config.steps >= 8 else 0
    return dataclasses.replace(config, preview_every=preview_every)


def train_into_library(
    library,
    pipe,
    request: TrainRequest,
    images: Sequence[Path],
    *,
    model: str,
    fingerprint: str | None = None,
    capacity: int | None = None,
    extra_config: Mapping | None = None,
    on_start: Callable[[object], None] | None = None,
    progress: Callable | None = None,
    should_stop: Callable[[], bool] | None = None,
    svd_cache_dir: str | os.PathLike | None = None,
):
    """Reserve a slot, train the concept into it and add it to the library; returns (record, result).

    ``images`` are the files ``prepare_training`` checked. ``fingerprint`` and ``capacity`` (at the
    request's rank) are measured on ``pipe`` when not given (``base_model_facts``). ``on_start`` gets the final
    ``TrainConfig`` (slot and steps known) before the first step. A failed or cancelled run leaves the
    library as it was: the reservation is dropped and nothing is added (a checkpoint, with
    ``checkpoint_every``, stays for ``resume``); a finished one removes the name's checkpoint.
    """
    from spectral_diffusion.training.trainer import train_concept

    config = request.config(model, library.root, extra=extra_config)  # refuse bad settings before reserving
    if fingerprint is None or capacity is None:
        fingerprint, capacity = base_model_facts(pipe, config.rank, svd_cache_dir)
    with library.reserve(request.name, fingerprint, config.rank, capacity, request.slot, tokens=config.tokens) as slot:
        config = _with_previews(dataclasses.replace(config, slot=slot), pipe, request.preview_every)
        if on_start is not None:
            on_start(config)
        result = train_concept(
            pipe,
            images,
            config,
            progress=progress,
            should_stop=should_stop,
            svd_cache_dir=svd_cache_dir,
            base_model_name=model,
        )
        record = library.add(result.adapter, images, result.preview)
        library.discard_checkpoint(request.name)  # finished: a later --resume must not find this run's state
    return record, result


def export_concept(library, studio: Callable[[], object], name: str, format: str, out: str | os.PathLike) -> list[Path]:
    """Write one concept: the library's own file for ``spectral``, an exact LoRA (+ TI files) otherwise.

    ``studio`` makes (or returns) the studio, so the spectral format needs no model at all.
    """
    check_export_format(format)
    if format == "spectral":
        return [library.export_file(name, out)]
    fused = studio()
    if name not in fused.concepts:
        fused.load_concept(name, library.adapter(name))
    return fused.export_fused({name: 1.0}, out, format=format)


def import_into_library(library, path: str | os.PathLike, name: str | None = None) -> list:
    """Add an adapter file (optionally under ``name``) or every concept of a fused bundle (``fuse --format
    spectral``, ``export_fused``; all or none) to the library; returns their records."""
    if not is_bundle(path):
        return [library.import_file(path, name=name)]
    if name:
        raise LibraryError(
            f"{Path(path).name} is a fused bundle: its concepts keep their own names; import it without a name"
        )
    return library.import_bundle(path)


LAYOUT_CHOICES = ("auto", *PRESETS)


def build_layout(library, prompt: str, negative: str, spec=None, regions: Sequence = ()) -> Layout | None:
    """The layout of a generation, or None for global fusion.

    ``spec``: ``auto`` (the concepts side by side, in the order their tokens appear in the prompt), a
    preset name (``left-right``, ``top-bottom``, ``thirds``, ``grid``: boxes given in that order), a layout
    JSON object or text, or a path to a ``.json`` file. ``regions``: ``Region`` objects or CLI region
    strings (``NAME:x0,y0,x1,y1:PROMPT``). A JSON layout brings its own prompt; otherwise ``prompt``
    is the context prompt.
    """
    if spec and regions:
        raise LayoutError("give either a layout or regions, not both")
    if regions:
        return Layout(prompt, tuple(r if isinstance(r, Region) else parse_region(r) for r in regions), negative)
    if not spec:
        return None
    if isinstance(spec, Mapping):
        return Layout.from_json(spec)
    spec = str(spec).strip()
    if spec in LAYOUT_CHOICES:
        tokens = {r.name: r.tokens for r in library.list() if any(t in prompt for t in r.tokens)}
        if spec == "auto":
            return auto_layout(prompt, tokens, negative)
        return preset_layout(spec, prompt, tokens, negative)
    if spec.startswith("{"):
        return Layout.from_json(spec)
    return Layout.from_json(_read_layout_file(Path(spec)))


def _read_layout_file(path: Path) -> str:
    if not path.is_file():
        raise LayoutError(f"layout {path} is neither a file nor one of {', '.join(LAYOUT_CHOICES)}")
    if path.stat().st_size > MAX_LAYOUT_BYTES:
        raise LayoutError(
            f"layout file {path.name} is larger than {MAX_LAYOUT_BYTES // 1024} kB; a layout is a few lines"
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise LayoutError(f"cannot read layout file {path.name} ({error})") from None


@dataclass(frozen=True)
class BaseModelSlots:
    """The slots of one base model: what the Library tab draws and ``list`` sums up."""

    base_model: str
    report: SlotReport


def slot_overview(
    library, current: tuple[str, str, int, int] | None = None, base_models: Mapping[str, str] | None = None
) -> list[BaseModelSlots]:
    """The slots of every base model with concepts in ``library`` (of ``base_models``, fingerprint -> name,
    when given), counted at the smallest rank among its concepts, by fingerprint.

    ``current`` (fingerprint, name, rank, capacity): the loaded model, first, at that rank and capacity,
    whether or not it has concepts yet.
    """
    out = []
    if current is not None:
        fingerprint, name, rank, capacity = current
        out.append(BaseModelSlots(name, library.slot_report(fingerprint, rank, capacity)))
    chosen = library.base_models() if base_models is None else base_models
    for fingerprint, name in sorted(chosen.items()):
        if current is not None and fingerprint == current[0]:
            continue
        unit = min((r.rank for r in library.list(fingerprint)), default=1)
        out.append(BaseModelSlots(name, library.slot_report(fingerprint, unit)))
    return out


def check_concepts_exist(library, names) -> None:
    """Every named concept is in the library (``ConceptNotFoundError`` names the first missing one)."""
    for name in names:
        library.get(name)
