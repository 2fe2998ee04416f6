"""The web app's API endpoints: what each named endpoint (and its button) does, as plain functions.

Every handler takes the ``Service`` first, then its endpoint's parameters: their names and order are the
HTTP API (``webapp/__init__.py`` lists them), so they are kept as they are. Each returns what the endpoint
returns and can be called (and tested) without a browser. ``webapp/events.py`` binds them to the service
and to their widgets; ``webapp/page.py`` holds the handlers of the page alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout

import gradio as gr

from spectral_diffusion.core.strengths import parse_concepts
from spectral_diffusion.frontends.service import Service, TrainingStatus
from spectral_diffusion.frontends.workflows import TrainRequest
from spectral_diffusion.generation.layout import Layout, concept_overlaps
from spectral_diffusion.generation.pnginfo import SETTINGS_KEY
from spectral_diffusion.generation.request import DEFAULTS
from webapp import drawings
from webapp.calls import user_errors
from webapp.forms import InputError, TrainForm, file_paths, real, whole
from webapp.handoff import handed_out
from webapp.render import info_line, record_json, status_json

POLL_SECONDS = 0.5  # how often a running training's progress is sent to the page


# ----- training: one run followed for the API or the page -------------------------------------------


class TrainingRun:
    """One started training: its future, and what the page shows of it (loss history, preview steps)."""

    def __init__(self, service: Service, request: TrainRequest):
        self.service = service
        self.losses: list[tuple[int, float]] = []
        self.preview_steps: list[int] = []
        self.future = service.start_training(request, self._on_step)

    def _on_step(self, status: TrainingStatus) -> None:  # the training thread, once per step
        if status.loss is not None:
            self.losses.append((status.step, float(status.loss)))
        while len(self.preview_steps) < len(status.previews):
            self.preview_steps.append(status.step)

    def previews(self) -> list[tuple]:
        """The previews with their step as caption (the last one of a finished run: "final")."""
        status = self.service.status
        return [
            (
                image,
                f"step {self.preview_steps[i]}"
                if i < len(self.preview_steps)
                else f"final · step {status.total_steps}",
            )
            for i, image in enumerate(list(status.previews))
        ]

    def chart(self):
        return drawings.loss_chart(list(self.losses))

    def follow(self, shown: Callable[[TrainingStatus, list | None], object]):
        """Yield ``shown(status, previews)`` every poll until the run ends; returns its record (or raises its
        error). ``previews`` is None while no preview was added since the last poll (nothing to resend)."""
        count = -1
        while True:
            try:
                return self.future.result(timeout=POLL_SECONDS)
            except FutureTimeout:
                status = self.service.status
                previews = None
                if len(status.previews) != count:
                    count = len(status.previews)
                    previews = self.previews()
                yield shown(status, previews)


def _trained(result) -> str:
    record = result[2] if isinstance(result, tuple) and len(result) > 2 else None
    return f"trained {record['name']} into slot {record['slot']}" if isinstance(record, dict) else ""


@user_errors(summary=_trained)
def train_concept(
    service: Service,
    images,
    name,
    class_word,
    variant,
    rank,
    steps,
    lr_unet=None,
    lr_text=None,
    lr_embedding=None,
    batch_size=None,
    resolution=None,
    seed=None,
    masks=None,
    captions=None,
):
    """Start a training, then yield (status, previews, record) until it ends: the status as data
    (``render.status_json``: state, step, total_steps, loss, eta_seconds, slot, token, message), the
    record (``record_json``) once trained."""
    form = TrainForm(
        images=images,
        name=name,
        class_word=class_word,
        variant=variant,
        rank=rank,
        steps=steps,
        lr_unet=lr_unet,
        lr_text=lr_text,
        lr_embedding=lr_embedding,
        batch_size=batch_size,
        resolution=resolution,
        seed=seed,
        masks=masks,
        captions=captions,
    )
    run = TrainingRun(service, form.request(service))

    def shown(status, previews):
        return status_json(status), gr.skip() if previews is None else previews, gr.skip()

    try:
        record = yield from run.follow(shown)
    except Exception:
        yield status_json(service.status), gr.skip(), gr.skip()  # the status says "cancelled" / "failed"
        raise
    yield status_json(service.status, record), run.previews(), record_json(record)


@user_errors
def cancel_training(service: Service) -> str:
    if service.cancel_training():
        return "cancelling: the training stops after its current step"
    gr.Info("No training is running: there is nothing to cancel")  # the page's toast; API callers get the text
    return "no training is running"


# ----- the library ----------------------------------------------------------------------------------


@user_errors(summary=lambda listed: f"{len(listed)} concept(s)")
def list_concepts(service: Service) -> list[dict]:
    fingerprint = service.fingerprint
    return [record_json(r, r.base_fingerprint == fingerprint) for r in service.concepts(this_model_only=False)]


@user_errors(summary=str)
def delete_concept(service: Service, name, confirm) -> str:
    if not name:
        raise InputError("pick the concept to delete")
    if not confirm:
        raise InputError(f"tick “I am sure” to delete {name}: this cannot be undone")
    service.delete_concept(name)
    return f"deleted {name}"


@user_errors(summary=lambda record: f"imported {record['name']} into slot {record['slot']}")
def import_concept(service: Service, file, name) -> dict:
    paths = file_paths(file)
    if len(paths) != 1:
        raise InputError("upload one adapter file (.safetensors)")
    return record_json(service.import_concept(paths[0], name=(name or "").strip() or None))


@user_errors(summary=lambda files: f"{len(files)} file(s)")
def export_concept(service: Service, name, format) -> list[str]:
    if not name:
        raise InputError("pick the concept to download")
    return handed_out(service.export_concept(name, format or "spectral"))


# ----- generation -----------------------------------------------------------------------------------


@user_errors(summary=lambda result: result[1])
def generate(
    service: Service,
    prompt,
    concepts,
    negative,
    seed,
    steps,
    guidance,
    width,
    height,
    num_images,
    scheduler,
    layout="",
    regional_mode=DEFAULTS.regional_mode,
) -> tuple[list[tuple[str, str]], str]:
    """((image path, "seed S") per image, "N image(s), seed S · settings · time"): image k is drawn from
    seed + k, its caption and stored settings say which. A negative or empty seed draws a random one.
    ``layout``: "" (global fusion), ``auto``, a preset name or a layout JSON (regional composition);
    ``regional_mode``: how a layout is drawn, ``passes`` or ``routed`` (empty: the default)."""
    started = time.monotonic()
    seed_value = None if seed is None or seed == "" or real("seed", seed) < 0 else whole("seed", seed)
    chosen = parse_concepts(concepts or "")
    steps, guidance = whole("steps", steps, 1), real("guidance", guidance)
    scheduler, layout = scheduler or "default", (layout or "").strip()
    images = service.generate(
        prompt or "",
        chosen,
        negative_prompt=negative or "",
        seed=seed_value,
        steps=steps,
        guidance=guidance,
        width=whole("width", width) or None,
        height=whole("height", height) or None,
        num_images=whole("num_images", num_images, 1),
        scheduler=scheduler,
        layout=layout or None,
        regional_mode=regional_mode or DEFAULTS.regional_mode,
    )
    used = images[0].info.get("seed", seed_value) if images else seed_value
    paths = service.save_images(images, stem=f"seed{used}")
    size = images[0].size if images else None
    captions = [f"seed {image.info.get('seed', '?')}" for image in images]
    # what the image was drawn with: a layout selects the concepts it places when none are chosen
    stored = json.loads(images[0].info.get(SETTINGS_KEY, "{}")) if images else {}
    drawn = stored.get("concepts", chosen)
    overlaps = concept_overlaps(Layout.from_json(stored["layout"])) if "layout" in stored else []
    for first, second, share in overlaps:
        gr.Warning(
            f"The boxes of {first} and {second} overlap ({share:.0%} of the image): there both concepts act "
            "and their region prompts are blended. Give each concept its own box unless that is what you want."
        )
    return list(zip(handed_out(paths), captions, strict=True)), info_line(
        len(paths),
        used,
        size,
        steps,
        guidance,
        scheduler,
        drawn,
        layout,
        time.monotonic() - started,
        stored.get("regional_mode", ""),
        [f"{first} and {second} overlap" for first, second, _ in overlaps],
    )


@user_errors(summary=lambda files: f"{len(files)} file(s)")
def export_fused(service: Service, concepts, format) -> list[str]:
    chosen = parse_concepts(concepts or "")
    if not chosen:
        raise InputError("pick at least one concept to fuse")
    return handed_out(service.export_fused(chosen, format or "spectral"))
