"""One generation request: prompt, fused concepts with strengths and sampler settings, validated."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from spectral_diffusion.core.strengths import format_concepts, is_finite_number, normalize_strengths
from spectral_diffusion.core.tokens import TOKEN_BODY
from spectral_diffusion.errors import RequestError
from spectral_diffusion.generation.layout import Layout, concept_overlaps
from spectral_diffusion.generation.schedulers import SCHEDULERS

logger = logging.getLogger(__name__)

# how the concepts are applied: in factored form, or merged into the weights
MODES = ("live", "baked")
# how a layout is drawn: one UNet pass per region with only its concept on (generation/passes.py), or one
# pass with every concept's slot routed to its box (generation/regional.py); docs/design.md section 11
REGIONAL_MODES = ("passes", "routed")
MAX_STEPS = 200
MAX_NUM_IMAGES = 16  # images per generation request (images.MAX_IMAGES: training photos per concept)
MAX_SIDE = 4096
# a model draws sensibly up to this many times its native size per side (SD1.5: 2048 px; builtin:toy: 128 px);
# beyond it time and memory grow with the square of the side for pictures the model cannot compose
MAX_SIZE_FACTOR = 4
SIZE_MULTIPLE = 8  # diffusers' Stable Diffusion pipelines refuse other sizes
MAX_GUIDANCE = 50.0
MAX_PROMPT_CHARS = 10_000
MAX_SEED = 2**63 - 1
PROMPT_TOKEN = re.compile(TOKEN_BODY)


@dataclass(frozen=True)
class GenerationDefaults:
    """The settings a generation gets unless it says otherwise, the same in every frontend: the CLI's
    flags, ``Service.generate``, the app's widgets and ``GenerationRequest`` all read ``DEFAULTS``."""

    steps: int = 25
    guidance: float = 7.5
    seed: int = 0  # a fixed seed: the same settings give the same picture; -1 (or None) draws one
    num_images: int = 1
    scheduler: str = "default"
    negative_prompt: str = ""
    # measured on builtin:toy (docs/fusion-quality.md): both concepts drawn in 39 of 48 images by eye
    # with the left-right preset against 7 of 48 for one routed pass, at 1.35-1.7x its time (1.8x at SD1.5 size)
    regional_mode: str = "passes"


DEFAULTS = GenerationDefaults()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_range(label: str, value, low, high, integer: bool = True) -> None:
    ok = _is_int(value) if integer else is_finite_number(value)
    if not ok or not low <= value <= high:
        kind = "a whole number" if integer else "a number"
        raise RequestError(f"{label} must be {kind} from {low} to {high}, got {value!r}")


def _check_side(label: str, value) -> None:
    if value is None:
        return
    _check_range(label, value, SIZE_MULTIPLE, MAX_SIDE)
    if value % SIZE_MULTIPLE:
        raise RequestError(f"{label} must be a multiple of {SIZE_MULTIPLE} pixels, got {value}")


@dataclass
class GenerationRequest:
    """One generation: prompt, fused concepts with strengths, sampler settings. Validated on creation.

    Image k of a request is drawn from ``seed + k`` with a generator of its own (as AUTOMATIC1111 does),
    so each image stores its own seed and ``seed + k`` alone gives image k again (up to a level of rounding
    in a few pixels: batched arithmetic is not bit-identical to one image's).
    ``seed=None`` (or -1) draws a random seed (stored in each PIL image's ``info["seed"]``); ``width`` /
    ``height`` ``None`` mean the model's native size. ``mode`` ``baked`` merges the concepts into the
    weights (base-model speed), ``live`` applies them in factored form; both give the same image.
    ``layout`` composes the image regionally: each placed concept acts only in its own box (live only;
    placed concepts are selected at strength 1 unless ``concepts`` says otherwise), drawn by
    ``regional_mode``: ``passes`` (one UNet pass per region, only its concept on; the default) or
    ``routed`` (one pass, each concept's slot routed to its box: faster, less alike).
    """

    prompt: str
    negative_prompt: str = DEFAULTS.negative_prompt
    concepts: dict[str, float] = field(default_factory=dict)
    steps: int = DEFAULTS.steps
    guidance: float = DEFAULTS.guidance
    seed: int | None = DEFAULTS.seed
    width: int | None = None
    height: int | None = None
    num_images: int = DEFAULTS.num_images
    scheduler: str = DEFAULTS.scheduler
    mode: str = "live"
    layout: Layout | None = None
    regional_mode: str = DEFAULTS.regional_mode

    def __post_init__(self):
        for label, text in (("prompt", self.prompt), ("negative_prompt", self.negative_prompt)):
            if not isinstance(text, str) or len(text) > MAX_PROMPT_CHARS:
                raise RequestError(f"{label} must be text of at most {MAX_PROMPT_CHARS} characters")
        if not self.prompt.strip():
            raise RequestError("the prompt is empty; describe the picture, e.g. 'a photo of <my-dog> on a sofa'")
        self.concepts = normalize_strengths(self.concepts)
        _check_range("steps", self.steps, 1, MAX_STEPS)
        _check_range("guidance", self.guidance, 0.0, MAX_GUIDANCE, integer=False)
        if self.seed == -1:  # the app's and the CLI's "random seed"
            self.seed = None
        if self.seed is not None:
            _check_range("seed", self.seed, 0, MAX_SEED)
        _check_side("width", self.width)
        _check_side("height", self.height)
        _check_range("num_images", self.num_images, 1, MAX_NUM_IMAGES)
        if self.seed is not None and self.seed + self.num_images - 1 > MAX_SEED:
            raise RequestError(
                f"seed must be at most {MAX_SEED - self.num_images + 1} for {self.num_images} images "
                "(image k is drawn from seed + k)"
            )
        if self.scheduler not in SCHEDULERS:
            raise RequestError(f"unknown scheduler {self.scheduler!r}; use one of {sorted(SCHEDULERS)}")
        if self.mode not in MODES:
            raise RequestError(f"unknown mode {self.mode!r}; use one of {MODES}")
        if self.regional_mode not in REGIONAL_MODES:
            raise RequestError(f"unknown regional mode {self.regional_mode!r}; use one of {REGIONAL_MODES}")
        if self.layout is not None:
            self._check_layout()

    def _check_layout(self) -> None:
        if not isinstance(self.layout, Layout):
            raise RequestError(f"layout must be a Layout, got {type(self.layout).__name__}")
        if self.mode != "live":
            raise RequestError(
                "a layout routes each concept to its own region, which needs live slots: baked concepts act "
                "everywhere. Generate the layout in live mode (drop --baked)"
            )
        if (self.layout.prompt, self.layout.negative) != (self.prompt, self.negative_prompt):
            raise RequestError("the layout's prompt and negative prompt must be the request's prompt and negative")
        chosen = dict(self.concepts)
        for name in self.layout.concepts:
            if chosen and name not in chosen:
                raise RequestError(
                    f"the layout places concept {name!r}, which is not among the chosen concepts "
                    f"({', '.join(chosen)}): add it to the concepts (--concepts {format_concepts({**chosen, name: 1.0})}) "
                    "or remove its region"
                )
            # with no concepts chosen, the placed ones are selected, at strength 1
            self.concepts.setdefault(name, 1.0)
        for first, second, share in concept_overlaps(self.layout):
            logger.warning(
                "the boxes of %s and %s overlap (%.0f%% of the image): there both concepts act and their "
                "region prompts are blended; give each concept its own box unless that is what you want",
                first,
                second,
                100 * share,
            )

    @property
    def prompts(self) -> list[str]:
        """Every prompt text of the request: the prompt, the negative and each region's."""
        texts = [self.prompt, self.negative_prompt]
        if self.layout is not None:
            texts += [r.prompt or "" for r in self.layout.regions] + [r.negative or "" for r in self.layout.regions]
        return texts


def check_size_for_model(request: GenerationRequest, native: tuple[int, int]) -> None:
    """Refuse a width or height above ``MAX_SIZE_FACTOR`` times the model's native (height, width)."""
    for label, value, side in (("width", request.width, native[1]), ("height", request.height, native[0])):
        if value is not None and value > MAX_SIZE_FACTOR * side:
            raise RequestError(
                f"{label} {value} is more than {MAX_SIZE_FACTOR}x this model's native size of {native[1]}x{native[0]} "
                f"px; ask for at most {MAX_SIZE_FACTOR * side} (or leave it out for the native size)"
            )


def check_prompt_tokens(
    request: GenerationRequest, tokens: Mapping[str, Iterable[str]], selected: Iterable[str]
) -> None:
    """Every trigger token in the prompts must belong to a selected concept.

    ``tokens`` maps every loaded concept to its trigger tokens; ``selected`` names the active ones.
    """
    chosen = {token for name in selected for token in tokens[name]}
    owners = {token: name for name, concept_tokens in tokens.items() for token in concept_tokens}
    for text in request.prompts:
        for token in PROMPT_TOKEN.findall(text.lower()):
            if token in chosen:
                continue
            owner = owners.get(token)
            if owner is not None:
                raise RequestError(
                    f"prompt uses {token} but concept {owner!r} is not selected; select it with a "
                    f"non-zero strength or remove {token} from the prompt"
                )
            raise RequestError(
                f"prompt uses {token} but no loaded concept has that trigger token; "
                f"loaded concepts: {sorted(tokens) or 'none'}"
            )
