"""The web app's service: one object over the library, training and the studio, no UI code.

The app (``app.py``) only turns widgets into calls of this class and its errors into ``gr.Error``.
One training runs at a time (a second request is told to wait); generations are serialised by the
studio's lock and queued by the web server. Nothing is loaded before the first request needs it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from spectral_diffusion.atomic import atomic_write_text, storage_error
from spectral_diffusion.errors import SpectralDiffusionError, TrainingCancelled
from spectral_diffusion.formats import check_export_format
from spectral_diffusion.frontends.workflows import (
    TrainRequest,
    build_layout,
    export_concept,
    prepare_training,
    slot_overview,
    train_into_library,
)
from spectral_diffusion.generation.pnginfo import save_png
from spectral_diffusion.generation.request import DEFAULTS
from spectral_diffusion.library import ConceptRecord, Library
from spectral_diffusion.library.slotmap import draw_slot_map
from spectral_diffusion.models.registry import DEFAULT_MODEL, default_rank, training_defaults

logger = logging.getLogger(__name__)


class BusyError(SpectralDiffusionError):
    """Another training is running; only one runs at a time."""


@dataclass
class TrainingStatus:
    """What the Train tab shows while a run goes on."""

    name: str = ""
    state: str = "idle"  # idle, preparing, running, done, cancelled, failed
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eta_seconds: float | None = None
    previews: list[Image.Image] = field(default_factory=list)
    message: str = ""
    started: float = 0.0
    slot: int | None = None  # known once the run has reserved its slot


def _safe_filename(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]+", "-", text).strip("-") or "output"


class Service:
    """Everything the app can do, as plain Python calls."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        library: str | os.PathLike | None = None,
        device: str = "cpu",
        output_dir: str | os.PathLike | None = None,
        svd_cache_dir: str | os.PathLike | None = None,
        train_defaults: Mapping | None = None,
    ):
        """Cheap: nothing is loaded until a call needs the model.

        ``train_defaults`` are extra ``TrainConfig`` fields for every training (e.g.
        ``{"preview_steps": 10, "resolution": 256}``). ``output_dir`` keeps generated images, exports and
        upload copies; without one they go to a temporary folder that is removed with the service (or at exit).
        """
        from spectral_diffusion.generation.fusion import Studio

        self.model = model
        self.device = device
        self.library = Library(library)
        self.svd_cache_dir = svd_cache_dir
        self.studio = Studio(model, device=device, svd_cache_dir=svd_cache_dir, library=self.library)
        # kept on the service: its finaliser removes the folder when the service goes, or at interpreter exit
        self._own_output_dir = None if output_dir else tempfile.TemporaryDirectory(prefix="spectral-outputs-")
        self.output_dir = Path(output_dir) if output_dir else Path(self._own_output_dir.name)
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise storage_error(error, self.output_dir) or error from None
        self.train_defaults = {**training_defaults(model), **dict(train_defaults or {})}
        self.status = TrainingStatus()
        self._train_lock = threading.Lock()
        self._cancel = threading.Event()
        self._train_pipe = None
        self._fingerprint: str | None = None
        self._capacity: dict[int, int] = {}

    # ----- model facts ------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        # cached: the studio's lock is held for a whole generation, and the base model never changes
        if self._fingerprint is None:
            self._fingerprint = self.studio.adapters.fingerprint
        return self._fingerprint

    def capacity(self, rank: int) -> int:
        if rank not in self._capacity:
            self._capacity[rank] = self.studio.capacity(rank)
        return self._capacity[rank]

    def next_slot(self, rank: int | None = None) -> int:
        """The slot a new concept of this rank would take now (raises when the model is full)."""
        rank = rank or default_rank(self.model)
        return self.library.allocate_slot(self.fingerprint, rank, self.capacity(rank))

    # ----- library ----------------------------------------------------------------------------------

    def concepts(self, this_model_only: bool = True) -> list[ConceptRecord]:
        return self.library.list(self.fingerprint if this_model_only else None)

    def slot_map_image(self, rank: int | None = None) -> Image.Image:
        rank = rank or default_rank(self.model)
        slots = self.library.slot_map(self.fingerprint, rank)
        title = f"{self.model}  (base {self.fingerprint}, rank {rank})"
        return draw_slot_map(slots, self.capacity(rank), title)

    def slot_maps(self) -> list[tuple[str, Image.Image]]:
        """One (caption, picture) per base model with concepts in the library, this model first."""
        rank = default_rank(self.model)
        maps = []
        for entry in slot_overview(self.library, current=(self.fingerprint, self.model, rank, self.capacity(rank))):
            report = entry.report
            capacity = report.capacity or (max(report.taken, default=0) + 1)
            title = f"{entry.base_model}  (base {report.base_fingerprint}, rank {report.rank})"
            this = report.base_fingerprint == self.fingerprint
            maps.append(
                (
                    f"{self.model} (this model)" if this else entry.base_model,
                    draw_slot_map(report.taken, capacity, title),
                )
            )
        return maps

    def delete_concept(self, name: str) -> None:
        self.library.delete(name)
        if name in self.studio.concepts:
            self.studio.unload_concept(name)

    def import_concept(self, path: str | os.PathLike, name: str | None = None) -> ConceptRecord:
        record = self.library.import_file(path, name=name or None, base_fingerprint=self.fingerprint)
        if record.name in self.studio.concepts:  # a re-import replaces the cached copy
            self.studio.unload_concept(record.name)
        return record

    def export_concept(self, name: str, format: str = "spectral") -> list[Path]:
        """Write one concept for download; LoRA formats come with textual-inversion files."""
        check_export_format(format)
        return export_concept(self.library, lambda: self.studio, name, format, self._out_path(name, format))

    def export_fused(self, concepts: Mapping[str, float], format: str = "spectral") -> list[Path]:
        check_export_format(format)
        out = self._out_path("+".join(sorted(concepts)) or "fused", format)
        return self.studio.export_fused(concepts, out, format=format)

    def _out_path(self, stem: str, format: str) -> Path:
        folder = self._new_folder("export-")
        suffix = "" if format == "spectral" else f".{format}"
        return folder / f"{_safe_filename(stem)}{suffix}.safetensors"

    # ----- generation -------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        concepts: Mapping[str, float] | None = None,
        negative_prompt: str = DEFAULTS.negative_prompt,
        seed: int | None = DEFAULTS.seed,
        steps: int = DEFAULTS.steps,
        guidance: float = DEFAULTS.guidance,
        width: int | None = None,
        height: int | None = None,
        num_images: int = DEFAULTS.num_images,
        scheduler: str = DEFAULTS.scheduler,
        progress: Callable[[int, int], None] | None = None,
        layout=None,
        regional_mode: str = DEFAULTS.regional_mode,
    ) -> list[Image.Image]:
        """Generate; ``layout`` (optional) composes regionally: a layout JSON object or text, ``auto`` or a
        preset name (``workflows.build_layout``). Its context prompt is ``prompt`` unless the JSON has one.
        ``regional_mode``: how a layout is drawn (``passes`` or ``routed``, docs/design.md section 11)."""
        from spectral_diffusion.generation.request import GenerationRequest

        placed = build_layout(self.library, prompt, negative_prompt, layout) if layout else None
        if placed is not None:
            prompt, negative_prompt = placed.prompt, placed.negative
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            layout=placed,
            concepts=dict(concepts or {}),
            steps=steps,
            guidance=guidance,
            seed=seed,
            width=width,
            height=height,
            num_images=num_images,
            scheduler=scheduler,
            regional_mode=regional_mode,
        )
        return self.studio.generate(request, progress=progress)

    def save_images(self, images: Sequence[Image.Image], stem: str = "image") -> list[Path]:
        folder = self._new_folder("generated-")
        paths = []
        for index, image in enumerate(images):
            path = folder / f"{_safe_filename(stem)}-{index}.png"
            try:
                save_png(image, path)
            except OSError as error:
                raise storage_error(error, path) or error from None
            paths.append(path)
        return paths

    # ----- uploads ----------------------------------------------------------------------------------

    def _new_folder(self, prefix: str) -> Path:
        """A new folder of its own under the output folder (a full or read-only disk: ``StorageError``)."""
        try:
            return Path(tempfile.mkdtemp(prefix=prefix, dir=self.output_dir))
        except OSError as error:
            raise storage_error(error, self.output_dir) or error from None

    def _copy(self, source: str | os.PathLike, target: Path) -> None:
        try:
            shutil.copyfile(source, target)
        except OSError as error:
            raise storage_error(error, target) or error from None

    def mask_folder(self, masks: Sequence[str | os.PathLike]) -> str:
        """Uploaded masks copied into a folder of their own under their file names (training pairs each
        photo with the mask of the same name)."""
        folder = self._new_folder("masks-")
        for path in masks:
            self._copy(path, folder / Path(path).name)
        return str(folder)

    def captioned_photos(self, photos: Sequence[str | os.PathLike], captions: Mapping[str, str]) -> list[str]:
        """Uploaded photos copied into a folder of their own, the caption typed for a photo (``captions``, by
        file name) written beside it as ``photo.txt``: the caption file convention of the CLI's image folders."""
        folder = self._new_folder("photos-")
        copies = []
        for path in photos:
            copy = folder / Path(path).name
            self._copy(path, copy)
            if captions.get(copy.name):
                atomic_write_text(copy.with_suffix(".txt"), captions[copy.name] + "\n")
            copies.append(str(copy))
        return copies

    # ----- training ---------------------------------------------------------------------------------

    @property
    def training(self) -> bool:
        return self._train_lock.locked()

    def cancel_training(self) -> bool:
        """Ask the running training to stop; it raises ``TrainingCancelled`` at its next step."""
        if not self.training:
            return False
        self._cancel.set()
        return True

    def _training_pipeline(self):
        """A pipeline of its own for training: the studio's is patched for generation."""
        if self._train_pipe is None:
            from spectral_diffusion.models.registry import load_pipeline

            self._train_pipe = load_pipeline(self.model, device=self.device)
            self._train_pipe.set_progress_bar_config(disable=True)
        return self._train_pipe

    def train(self, request: TrainRequest, progress: Callable[[TrainingStatus], None] | None = None) -> ConceptRecord:
        """``start_training`` and wait for it. Raises ``BusyError`` while another training runs."""
        return self.start_training(request, progress).result()

    def start_training(self, request: TrainRequest, progress: Callable[[TrainingStatus], None] | None = None) -> Future:
        """Check the request, then train in a background thread; returns a future of the record.

        Bad input (name, images: missing, unreadable, too large) and ``BusyError`` are raised here,
        before anything is written. ``self.status`` follows the run; ``cancel_training`` stops it.
        """
        paths = prepare_training(self.library, request, self.model, self._extra_config())
        if not self._train_lock.acquire(blocking=False):
            raise BusyError(f"a training ({self.status.name}) is already running; wait for it to finish or cancel it")
        future: Future = Future()
        future.set_running_or_notify_cancel()
        self._cancel.clear()
        name = request.name
        self.status = TrainingStatus(name=name, state="preparing", started=time.time(), message="loading the model")

        def run() -> None:
            try:
                future.set_result(self._train_locked(request, paths, progress))
            except BaseException as error:
                self.status.state = "cancelled" if isinstance(error, TrainingCancelled) else "failed"
                self.status.message = str(error)
                if not isinstance(error, SpectralDiffusionError):
                    logger.exception("training of %s failed", name)
                future.set_exception(error)
            finally:
                self._train_lock.release()

        try:
            threading.Thread(target=run, name=f"train-{name}", daemon=True).start()
        except BaseException:
            self._train_lock.release()
            raise
        return future

    def _extra_config(self) -> dict:
        return {"cpu": self.device == "cpu", **self.train_defaults}

    def _train_locked(self, request: TrainRequest, paths: list[Path], progress) -> ConceptRecord:
        pipe = self._training_pipeline()
        status = self.status

        def on_start(config) -> None:
            status.total_steps, status.slot = config.steps, config.slot
            status.message = f"training into slot {config.slot}"

        def on_progress(update) -> None:
            status.state, status.step, status.total_steps = "running", update.step, update.total_steps
            status.loss, status.eta_seconds = update.loss, update.eta_seconds
            if update.preview is not None:
                status.previews.append(update.preview)
            if progress is not None:
                progress(status)

        rank = request.rank_for(self.model)
        record, result = train_into_library(
            self.library,
            pipe,
            request,
            paths,
            model=self.model,
            fingerprint=self.fingerprint,
            capacity=self.capacity(rank),
            extra_config=self._extra_config(),
            on_start=on_start,
            progress=on_progress,
            should_stop=self._cancel.is_set,
            svd_cache_dir=self.svd_cache_dir,
        )
        status.state, status.message = "done", f"trained {request.name} into slot {record.slot}"
        if not status.previews or status.previews[-1] is not result.preview:
            status.previews.append(result.preview)
        return record
