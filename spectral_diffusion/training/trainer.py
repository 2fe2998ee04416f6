"""Few-shot training of one concept into one spectral slot, on HF Accelerate.

``train_concept`` patches a Stable Diffusion 1.x / 2.x / XL pipeline, creates the concept in its slot
and trains the slot's spectral parameters in the UNet and the text encoder(s) together with the
concept's trigger-token embeddings, each group with its own learning rate (the paper's diffusion
setting: AdamW, linear decay, rank 8; embedding 1e-3, text encoder 1e-5, UNet 1e-4, ~1000 steps at
batch 2 for SD1.5). It returns an adapter (``AdapterData``) and a preview image and writes nothing
except resumable checkpoints into ``config.checkpoint_dir``; the library stores the result.

Reproducibility: every random draw of step ``s`` (which images, crops, flips, captions, noise,
timesteps) comes from generators seeded by ``(seed, s, rank)``, never from a stream that depends on
what ran before. A resumed run therefore continues exactly like an uninterrupted one, and
``torchrun`` / ``accelerate launch`` data-parallel runs need no code change: rank r takes its own
share of every global batch, and gradients are averaged by DDP.

Default steps and resolution per model (``steps=None``, ``resolution=None``): the resolution is the
UNet's native one (``sample_size * vae_scale_factor``: 64 px for the built-in tiny models, 512 for
SD1.5, 768 for SD2, 1024 for SDXL); steps are 150 at 128 px or less (built-in models train in minutes
on a CPU), 400 up to 256 px and 1000 above (the paper's setting for SD1.5, also used for SDXL).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from spectral_diffusion.atomic import atomic_path, atomic_write_text
from spectral_diffusion.core.layers import VARIANTS
from spectral_diffusion.core.model import TEXT_COMPONENTS, TOKENIZER_OF, ConceptInfo, SpectralAdapters, TargetConfig
from spectral_diffusion.core.svd import SvdCache
from spectral_diffusion.core.tokens import default_token, validate_token
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.formats.adapter_file import AdapterData, adapter_from_model
from spectral_diffusion.images import IMAGE_EXTENSIONS, find_images, is_image_list, open_image
from spectral_diffusion.training.data import ConceptDataset, caption_templates, collate, mix_seed

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")
EVAL_IMAGES = 4
EVAL_TIMESTEPS = (0.1, 0.35, 0.6, 0.85)  # fractions of the schedule: low to high noise
CHECKPOINT_STATE = "state.json"
CHECKPOINT_FORMAT = "spectral-diffusion-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_TENSORS = re.compile(r"checkpoint-\d{7,}\.safetensors")
# Fields that may differ between a checkpointed run and the run resuming it.
RESUME_FREE_FIELDS = (
    "resume", "checkpoint_every", "preview_every", "preview_prompt", "preview_steps", "cpu", "gradient_checkpointing",
)
# Local paths: not part of what an adapter records about its training.
LOCAL_FIELDS = ("checkpoint_dir", "class_images_dir")


class TrainingCancelled(SpectralDiffusionError):
    """``should_stop()`` asked the run to stop; the pipeline is restored and no concept was made."""


class CheckpointError(SpectralDiffusionError, ValueError):
    """A checkpoint cannot be resumed: damaged, or made by a different configuration or base model."""


# ----- configuration ------------------------------------------------------------------------------


def _positive(name: str, value, minimum=1) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a number of at least {minimum}, got {value!r}")


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
    weight_decay: float = 1e-2  # spectral parameters only; embeddings are not decayed toward zero
    max_grad_norm: float | None = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    cpu: bool = False  # train on the CPU even where a GPU is present
    random_crop: bool = True
    flip_p: float = 0.5
    min_image_size: int | None = None  # None: half the resolution
    prior_preservation: bool = False
    prior_weight: float = 1.0
    num_class_images: int = 16
    class_images_dir: str | None = None  # None: class images are made in memory each run
    class_inference_steps: int = 25
    min_snr_gamma: float | None = None
    preview_every: int = 0  # 0: only the final preview
    preview_prompt: str | None = None  # None: "a photo of <token> <class word>"
    preview_steps: int = 25
    guidance_scale: float = 7.5
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("a concept needs a name")
        self.tokens = list(self.tokens) or [default_token(self.name)]
        for token in self.tokens:
            validate_token(token)
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError(f"trigger tokens must be distinct, got {self.tokens}")
        self._check_numbers()
        self._check_choices()

    def _check_numbers(self) -> None:
        for name in ("rank", "batch_size", "gradient_accumulation", "num_class_images", "preview_steps",
                     "class_inference_steps"):
            _positive(name, getattr(self, name))
        for name in ("slot", "seed", "lr_warmup_steps", "preview_every", "checkpoint_every"):
            _positive(name, getattr(self, name), minimum=0)
        for name in ("lr_unet", "lr_text", "lr_embedding", "weight_decay", "guidance_scale"):
            _positive(name, getattr(self, name), minimum=0)
        for name in ("rank", "slot", "seed", "batch_size", "gradient_accumulation"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.steps is not None:
            _positive("steps", self.steps)
        if self.resolution is not None:
            _positive("resolution", self.resolution, minimum=8)
            if self.resolution % 8:
                raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.max_grad_norm is not None:
            _positive("max_grad_norm", self.max_grad_norm, minimum=0)
        if self.min_snr_gamma is not None and not (_is_number(self.min_snr_gamma) and self.min_snr_gamma > 0):
            raise ValueError(f"min_snr_gamma must be positive (5 is usual) or None, got {self.min_snr_gamma!r}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p must be between 0 and 1, got {self.flip_p}")

    def _check_choices(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; use one of {VARIANTS}")
        TargetConfig.preset(self.targets)  # raises a ValueError listing the presets
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.prior_preservation and not self.class_word.strip():
            raise ValueError("prior preservation needs a class word (e.g. 'dog') to generate class images")
        if self.prior_preservation:
            _positive("prior_weight", self.prior_weight, minimum=0)
        if (self.checkpoint_every or self.resume) and not self.checkpoint_dir:
            raise ValueError("checkpoint_every and resume need a checkpoint_dir")

    @property
    def token_text(self) -> str:
        return " ".join(self.tokens)

    def resolved(self, pipe) -> TrainConfig:
        """A copy with ``steps`` and ``resolution`` filled in from the model's defaults."""
        resolution = self.resolution or default_resolution(pipe)
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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    """One finished optimiser step, for progress bars. ``preview`` is set on preview steps only."""

    step: int
    total_steps: int
    loss: float
    eta_seconds: float
    preview: Image.Image | None = None


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


# ----- accelerate and the borrowed pipeline -------------------------------------------------------


def _make_accelerator(config: TrainConfig, sdxl: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    # SDXL reads the first text encoder's penultimate layer: its last layer gets no gradient, which
    # DDP must be told about. Buffers (the slots' base triplets) never change: no need to broadcast.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=sdxl, broadcast_buffers=False)
    cpu = config.cpu or not torch.cuda.is_available()
    kwargs = {"mixed_precision": config.mixed_precision, "cpu": cpu, "kwargs_handlers": [ddp]}
    try:
        return Accelerator(**kwargs)
    except ValueError as error:
        if "already been initialized" not in str(error):
            raise
        # Accelerate keeps one process-wide state; a second run in this process (the app, tests) with
        # another precision must reset it. The distributed process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(**kwargs)


def _components(pipe) -> dict[str, torch.nn.Module]:
    names = ("unet", "vae") + TEXT_COMPONENTS
    return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}


@contextmanager
def _borrowed(pipe) -> Iterator[None]:
    """Give the pipeline back exactly as it came: modes, devices, grad flags, tokenizers, scheduler.

    Tokenizers and the scheduler are swapped for copies (training adds trigger tokens to the
    tokenizer and previews move the scheduler), so the caller's objects are never touched.
    """
    modules = _components(pipe)
    modes = {name: module.training for name, module in modules.items()}
    devices = {name: next(module.parameters()).device for name, module in modules.items()}
    grads = {name: [p.requires_grad for p in module.parameters()] for name, module in modules.items()}
    checkpointing = {name: _checkpointing_on(module) for name, module in modules.items()}
    own_forward = {name: "forward" in vars(module) for name, module in modules.items()}
    vae_dtype = pipe.vae.dtype
    swapped = {
        name: getattr(pipe, name)
        for name in ("scheduler", *TOKENIZER_OF.values())
        if getattr(pipe, name, None) is not None
    }
    progress_config = copy.copy(vars(pipe).get("_progress_bar_config"))  # previews silence the bar
    for name, original in swapped.items():
        setattr(pipe, name, copy.deepcopy(original))
    try:
        yield
    finally:
        for name, original in swapped.items():
            setattr(pipe, name, original)
        if progress_config is None:
            vars(pipe).pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = progress_config
        for name, module in modules.items():
            _restore_module(module, modes[name], devices[name], grads[name], checkpointing[name])
            if not own_forward[name]:  # accelerate's mixed-precision forward wrapper, even unwrapped
                vars(module).pop("forward", None)
                vars(module).pop("_original_forward", None)
        if pipe.vae.dtype != vae_dtype:  # undo _upcast_vae: fp16 -> fp32 -> fp16 is exact
            pipe.vae.to(dtype=vae_dtype)


def _checkpointing_on(module: torch.nn.Module) -> bool:
    if hasattr(module, "is_activation_checkpointing"):  # transformers 5 (the other name is deprecated)
        return bool(module.is_activation_checkpointing)
    return bool(getattr(module, "is_gradient_checkpointing", False))


def _set_checkpointing(module: torch.nn.Module, enable: bool) -> None:
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers
        module.enable_gradient_checkpointing() if enable else module.disable_gradient_checkpointing()
    elif hasattr(module, "activation_checkpointing_enable"):  # transformers 5
        module.activation_checkpointing_enable() if enable else module.activation_checkpointing_disable()
    elif hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable() if enable else module.gradient_checkpointing_disable()


def _restore_module(module, training: bool, device, grads: list[bool], checkpointing: bool) -> None:
    module.train(training)
    module.to(device)
    for param, flag in zip(module.parameters(), grads, strict=True):
        param.requires_grad_(flag)
    if _checkpointing_on(module) != checkpointing:
        _set_checkpointing(module, checkpointing)


# ----- text, latents, images ----------------------------------------------------------------------


def _tokenize(tokenizer, captions: Sequence[str], device) -> torch.Tensor:
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def encode_captions(text_encoders, tokenizers, captions, device, sdxl: bool):
    """Prompt embeddings (and SDXL's pooled embedding) as the pipelines build them, with gradients."""
    if not sdxl:
        return text_encoders[0](_tokenize(tokenizers[0], captions, device))[0], None
    hidden, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers, strict=True):
        out = encoder(_tokenize(tokenizer, captions, device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
        pooled = out[0]  # the last encoder's projected pooled output ("text_embeds")
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(batch: dict, resolution: int, device, dtype) -> torch.Tensor:
    """SDXL micro-conditioning per example: original (h, w), crop top-left (y, x), target (h, w)."""
    rows = [
        list(original) + list(crop) + [resolution, resolution]
        for original, crop in zip(batch["original_size"], batch["crop_top_left"], strict=True)
    ]
    return torch.tensor(rows, device=device, dtype=dtype)


def encode_images(vae, pixel_values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """VAE latents in the UNet's space; ``generator`` None takes the distribution's mean."""
    with torch.no_grad():
        dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = dist.mode() if generator is None else dist.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Pipeline latents to PIL images, in the VAE's own dtype (it may be kept in fp32)."""
    vae = pipe.vae
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean, device=vae.device, dtype=vae.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=vae.device, dtype=vae.dtype).view(1, -1, 1, 1)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        images = vae.decode(latents).sample
    return pipe.image_processor.postprocess(images.float(), output_type="pil")


def generate(pipe, prompt: str, count: int, resolution: int, steps: int, guidance: float, seed: int):
    """``count`` images of ``prompt`` from the pipeline as it is now (patched or not), seeded."""
    generator = torch.Generator("cpu").manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        latents = pipe(
            prompt=[prompt] * count,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
            generator=generator,
            output_type="latent",
        ).images
    return decode_latents(pipe, latents)


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
        seed = mix_seed(config.seed, 7, len(images))
        steps, guidance = config.class_inference_steps, config.guidance_scale
        made = generate(pipe, prompt, count, config.resolution, steps, guidance, seed)
        for image in made:
            if folder is not None:
                with atomic_path(folder / f"class-{len(images):04d}.png") as tmp:
                    image.save(tmp, format="PNG")
            images.append(image)
    logger.info("%d class images of %r for prior preservation", len(images), prompt)
    return images


# ----- checkpoints --------------------------------------------------------------------------------


def _config_for_resume(config: TrainConfig) -> dict:
    data = config.to_json()
    for key in RESUME_FREE_FIELDS:
        data.pop(key, None)
    return data


def _rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def _restore_rng(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


# ----- the trainer --------------------------------------------------------------------------------


class _Trainer:
    """One run: holds the patched pipeline, the prepared models and the optimiser."""

    def __init__(self, pipe, adapters: SpectralAdapters, dataset, class_set, config: TrainConfig, accelerator):
        self.pipe, self.adapters, self.config = pipe, adapters, config
        self.dataset, self.class_set = dataset, class_set
        self.accelerator = accelerator
        self.device = accelerator.device
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.noise_scheduler = _noise_scheduler(pipe)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.text_names = [name for name in TEXT_COMPONENTS if getattr(pipe, name, None) is not None]
        self.tokenizers = [getattr(pipe, TOKENIZER_OF[name]) for name in self.text_names]
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.step = 0
        self.losses: list[float] = []
        self.eval_losses: dict[int, float] = {}
        self._perms: dict[tuple[int, int], torch.Tensor] = {}
        self._setup_models()

    # -- setup ------------------------------------------------------------------------------------

    def _setup_models(self) -> None:
        config, pipe = self.config, self.pipe
        groups = self.adapters.trainable_parameters(config.name)
        self.params = [p for group in groups.values() for p in group]
        if any(p.dtype != torch.float32 for p in self.params):  # the optimiser must see fp32 masters
            raise RuntimeError("trainable spectral parameters must be float32")
        settings = {
            "unet": (config.lr_unet, config.weight_decay),
            "text_encoder": (config.lr_text, config.weight_decay),
            "embeddings": (config.lr_embedding, 0.0),
        }
        param_groups = [
            {"params": groups[name], "lr": lr, "initial_lr": lr, "weight_decay": decay}
            for name, (lr, decay) in settings.items()
            if groups[name]
        ]
        self.optimizer = torch.optim.AdamW(param_groups)
        if config.gradient_checkpointing:
            for module in [pipe.unet] + [getattr(pipe, name) for name in self.text_names]:
                _set_checkpointing(module, True)
        prepared = self.accelerator.prepare(pipe.unet, *[getattr(pipe, n) for n in self.text_names], self.optimizer)
        self.unet, self.text_encoders, self.prepared_optimizer = prepared[0], list(prepared[1:-1]), prepared[-1]

    def release(self) -> None:
        """Undo ``prepare``: drop DDP wrappers and accelerate's autocast forward from the modules."""
        for model in [self.unet, *self.text_encoders]:
            self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        self.accelerator.free_memory()

    def _train_mode(self, training: bool) -> None:
        for name in ["unet", *self.text_names]:
            getattr(self.pipe, name).train(training)

    # -- data -------------------------------------------------------------------------------------

    def _permutation(self, tag: int, epoch: int, size: int) -> torch.Tensor:
        key = (tag, epoch)
        if key not in self._perms:
            if len(self._perms) > 8:  # only the current epochs are ever asked for again
                self._perms.clear()
            generator = torch.Generator().manual_seed(mix_seed(self.config.seed, tag, epoch))
            self._perms[key] = torch.randperm(size, generator=generator)
        return self._perms[key]

    def _examples(self, dataset, tag: int, micro: int) -> dict:
        """This rank's share of the global batch of micro-step ``micro`` of the current step."""
        config, acc = self.config, self.accelerator
        first = (self.step * config.gradient_accumulation + micro) * acc.num_processes + acc.process_index
        examples = []
        for j in range(config.batch_size):
            q = first * config.batch_size + j  # global example number: epoch-wise shuffled stream
            index = int(self._permutation(tag, q // len(dataset), len(dataset))[q % len(dataset)])
            generator = torch.Generator().manual_seed(mix_seed(config.seed, tag + 1, q))
            examples.append(dataset.example(index, generator))
        return collate(examples)

    def _batch(self, micro: int) -> tuple[dict, int]:
        batch = self._examples(self.dataset, 10, micro)
        if self.class_set is None:
            return batch, 0
        extra = self._examples(self.class_set, 20, micro)
        merged = {key: batch[key] + extra[key] for key in ("caption", "original_size", "crop_top_left")}
        merged["pixel_values"] = torch.cat([batch["pixel_values"], extra["pixel_values"]])
        return merged, len(extra["caption"])

    # -- objective --------------------------------------------------------------------------------

    def _target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}; use one of {PREDICTION_TYPES}")

    def _snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023), for epsilon or v targets."""
        alpha = self.alphas_cumprod[timesteps].float()
        snr = alpha / (1.0 - alpha)
        clipped = torch.clamp(snr, max=self.config.min_snr_gamma)
        return clipped / (snr + 1.0) if self.prediction_type == "v_prediction" else clipped / snr

    def _predict(self, unet, text_encoders, batch, latents, noise, timesteps):
        embeds, pooled = encode_captions(text_encoders, self.tokenizers, batch["caption"], self.device, self.sdxl)
        dtype = self.pipe.unet.dtype
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        kwargs = {}
        if self.sdxl:
            time_ids = sdxl_time_ids(batch, self.config.resolution, self.device, dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype), "time_ids": time_ids}
        out = unet(noisy.to(dtype), timesteps, encoder_hidden_states=embeds.to(dtype), return_dict=False, **kwargs)
        return out[0].float()

    def _sample_noise(self, latents, generator):
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(self.device)
        return noise, timesteps

    def _micro_loss(self, micro: int) -> torch.Tensor:
        batch, n_class = self._batch(micro)
        rank = self.accelerator.process_index
        generator = torch.Generator().manual_seed(mix_seed(self.config.seed, 30, self.step, micro, rank))
        latents = encode_images(self.pipe.vae, batch["pixel_values"], generator).to(self.device)
        noise, timesteps = self._sample_noise(latents, generator)
        pred = self._predict(self.unet, self.text_encoders, batch, latents, noise, timesteps)
        per_example = F.mse_loss(pred, self._target(latents, noise, timesteps), reduction="none")
        per_example = per_example.mean(dim=tuple(range(1, pred.ndim)))
        if self.config.min_snr_gamma is not None:
            per_example = per_example * self._snr_weights(timesteps)
        if not n_class:
            return per_example.mean()
        instance, prior = per_example[:-n_class], per_example[-n_class:]
        return instance.mean() + self.config.prior_weight * prior.mean()

    # -- one optimiser step -----------------------------------------------------------------------

    def _set_lr(self) -> None:
        config = self.config
        warmup, total = config.lr_warmup_steps, config.steps
        if self.step < warmup:
            factor = (self.step + 1) / warmup
        else:
            factor = max(0.0, (total - self.step) / max(1, total - warmup))
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def train_step(self) -> float:
        config, acc = self.config, self.accelerator
        self._train_mode(True)
        self._set_lr()
        total = 0.0
        for micro in range(config.gradient_accumulation):
            last = micro == config.gradient_accumulation - 1
            with ExitStack() as stack:
                if not last:  # all-reduce the gradients once, on the last micro-batch
                    for model in [self.unet, *self.text_encoders]:
                        stack.enter_context(acc.no_sync(model))
                loss = self._micro_loss(micro)
                acc.backward(loss / config.gradient_accumulation)
            total += float(loss.detach()) / config.gradient_accumulation
        if config.max_grad_norm:
            acc.clip_grad_norm_(self.params, config.max_grad_norm)
        self.prepared_optimizer.step()
        self.prepared_optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if not math.isfinite(total):
            raise FloatingPointError(
                f"the training loss became {total} at step {self.step}; lower the learning rates or use bf16 "
                "instead of fp16"
            )
        return total

    # -- evaluation and previews ------------------------------------------------------------------

    def prepare_eval(self) -> None:
        """A fixed evaluation batch: centre crops of the first images, fixed noise and timesteps."""
        count = min(EVAL_IMAGES, len(self.dataset))
        examples = [self.dataset.example(i) for i in range(count) for _ in EVAL_TIMESTEPS]
        batch = collate(examples)
        generator = torch.Generator().manual_seed(mix_seed(self.config.seed, 40))
        latents = encode_images(self.pipe.vae, batch["pixel_values"], None).to(self.device)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.tensor([int(f * steps) for f in EVAL_TIMESTEPS] * count, device=self.device)
        self._eval = (batch, latents, noise, timesteps)

    def evaluate(self) -> float:
        batch, latents, noise, timesteps = self._eval
        self._train_mode(False)
        encoders = [getattr(self.pipe, name) for name in self.text_names]
        total, size = 0.0, max(8, self.config.batch_size)
        with torch.no_grad(), self.accelerator.autocast():
            for start in range(0, latents.shape[0], size):
                part = slice(start, start + size)
                sub = {key: value[part] for key, value in batch.items()}
                pred = self._predict(self.pipe.unet, encoders, sub, latents[part], noise[part], timesteps[part])
                target = self._target(latents[part], noise[part], timesteps[part])
                total += float(F.mse_loss(pred, target, reduction="sum"))
        loss = total / latents.numel()
        self.eval_losses[self.step] = loss
        logger.info("evaluation loss at step %d: %.5f", self.step, loss)
        return loss

    def preview(self) -> Image.Image:
        config = self.config
        prompt = config.preview_prompt or f"{caption_templates(config.token_text, config.class_word)[0]}"
        self._train_mode(False)
        with self.accelerator.autocast():
            image = generate(self.pipe, prompt, 1, config.resolution, config.preview_steps, config.guidance_scale,
                             mix_seed(config.seed, 50))[0]
        return image

    # -- checkpoints ------------------------------------------------------------------------------

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.params)}
        for i, param in enumerate(self.params):
            for key, value in self.optimizer.state.get(param, {}).items():
                tensors[f"optim.{i}.{key}"] = value.detach().cpu().reshape(-1).contiguous()
        tensors.update(_rng_tensors(self.device))
        return tensors

    def save_checkpoint(self) -> None:
        """Tensors (safetensors) then the JSON state naming them, each written atomically."""
        if not self.accelerator.is_main_process:
            return
        folder = Path(self.config.checkpoint_dir)
        name = f"checkpoint-{self.step:07d}.safetensors"
        with atomic_path(folder / name) as tmp:
            save_file(self._checkpoint_tensors(), str(tmp))
        scaler = self.accelerator.scaler
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "tensors": name,
            "config": _config_for_resume(self.config),
            "base_fingerprint": self.adapters.fingerprint,
            "losses": self.losses,
            "eval_losses": {str(k): v for k, v in self.eval_losses.items()},
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        atomic_write_text(folder / CHECKPOINT_STATE, json.dumps(state, indent=1))
        for old in folder.glob("checkpoint-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        logger.info("checkpoint at step %d in %s", self.step, folder)

    def load_checkpoint(self) -> bool:
        folder = Path(self.config.checkpoint_dir)
        state_path = folder / CHECKPOINT_STATE
        if not state_path.is_file():
            logger.info("no checkpoint in %s: starting from step 0", folder)
            return False
        state = self._read_state(state_path)
        try:
            tensors = load_file(str(folder / state["tensors"]))
        except Exception as error:  # a damaged file is reported, never half-applied
            raise CheckpointError(f"checkpoint {folder / state['tensors']} is unreadable ({error})") from None
        self._apply_checkpoint(tensors, state)
        logger.info("resumed from step %d of %s", self.step, folder)
        return True

    def _read_state(self, path: Path) -> dict:
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"checkpoint state {path} is unreadable ({error})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not a training checkpoint")
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has version {state.get('version')!r}; this package reads {CHECKPOINT_VERSION}"
            )
        if not CHECKPOINT_TENSORS.fullmatch(str(state.get("tensors"))):  # a name inside the folder, no path
            raise CheckpointError(f"checkpoint state {path} names an invalid tensor file {state.get('tensors')!r}")
        if state.get("base_fingerprint") != self.adapters.fingerprint:
            raise CheckpointError(f"checkpoint in {path.parent} was made on another base model; start afresh")
        mine = _config_for_resume(self.config)
        theirs = state.get("config", {})
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if changed:
            detail = ", ".join(f"{k}={theirs.get(k)!r} (now {mine.get(k)!r})" for k in changed[:4])
            raise CheckpointError(
                f"checkpoint in {path.parent} was made with other settings: {detail}; resume with the same "
                "settings or delete the checkpoint"
            )
        step = state.get("step")
        if not isinstance(step, int) or not 0 <= step <= self.config.steps:
            raise CheckpointError(f"checkpoint {path} has an invalid step {step!r}")
        return state

    def _apply_checkpoint(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        for i, param in enumerate(self.params):
            saved = tensors.get(f"param.{i}")
            if saved is None or saved.shape != param.shape or not torch.isfinite(saved).all():
                raise CheckpointError(f"checkpoint tensor param.{i} is missing or does not fit this model")
        with torch.no_grad():
            for i, param in enumerate(self.params):
                param.copy_(tensors[f"param.{i}"])
        for i, param in enumerate(self.params):
            prefix = f"optim.{i}."
            entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if entry:
                self.optimizer.state[param] = _adam_state(entry, param, i)
        _restore_rng(tensors, self.device)
        if state.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.losses = [float(x) for x in state.get("losses", [])][: self.step]
        self.eval_losses = {int(k): float(v) for k, v in state.get("eval_losses", {}).items()}


def _adam_state(entry: dict[str, torch.Tensor], param: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state from flat checkpoint tensors (its ``step`` stays a CPU scalar)."""
    if set(entry) != {"step", "exp_avg", "exp_avg_sq"} or entry["step"].numel() != 1 or any(
        entry[k].numel() != param.numel() for k in ("exp_avg", "exp_avg_sq")
    ):
        raise CheckpointError(f"checkpoint optimiser state {index} does not fit this model")
    return {
        "step": entry["step"].reshape(()),
        "exp_avg": entry["exp_avg"].reshape(param.shape).to(param.device),
        "exp_avg_sq": entry["exp_avg_sq"].reshape(param.shape).to(param.device),
    }


def _noise_scheduler(pipe):
    """A DDPM scheduler with the pipeline's own schedule and prediction type, for training."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(
            f"the model's scheduler predicts {kind!r}; training supports prediction_type {PREDICTION_TYPES}"
        )
    return scheduler


# ----- the run ------------------------------------------------------------------------------------


def _should_stop(accelerator, should_stop: Callable[[], bool] | None) -> bool:
    local = bool(should_stop()) if should_stop is not None else False
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)  # any rank stops: all stop


def _report(trainer: _Trainer, progress, loss: float, started: float, first_step: int, preview) -> None:
    if progress is None or not trainer.accelerator.is_main_process:
        return
    done = trainer.step - first_step
    eta = (time.monotonic() - started) / done * (trainer.config.steps - trainer.step)
    progress(TrainProgress(trainer.step, trainer.config.steps, loss, eta, preview))


def _loop(trainer: _Trainer, progress, should_stop) -> Image.Image:
    """Train to the last step; returns the final preview (made on every rank)."""
    config, acc = trainer.config, trainer.accelerator
    started, first_step = time.monotonic(), trainer.step
    final_preview = None
    while trainer.step < config.steps:
        if _should_stop(acc, should_stop):
            if config.checkpoint_every and trainer.step > first_step:
                trainer.save_checkpoint()
            raise TrainingCancelled(f"training of {config.name!r} cancelled at step {trainer.step}/{config.steps}")
        loss = trainer.train_step()
        trainer.losses.append(loss)
        preview = None
        if trainer.step == config.steps:
            preview = final_preview = trainer.preview()
        elif config.preview_every and trainer.step % config.preview_every == 0 and acc.is_main_process:
            preview = trainer.preview()
        if config.checkpoint_every and (trainer.step % config.checkpoint_every == 0 or trainer.step == config.steps):
            trainer.save_checkpoint()
        _report(trainer, progress, loss, started, first_step, preview)
    return final_preview if final_preview is not None else trainer.preview()


def _datasets(images, config: TrainConfig, pipe, should_stop) -> tuple[ConceptDataset, ConceptDataset | None]:
    kwargs = {"resolution": config.resolution, "random_crop": config.random_crop, "flip_p": config.flip_p}
    dataset = ConceptDataset(
        images, config.token_text, config.class_word, min_size=config.min_image_size, seed=config.seed, **kwargs
    )
    if not config.prior_preservation:
        return dataset, None
    made = class_images(pipe, config, should_stop)
    class_set = ConceptDataset(made, "", config.class_word, templates=[class_prompt(config.class_word)],
                               min_size=0, seed=config.seed, **kwargs)
    return dataset, class_set


def _cast_frozen(pipe, accelerator, owned: bool) -> None:
    """Keep frozen UNet / text-encoder weights in the mixed-precision dtype (our own pipeline only).

    A caller's pipeline keeps its dtype (a round trip through fp16 would not give its weights back);
    the VAE stays as loaded, since SD's VAE overflows in fp16 and it runs without gradients anyway.
    """
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)
    if not owned or dtype is None or not accelerator.native_amp:
        return
    for name in ("unet",) + TEXT_COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(dtype=dtype)


def _base_model_name(model, pipe, given: str | None) -> str:
    if given:
        return given
    if isinstance(model, str):
        return model
    return str(getattr(pipe, "name_or_path", "") or getattr(pipe.config, "_name_or_path", "") or "")


def _load(model):
    from spectral_diffusion.models.registry import load_pipeline

    if not isinstance(model, str):
        return model, False
    return load_pipeline(model), True


def train_concept(
    model,
    images,
    config: TrainConfig,
    *,
    progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    svd_cache_dir: str | os.PathLike | None = None,
    base_model_name: str | None = None,
) -> TrainResult:
    """Train one concept into its slot and return the adapter; see the module docstring.

    ``model`` is a model name for ``builtin.load_pipeline`` or a loaded pipeline, which is patched for
    the run and given back unchanged (weights, modules, tokenizers, modes, devices). ``images`` is a
    folder or a list of image files. Nothing is written except checkpoints in ``config.checkpoint_dir``
    (and generated class images in ``config.class_images_dir``). ``should_stop`` is polled before every
    step; when it returns True the run raises ``TrainingCancelled``.
    """
    if not is_image_list(images):
        find_images(images)  # cheap checks (no images, too many) before any model is loaded
    pipe, owned = _load(model)
    config = config.resolved(pipe)
    with _borrowed(pipe), torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        return _train(pipe, owned, images, config, progress, should_stop, svd_cache_dir,
                      _base_model_name(model, pipe, base_model_name))


def _upcast_vae(pipe) -> None:
    """Run an fp16 VAE that asks for it (``force_upcast``, e.g. SDXL's) in fp32: in fp16 it overflows
    to NaN latents. ``_borrowed`` casts it back afterwards."""
    vae = pipe.vae
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(dtype=torch.float32)


def _check_precision(pipe, config: TrainConfig, accelerator) -> None:
    if config.mixed_precision == "fp16" and not accelerator.native_amp:
        logger.warning("fp16 mixed precision needs a GPU; training in fp32 (bf16 works on CPUs)")
    if pipe.unet.dtype != torch.float32 and config.mixed_precision == "no":
        logger.warning("the pipeline is in %s but mixed_precision is 'no': gradients may underflow; pass "
                       "mixed_precision='fp16' or 'bf16' to train with autocast", pipe.unet.dtype)


def _train(pipe, owned, images, config, progress, should_stop, svd_cache_dir, base_model) -> TrainResult:
    accelerator = _make_accelerator(config, getattr(pipe, "text_encoder_2", None) is not None)
    _check_precision(pipe, config, accelerator)
    _noise_scheduler(pipe)  # refuse an unsupported prediction type before any work
    torch.manual_seed(mix_seed(config.seed, accelerator.process_index))  # dropout etc. in real models
    for module in _components(pipe).values():
        module.to(accelerator.device)
    _upcast_vae(pipe)
    dataset, class_set = _datasets(images, config, pipe, should_stop)
    adapters = SpectralAdapters.from_pipeline(pipe, TargetConfig.preset(config.targets), SvdCache(svd_cache_dir))
    trainer = None
    try:
        adapters.spectrum((config.slot + 1) * config.rank)  # from the weights in full precision
        _cast_frozen(pipe, accelerator, owned)
        info = ConceptInfo(config.name, config.slot, config.rank, config.variant, config.tokens, config.class_word)
        adapters.new_concept(info)
        trainer = _Trainer(pipe, adapters, dataset, class_set, config, accelerator)
        resumed = trainer.load_checkpoint() if config.resume else False
        trainer.prepare_eval()
        if trainer.step not in trainer.eval_losses:
            trainer.evaluate()
        start = trainer.step
        preview = _loop(trainer, progress, should_stop)
        trainer.evaluate()
        adapter = adapter_from_model(adapters, config.name, base_model, train_config=config.to_json())
        logger.info("trained %s: %d steps, eval loss %s", config.name, config.steps, trainer.eval_losses)
        return TrainResult(adapter, preview, list(trainer.losses), dict(trainer.eval_losses), start if resumed else 0)
    finally:
        if trainer is not None:
            trainer.release()
        adapters.unpatch()
