"""The page's own handlers (no API endpoint): the Train button, the hints and views that follow what is
typed and clicked, the layout editor, and a PNG's settings back into the Generate form.

Inputs come by name: the parameters are named after the widgets they read (``webapp/layout.py``,
``webapp/layout_generate.py``; a ``row_...`` name is a list, one value per concept row). A handler with
several outputs returns them by name, a dict of widget name to value: a widget it leaves out stays as it
is. ``webapp/events.py`` maps the names to the widgets.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import gradio as gr

from spectral_diffusion.core.strengths import format_concepts
from spectral_diffusion.errors import TrainingCancelled
from spectral_diffusion.frontends.service import Service
from spectral_diffusion.frontends.workflows import build_layout
from spectral_diffusion.generation.layout import Layout
from spectral_diffusion.generation.pnginfo import read_settings
from spectral_diffusion.generation.schedulers import SCHEDULERS
from spectral_diffusion.models.registry import default_rank
from webapp import drawings, forms
from webapp.calls import INTERNAL_ERROR, USER_ERRORS, log_done, user_message
from webapp.forms import TrainForm, file_paths, whole
from webapp.handlers import TrainingRun
from webapp.render import problem_html, progress_html, record_json, record_summary, table_row

logger = logging.getLogger(__name__)


# ----- the Train tab --------------------------------------------------------------------------------


def train_on_page(service: Service, **form):
    """The Train button: like ``train_concept`` but for the page, so nothing ends as an Error badge.
    ``form``: the Train tab's values by name (``TrainForm``'s fields).

    Yields updates of progress, previews, trained (the summary line), loss_chart, cancel_message, name,
    images and masks.
    A cancel is a neutral notice and the previews stay; bad input is one message in the status line; the
    cancel line is cleared at the end. A success says what was trained and empties the name box: the name
    is taken now, and the slot line shows where the next concept goes (not "Name taken" for the concept
    just trained). It empties the photos and masks too (their change empties the thumbnails and captions):
    photos dropped for the next concept are added to those in the box, and would train it on both.
    """
    started, values = time.monotonic(), TrainForm(**form)
    name, run = values.name or "", None
    try:
        run = TrainingRun(service, values.request(service))
        chart_points = [-1]

        def shown(status, previews):
            update = {"progress": progress_html(status)}
            if previews is not None:
                update["previews"] = previews
            if len(run.losses) != chart_points[0]:
                chart_points[0] = len(run.losses)
                update["loss_chart"] = run.chart()
            return update

        yield {"progress": progress_html(service.status), "trained": ""}  # no earlier result
        record = yield from run.follow(shown)
    except TrainingCancelled:
        logger.info("train %s: cancelled at step %d (%.1f s)", name, service.status.step, time.monotonic() - started)
        gr.Info(f"Training of {name} cancelled: nothing was added to the library")
        yield {
            "progress": progress_html(service.status),
            "trained": "",
            "loss_chart": run.chart(),
            "cancel_message": "",
        }
        return
    except Exception as error:  # noqa: BLE001 - every outcome is shown in the status line
        message = user_message(error) if isinstance(error, USER_ERRORS) else INTERNAL_ERROR
        if isinstance(error, USER_ERRORS):
            logger.info("train %s refused: %s", name, message)
        else:
            logger.error("train %s: internal error", name, exc_info=error)
        yield {"progress": problem_html(message), "trained": "", "cancel_message": ""}
        return
    log_done(f"train {name}", started, f"trained into slot {record.slot}")
    yield {
        "progress": progress_html(service.status),
        "previews": run.previews(),
        "trained": record_summary(record_json(record), "Trained"),
        "loss_chart": run.chart(),
        "cancel_message": "",
        "name": "",
        "images": None,
        "masks": None,
    }


def upload_thumbnails(images) -> list[str]:
    """The uploaded photos as a gallery (thumbnails instead of a file list; caption files left out)."""
    return forms.split_uploads(images, strict=False)[0]


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
    return (
        f"This concept will take **slot {slot}** of `{service.model}` "
        f"(rank {rank}: {capacity} slots of singular vectors)."
    )


# ----- the Library tab and the shared refresh -------------------------------------------------------


def refresh(service: Service, selected, row_names: Sequence) -> dict:
    """Every library view after a change: slot maps, library cards, table, JSON listing, the library's
    pick (``selected``), the Generate tab's cards, both card lists' names, and each concept row's choices."""
    fingerprint = service.fingerprint
    records = service.concepts(this_model_only=False)
    here = [r for r in records if r.base_fingerprint == fingerprint]
    names = [r.name for r in here]
    all_names = [r.name for r in records]
    return {
        "slot_maps": drawings.stack_images([image for _, image in service.slot_maps()]),
        "library_cards": [drawings.card(r) for r in records],
        "table": [table_row(r) for r in records],
        "listing": [record_json(r, r.base_fingerprint == fingerprint) for r in records],
        "selected": gr.Dropdown(choices=all_names, value=selected if selected in all_names else None),
        "generate_cards": [drawings.card(r) for r in here],
        "generate_card_names": names,
        "library_card_names": all_names,
        "row_names": [gr.Dropdown(choices=names, value=v if v in names else None) for v in row_names],
    }


def select_card(index: int, names: Sequence[str]):
    """The name of the library card clicked (no change when the list moved under the click)."""
    return names[index] if names and index < len(names) else gr.skip()


def imported_summary(record) -> str:
    """The Library tab's line after an import (cleared when the import failed)."""
    return record_summary(record, "Imported") if isinstance(record, dict) else ""


# ----- the Generate tab -----------------------------------------------------------------------------


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


def pick_concept(
    service: Service, index: int, card_names: Sequence[str], prompt, prompt_cursor, row_names: Sequence
) -> dict:
    """Clicking concept card ``index``: its trigger token goes into the prompt at the cursor (the prompt
    box's last caret position, -1: the end), the concept into a free row. Updates prompt, prompt_cursor
    (after the token) and row_names."""
    if not card_names or index >= len(card_names):
        return {}
    name = card_names[index]
    record = next((r for r in service.concepts() if r.name == name), None)
    token = record.token if record else f"<{name}>"
    update = {}
    if token not in (prompt or ""):
        update["prompt"], update["prompt_cursor"] = insert_token(prompt, token, prompt_cursor)
    rows = list(row_names)
    if name not in rows:
        free = next((i for i, v in enumerate(rows) if not v), None)
        if free is not None:
            rows[free] = name
    return {**update, "row_names": rows}


def rows_to_spec(row_names: Sequence, row_strengths: Sequence) -> str:
    """The concept rows as a concepts text, "dog,cat:0.8"."""
    chosen = {name: float(strength) for name, strength in zip(row_names, row_strengths, strict=True) if name}
    return format_concepts(chosen)


def layout_editor(
    service: Service,
    layout_mode,
    prompt,
    negative,
    width,
    height,
    row_names: Sequence,
    row_boxes: Sequence[Sequence],
    region_prompts: Sequence,
) -> dict:
    """The layout editor after any change: the layout text for the generate endpoint, its picture, and
    which rows' box editors show (box_rows: a custom layout's named rows)."""
    spec = forms.layout_spec(layout_mode, prompt, negative, row_names, row_boxes, region_prompts)
    update = {
        "layout_text": spec,
        "box_rows": [gr.update(visible=layout_mode == forms.CUSTOM and bool(name)) for name in row_names],
    }
    if not spec:
        return {**update, "layout_picture": gr.update(value=None, visible=False)}
    try:
        layout = build_layout(service.library, prompt or "", negative or "", spec)
        size = (whole("width", width) or 512, whole("height", height) or 512)
        picture = drawings.draw_layout(layout, *size)
    except USER_ERRORS as error:
        picture = drawings.message_picture(f"This layout cannot be used yet: {user_message(error)}")
    return {**update, "layout_picture": gr.update(value=picture, visible=True)}


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
            return drawings.overlay_layout(image.convert("RGB"), Layout.from_json(settings["layout"]))
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


def image_settings(gallery, selected_image) -> dict:
    """The "Use the selected image's settings" button: ``load_settings`` of the gallery's selected image
    (the first when none is selected)."""
    path = gallery_path(gallery, selected_image)
    if path is None:
        gr.Info("Nothing to use yet: generate an image first")
        return {}
    fields = load_settings(path)
    gr.Info(fields["settings_message"].replace("**", ""))  # a toast (HTML, escaped): its own place may be folded
    return fields


def load_settings(settings_file) -> dict:
    """The "Load settings from a PNG" upload: every Generate field from the PNG's stored settings, by the
    names of ``forms.LoadedSettings``; a PNG without settings changes nothing and says why in the
    settings_message."""
    paths = file_paths(settings_file)
    if not paths:
        return {"settings_message": ""}
    try:
        loaded = forms.loaded_settings(read_settings(paths[0]), Path(paths[0]).name)
    except USER_ERRORS as error:
        return {"settings_message": f"**Could not load settings:** {html.escape(user_message(error))}"}
    fields = dict(vars(loaded))
    fields["scheduler"] = loaded.scheduler if loaded.scheduler in SCHEDULERS else "default"
    fields["row_names"] = [gr.update(value=name) for name in loaded.row_names]  # kept even when not (yet) a choice
    fields["settings_message"] = html.escape(loaded.settings_message)
    return fields
