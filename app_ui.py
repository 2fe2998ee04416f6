"""The web app's handlers: what each button and API endpoint does, as plain functions.

Every handler takes the ``Service`` first, then the values of its input widgets in the order app.py
wires them, and returns what its output widgets show, so it can be called (and tested) without a
browser. app.py lays out the page and binds the handlers to the service. Bad input, the package's
``SpectralDiffusionError`` and the app's own ``InputError``, is shown to the user as ``gr.Error``;
anything else is a bug: logged with its traceback, shown as a generic internal error. Each request
to an endpoint is one line of the server log at INFO.
"""

from __future__ import annotations

import contextvars
import functools
import html
import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import gradio as gr

import app_values
import app_views
from app_values import InputError, file_paths, real, train_request, whole
from app_views import card, problem_html, progress_html, record_json, stack_images, status_json, table_row
from spectral_diffusion.core.strengths import format_concepts, parse_concepts
from spectral_diffusion.errors import SpectralDiffusionError, TrainingCancelled
from spectral_diffusion.frontends.service import Service, TrainingStatus
from spectral_diffusion.frontends.workflows import TrainRequest, build_layout
from spectral_diffusion.generation.layout import Layout
from spectral_diffusion.generation.pnginfo import read_settings
from spectral_diffusion.generation.schedulers import SCHEDULERS
from spectral_diffusion.models.registry import default_rank

# app.py runs as __main__, so the app's loggers are named, not __name__: "app" configures them all
logger = logging.getLogger("app.handlers")

POLL_SECONDS = 0.5  # how often a running training's progress is sent to the page
INTERNAL_ERROR = "internal error, see the server log"


# ----- errors and the request log -------------------------------------------------------------------


USER_ERRORS = (SpectralDiffusionError, InputError)


def _user_message(error: Exception) -> str:
    return str(error) or type(error).__name__


def _from_api_client() -> bool:
    """Whether the request being handled comes from an API client rather than the page. The page's own
    client marks its requests ``x-gradio-user: app`` (gradio_client: ``api``, MCP: ``mcp``, curl: none);
    outside a request (a handler called directly) the answer is no."""
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    headers = getattr(request, "headers", None)
    return request is not None and headers is not None and headers.get("x-gradio-user") != "app"


def error_text(message: str) -> str:
    """An error message as ``gr.Error`` should carry it. The page renders the message as HTML through a
    sanitiser that drops unknown tags, so "prompt uses <heart>" would read "prompt uses": the page gets it
    HTML-escaped; API clients, which read it as text, get it as it is."""
    return message if _from_api_client() else html.escape(message, quote=False)


def _shown_error(error: Exception, where: str) -> gr.Error:
    """The ``gr.Error`` the page shows for ``error``: its message for bad input, a generic one for a bug.
    Either way it is the request's one log line: bad input without a traceback, a bug with one."""
    if isinstance(error, USER_ERRORS):
        logger.info("%s refused: %s", where, _user_message(error))
        return gr.Error(error_text(_user_message(error)), print_exception=False)
    logger.error("%s: internal error", where, exc_info=error)
    return gr.Error(INTERNAL_ERROR, print_exception=False)


def _log_done(where: str, started: float, summary: str = "") -> None:
    logger.info("%s: %s(%.1f s)", where, f"{summary} " if summary else "", time.monotonic() - started)


def user_errors(fn: Callable | None = None, *, summary: Callable | None = None) -> Callable:
    """Raise every error of ``fn`` as ``gr.Error`` (see ``_shown_error``); keeps generators generators.
    Logs one line per call; ``summary(result)`` (or the last value yielded) words its outcome."""
    if fn is None:
        return functools.partial(user_errors, summary=summary)
    where = fn.__name__

    def done(started: float, result) -> None:
        _log_done(where, started, summary(result) if summary and result is not None else "")

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            started, last = time.monotonic(), None
            try:
                for last in fn(*args, **kwargs):
                    yield last
            except gr.Error:
                raise
            except Exception as error:
                raise _shown_error(error, where) from error
            done(started, last)

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started = time.monotonic()
        try:
            result = fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:
            raise _shown_error(error, where) from error
        done(started, result)
        return result

    return wrapper


# ----- model work off gradio's worker threads -------------------------------------------------------


def in_own_thread(fn: Callable) -> Callable:
    """``fn`` run in a thread of its own that ends with the call, in the caller's context (gradio's request,
    its notices); its result or error is the caller's.

    Why: torch's OpenMP runtime (libgomp) gives each thread that runs torch ops a team of helper threads
    for the rest of that thread's life, and while the live teams hold more threads than there are CPUs it
    stops spin-waiting between parallel regions: every region then sleeps and wakes. gradio's worker
    threads live as long as the server, so model work done on them (the page's first refresh loads the
    model and computes its spectrum; a generation; an export) left a team alive beside the training
    thread's, and training steps ran 1.4-1.7x slower than the CLI's (README, "Web app"). A thread per call
    takes its team with it, so a training alone has the CPUs' only team, as the CLI has."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        context, outcome = contextvars.copy_context(), {}

        def run() -> None:
            try:
                outcome["result"] = context.run(fn, *args, **kwargs)
            except BaseException as error:  # noqa: BLE001 - handed to the caller below
                outcome["error"] = error

        thread = threading.Thread(target=run, name=f"app-{getattr(fn, '__name__', 'call')}", daemon=True)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome.pop("error")
        return outcome["result"]

    return wrapper


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
        return [(image, f"step {self.preview_steps[i]}" if i < len(self.preview_steps)
                 else f"final · step {status.total_steps}") for i, image in enumerate(list(status.previews))]

    def chart(self):
        return app_views.loss_chart(list(self.losses))

    def follow(self, shown: Callable[[TrainingStatus, object], tuple]):
        """Yield ``shown(status, previews or gr.skip())`` every poll until the run ends; returns its record
        (or raises its error). Previews are resent only when one is added."""
        count = -1
        while True:
            try:
                return self.future.result(timeout=POLL_SECONDS)
            except FutureTimeout:
                status = self.service.status
                previews = gr.skip()
                if len(status.previews) != count:
                    count = len(status.previews)
                    previews = self.previews()
                yield shown(status, previews)


# ----- API endpoints --------------------------------------------------------------------------------


def _trained(result) -> str:
    record = result[2] if isinstance(result, tuple) and len(result) > 2 else None
    return f"trained {record['name']} into slot {record['slot']}" if isinstance(record, dict) else ""


@user_errors(summary=_trained)
def train_concept(service: Service, images, name, class_word, variant, rank, steps, lr_unet=None, lr_text=None,
                  lr_embedding=None, batch_size=None, resolution=None, seed=None, masks=None, captions=None):
    """Start a training, then yield (status, previews, record) until it ends: the status as data
    (``app_views.status_json``: state, step, total_steps, loss, eta_seconds, slot, token, message), the
    record (``record_json``) once trained."""
    request = train_request(service, images, name, class_word, variant, rank, steps, lr_unet, lr_text,
                            lr_embedding, batch_size, resolution, seed, masks, captions)
    run = TrainingRun(service, request)
    try:
        record = yield from run.follow(lambda status, previews: (status_json(status), previews, gr.skip()))
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


def imported_summary(record) -> str:
    """The Library tab's line after an import (cleared when the import failed)."""
    return app_views.record_summary(record, "Imported") if isinstance(record, dict) else ""


@user_errors(summary=lambda files: f"{len(files)} file(s)")
def export_concept(service: Service, name, format) -> list[str]:
    if not name:
        raise InputError("pick the concept to download")
    return [str(p) for p in service.export_concept(name, format or "spectral")]


@user_errors(summary=lambda result: result[1])
def generate(service: Service, prompt, concepts, negative, seed, steps, guidance, width, height, num_images,
             scheduler, layout="") -> tuple[list[tuple[str, str]], str]:
    """((image path, "seed S") per image, "N image(s), seed S · settings · time"): image k is drawn from
    seed + k, its caption and stored settings say which. A negative or empty seed draws a random one.
    ``layout``: "" (global fusion), ``auto``, a preset name or a layout JSON (regional composition)."""
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
    )
    used = images[0].info.get("seed", seed_value) if images else seed_value
    paths = service.save_images(images, stem=f"seed{used}")
    size = images[0].size if images else None
    captions = [f"seed {image.info.get('seed', '?')}" for image in images]
    return list(zip(map(str, paths), captions, strict=True)), app_values.info_line(
        len(paths), used, size, steps, guidance, scheduler, chosen, layout, time.monotonic() - started)


@user_errors(summary=lambda files: f"{len(files)} file(s)")
def export_fused(service: Service, concepts, format) -> list[str]:
    chosen = parse_concepts(concepts or "")
    if not chosen:
        raise InputError("pick at least one concept to fuse")
    return [str(p) for p in service.export_fused(chosen, format or "spectral")]


# ----- Train tab (page only) ------------------------------------------------------------------------


def train_on_page(service: Service, *values):
    """The Train button: like ``train_concept`` but for the page, so nothing ends as an Error badge.

    Yields (progress, previews, trained line, loss chart, cancel line, name). A cancel is a neutral notice
    and the previews stay; bad input is one message in the status line; the cancel line is cleared at the
    end. A success says what was trained and empties the name box: the name is taken now, and the slot
    line shows where the next concept goes (not "Name taken" for the concept just trained).
    """
    started, name = time.monotonic(), (values[1] if len(values) > 1 else "") or ""
    run = None
    try:
        run = TrainingRun(service, train_request(service, *values))
        chart_points = [-1]

        def shown(status, previews):
            chart = gr.skip()
            if len(run.losses) != chart_points[0]:
                chart_points[0] = len(run.losses)
                chart = run.chart()
            return progress_html(status), previews, gr.skip(), chart, gr.skip(), gr.skip()

        yield progress_html(service.status), gr.skip(), "", gr.skip(), gr.skip(), gr.skip()  # no earlier result
        record = yield from run.follow(shown)
    except TrainingCancelled:
        logger.info("train %s: cancelled at step %d (%.1f s)", name, service.status.step, time.monotonic() - started)
        gr.Info(f"Training of {name} cancelled: nothing was added to the library")
        yield progress_html(service.status), gr.skip(), "", run.chart(), "", gr.skip()
        return
    except Exception as error:  # noqa: BLE001 - every outcome is shown in the status line
        message = _user_message(error) if isinstance(error, USER_ERRORS) else INTERNAL_ERROR
        if isinstance(error, USER_ERRORS):
            logger.info("train %s refused: %s", name, message)
        else:
            logger.error("train %s: internal error", name, exc_info=error)
        yield problem_html(message), gr.skip(), "", gr.skip(), "", gr.skip()
        return
    _log_done(f"train {name}", started, f"trained into slot {record.slot}")
    yield (progress_html(service.status), run.previews(), app_views.record_summary(record_json(record), "Trained"),
           run.chart(), "", "")


def upload_thumbnails(files) -> list[str]:
    """The uploaded photos as a gallery (thumbnails instead of a file list)."""
    return file_paths(files)


def caption_rows(files, current) -> list[list[str]]:
    """One (photo, caption) row per uploaded photo, keeping captions already typed for the same names."""
    return app_values.caption_rows(files, current)


def slot_info(service: Service, rank, name="") -> str:
    """The Train tab's hint: the slot the next concept of this rank takes, or why it cannot be trained
    (a taken or invalid name, checked as it is typed; no slot left)."""
    name = (name or "").strip()
    try:
        if name:
            service.library.validate_name(name)
            if service.library.exists(name):
                return f"**Name taken:** a concept named `{name}` is already in the library; pick another name."
        rank = whole("rank", rank) or default_rank(service.model)
        slot = service.next_slot(rank)
        capacity = service.capacity(rank)
    except USER_ERRORS as error:
        what = "Name not usable" if name and "name" in str(error) else "No slot available"
        return f"**{what}:** {html.escape(str(error))}"
    return (f"This concept will take **slot {slot}** of `{service.model}` "
            f"(rank {rank}: {capacity} slots of singular vectors).")


# ----- Library tab and shared refresh (page only) ---------------------------------------------------


def refresh(service: Service, selected, *rows):
    """Every library view after a change: (slot maps, library cards, table, JSON listing, library pick,
    generate cards, their names, the library cards' names, one update per concept row)."""
    fingerprint = service.fingerprint
    records = service.concepts(this_model_only=False)
    here = [r for r in records if r.base_fingerprint == fingerprint]
    names = [r.name for r in here]
    all_names = [r.name for r in records]
    maps = stack_images([image for _, image in service.slot_maps()])
    listing = [record_json(r, r.base_fingerprint == fingerprint) for r in records]
    pick = gr.Dropdown(choices=all_names, value=selected if selected in all_names else None)
    row_updates = [gr.Dropdown(choices=names, value=v if v in names else None) for v in rows]
    return (maps, [card(r) for r in records], [table_row(r) for r in records], listing, pick,
            [card(r) for r in here], names, all_names, *row_updates)


def select_card(index: int, names: Sequence[str]):
    """The name of the library card clicked (no change when the list moved under the click)."""
    return names[index] if names and index < len(names) else gr.skip()


# ----- Generate tab (page only) ---------------------------------------------------------------------


def insert_token(prompt: str, token: str, cursor) -> tuple[str, int]:
    """``prompt`` with ``token`` inserted at character ``cursor`` (None, negative or past the end: at the
    end), a space either side where it would touch other text; returns (prompt, cursor after the token)."""
    prompt = prompt or ""
    try:
        at = int(cursor)
    except (TypeError, ValueError):
        at = -1
    if not 0 <= at <= len(prompt):
        at = len(prompt)
    before, after = prompt[:at], prompt[at:]
    if at == len(prompt):
        before = before.rstrip()
    before += " " if before and not before[-1].isspace() else ""
    after = (" " if after and not after[0].isspace() else "") + after
    return before + token + after, len(before) + len(token)


def pick_concept(service: Service, index: int, names: Sequence[str], prompt, cursor, *rows):
    """Clicking concept card ``index``: its trigger token goes into the prompt at the cursor (the prompt
    box's last caret position, -1: the end), the concept into a free row. Returns (prompt, cursor, *rows)."""
    if not names or index >= len(names):
        return (gr.skip(),) * (2 + len(rows))
    name = names[index]
    record = next((r for r in service.concepts() if r.name == name), None)
    token = record.token if record else f"<{name}>"
    prompt, after = prompt or "", gr.skip()
    if token not in prompt:
        prompt, after = insert_token(prompt, token, cursor)
    values = list(rows)
    if name not in values:
        free = next((i for i, v in enumerate(values) if not v), None)
        if free is not None:
            values[free] = name
    return (prompt, after, *values)


def rows_to_spec(*values) -> str:
    """The concept rows' names then strengths (as many of each) as a concepts text, "dog,cat:0.8"."""
    half = len(values) // 2
    chosen = {}
    for name, strength in zip(values[:half], values[half:], strict=True):
        if name:
            chosen[name] = float(strength)
    return format_concepts(chosen)


def layout_editor(service: Service, mode, prompt, negative, width, height, *rows):
    """The layout editor after any change: (layout text for the generate endpoint, its picture, whether
    which rows' box editors show: a custom layout's named rows). ``rows``: the concept rows' names, boxes and region prompts (``LayoutRows``)."""
    editor = app_values.LayoutRows.split(rows)
    spec = app_values.layout_spec(mode, prompt, negative, editor)
    boxes_shown = [gr.update(visible=mode == app_values.CUSTOM and bool(name)) for name in editor.names]
    if not spec:
        return (spec, gr.update(value=None, visible=False), *boxes_shown)
    try:
        layout = build_layout(service.library, prompt or "", negative or "", spec)
        size = (whole("width", width) or 512, whole("height", height) or 512)
        picture = app_views.draw_layout(layout, *size)
    except USER_ERRORS as error:
        picture = app_views.message_picture(f"This layout cannot be used yet: {_user_message(error)}")
    return (spec, gr.update(value=picture, visible=True), *boxes_shown)


def result_overlay(gallery):
    """The first generated image with its layout's boxes drawn over it (hidden without a layout)."""
    picture = _overlay_picture(gallery)
    return gr.update(value=picture, visible=picture is not None)


def _overlay_picture(gallery):
    path = gallery_path(gallery, 0)
    if not path:
        return None
    try:
        settings = read_settings(path)
        if not isinstance(settings.get("layout"), dict):
            return None
        from PIL import Image

        with Image.open(path) as image:
            return app_views.overlay_layout(image.convert("RGB"), Layout.from_json(settings["layout"]))
    except USER_ERRORS:
        return None


def gallery_path(gallery, index) -> str | None:
    """The file of gallery item ``index`` (the first when ``index`` is None or out of range)."""
    items = list(gallery or [])
    if not items:
        return None
    item = items[index] if isinstance(index, int) and 0 <= index < len(items) else items[0]
    path = item[0] if isinstance(item, (list, tuple)) else item
    return (file_paths(path) or [None])[0]


def image_settings(gallery, index, rows: int):
    """The "Use the selected image's settings" button: ``load_settings`` of the gallery's selected image
    (the first when none is selected)."""
    path = gallery_path(gallery, index)
    if path is None:
        gr.Info("Nothing to use yet: generate an image first")
        count = 8 + 2 * rows + 1 + app_values.BOX_FIELDS * rows + rows
        return (*(gr.skip(),) * count, gr.skip())
    fields = load_settings(path, rows)
    gr.Info(fields[-1].replace("**", ""))  # a toast (HTML, escaped): the message's own place may be folded
    return fields


def load_settings(file, rows: int):
    """The "Load settings from a PNG" upload: every Generate field from the PNG's stored settings.

    Returns (prompt, negative, seed, steps, guidance, width, height, scheduler, *names, *strengths,
    layout mode, *box values, *region prompts, message); a PNG without settings changes nothing and
    says why in the message."""
    paths = file_paths(file)
    count = 8 + 2 * rows + 1 + app_values.BOX_FIELDS * rows + rows
    if not paths:
        return (*(gr.skip(),) * count, "")
    try:
        loaded = app_values.loaded_settings(read_settings(paths[0]), rows, Path(paths[0]).name)
    except USER_ERRORS as error:
        return (*(gr.skip(),) * count, f"**Could not load settings:** {html.escape(_user_message(error))}")
    scheduler = loaded.scheduler if loaded.scheduler in SCHEDULERS else "default"
    names = [gr.update(value=name) for name in loaded.names]  # kept even when not (yet) a choice
    boxes = [value for box in loaded.boxes for value in box]
    return (loaded.prompt, loaded.negative, loaded.seed, loaded.steps, loaded.guidance, loaded.width, loaded.height,
            scheduler, *names, *loaded.strengths, loaded.layout_mode, *boxes, *loaded.region_prompts,
            html.escape(loaded.message))
