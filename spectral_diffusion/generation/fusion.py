"""Fusion and generation over one loaded base pipeline.

A ``Studio`` loads its base model once (lazily) and keeps every concept it was given installed in
one ``SpectralAdapters``. Switching the fused set only flips concepts on and off and changes their
strengths; nothing is reloaded. Two concepts in the same slot cannot be installed side by side, so
when a requested concept needs a slot held by an inactive one, the inactive one is taken out (it
stays registered and comes back when asked for).

A fused set exports as one spectral bundle (all concepts, lossless, re-loadable here) or as an exact
LoRA + textual-inversion pair that plain diffusers, AUTOMATIC1111 and ComfyUI load.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from itertools import combinations
from pathlib import Path

import torch

from spectral_diffusion.core import slots
from spectral_diffusion.core.config import ConceptInfo, TargetConfig
from spectral_diffusion.core.model import SpectralAdapters
from spectral_diffusion.core.strengths import normalize_strengths
from spectral_diffusion.core.svd import SvdCache
from spectral_diffusion.core.tokens import TokenError
from spectral_diffusion.errors import (
    BaseModelMismatchError,
    ConceptNotFoundError,
    FusionError,
    RequestError,
    SlotConflictError,
)
from spectral_diffusion.formats import check_export_format
from spectral_diffusion.formats.adapter_file import AdapterData, install_adapter
from spectral_diffusion.formats.bundle import read_bundle_and_strengths, write_bundle
from spectral_diffusion.formats.lora import export_lora
from spectral_diffusion.generation.compose import run_global, run_regional
from spectral_diffusion.generation.pnginfo import attach_settings, request_settings
from spectral_diffusion.generation.request import (
    MODES,
    GenerationRequest,
    check_prompt_tokens,
    check_size_for_model,
)
from spectral_diffusion.generation.schedulers import make_scheduler
from spectral_diffusion.models.registry import load_pipeline

logger = logging.getLogger(__name__)


def native_size(pipe) -> tuple[int, int]:
    """(height, width) in pixels the pipeline's UNet was made for: ``sample_size * vae_scale_factor``."""
    size = pipe.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return height * pipe.vae_scale_factor, width * pipe.vae_scale_factor


def _targets_key(targets) -> tuple[frozenset, frozenset]:
    data = targets.to_json() if isinstance(targets, TargetConfig) else dict(targets)
    return frozenset(data.get("unet", ())), frozenset(data.get("text_encoder", ()))


class Studio:
    """Fuse concepts and generate with them over one base pipeline, loaded once on first use.

    Thread-safe: one lock serialises activation, generation and export (the pipeline is not
    re-entrant). ``library`` is optional: any object with ``.adapter(name) -> AdapterData``; concepts
    it knows are loaded the first time a request names them.
    """

    def __init__(
        self,
        model: str = "builtin:toy",
        torch_dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        svd_cache_dir: str | os.PathLike | None = None,
        library=None,
        targets: TargetConfig | None = None,
    ):
        self._model = str(model)
        self.torch_dtype = torch_dtype
        self.device = device
        self.svd_cache = SvdCache(svd_cache_dir)
        self.library = library
        self._targets = targets
        self.load_count = 0
        self._pipe = None
        self._adapters: SpectralAdapters | None = None
        self._default_scheduler = None
        self._store: dict[str, AdapterData] = {}
        self._active: dict[str, float] = {}
        self._mode = "live"
        self._applied: tuple | None = None  # (sorted active items, mode) the weights reflect now
        self._pristine: dict[str, torch.Tensor] | None = None
        self._lock = threading.RLock()

    # ----- model --------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model

    @property
    def pipe(self):
        """The base pipeline, loaded on first access and never again."""
        with self._lock:
            if self._pipe is None:
                pipe = load_pipeline(self._model, torch_dtype=self.torch_dtype, device=self.device)
                pipe.set_progress_bar_config(disable=True)  # progress goes through the callback
                self._default_scheduler = pipe.scheduler
                self._pipe = pipe
                self.load_count += 1
                logger.info("studio loaded %s (%s)", self._model, type(pipe).__name__)
            return self._pipe

    @property
    def adapters(self) -> SpectralAdapters:
        """The pipeline's spectral layers, patched once; every loaded concept lives here."""
        with self._lock:
            if self._adapters is None:
                self._adapters = SpectralAdapters.from_pipeline(self.pipe, self._targets, self.svd_cache)
            return self._adapters

    def capacity(self, rank: int) -> int:
        """``SpectralAdapters.capacity`` under the studio's lock: the first call computes the spectrum,
        which needs the base weights unmerged, never in the middle of another thread's baked generation."""
        with self._lock:
            return self.adapters.capacity(rank)

    @property
    def concepts(self) -> dict[str, ConceptInfo]:
        """Registered concepts (installed or waiting for their slot), by studio name."""
        return {name: self._info(name) for name in self._store}

    @property
    def active(self) -> dict[str, float]:
        return dict(self._active)

    @property
    def mode(self) -> str:
        return self._mode

    def _info(self, name: str) -> ConceptInfo:
        return self._store[name].renamed(name).info

    # ----- registering concepts -----------------------------------------------------------------

    def load_concept(self, name: str, data: AdapterData | None = None) -> None:
        """Register a concept under ``name``, checked against the base model now, inactive.

        Loading a name that is in use replaces that concept (the new one starts inactive). Raises
        ``BaseModelMismatchError`` naming the concept if it was made for another base model; then
        nothing changes.
        """
        with self._lock:
            if data is None:
                data = self._from_library(name)
            if not isinstance(data, AdapterData):
                raise TypeError(f"load_concept needs AdapterData, got {type(data).__name__}")
            self._check_targets(name, data)
            previous, strength = self._store.get(name), self._active.get(name)
            self._drop(name)
            self._store[name] = data
            try:
                # installing now checks it against the base model at once, even if an active concept
                # holds its slot: that one steps aside and _sync below puts it back
                self._install(name, keep=set())
            except Exception:
                del self._store[name]
                if previous is not None:  # the replaced concept comes back as it was
                    self._store[name] = previous
                    if strength is not None:
                        self._active[name] = strength
                raise
            finally:
                self._sync()
            logger.info("loaded concept %r (slot %d, %s)", name, data.info.slot, data.info.variant)

    def unload_concept(self, name: str) -> None:
        """Forget a concept: take it out of the model and of the active set."""
        with self._lock:
            if name not in self._store:
                raise ConceptNotFoundError(f"concept {name!r} is not loaded; loaded: {sorted(self._store)}")
            self._drop(name)
            del self._store[name]
            self._sync()

    def load_bundle(self, path: str | os.PathLike) -> dict[str, float]:
        """Load every concept of a bundle (all or none); returns its stored strengths for ``activate``."""
        datas, strengths = read_bundle_and_strengths(path)
        with self._lock:
            previous = {data.info.name: self._store.get(data.info.name) for data in datas}
            try:
                for data in datas:
                    self.load_concept(data.info.name, data)
            except Exception:
                for name, old in previous.items():
                    if name in self._store:
                        self.unload_concept(name)
                    if old is not None:
                        self.load_concept(name, old)
                raise
        return strengths

    def _from_library(self, name: str) -> AdapterData:
        if self.library is None:
            raise ConceptNotFoundError(f"concept {name!r} is not loaded; loaded: {sorted(self._store)}")
        return self.library.adapter(name)

    def _ensure_registered(self, name: str) -> None:
        if name not in self._store:
            self.load_concept(name, self._from_library(name))

    def _check_targets(self, name: str, data: AdapterData) -> None:
        if not data.targets:
            return  # nothing to compare; installing checks the layer set
        if self._adapters is None and self._targets is None:
            self._targets = TargetConfig.from_json(data.targets)  # the first concept sets the layers
        have = self.adapters.targets
        if _targets_key(data.targets) != _targets_key(have):
            raise FusionError(
                f"concept {name!r} adapts the layers {data.targets} but this studio adapts {have.to_json()}; "
                "concepts trained with different adapter targets cannot be fused"
            )

    def _drop(self, name: str) -> None:
        """Take ``name`` out of the model (if installed) and out of the active set."""
        if name in self._active:
            self._unbake()
            del self._active[name]
            self._applied = None
        if self._adapters is not None and name in self._adapters.concepts:
            self._unbake()
            self._adapters.remove_concept(name)
            self._applied = None

    # ----- installing ---------------------------------------------------------------------------

    def _install(self, name: str, keep: set[str]) -> None:
        """Install a registered concept, first taking out installed ones that clash with it (none in
        ``keep``: those were checked to be fusable)."""
        info = self._info(name)
        adapters = self.adapters
        for other in list(adapters.concepts):
            if other not in keep and other != name and slots.clash(info, adapters.concepts[other]):
                self._unbake()
                adapters.remove_concept(other)
                self._applied = None
                logger.info("took concept %r out of the model to free the slot of %r", other, name)
        data = self._store[name]
        try:
            install_adapter(adapters, data, name=name, model_name=self._model)
        except (BaseModelMismatchError, SlotConflictError, TokenError) as error:
            raise type(error)(self._mismatch(name, data, error)) from error
        adapters.set_enabled(name, False)  # installed concepts start on; only _apply switches them on

    def _mismatch(self, name: str, data: AdapterData, error: Exception) -> str:
        origin = data.base_model or "an unknown model"
        note = ""
        if data.base_fingerprint and data.base_fingerprint != self.adapters.fingerprint:
            note = f" (base fingerprint {data.base_fingerprint}, this model's is {self.adapters.fingerprint})"
        return f"concept {name!r}, made for {origin}{note}, cannot be loaded into {self._model}: {error}"

    def _check_fusable(self, names: Iterable[str]) -> None:
        for a, b in combinations(sorted(names), 2):
            why = slots.clash(self._info(a), self._info(b))
            if why:
                raise FusionError(
                    f"concepts {a!r} and {b!r} cannot be fused: they {why}. Select one of them, or "
                    "retrain one into a free slot"
                )

    # ----- activation ---------------------------------------------------------------------------

    def activate(self, concepts: Mapping[str, float] | Iterable[str], mode: str = "live") -> None:
        """Switch the requested concepts on at their strengths and every other one off.

        Strength 0 is the same as leaving a concept out. ``baked`` merges the set into the weights,
        ``live`` applies it in factored form. On error the previous set stays in effect.
        """
        if mode not in MODES:
            raise RequestError(f"unknown mode {mode!r}; use one of {MODES}")
        wanted = {name: s for name, s in normalize_strengths(concepts).items() if s != 0.0}
        with self._lock:
            for name in wanted:
                self._ensure_registered(name)
            self._check_fusable(wanted)
            previous = (dict(self._active), self._mode)
            try:
                self._apply(wanted, mode)
            except Exception:
                self._applied = None
                self._restore(*previous)
                raise

    def _restore(self, active: dict[str, float], mode: str) -> None:
        try:
            self._apply(active, mode)
        except Exception:  # keep the first error; the next activate re-applies everything
            logger.exception("could not restore the previous concept set %s", sorted(active))

    def _apply(self, wanted: dict[str, float], mode: str) -> None:
        key = (tuple(sorted(wanted.items())), mode)
        if key == self._applied:
            return
        adapters = self.adapters
        self._unbake()
        for name in wanted:
            if name not in adapters.concepts:
                self._install(name, keep=set(wanted))
        for name in adapters.concepts:
            adapters.set_enabled(name, name in wanted)
            if name in wanted:
                adapters.set_strength(name, wanted[name])
        if mode == "baked" and wanted:
            self._bake(list(wanted))
        self._active, self._mode, self._applied = dict(wanted), mode, key
        logger.debug("active concepts %s (%s)", wanted, mode)

    def _sync(self) -> None:
        """Make the weights reflect the active set again after an install or removal disturbed them."""
        if self._applied is None:
            self._restore(dict(self._active), self._mode)

    @torch.no_grad()
    def _bake(self, names: list[str]) -> None:
        adapters = self.adapters
        if self._pristine is None:  # taken while unmerged: the exact base weights
            self._pristine = {
                key: layer.base_layer.weight.detach().to("cpu", copy=True) for key, layer in adapters.layers.items()
            }
        adapters.merge(names)

    @torch.no_grad()
    def _unbake(self) -> None:
        """Unmerge, then copy the saved base weights back: repeated bake/unbake cycles would otherwise
        drift the base by rounding (badly in float16)."""
        adapters = self._adapters
        if adapters is None or not adapters.merged:
            return
        adapters.unmerge()
        for key, layer in adapters.layers.items():
            layer.base_layer.weight.copy_(self._pristine[key])
        self._applied = None

    # ----- generation ---------------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        progress: Callable[[int, int], None] | None = None,
        output_type: str = "pil",
    ) -> list:
        """Generate ``request.num_images`` images with the requested concepts fused.

        Returns PIL images (``output_type="pil"``) or float arrays H x W x 3 in [0, 1] (``"np"``).
        ``progress(step, total)`` is called after every denoising step; raising from it cancels.
        """
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"generate needs a GenerationRequest, got {type(request).__name__}")
        if output_type not in ("pil", "np"):
            raise RequestError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        with self._lock:
            pipe = self.pipe
            self.activate(request.concepts, request.mode)
            check_prompt_tokens(request, {name: self._info(name).tokens for name in self._store}, self._active)
            check_size_for_model(request, native_size(pipe))
            seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
            pipe.scheduler = make_scheduler(request.scheduler, self._default_scheduler)
            try:
                images = self._run(pipe, request, seed, progress, output_type)
            finally:
                pipe.scheduler = self._default_scheduler
        logger.info("generated %d image(s), seed %d, concepts %s", len(images), seed, request.concepts)
        return images

    def _run(self, pipe, request: GenerationRequest, seed: int, progress, output_type: str) -> list:
        if request.layout is None:
            images = run_global(pipe, request, seed, progress, output_type)
        else:
            missing = [name for name in request.layout.concepts if name not in self._active]
            if missing:
                raise RequestError(f"the layout places {missing[0]!r}, which is not selected with a non-zero strength")
            images = run_regional(pipe, self.adapters, request, seed, progress, output_type)
        if output_type == "pil":
            for k, image in enumerate(images):  # image k was drawn from seed + k (compose.py)
                image.info["seed"] = str(seed + k)
                attach_settings(image, request_settings(request, seed + k, self._model, *image.size))
        return images

    # ----- export -------------------------------------------------------------------------------

    def export_fused(
        self,
        names_with_strengths: Mapping[str, float] | Iterable[str],
        out_path: str | os.PathLike,
        format: str = "spectral",
    ) -> list[Path]:
        """Write a fused set: ``spectral`` (one bundle file), ``lora`` (peft keys) or ``kohya``
        (A1111 / ComfyUI keys), the latter two with one textual-inversion file per concept.

        Returns the paths written, the main file first. The active set is left as it was.
        """
        check_export_format(format)
        strengths = {name: s for name, s in normalize_strengths(names_with_strengths).items() if s != 0.0}
        if not strengths:
            raise FusionError("name at least one concept with a non-zero strength to export")
        with self._lock:
            for name in strengths:
                self._ensure_registered(name)
            self._check_fusable(strengths)
            if format == "spectral":
                return [write_bundle({name: self._store[name] for name in strengths}, out_path, strengths)]
            return self._export_lora(strengths, out_path, "peft" if format == "lora" else "kohya")

    def _export_lora(self, strengths: dict[str, float], out_path, style: str) -> list[Path]:
        missing = [name for name in strengths if name not in self.adapters.concepts]
        try:
            for name in missing:
                self._install(name, keep=set(strengths))
            return export_lora(self.adapters, list(strengths), out_path, strengths=strengths, style=style)
        finally:
            self._sync()  # installing may have taken active concepts out: put the active set back
