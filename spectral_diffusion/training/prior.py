"""Class images for prior preservation: the base model's own pictures of the class word.

They are made before the concept is created (so by the untouched base model), seeded from the run's
seed, and kept in ``config.class_images_dir`` when one is given so later runs reuse them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from spectral_diffusion.atomic import atomic_path
from spectral_diffusion.errors import TrainingCancelled
from spectral_diffusion.generation.diffusion import generate
from spectral_diffusion.images import IMAGE_EXTENSIONS, open_image
from spectral_diffusion.training.config import TrainConfig
from spectral_diffusion.training.data import Stream, caption_templates, mix_seed

logger = logging.getLogger(__name__)


def class_prompt(class_word: str) -> str:
    return caption_templates("", class_word)[0]


def class_images(pipe, config: TrainConfig, should_stop: Callable[[], bool] | None = None) -> list[Image.Image]:
    """Prior-preservation images of the class word by the base model; reused from class_images_dir."""
    wanted = config.num_class_images
    folder = Path(config.class_images_dir) if config.class_images_dir else None
    have = []
    if folder is not None and folder.is_dir():
        have = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    images = [open_image(path) for path in have[:wanted]]
    prompt, batch = class_prompt(config.class_word), max(1, min(4, config.batch_size * 2))
    while len(images) < wanted:
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"training of {config.name!r} cancelled while making class images")
        count = min(batch, wanted - len(images))
        seed = mix_seed(config.seed, Stream.CLASS_IMAGES, len(images))
        steps, guidance = config.class_inference_steps, config.guidance_scale
        made = generate(pipe, prompt, count, config.resolution, steps, guidance, seed)
        for image in made:
            if folder is not None:
                with atomic_path(folder / f"class-{len(images):04d}.png") as tmp:
                    image.save(tmp, format="PNG")
            images.append(image)
    logger.info("%d class images of %r for prior preservation", len(images), prompt)
    return images
