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

This module holds the run itself (data order, optimiser steps, evaluation, previews); the settings
are in ``config``, the loss in ``objective``, resumable state in ``checkpoint``, the caller's
pipeline's safe-keeping in ``borrowed`` and prior-preservation class images in ``prior``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from PIL import Image

from spectral_diffusion.core.config import TEXT_COMPONENTS, ConceptInfo, TargetConfig
from spectral_diffusion.core.model import SpectralAdapters
from spectral_diffusion.core.svd import SvdCache
from spectral_diffusion.errors import TrainingCancelled
from spectral_diffusion.formats.adapter_file import USABLE_COLUMNS_KEY, adapter_from_model
from spectral_diffusion.generation.diffusion import encode_images, generate
from spectral_diffusion.images import find_images, is_image_list
from spectral_diffusion.models.registry import caption_grammar
from spectral_diffusion.training.accelerator import check_precision, make_accelerator
from spectral_diffusion.training.borrowed import borrowed, cast_frozen, components, set_checkpointing, upcast_vae
from spectral_diffusion.training.checkpoint import Checkpoints
from spectral_diffusion.training.config import TrainConfig, TrainProgress, TrainResult
from spectral_diffusion.training.data import ConceptDataset, Stream, caption_templates, collate, mix_seed
from spectral_diffusion.training.lr_scale import StepScale
from spectral_diffusion.training.objective import DenoisingObjective, latent_weights, noise_scheduler, per_example_loss
from spectral_diffusion.training.prior import class_images, class_prompt

logger = logging.getLogger(__name__)

EVAL_IMAGES = 4
EVAL_TIMESTEPS = (0.1, 0.35, 0.6, 0.85)  # fractions of the schedule: low to high noise


# ----- the trainer --------------------------------------------------------------------------------


class _Trainer:
    """One run: holds the patched pipeline, the prepared models and the optimiser."""

    def __init__(self, pipe, adapters: SpectralAdapters, dataset, class_set, config: TrainConfig, accelerator):
        self.pipe, self.adapters, self.config = pipe, adapters, config
        self.dataset, self.class_set = dataset, class_set
        self.accelerator = accelerator
        self.device = accelerator.device
        self.objective = DenoisingObjective(pipe, config.resolution, config.min_snr_gamma, self.device)
        self.text_names = [name for name in TEXT_COMPONENTS if getattr(pipe, name, None) is not None]
        self.step = 0
        self.losses: list[float] = []
        self.eval_losses: dict[int, float] = {}
        self._perms: dict[tuple[int, int], torch.Tensor] = {}
        self._setup_models()
        inputs = {"fingerprint": dataset.fingerprint(), "images": len(dataset)} if config.checkpoint_dir else None
        self.checkpoints = Checkpoints(
            config, adapters.fingerprint, self.params, self.optimizer, accelerator.scaler, self.device, inputs
        )

    # -- setup ------------------------------------------------------------------------------------

    def _setup_models(self) -> None:
        config, pipe = self.config, self.pipe
        groups = self.adapters.trainable_parameters(config.name)
        if not config.train_c:  # the diagnostic "c off": the singular-value shift stays zero
            shifts = {id(layer.concept(config.name).c) for layer in self.adapters.layers.values()}
            for name, group in groups.items():
                for param in group:
                    if id(param) in shifts:
                        param.requires_grad_(False)
                groups[name] = [p for p in group if id(p) not in shifts]
        self.step_scale = StepScale(self.adapters, config.name, config.lr_scale)
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
                set_checkpointing(module, True)
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

    def _permutation(self, stream: int, epoch: int, size: int) -> torch.Tensor:
        key = (stream, epoch)
        if key not in self._perms:
            if len(self._perms) > 8:  # only the current epochs are ever asked for again
                self._perms.clear()
            generator = torch.Generator().manual_seed(mix_seed(self.config.seed, stream, epoch))
            self._perms[key] = torch.randperm(size, generator=generator)
        return self._perms[key]

    def _examples(self, dataset, streams: tuple[int, int], micro: int) -> dict:
        """This rank's share of the global batch of micro-step ``micro`` of the current step; ``streams``:
        (order, views), ``Stream.INSTANCE_DATA`` or ``Stream.CLASS_DATA``."""
        order, views = streams
        config, acc = self.config, self.accelerator
        first = (self.step * config.gradient_accumulation + micro) * acc.num_processes + acc.process_index
        examples = []
        for j in range(config.batch_size):
            q = first * config.batch_size + j  # global example number: epoch-wise shuffled stream
            index = int(self._permutation(order, q // len(dataset), len(dataset))[q % len(dataset)])
            generator = torch.Generator().manual_seed(mix_seed(config.seed, views, q))
            examples.append(dataset.example(index, generator))
        return collate(examples)

    def _batch(self, micro: int) -> tuple[dict, int]:
        batch = self._examples(self.dataset, Stream.INSTANCE_DATA, micro)
        if self.class_set is None:
            return batch, 0
        extra = self._examples(self.class_set, Stream.CLASS_DATA, micro)
        merged = {key: batch[key] + extra[key] for key in ("caption", "original_size", "crop_top_left")}
        merged["pixel_values"] = torch.cat([batch["pixel_values"], extra["pixel_values"]])
        if "mask" in batch:  # class images have no masks: all of them counts
            merged["mask"] = torch.cat([batch["mask"], torch.ones_like(extra["pixel_values"][:, :1])])
        return merged, len(extra["caption"])

    # -- objective --------------------------------------------------------------------------------

    def _micro_loss(self, micro: int) -> torch.Tensor:
        batch, n_class = self._batch(micro)
        rank = self.accelerator.process_index
        generator = torch.Generator().manual_seed(mix_seed(self.config.seed, Stream.NOISE, self.step, micro, rank))
        latents = encode_images(self.pipe.vae, batch["pixel_values"], generator).to(self.device)
        noise, timesteps = self.objective.sample_noise(latents, generator)
        pred = self.objective.predict(self.unet, self.text_encoders, batch, latents, noise, timesteps)
        weights = None
        if "mask" in batch:
            weights = latent_weights(batch["mask"], tuple(pred.shape[-2:]), self.config.background_loss_weight)
        per_example = per_example_loss(pred, self.objective.target(latents, noise, timesteps), weights)
        if self.config.min_snr_gamma is not None:
            per_example = per_example * self.objective.snr_weights(timesteps)
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
        before = self.step_scale.before()
        self.prepared_optimizer.step()
        self.step_scale.after(before)
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
        generator = torch.Generator().manual_seed(mix_seed(self.config.seed, Stream.EVAL))
        latents = encode_images(self.pipe.vae, batch["pixel_values"], None).to(self.device)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        steps = self.objective.num_train_timesteps
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
                pred = self.objective.predict(
                    self.pipe.unet, encoders, sub, latents[part], noise[part], timesteps[part]
                )
                target = self.objective.target(latents[part], noise[part], timesteps[part])
                total += float(F.mse_loss(pred, target, reduction="sum"))
        loss = total / latents.numel()
        self.eval_losses[self.step] = loss
        logger.info("evaluation loss at step %d: %.5f", self.step, loss)
        return loss

    def preview(self) -> Image.Image:
        config = self.config
        prompt = config.preview_prompt or preview_prompt(self.dataset, config)
        self._train_mode(False)
        with self.accelerator.autocast():
            image = generate(
                self.pipe,
                prompt,
                1,
                config.resolution,
                config.preview_steps,
                config.guidance_scale,
                mix_seed(config.seed, Stream.PREVIEW),
            )[0]
        return image

    # -- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Only the main process writes; every rank holds the same parameters after a step."""
        if self.accelerator.is_main_process:
            self.checkpoints.save(self.step, self.losses, self.eval_losses)

    def load_checkpoint(self) -> bool:
        resumed = self.checkpoints.load()
        if resumed is None:
            return False
        self.step, self.losses, self.eval_losses = resumed.step, resumed.losses, resumed.eval_losses
        return True


def preview_prompt(dataset, config: TrainConfig) -> str:
    """What previews draw: the first photo's own caption when it has one (a prompt the model has seen the
    concept with), else the first caption template ("a photo of <tok> dog")."""
    captions = [source.caption for source in getattr(dataset, "sources", ()) if source.caption]
    return captions[0] if captions else caption_templates(config.token_text, config.class_word)[0]


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
    progress(TrainProgress(trainer.step, trainer.config.steps, loss, eta, preview, first_step))


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


def _datasets(
    images, config: TrainConfig, pipe, should_stop, base_model: str
) -> tuple[ConceptDataset, ConceptDataset | None]:
    kwargs = {"resolution": config.resolution, "random_crop": config.random_crop, "flip_p": config.flip_p}
    dataset = ConceptDataset(
        images,
        config.token_text,
        config.class_word,
        min_size=config.min_image_size,
        seed=config.seed,
        mask_dir=config.mask_dir,
        augment_p=config.augment_p,
        pair_p=config.pair_p,
        recolour_p=config.recolour_p,
        captions=caption_grammar(base_model),
        augment_scale=(config.augment_min_scale, config.augment_max_scale),
        **kwargs,
    )
    if not config.prior_preservation:
        return dataset, None
    made = class_images(pipe, config, should_stop)
    class_set = ConceptDataset(
        made, "", config.class_word, templates=[class_prompt(config.class_word)], min_size=0, seed=config.seed, **kwargs
    )
    return dataset, class_set


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

    ``model`` is a model name for ``models.registry.load_pipeline`` or a loaded pipeline, which is patched for
    the run and given back unchanged (weights, modules, tokenizers, modes, devices). ``images`` is a
    folder or a list of image files. Nothing is written except checkpoints in ``config.checkpoint_dir``
    (and generated class images in ``config.class_images_dir``). ``should_stop`` is polled before every
    step; when it returns True the run raises ``TrainingCancelled``.
    """
    if not is_image_list(images):
        find_images(images)  # cheap checks (no images, too many) before any model is loaded
    pipe, owned = _load(model)
    config = config.resolved(pipe)
    with borrowed(pipe), torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        return _train(
            pipe,
            owned,
            images,
            config,
            progress,
            should_stop,
            svd_cache_dir,
            _base_model_name(model, pipe, base_model_name),
        )


def _train(pipe, owned, images, config, progress, should_stop, svd_cache_dir, base_model) -> TrainResult:
    accelerator = make_accelerator(config, getattr(pipe, "text_encoder_2", None) is not None)
    check_precision(pipe, config, accelerator)
    noise_scheduler(pipe)  # refuse an unsupported prediction type before any work
    torch.manual_seed(mix_seed(config.seed, accelerator.process_index))  # dropout etc. in real models
    for module in components(pipe).values():
        module.to(accelerator.device)
    upcast_vae(pipe)
    dataset, class_set = _datasets(images, config, pipe, should_stop, base_model)
    adapters = SpectralAdapters.from_pipeline(pipe, TargetConfig.preset(config.targets), SvdCache(svd_cache_dir))
    trainer = None
    try:
        adapters.spectrum((config.slot + 1) * config.rank)  # from the weights in full precision
        cast_frozen(pipe, accelerator, owned)
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
        usable = {USABLE_COLUMNS_KEY: str(adapters.usable_dim())}  # for slot maps drawn without the model
        adapter = adapter_from_model(
            adapters, config.name, base_model, train_config=config.to_json(), extra_metadata=usable
        )
        logger.info("trained %s: %d steps, eval loss %s", config.name, config.steps, trainer.eval_losses)
        return TrainResult(adapter, preview, list(trainer.losses), dict(trainer.eval_losses), start if resumed else 0)
    finally:
        if trainer is not None:
            trainer.release()
        adapters.unpatch()
