"""The web app's pictures, drawn with PIL, without gradio: a regional layout as coloured boxes (alone, or
over a generated image), the training loss curve, a picture that says why there is no layout, concept
cards and the library's slot maps stacked. The page shows them in image widgets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from spectral_diffusion.generation.layout import Layout

# one colour per region, in region order (distinct on white and over photos)
COLOURS = [
    (230, 80, 70),
    (60, 130, 230),
    (60, 170, 90),
    (240, 170, 40),
    (160, 90, 210),
    (30, 180, 190),
    (220, 90, 170),
    (120, 120, 120),
]
# The layout pictures are shown in widgets of this box (CSS px: webapp/layout_generate.py gives them this
# height and this minimum width; side by side in the result column at 1280 px each is about this wide).
# They are drawn at PICTURE_SCALE times it, so that labels of LABEL_PX on the page are crisp on high-density screens too.
LAYOUT_WIDGET = (290, 240)
PICTURE_SCALE = 2
LABEL_PX = 16  # the labels' font size on the page (CSS px)
CONTEXT_FILL = (244, 245, 248)


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


# ----- the Library tab -----------------------------------------------------------------------------


def card(record):
    """(image, caption) of a concept's card: its preview, or a grey square when it has none."""
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
    if not images:
        return None
    width = max(image.width for image in images)
    out = Image.new("RGB", (width, sum(image.height for image in images)), (255, 255, 255))
    top = 0
    for image in images:
        out.paste(image, (0, top))
        top += image.height
    return out
