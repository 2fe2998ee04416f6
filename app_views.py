"""What the web app shows, without gradio: the training progress line, concept cards, the library
table, and the pictures drawn with PIL (a regional layout as coloured boxes, the same boxes over a
generated image). app_ui.py puts these into widgets."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from spectral_diffusion.frontends.service import TrainingStatus
from spectral_diffusion.generation.layout import Layout

# one colour per region, in region order (distinct on white and over photos)
COLOURS = [(230, 80, 70), (60, 130, 230), (60, 170, 90), (240, 170, 40), (160, 90, 210), (30, 180, 190),
           (220, 90, 170), (120, 120, 120)]
# The layout pictures are shown in widgets of this box (CSS px: app_tabs.py gives them this height and this
# minimum width; side by side in the result column at 1280 px each is about this wide). They are drawn at
# PICTURE_SCALE times it, so that labels of LABEL_PX on the page are crisp on high-density screens too.
LAYOUT_WIDGET = (290, 240)
PICTURE_SCALE = 2
LABEL_PX = 16  # the labels' font size on the page (CSS px)
CONTEXT_FILL = (244, 245, 248)
TABLE_HEADERS = ["name", "trigger token", "slot", "variant", "rank", "class word", "images", "base model", "created"]


# ----- regional layouts ----------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def canvas_size(width: int, height: int) -> tuple[int, int]:
    """The drawing size of a ``width`` x ``height`` image: its aspect ratio, fitted into the layout widget's
    box times ``PICTURE_SCALE`` (so the page shows it at 1 / PICTURE_SCALE, whatever its shape)."""
    width, height = max(int(width), 1), max(int(height), 1)
    scale = min(LAYOUT_WIDGET[0] * PICTURE_SCALE / width, LAYOUT_WIDGET[1] * PICTURE_SCALE / height)
    return max(round(width * scale), 1), max(round(height * scale), 1)


def shown_scale(size: tuple[int, int]) -> float:
    """How much smaller a picture of ``size`` appears in a layout widget (object-fit: contain)."""
    return min(LAYOUT_WIDGET[0] / size[0], LAYOUT_WIDGET[1] / size[1], 1.0)


LABEL_FONT = LABEL_PX * PICTURE_SCALE  # the labels' font size on a canvas


def region_label(layout: Layout, index: int) -> str:
    region = layout.regions[index]
    name = region.concept or "(no concept)"
    return name if region.prompt is None else f"{name}: {region.prompt}"


def _draw_boxes(image: Image.Image, layout: Layout, fill_alpha: int) -> Image.Image:
    """``image`` with the layout's boxes drawn on it (translucent fill, solid outline, the region's label)."""
    base = image.convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    width, height = base.size
    line = 2 * PICTURE_SCALE
    font = _font(LABEL_FONT)
    for index, region in enumerate(layout.regions):
        colour = COLOURS[index % len(COLOURS)]
        x0, y0, x1, y1 = region.box
        box = (round(x0 * width), round(y0 * height), round(x1 * width) - 1, round(y1 * height) - 1)
        draw.rectangle(box, fill=(*colour, fill_alpha), outline=(*colour, 255), width=line)
        label = _fit(draw, region_label(layout, index), font, box[2] - box[0] - 2 * line - 4)
        # centred in its box: a widget's own label covers the picture's top-left corner
        size = draw.textbbox((0, 0), label, font=font)
        left = (box[0] + box[2] - (size[2] - size[0])) // 2
        top = (box[1] + box[3] - (size[3] - size[1])) // 2
        bounds = draw.textbbox((left, top), label, font=font)
        draw.rectangle((bounds[0] - 4, bounds[1] - 2, bounds[2] + 4, bounds[3] + 2), fill=(*colour, 230))
        draw.text((left, top), label, fill=(255, 255, 255, 255), font=font)
    return Image.alpha_composite(base, overlay).convert("RGB")


def _fit(draw: ImageDraw.ImageDraw, text: str, font, room: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``room`` pixels."""
    if room <= 0 or draw.textlength(text, font=font) <= room:
        return text
    while len(text) > 1 and draw.textlength(text + "…", font=font) > room:
        text = text[:-1]
    return text + "…"


def draw_layout(layout: Layout, width: int, height: int) -> Image.Image:
    """The layout on an empty canvas of the image's shape: the context prompt outside every box."""
    size = canvas_size(width, height)
    canvas = Image.new("RGB", size, CONTEXT_FILL)
    draw = ImageDraw.Draw(canvas)
    font = _font(LABEL_FONT)
    context = _fit(draw, f"context: {layout.prompt}", font, size[0] - 16)
    draw.text((8, size[1] - font.size - 12), context, fill=(90, 90, 100), font=font)
    return _draw_boxes(canvas, layout, fill_alpha=90)


def overlay_layout(image: Image.Image, layout: Layout) -> Image.Image:
    """The generated ``image`` with the layout's boxes over it, at the size of ``canvas_size`` (labels of the
    same size whatever the image's; a tiny image is scaled up pixel by pixel, keeping its own pixels)."""
    size = canvas_size(*image.size)
    if image.size != size:
        smaller = size[0] < image.size[0]
        image = image.resize(size, Image.Resampling.LANCZOS if smaller else Image.Resampling.NEAREST)
    return _draw_boxes(image, layout, fill_alpha=40)


def loss_chart(losses: Sequence[tuple[int, float]], width: int = 480, height: int = 200) -> Image.Image | None:
    """The training loss per step as a line on a white card, with the first, lowest and last loss."""
    if not losses:
        return None
    chart = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(chart)
    font = _font(12)
    left, right, top, bottom = 56, width - 12, 32, height - 24  # top: room for the widget's own label
    steps = [step for step, _ in losses]
    values = [loss for _, loss in losses]
    low, high = min(values), max(values)
    span, first = (high - low) or 1.0, steps[0]
    step_span = (steps[-1] - first) or 1

    def point(step, loss):
        return (left + (right - left) * (step - first) / step_span, bottom - (bottom - top) * (loss - low) / span)

    draw.rectangle((left, top, right, bottom), outline=(200, 202, 210))
    for value, y in ((high, top), (low, bottom)):
        draw.text((4, y - 7), f"{value:.4f}", fill=(90, 90, 100), font=font)
    draw.text((left, bottom + 6), f"step {first}", fill=(90, 90, 100), font=font)
    last = f"step {steps[-1]} · loss {values[-1]:.4f}"
    draw.text((right - draw.textlength(last, font=font), bottom + 6), last, fill=(90, 90, 100), font=font)
    points = [point(s, v) for s, v in losses]
    if len(points) == 1:
        points = points * 2
    draw.line(points, fill=COLOURS[1], width=2)
    return chart


def message_picture(text: str) -> Image.Image:
    """A picture that says why there is no layout to draw: a layout widget's width, its labels' size, as
    tall as the text (at most the widget)."""
    width, most = LAYOUT_WIDGET[0] * PICTURE_SCALE, LAYOUT_WIDGET[1] * PICTURE_SCALE
    font, pitch, margin = _font(LABEL_FONT), round(LABEL_FONT * 1.25), 8 * PICTURE_SCALE
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line = [], ""
    for word in text.split():
        if measure.textlength(f"{line} {word}".strip(), font=font) > width - 2 * margin and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines = [*lines, line][: (most - 2 * margin) // pitch]
    canvas = Image.new("RGB", (width, 2 * margin + pitch * len(lines)), CONTEXT_FILL)
    draw = ImageDraw.Draw(canvas)
    for row, text_line in enumerate(lines):
        draw.text((margin, margin + pitch * row), text_line, fill=(150, 60, 50), font=font)
    return canvas


# ----- the Train and Library tabs ------------------------------------------------------------------


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
        if status.state == "cancelled":
            text = f"Cancelled {name} at step {status.step}/{total}: the library is unchanged"
        elif status.state == "failed":
            text = f"{name}: {html.escape(status.message)}"
    return (
        f'<div class="sd-status"><div class="sd-bar"><div style="width:{fraction * 100:.1f}%"></div></div>'
        f'<span id="train-status-text">{text}</span></div>'
    )


def problem_html(message: str) -> str:
    """The Train tab's status line when a training cannot start or fails: the one place it is shown."""
    return (f'<div class="sd-status"><div class="sd-bar"><div style="width:0%"></div></div>'
            f'<span id="train-status-text" class="sd-problem">{html.escape(message)}</span></div>')


def status_json(status: TrainingStatus, record=None) -> dict:
    """What the ``train_concept`` endpoint says about a run, as data (the page shows ``progress_html``).

    ``state``: preparing, running, done, cancelled or failed; ``slot`` once reserved; ``token`` (and the
    final ``slot``) from the library ``record`` once done."""
    data = {
        "name": status.name,
        "state": status.state,
        "step": status.step,
        "total_steps": status.total_steps,
        "loss": None if status.loss is None else float(status.loss),
        "eta_seconds": None if status.eta_seconds is None else round(float(status.eta_seconds), 1),
        "slot": status.slot,
        "token": None,
        "message": status.message,
    }
    if record is not None:
        data.update(slot=record.slot, token=record.token)
    return data


def record_summary(record: dict, done: str) -> str:
    """A concept record (``record_json``) as one readable Markdown line; ``done`` says what happened
    ("Trained", "Imported")."""
    if not record:
        return ""
    tokens = " ".join(f"`{token}`" for token in record.get("tokens") or [record.get("token")])
    text = f"**{done} {html.escape(str(record.get('name')))}**: trigger token {tokens}, slot {record.get('slot')}"
    if record.get("base_model"):
        text += f" of `{record['base_model']}`"
    text += f" (rank {record.get('rank')}, {record.get('variant')})"
    if record.get("class_word"):
        text += f", class word “{html.escape(str(record['class_word']))}”"
    if record.get("image_count"):
        text += f", {record['image_count']} photo{'s' if record['image_count'] != 1 else ''}"
    if record.get("this_model", True):
        return f"{text}. Write {tokens} in a prompt on the Generate tab to draw it."
    return f"{text}. It was made for another base model: it cannot be used with this one."


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


def _short_date(created_at: str) -> str:
    """"2025-01-02T03:04:05+00:00" as "2025-01-02 03:04" (the table's column stays narrow)."""
    text = str(created_at or "")
    return text[:16].replace("T", " ") if len(text) >= 16 and text[10:11] == "T" else text


def table_row(record) -> list:
    return [record.name, " ".join(record.tokens), record.slot, record.variant, record.rank, record.class_word,
            record.image_count, record.base_model, _short_date(record.created_at)]
