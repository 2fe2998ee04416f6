"""Pretrain ``builtin:toy``: a small Stable Diffusion 1.x pipeline trained from scratch on procedural scenes.

    python -m toy.pretrain                      # about 2 h 25 min on 2 CPU cores; resumes if interrupted
    python -m toy.pretrain --minutes 5 --work /tmp/toy-smoke --export /tmp/toy-smoke/model
    python -m toy.pretrain --device cuda        # the same recipe on a GPU, in minutes

Three phases, each resumable from its checkpoint in ``--work``:

1. render the scenes (``toy/scenes.py``) and train the VAE (32 px images, 16 x 16 x 4 latents);
2. encode every scene once with the frozen VAE;
3. train the UNet and the CLIP text encoder together on the diffusion loss (v-prediction, SD's noise
   schedule rescaled to zero terminal SNR, min-SNR weighting, 10% empty captions for classifier-free
   guidance, an EMA of the UNet) for ``--steps`` steps, the learning rate warmed up and then decayed
   along a cosine to zero at the last step.

The recipe is a number of steps, not of minutes, so it gives the same model on any machine; ``--minutes``
only stops one invocation early (it checkpoints and exports what it has, and the next invocation resumes).

The result is saved with ``save_pretrained`` to ``--export`` (by default the package folder that
``builtin:toy`` loads), in fp32 safetensors, so that it loads like any hub model. Checkpoints are
safetensors plus JSON; nothing is pickled.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from spectral_diffusion.atomic import atomic_path, atomic_write_text
from spectral_diffusion.testing.bpe import MAX_LENGTH, build_tokenizer, write_clip_vocab
from toy import scenes

logger = logging.getLogger("toy.pretrain")

PACKAGE_MODEL = Path(__file__).resolve().parent.parent / "spectral_diffusion" / "models" / "toy"
IMAGE_SIZE = scenes.IMAGE_SIZE
LATENT_SIZE = IMAGE_SIZE // 2  # v2: 16 x 16 latents; at 8 x 8 a small object was 2.4 cells wide
TEXT_HIDDEN = 64
RECIPE = "v3"
# v2 names positions more often and varies the order of mention (see docs/toy.md, "Why positions failed")
CAPTION_MIX = scenes.CaptionMix(size=0.7, position=0.85, background=0.8, reorder=True)
# v2: SD's betas rescaled to zero terminal SNR with v-prediction (as SD 2.1 predicts v): at t = 999 the
# input is pure noise, so the model learns to place objects from the caption alone. With SD's own schedule
# a trace of the image survives at t = 999 and v1 learned to read the layout from it, so at sampling time
# the starting noise decided where an object went (docs/toy.md, "Why positions failed").
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    steps_offset=1,
)
LOSS_CAP = 6.0  # weight of the v loss: 1 at high noise, capped at LOSS_CAP / (snr + 1) at low noise


# ------------------------------------------------------------------------------- models


def make_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
    )
    # Start with a near-deterministic posterior (std ~ 0.02): with a light KL term the encoder would
    # otherwise spend its first thousand steps shrinking unit noise before the decoder can learn.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = -8.0
    return vae


def make_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        # 16 -> 8 -> 4; cross-attention at 8 x 8 and 4 x 4 (at 16 x 16 it would cost 1.6x per step)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=16,
        norm_num_groups=32,
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(2)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=4 * TEXT_HIDDEN,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


# -------------------------------------------------------------------------------- data


def render_dataset(work: Path, count: int) -> tuple[torch.Tensor, list[scenes.Scene]]:
    """Scenes 0..count-1 as a uint8 tensor (N, 3, H, W), cached in ``work``."""
    cache = work / f"scenes-{count}.safetensors"
    picked = [scenes.random_scene(seed) for seed in range(count)]
    if cache.exists():
        return load_file(cache)["images"], picked
    with multiprocessing.Pool(max(1, os.cpu_count() or 1)) as pool:
        arrays = pool.imap(_render_array, picked, chunksize=256)
        images = np.stack(list(tqdm(arrays, total=count, desc="render scenes", mininterval=5)))
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with atomic_path(cache) as tmp:
        save_file({"images": tensor}, str(tmp))
    return tensor, picked


def _render_array(scene: scenes.Scene) -> np.ndarray:
    return np.asarray(scenes.render(scene))


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


# -------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Tensors and a JSON state, written atomically (the JSON last: it marks a complete checkpoint)."""
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "tensors.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    atomic_write_text(path / "state.json", json.dumps(state, indent=1))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    if not (path / "state.json").exists():
        return None
    return load_file(path / "tensors.safetensors"), json.loads((path / "state.json").read_text())


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = prefix + "."
    return {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}


def adam_tensors(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    out = {}
    for i, p in enumerate(params):
        st = optimizer.state.get(p)
        if st:
            out[f"adam.{i}.exp_avg"], out[f"adam.{i}.exp_avg_sq"] = st["exp_avg"], st["exp_avg_sq"]
            out[f"adam.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    return out


def restore_adam(optimizer, params, tensors) -> None:
    for i, p in enumerate(params):
        if f"adam.{i}.step" in tensors:
            optimizer.state[p] = {
                "exp_avg": tensors[f"adam.{i}.exp_avg"].clone(),
                "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].clone(),
                "step": tensors[f"adam.{i}.step"].reshape(()).clone(),
            }


# -------------------------------------------------------------------------------- phase 1


def object_weight(x: torch.Tensor, factor: float = 5.0) -> torch.Tensor:
    """1 on the background, 1 + ``factor`` on objects: the plain background is most of every picture and
    would otherwise dominate the loss, leaving objects blurred and their colours averaged."""
    corner = x[:, :, :1, :1]  # objects never cover the top-left corner pixel entirely
    return 1.0 + factor * ((x - corner).abs().amax(dim=1, keepdim=True) > 0.1).float()


def train_vae(work: Path, images: torch.Tensor, steps: int, batch: int = 16, lr: float = 2e-3, device: str = "cpu"):
    """Reconstruction (L1 + MSE, object pixels weighted up) with a light KL term; returns the VAE in eval mode."""
    vae = make_vae().to(device)
    ckpt = work / "vae"
    loaded = load_checkpoint(ckpt)
    start = 0
    params = list(vae.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if loaded:
        vae.load_state_dict(unprefixed("vae", loaded[0]))
        restore_adam(optimizer, params, {k: v.to(device) for k, v in loaded[0].items()})
        start = loaded[1]["step"]
    gen = torch.Generator().manual_seed(100 + start)
    bar = tqdm(range(start, steps), desc="VAE", initial=start, total=steps, mininterval=10)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = to_unit(images[torch.randint(len(images), (batch,), generator=gen)]).to(device)
        posterior = vae.encode(x).latent_dist
        sample = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        recon = vae.decode(sample).sample
        error = (recon - x).abs() + (recon - x) ** 2
        loss = (object_weight(x) * error).mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 500 == 0 or step + 1 == steps:
            save_checkpoint(
                ckpt,
                {**prefixed("vae", vae.state_dict()), **adam_tensors(optimizer, params)},
                {"step": step + 1, "loss": loss.item()},
            )
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(work: Path, vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every scene, cached; also sets the scaling factor."""
    cache = work / f"latents-{len(images)}.safetensors"
    if cache.exists():
        t = load_file(cache)
        return t["mean"], t["std"]
    means, stds = [], []
    for chunk in tqdm(images.split(512), desc="encode", mininterval=10):
        dist = vae.encode(to_unit(chunk).to(vae.device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    mean, std = torch.cat(means).contiguous(), torch.cat(stds).contiguous()
    with atomic_path(cache) as tmp:
        save_file({"mean": mean, "std": std}, str(tmp))
    return mean, std


# -------------------------------------------------------------------------------- phase 3


class CaptionTokens:
    """Token ids of captions, remembered: the same few thousand captions recur, and the Python BPE
    tokenizer would otherwise cost as much per step as the text encoder."""

    def __init__(self, tokenizer):
        self.tokenizer, self.known = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in self.known})
        if missing:
            ids = self.tokenizer(
                missing, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
            ).input_ids
            self.known.update(zip(missing, ids, strict=True))
        return torch.stack([self.known[c] for c in captions])


@dataclass(frozen=True)
class DiffusionRecipe:
    """How the UNet and the text encoder are trained. The defaults are recipe v3, the shipped model."""

    steps: int = 6300  # 1.24-1.32 s each on 2 quiet CPU cores: 130-138 min (docs/toy.md)
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 500
    schedule: str = "cosine"  # "cosine" decays to zero at ``steps``; "constant" is v2's schedule
    ema: float = 0.999

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown learning-rate schedule {self.schedule!r}: use 'cosine' or 'constant'")
        if self.steps < 1 or self.batch < 1 or self.lr <= 0 or not 0 <= self.ema < 1:
            raise ValueError(f"invalid diffusion recipe {self}")

    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup)
        if self.schedule == "constant":
            return self.lr * warm
        return self.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step, self.steps) / self.steps))


class Ema:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        pairs = [(self.shadow[k], v) for k, v in model.state_dict().items()]
        floats = [(a, b) for a, b in pairs if b.dtype.is_floating_point]
        torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1 - decay)
        for a, b in pairs:
            if not b.dtype.is_floating_point:
                a.copy_(b)


def train_diffusion(
    work: Path,
    scene_list,
    latent_mean,
    latent_std,
    scaling: float,
    recipe: DiffusionRecipe = DiffusionRecipe(),
    minutes: float | None = None,
    device: str = "cpu",
    on_step: Callable | None = None,
):
    """Train (or resume) to ``recipe.steps``; ``minutes`` stops this call early (at least one step is made).
    ``on_step(step, ema_unet_state, text_encoder)`` is called after every step, for sweeps that evaluate
    snapshots. Returns the EMA UNet, the text encoder, the tokenizer, the step reached and the losses."""
    from diffusers import DDPMScheduler

    tokenizer = build_tokenizer()
    tokenize = CaptionTokens(tokenizer)
    unet, text_encoder = make_unet().to(device), make_text_encoder(tokenizer).to(device)
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-2)
    ema = Ema(unet, recipe.ema)
    ckpt = work / "diffusion"
    step, elapsed, losses, restart = 0, 0.0, [], {}
    loaded = load_checkpoint(ckpt)
    if loaded:
        tensors, state = loaded
        restart = {k: state[k] for k in ("restarted_at", "restarted_from") if k in state}
        unet.load_state_dict(unprefixed("unet", tensors))
        text_encoder.load_state_dict(unprefixed("text", tensors))
        ema.shadow = {k: v.to(device).clone() for k, v in unprefixed("ema", tensors).items()}
        restore_adam(optimizer, params, {k: v.to(device) for k, v in tensors.items() if k.startswith("adam.")})
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
        logger.info("resumed diffusion training at step %d (%.1f min done)", step, elapsed / 60)
    noise_scheduler = DDPMScheduler(**SCHEDULER)
    snr = (noise_scheduler.alphas_cumprod / (1 - noise_scheduler.alphas_cumprod)).to(device)
    latent_mean, latent_std = latent_mean.to(device), latent_std.to(device)
    gen = torch.Generator().manual_seed(1000 + step)
    rng = random.Random(step)
    bar = tqdm(desc="diffusion", initial=step, total=recipe.steps, mininterval=10, unit="step")
    last_save, started, call_started = time.monotonic(), time.monotonic() - elapsed, time.monotonic()
    first_step = step
    # every call makes at least one step, so a resume always moves on, however slow the machine
    while step < recipe.steps and (
        step == first_step or minutes is None or time.monotonic() - call_started < minutes * 60
    ):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(step) * _rewarm(step, restart.get("restarted_at"))
        # random numbers are drawn on the CPU whatever the device, so every device sees the same batches
        idx = torch.randint(len(scene_list), (recipe.batch,), generator=gen)
        noise_in = torch.randn((recipe.batch, *latent_mean.shape[1:]), generator=gen).to(device)
        captions = [
            scenes.caption(scene_list[i], rng, keep=CAPTION_MIX) if rng.random() > 0.1 else "" for i in idx.tolist()
        ]
        noise = torch.randn(noise_in.shape, generator=gen).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (recipe.batch,), generator=gen).to(device)
        idx = idx.to(device)
        latents = (latent_mean[idx] + latent_std[idx] * noise_in) * scaling
        noisy = noise_scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(tokenize(captions).to(device))[0]
        pred = unet(noisy, t, hidden).sample
        target = noise_scheduler.get_velocity(latents, noise, t)
        # min-SNR with v's +1: in terms of the clean image the weight is min(snr + 1, LOSS_CAP), so the
        # noisiest steps, where the layout is decided, keep weight 1 rather than snr (~0 near t = 999)
        weight = torch.clamp(snr[t] + 1, max=LOSS_CAP) / (snr[t] + 1)
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(unet, step)
        step += 1
        losses.append(round(loss.item(), 5))
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{recipe.lr_at(step):.2e}")
        if on_step is not None:
            on_step(step, ema.shadow, text_encoder)
        if time.monotonic() - last_save > 300:
            _save_diffusion(
                ckpt, unet, text_encoder, ema, optimizer, params, step, time.monotonic() - started, losses, restart
            )
            last_save = time.monotonic()
    if step > first_step or not loaded:  # an export-only run (recipe already done) leaves the checkpoint alone
        _save_diffusion(
            ckpt, unet, text_encoder, ema, optimizer, params, step, time.monotonic() - started, losses, restart
        )
    unet.load_state_dict(ema.shadow)
    return unet.eval().cpu(), text_encoder.eval().cpu(), tokenizer, step, losses


REWARM_STEPS = 200


def _rewarm(step: int, restarted_at: int | None) -> float:
    """After a restart from exported weights Adam's moments are new: ramp the rate up again, briefly."""
    return 1.0 if restarted_at is None else min(1.0, (step - restarted_at + 1) / REWARM_STEPS)


def _save_diffusion(ckpt, unet, text_encoder, ema, optimizer, params, step, elapsed, losses, restart) -> None:
    tensors = {
        **prefixed("unet", unet.state_dict()),
        **prefixed("text", text_encoder.state_dict()),
        **prefixed("ema", ema.shadow),
        **adam_tensors(optimizer, params),
    }
    save_checkpoint(ckpt, tensors, {"step": step, "elapsed": elapsed, "losses": losses, **restart})
    logger.info("checkpoint at step %d", step)


# -------------------------------------------------------------------------------- export


def export(path: Path, unet, vae, text_encoder, tokenizer, info: dict) -> Path:
    """Save the pipeline with ``save_pretrained`` into a temporary sibling, then swap it into place."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    # "trailing" spacing starts sampling at t = 999, the pure-noise step the model was trained for
    scheduler = DDIMScheduler(**SCHEDULER, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_clip_vocab(tmp / "tokenizer")
        (tmp / "training.json").write_text(json.dumps(info, indent=1) + "\n")
        tmp.chmod(0o755)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def restart_from_export(folder: Path, work: Path) -> dict:
    """Seed ``work`` with an exported pipeline's weights, as checkpoints that ``main`` resumes: the VAE as
    finished, the diffusion phase at the step the export reached (its EMA UNet as both the weights and the
    EMA, Adam's moments new, the rate warmed up again over ``REWARM_STEPS``). For a run continued on
    another machine, where only the export travelled."""
    info = json.loads((folder / "training.json").read_text())
    if load_checkpoint(work / "vae") or load_checkpoint(work / "diffusion"):
        raise SystemExit(f"{work} already holds checkpoints; resume from them, or use an empty --work")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    save_checkpoint(work / "vae", prefixed("vae", vae), {"step": info["vae_steps"], "loss": None})
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    text = load_file(folder / "text_encoder" / "model.safetensors")
    step = info["diffusion_steps"]
    ema = {k: v.clone() for k, v in unet.items()}
    save_checkpoint(
        work / "diffusion",
        {**prefixed("unet", unet), **prefixed("ema", ema), **prefixed("text", text)},
        {
            "step": step,
            "elapsed": 0.0,
            "losses": info["losses"],
            "restarted_at": step,
            "restarted_from": {k: v for k, v in info.items() if k != "losses"},
        },
    )
    logger.info("seeded %s from %s at diffusion step %d", work, folder, step)
    return info


def training_info(
    scenes_count: int, vae_steps: int, recipe: DiffusionRecipe, steps: int, device: str, losses: list[float], **extra
) -> dict:
    """What an export's training.json records: the recipe, how far it got, where, and every step's loss."""
    return {
        "recipe": RECIPE,
        "scenes": scenes_count,
        "vae_steps": vae_steps,
        "diffusion": asdict(recipe),
        "diffusion_steps": steps,
        "device": device,
        **extra,
        "final_loss_mean_last_200": float(np.mean(losses[-200:])),
        "losses": losses,
    }


def _restart_record(work: Path) -> dict:
    """Where a run that was continued from an export came from, for its training.json."""
    state_file = work / "diffusion" / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    return {k: state[k] for k in ("restarted_at", "restarted_from") if k in state}


def recipe_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DiffusionRecipe()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="diffusion steps of the recipe")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--schedule", choices=("cosine", "constant"), default=defaults.schedule)
    parser.add_argument("--ema", type=float, default=defaults.ema)


def recipe_from(args: argparse.Namespace) -> DiffusionRecipe:
    return DiffusionRecipe(
        steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, schedule=args.schedule, ema=args.ema
    )


def prepare_latents(work: Path, scene_count: int, vae_steps: int, device: str):
    """Phases 1 and 2: the scenes, the VAE (its scaling factor set) and every scene's latent distribution."""
    images, scene_list = render_dataset(work, scene_count)
    vae = train_vae(work, images, vae_steps, device=device)
    mean, std = encode_dataset(work, vae, images)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    logger.info("latent scaling factor %.4f", scaling)
    return vae.cpu(), scene_list, mean, std, scaling


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("toy-work"), help="checkpoints and caches (resumed)")
    parser.add_argument("--export", type=Path, default=PACKAGE_MODEL, help="where the finished pipeline goes")
    parser.add_argument("--scenes", type=int, default=40000, help="number of distinct training scenes")
    parser.add_argument("--vae-steps", type=int, default=4000)
    recipe_arguments(parser)
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="stop this run's diffusion phase after so many minutes (it checkpoints, exports what "
        "it has, and the next run resumes)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a machine with a GPU")
    parser.add_argument(
        "--restart-from",
        type=Path,
        default=None,
        help="an exported pipeline (its training.json says how far it got) to continue from",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    recipe = recipe_from(args)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.restart_from:  # the export's scenes and VAE are the ones its latents came from
        info = restart_from_export(args.restart_from, args.work)
        args.scenes, args.vae_steps = info["scenes"], info["vae_steps"]
    vae, scene_list, mean, std, scaling = prepare_latents(args.work, args.scenes, args.vae_steps, args.device)
    unet, text_encoder, tokenizer, steps, losses = train_diffusion(
        args.work, scene_list, mean, std, scaling, recipe, args.minutes, args.device
    )
    info = training_info(args.scenes, args.vae_steps, recipe, steps, args.device, losses, **_restart_record(args.work))
    path = export(args.export, unet, vae, text_encoder, tokenizer, info)
    logger.info(
        "exported to %s: %d of %d diffusion steps, final loss %.4f",
        path,
        steps,
        recipe.steps,
        info["final_loss_mean_last_200"],
    )


if __name__ == "__main__":
    main()
