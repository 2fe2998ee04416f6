"""The web app's handlers: what each button and API endpoint does, as plain functions.

Every handler takes the ``Service`` first, then the values of its input widgets in the order app.py
wires them, and returns what its output widgets show, so it can be called (and tested) without a
browser. app.py lays out the page and binds the handlers to the service. Bad input, the package's
``SpectralDiffusionError`` and the app's own ``InputError``, is shown to the user as ``gr.Error``;
anything else is a bug: logged with its traceback, shown as a generic internal error.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import gradio as gr

from spectral_diffusion.core.strengths import format_concepts, parse_concepts
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.frontends.service import Service, TrainingStatus
from spectral_diffusion.frontends.workflows import TrainRequest
from spectral_diffusion.models.registry import default_rank

# app.py runs as __main__, so the app's loggers are named, not __name__: "app" configures them all
logger = logging.getLogger("app.handlers")

POLL_SECONDS = 0.5  # how often a running training's progress is sent to the page
INTERNAL_ERROR = "internal error, see the server log"
TABLE_HEADERS = ["name", "trigger token", "slot", "variant", "rank", "class word", "images", "base model", "created"]


# ----- errors ---------------------------------------------------------------------------------------


class InputError(ValueError):
    """A widget or API value the app itself refuses (missing, not a number, out of range)."""


USER_ERRORS = (SpectralDiffusionError, InputError)


def _user_message(error: Exception) -> str:
    # gradio 6 shows an error's text verbatim (trigger tokens like <my-dog> stay visible): no escaping
    return str(error) or type(error).__name__


def _shown_error(error: Exception, where: str) -> gr.Error:
    """The ``gr.Error`` the page shows for ``error``: its message for bad input, a generic one for a bug."""
    if isinstance(error, USER_ERRORS):
        return gr.Error(_user_message(error), print_exception=False)
    logger.error("internal error in %s", where, exc_info=error)
    return gr.Error(INTERNAL_ERROR, print_exception=False)


def user_errors(fn: Callable) -> Callable:
    """Raise every error of ``fn`` as ``gr.Error`` (see ``_shown_error``); keeps generators generators."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as error:
                raise _shown_error(error, fn.__name__) from error

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:
            raise _shown_error(error, fn.__name__) from error

    return wrapper


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


# ----- views ----------------------------------------------------------------------------------------


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def progress_html(status: TrainingStatus) -> str:
    """The Train tab's progress bar: state, step, loss and ETA."""
    name = html.escape(status.name)
    if status.state == "done":
        fraction, text = 1.0, f"Done: {html.escape(status.message)}"
    elif status.state == "idle":
        fraction, text = 0.0, html.escape(status.message)
    elif status.state == "preparing":
        fraction, text = 0.0, f"{name + ': ' if name else ''}{html.escape(status.message or 'preparing')}…"
    else:
        total = max(status.total_steps, 1)
        fraction = status.step / total
        loss = "…" if status.loss is None else f"{status.loss:.4f}"
        text = f"Training {name}: step {status.step}/{total} · loss {loss} · ETA {_eta(status.eta_seconds)}"
        if status.state in ("cancelled", "failed"):
            text = f"{name}: {html.escape(status.message)}"
    return (
        f'<div class="sd-status"><div class="sd-bar"><div style="width:{fraction * 100:.1f}%"></div></div>'
        f'<span id="train-status-text">{text}</span></div>'
    )


def record_json(record, this_model: bool = True) -> dict:
    """What the API says about one concept (no server paths)."""
    return {
        "name": record.name,
        "token": record.token,
        "tokens": list(record.tokens),
        "slot": record.slot,
        "rank": record.rank,
        "variant": record.variant,
        "class_word": record.class_word,
        "base_model": record.base_model,
        "base_fingerprint": record.base_fingerprint,
        "created_at": record.created_at,
        "image_count": record.image_count,
        "this_model": this_model,
    }


def card(record):
    """(image, caption) of a concept's card: its preview, or a grey square when it has none."""
    from PIL import Image

    image = None
    if record.preview_path is not None and Path(record.preview_path).is_file():
        try:
            with Image.open(record.preview_path) as raw:
                image = raw.convert("RGB")
        except OSError:
            image = None
    if image is None:
        image = Image.new("RGB", (64, 64), (225, 228, 235))
    return image, record.token or record.name


def stack_images(images):
    """Pictures one under the other on white (the slot maps of several base models as one image)."""
    from PIL import Image

    if not images:
        return None
    width = max(image.width for image in images)
    out = Image.new("RGB", (width, sum(image.height for image in images)), (255, 255, 255))
    top = 0
    for image in images:
        out.paste(image, (0, top))
        top += image.height
    return out


def table_row(record) -> list:
    return [record.name, " ".join(record.tokens), record.slot, record.variant, record.rank, record.class_word,
            record.image_count, record.base_model, record.created_at]


# ----- API endpoints --------------------------------------------------------------------------------


@user_errors
def train_concept(service: Service, images, name, class_word, variant, rank, steps):
    """Start a training, then yield (progress html, previews, record) until it ends."""
    paths = file_paths(images)
    if not paths:
        raise InputError("upload the concept's images first (3-20 photos work best)")
    name = (name or "").strip()
    if not name:
        raise InputError("give the concept a name, e.g. my-dog (its trigger token will be <my-dog>)")
    future = service.start_training(TrainRequest(
        name=name,
        images=paths,
        class_word=(class_word or "").strip(),
        variant=variant or "additive",
        rank=whole("rank", rank) or None,
        steps=whole("steps", steps) or None,
    ))
    shown = -1  # how many previews the page has: resend the gallery only when one is added
    while True:
        try:
            record = future.result(timeout=POLL_SECONDS)
            break
        except FutureTimeout:
            status = service.status
            previews = gr.skip()
            if len(status.previews) != shown:
                shown = len(status.previews)
                previews = list(status.previews)
            yield progress_html(status), previews, gr.skip()
        except Exception:
            yield progress_html(service.status), gr.skip(), gr.skip()  # show "cancelled" / "failed"
            raise
    yield progress_html(service.status), list(service.status.previews), record_json(record)


@user_errors
def cancel_training(service: Service) -> str:
    if service.cancel_training():
        return "cancelling: the training stops after its current step"
    return "no training is running"


@user_errors
def list_concepts(service: Service) -> list[dict]:
    fingerprint = service.fingerprint
    return [record_json(r, r.base_fingerprint == fingerprint) for r in service.concepts(this_model_only=False)]


@user_errors
def delete_concept(service: Service, name, confirm) -> str:
    if not name:
        raise InputError("pick the concept to delete")
    if not confirm:
        raise InputError(f"tick “I am sure” to delete {name}: this cannot be undone")
    service.delete_concept(name)
    return f"deleted {name}"


@user_errors
def import_concept(service: Service, file, name) -> dict:
    paths = file_paths(file)
    if len(paths) != 1:
        raise InputError("upload one adapter file (.safetensors)")
    return record_json(service.import_concept(paths[0], name=(name or "").strip() or None))


@user_errors
def export_concept(service: Service, name, format) -> list[str]:
    if not name:
        raise InputError("pick the concept to download")
    return [str(p) for p in service.export_concept(name, format or "spectral")]


@user_errors
def generate(service: Service, prompt, concepts, negative, seed, steps, guidance, width, height, num_images,
             scheduler) -> tuple[list[str], str]:
    """(image paths, "N image(s), seed S"); a negative or empty seed draws a random one."""
    seed_value = None if seed is None or seed == "" or real("seed", seed) < 0 else whole("seed", seed)
    images = service.generate(
        prompt or "",
        parse_concepts(concepts or ""),
        negative_prompt=negative or "",
        seed=seed_value,
        steps=whole("steps", steps, 1),
        guidance=real("guidance", guidance),
        width=whole("width", width) or None,
        height=whole("height", height) or None,
        num_images=whole("num_images", num_images, 1),
        scheduler=scheduler or "default",
    )
    used = images[0].info.get("seed", seed_value) if images else seed_value
    paths = service.save_images(images, stem=f"seed{used}")
    return [str(p) for p in paths], f"{len(paths)} image(s), seed {used}"


@user_errors
def export_fused(service: Service, concepts, format) -> list[str]:
    chosen = parse_concepts(concepts or "")
    if not chosen:
        raise InputError("pick at least one concept to fuse")
    return [str(p) for p in service.export_fused(chosen, format or "spectral")]


# ----- page helpers (private events) ----------------------------------------------------------------


def slot_info(service: Service, rank) -> str:
    """The Train tab's hint: the slot the next concept of this rank takes, or why there is none."""
    try:
        rank = whole("rank", rank) or default_rank(service.model)
        slot = service.next_slot(rank)
        capacity = service.capacity(rank)
    except USER_ERRORS as error:
        return f"**No slot available:** {html.escape(str(error))}"
    return (f"This concept will take **slot {slot}** of `{service.model}` "
            f"(rank {rank}: {capacity} slots of singular vectors).")


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


def pick_concept(service: Service, index: int, names: Sequence[str], prompt, *rows):
    """Clicking concept card ``index``: its trigger token goes into the prompt, the concept into a free row.
    Returns (prompt, *rows)."""
    if not names or index >= len(names):
        return (gr.skip(),) * (1 + len(rows))
    name = names[index]
    record = next((r for r in service.concepts() if r.name == name), None)
    token = record.token if record else f"<{name}>"
    prompt = prompt or ""
    if token not in prompt:
        prompt = f"{prompt.rstrip()} {token}".strip()
    values = list(rows)
    if name not in values:
        free = next((i for i, v in enumerate(values) if not v), None)
        if free is not None:
            values[free] = name
    return (prompt, *values)


def select_card(index: int, names: Sequence[str]):
    """The name of the library card clicked (no change when the list moved under the click)."""
    return names[index] if names and index < len(names) else gr.skip()


def rows_to_spec(*values) -> str:
    """The concept rows' names then strengths (as many of each) as a concepts text, "dog,cat:0.8"."""
    half = len(values) // 2
    chosen = {}
    for name, strength in zip(values[:half], values[half:], strict=True):
        if name:
            chosen[name] = float(strength)
    return format_concepts(chosen)
