"""What defines a training run (``TrainConfig``, validated on creation) and what a run reports back.

Default steps and resolution per model (``steps=None``, ``resolution=None``): the resolution is the
UNet's native one (``sample_size * vae_scale_factor``: 64 px for the built-in tiny models, 512 for
SD1.5, 768 for SD2, 1024 for SDXL); steps are 150 at 128 px or less (built-in models train in minutes
on a CPU), 400 up to 256 px and 1000 above (the paper's setting for SD1.5, also used for SDXL).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from PIL import Image

from spectral_diffusion.core.config import VARIANTS, TargetConfig
from spectral_diffusion.core.tokens import default_token, validate_token
from spectral_diffusion.errors import ConfigError
from spectral_diffusion.formats.adapter_file import AdapterData

MIXED_PRECISION = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# "uniform": one learning rate per component; "spectrum": the slot factors' steps are divided by the
# slot's singular values, so an update moves dW by about lr whatever s_k is (see training/lr_scale.py).
LR_SCALES = ("uniform", "spectrum")
DEFAULT_BACKGROUND_WEIGHT = 0.1  # loss weight of background latents when foreground masks are given
# Local paths: not part of what an adapter records about its training.
LOCAL_FIELDS = ("checkpoint_dir", "class_images_dir", "mask_dir")
# Sanity limits: 20x the longest default run (1000 steps on SD models; a concept is learnt in a few
# hundred), and a training resolution of at most 4x the model's native one.
MAX_STEPS = 20_000
MAX_RESOLUTION_FACTOR = 4


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(name: str, value, minimum=1) -> None:
    if not _is_number(value) or value < minimum:
        raise ConfigError(f"{name} must be a number of at least {minimum}, got {value!r}")


@dataclass
class TrainConfig:
    """Everything that defines one training run. ``steps`` / ``resolution`` None: the model's default."""

    name: str
    tokens: list[str] = field(default_factory=list)  # empty: [f"<{name}>"]
    class_word: str = ""
    rank: int = 8
    slot: int = 0
    variant: str = "additive"
    targets: str = "attention"  # TargetConfig preset
    steps: int | None = None
    resolution: int | None = None
    batch_size: int = 2  # per process: data-parallel runs see batch_size x processes per step
    gradient_accumulation: int = 1
    lr_unet: float = 1e-4
    lr_text: float = 1e-5
    lr_embedding: float = 1e-3
    lr_warmup_steps: int = 0
    lr_scale: str = "uniform"  # LR_SCALES
    train_c: bool = True  # False: the singular-value shift c stays zero (a diagnostic)
    weight_decay: float = 1e-2  # spectral parameters only; embeddings are not decayed toward zero
    max_grad_norm: float | None = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    cpu: bool = False  # train on the CPU even where a GPU is present
    random_crop: bool = True
    flip_p: float = 0.5
    min_image_size: int | None = None  # None: half the resolution
    # Foreground masks (white = concept), same file names as the images; the loss on background
    # latents is multiplied by background_weight (None: DEFAULT_BACKGROUND_WEIGHT with masks, else 1).
    mask_dir: str | None = None
    background_weight: float | None = None
    # Zoom-out / shift of a photo onto its own background, with probability augment_p per example:
    # the photo (or, with a mask, the concept alone) is scaled by a factor in [augment_min_scale,
    # augment_max_scale] and placed at random; position and size words of the caption follow.
    augment_p: float = 0.0
    augment_min_scale: float = 0.5
    augment_max_scale: float = 1.0
    # Two photos side by side with one two-object caption, with probability pair_p per example (each
    # concept scaled as above): the trigger token learns to stand second in a prompt, beside another object.
    pair_p: float = 0.0
    # The concept redrawn in another colour of the model's caption grammar, the caption's colour word
    # following, with probability recolour_p per example (never without a grammar with colours). The
    # colours the photos show least are picked most, so that every colour is seen about as often.
    recolour_p: float = 0.0
    prior_preservation: bool = False
    prior_weight: float = 1.0
    num_class_images: int = 16
    class_images_dir: str | None = None  # None: class images are made in memory each run
    class_inference_steps: int = 25
    min_snr_gamma: float | None = None
    preview_every: int = 0  # 0: only the final preview
    preview_prompt: str | None = None  # None: the first photo's caption, else "a photo of <token> <class word>"
    preview_steps: int = 25
    guidance_scale: float = 7.5
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError("a concept needs a name")
        self.tokens = list(self.tokens) or [default_token(self.name)]
        for token in self.tokens:
            validate_token(token)
        if len(set(self.tokens)) != len(self.tokens):
            raise ConfigError(f"trigger tokens must be distinct, got {self.tokens}")
        self._check_numbers()
        self._check_choices()

    def _check_numbers(self) -> None:
        for name in (
            "rank",
            "batch_size",
            "gradient_accumulation",
            "num_class_images",
            "preview_steps",
            "class_inference_steps",
        ):
            _positive(name, getattr(self, name))
        for name in ("slot", "seed", "lr_warmup_steps", "preview_every", "checkpoint_every"):
            _positive(name, getattr(self, name), minimum=0)
        for name in ("lr_unet", "lr_text", "lr_embedding", "weight_decay", "guidance_scale"):
            _positive(name, getattr(self, name), minimum=0)
        for name in ("rank", "slot", "seed", "batch_size", "gradient_accumulation"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.steps is not None:
            _positive("steps", self.steps)
            if self.steps > MAX_STEPS:
                raise ConfigError(
                    f"steps must be at most {MAX_STEPS}, got {self.steps}; a concept is learnt in a few hundred "
                    "steps (0 or none: the model's default)"
                )
        if self.resolution is not None:
            _positive("resolution", self.resolution, minimum=8)
            if self.resolution % 8:
                raise ConfigError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.max_grad_norm is not None:
            _positive("max_grad_norm", self.max_grad_norm, minimum=0)
        if self.min_snr_gamma is not None and not (_is_number(self.min_snr_gamma) and self.min_snr_gamma > 0):
            raise ConfigError(f"min_snr_gamma must be positive (5 is usual) or None, got {self.min_snr_gamma!r}")
        for name in ("flip_p", "augment_p", "pair_p", "recolour_p"):
            if not (_is_number(getattr(self, name)) and 0.0 <= getattr(self, name) <= 1.0):
                raise ConfigError(f"{name} must be between 0 and 1, got {getattr(self, name)!r}")
        low, high = self.augment_min_scale, self.augment_max_scale
        if not (_is_number(low) and _is_number(high) and 0.1 <= low <= high <= 1.0):
            raise ConfigError(f"augment scales must satisfy 0.1 <= min <= max <= 1, got {low!r}, {high!r}")
        if self.background_weight is not None and not (
            _is_number(self.background_weight) and 0.0 <= self.background_weight <= 1.0
        ):
            raise ConfigError(f"background_weight must be between 0 and 1, got {self.background_weight!r}")

    def _check_choices(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}; use one of {VARIANTS}")
        TargetConfig.preset(self.targets)  # raises a ConfigError listing the presets
        if self.lr_scale not in LR_SCALES:
            raise ConfigError(f"lr_scale must be one of {LR_SCALES}, got {self.lr_scale!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.prior_preservation and not self.class_word.strip():
            raise ConfigError("prior preservation needs a class word (e.g. 'dog') to generate class images")
        if self.prior_preservation:
            _positive("prior_weight", self.prior_weight, minimum=0)
        if (self.checkpoint_every or self.resume) and not self.checkpoint_dir:
            raise ConfigError("checkpoint_every and resume need a checkpoint_dir")

    @property
    def token_text(self) -> str:
        return " ".join(self.tokens)

    @property
    def background_loss_weight(self) -> float:
        """The loss weight of background latents: 1 without masks."""
        if self.mask_dir is None:
            return 1.0
        return DEFAULT_BACKGROUND_WEIGHT if self.background_weight is None else float(self.background_weight)

    def resolved(self, pipe) -> TrainConfig:
        """A copy with ``steps`` and ``resolution`` filled in from the model's defaults."""
        native = default_resolution(pipe)
        resolution = self.resolution or native
        if resolution > MAX_RESOLUTION_FACTOR * native:
            raise ConfigError(
                f"resolution {resolution} is more than {MAX_RESOLUTION_FACTOR}x this model's native {native} px; "
                f"train at {MAX_RESOLUTION_FACTOR * native} px or less (none: the native size)"
            )
        return dataclasses.replace(self, resolution=resolution, steps=self.steps or default_steps(resolution))

    def to_json(self) -> dict:
        """The run's settings for the adapter's ``train_config`` metadata (local paths left out)."""
        data = dataclasses.asdict(self)
        for key in LOCAL_FIELDS:
            data.pop(key)
        return data

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def default_resolution(pipe) -> int:
    """The UNet's native image size: ``sample_size * vae_scale_factor``."""
    size = pipe.unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) * int(getattr(pipe, "vae_scale_factor", 8))


def default_steps(resolution: int) -> int:
    """150 steps for built-in models (<= 128 px), 400 up to 256 px, 1000 for real SD models."""
    if resolution <= 128:
        return 150
    if resolution <= 256:
        return 400
    return 1000


@dataclass
class TrainProgress:
    """One finished optimiser step, for progress bars. ``preview`` is set on preview steps only;
    ``first_step`` is where this run started (the checkpoint's step after a resume, else 0)."""

    step: int
    total_steps: int
    loss: float
    eta_seconds: float
    preview: Image.Image | None = None
    first_step: int = 0


@dataclass
class TrainResult:
    """The trained concept (ready for ``save_adapter``), its preview and the per-step training losses.

    ``eval_losses`` maps a step to the loss on a fixed evaluation batch (the first images, centre
    crops, fixed noise and timesteps) measured at the start of the run and at its end.
    """

    adapter: AdapterData
    preview: Image.Image
    losses: list[float]
    eval_losses: dict[int, float] = field(default_factory=dict)
    resumed_from: int = 0
