"""Draw a base model's slot map: which slots are taken, and by which concept."""

from __future__ import annotations

import hashlib

from PIL import Image, ImageDraw, ImageFont

CELL = 72
GAP = 6
FREE = (232, 234, 238)
TEXT = (25, 28, 33)


def concept_colour(name: str) -> tuple[int, int, int]:
    """A stable pastel colour per concept name."""
    digest = hashlib.sha256(name.encode()).digest()
    return tuple(150 + digest[i] % 90 for i in range(3))


def draw_slot_map(slots: dict[int, str], capacity: int, title: str = "", columns: int = 8) -> Image.Image:
    """``slots`` maps slot index -> concept name; free slots are drawn grey with their number."""
    capacity = max(capacity, max(slots, default=-1) + 1, 1)
    rows = (capacity + columns - 1) // columns
    header = 28 if title else 0
    width = columns * (CELL + GAP) + GAP
    height = header + rows * (CELL + GAP) + GAP
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    if title:
        draw.text((GAP, 8), title, fill=TEXT, font=font)
    for slot in range(capacity):
        row, col = divmod(slot, columns)
        x0, y0 = GAP + col * (CELL + GAP), header + GAP + row * (CELL + GAP)
        owner = slots.get(slot)
        draw.rounded_rectangle((x0, y0, x0 + CELL, y0 + CELL), radius=8, fill=concept_colour(owner) if owner else FREE)
        draw.text((x0 + 6, y0 + 5), f"slot {slot}", fill=TEXT, font=font)
        label = owner if owner else "free"
        draw.text((x0 + 6, y0 + CELL // 2), label[:11], fill=TEXT, font=font)
    return image
