"""Pixel formats PIL's plain ``convert`` gets wrong: bring them to 8 bits per channel first.

``Image.convert("RGB")`` clips 16-bit and 32-bit integer images at 255 (a 16-bit grey photo turns
white) and truncates float images in [0, 1] to black. Both the training images (``data``) and the
library's stored copies (``library``) go through ``to_8bit`` first.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _scaled_to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    peak = float(finite.max()) if finite.size else 0.0
    low = min(float(finite.min()), 0.0) if finite.size else 0.0
    if image.mode == "F" and low >= 0.0 and peak <= 1.0:
        scale = 255.0  # a float image in [0, 1]
    elif image.mode.startswith("I;16") or (low >= 0.0 and 255.0 < peak <= 65535.0):
        scale = 255.0 / 65535.0  # 16 bits per sample
    elif low >= 0.0 and peak <= 255.0:
        scale = 1.0  # already 8-bit values in a wide container
    else:
        values = values - low  # anything else: stretch its range onto 0-255
        peak = peak - low
        scale = 255.0 / peak if peak > 0 else 1.0
    eight = np.clip(np.nan_to_num(values * scale), 0.0, 255.0).round().astype(np.uint8)
    return Image.fromarray(eight)  # 2-D uint8: mode L


def to_8bit(image: Image.Image) -> Image.Image:
    """``image`` unchanged, or as 8-bit L when PIL's ``convert`` would damage it."""
    if image.mode in WIDE_MODES:
        return _scaled_to_8bit(image)
    return image
