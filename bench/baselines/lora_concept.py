"""The PEFT LoRA baseline of the fusion benchmark, trained the way ``train_concept`` trains a slot.

Same images and captions (``ConceptDataset``), same trigger-token scheme (one new embedding row per
concept, initialised to the table's mean, the only trainable row), same target layers (the patcher's
``attention`` preset), same rank, steps, batch, learning rates, noise schedule and loss. The LoRA
factors come from ``peft.inject_adapter_in_model`` on copies of the UNet and text encoder, so the
base pipeline is never touched; what comes out is the dense update ``scale * B @ A`` per layer.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spectral_diffusion.core.config import TEXT_ATTENTION, UNET_ATTENTION
from spectral_diffusion.core.tokens import add_tokens
from spectral_diffusion.generation.diffusion import encode_captions, encode_images
from spectral_diffusion.training.config import TrainConfig
from spectral_diffusion.training.data import ConceptDataset, collate, mix_seed

logger = logging.getLogger(__name__)


@dataclass
class LoraConcept:
    token: str
    deltas: dict[str, dict[str, torch.Tensor]]  # component -> module path -> dense update (out x in)
    token_vector: torch.Tensor
    losses: list[float]


def _lora_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            deltas[path] = module.get_delta_weight("concept").detach().float().clone()
    return deltas


def train_lora_concept(pipe, images, config: TrainConfig) -> LoraConcept:
    """Train one LoRA concept on copies of ``pipe``'s UNet and text encoder; ``pipe`` is unchanged."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig, inject_adapter_in_model

    config = config.resolved(pipe)
    token = config.tokens[0] if config.tokens else f"<{config.name}>"
    torch.manual_seed(config.seed)
    tokenizer = copy.deepcopy(pipe.tokenizer)
    (token_id,) = add_tokens(tokenizer, [token])
    unet, text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    table = text_encoder.get_input_embeddings().weight.data
    text_encoder.resize_token_embeddings(len(tokenizer))
    embedding = text_encoder.get_input_embeddings()
    embedding.weight.data[token_id] = table.mean(dim=0)

    def lora(suffixes):
        return LoraConfig(r=config.rank, lora_alpha=config.rank, lora_dropout=0.0, target_modules=list(suffixes))

    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet = inject_adapter_in_model(lora(UNET_ATTENTION), unet, adapter_name="concept")
    text_encoder = inject_adapter_in_model(lora(TEXT_ATTENTION), text_encoder, adapter_name="concept")
    embedding.weight.requires_grad_(True)
    rows = torch.zeros(len(tokenizer), 1)
    rows[token_id] = 1
    embedding.weight.register_hook(lambda grad: grad * rows)  # only the trigger token's row learns
    groups = [
        {
            "params": [p for n, p in unet.named_parameters() if "lora_" in n],
            "lr": config.lr_unet,
            "weight_decay": config.weight_decay,
        },
        {
            "params": [p for n, p in text_encoder.named_parameters() if "lora_" in n],
            "lr": config.lr_text,
            "weight_decay": config.weight_decay,
        },
        {"params": [embedding.weight], "lr": config.lr_embedding, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups)
    dataset = ConceptDataset(
        images,
        token,
        resolution=config.resolution,
        random_crop=config.random_crop,
        flip_p=config.flip_p,
        seed=config.seed,
    )
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet.train()
    text_encoder.train()
    losses = []
    for step in range(config.steps):
        examples = []
        for j in range(config.batch_size):
            q = step * config.batch_size + j
            generator = torch.Generator().manual_seed(mix_seed(config.seed, 11, q))
            examples.append(dataset.example(q % len(dataset), generator))
        batch = collate(examples)
        generator = torch.Generator().manual_seed(mix_seed(config.seed, 12, step))
        latents = encode_images(pipe.vae, batch["pixel_values"], generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        hidden, _ = encode_captions([text_encoder], [tokenizer], batch["caption"], "cpu", sdxl=False)
        pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
        if scheduler.config.prediction_type == "epsilon":
            target = noise
        elif scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction type {scheduler.config.prediction_type!r}")
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        params = [p for group in groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    deltas = {"unet": _lora_deltas(unet), "text_encoder": _lora_deltas(text_encoder)}
    return LoraConcept(token, deltas, embedding.weight.data[token_id].clone(), losses)


def fused_pipeline(pipe, concepts: list[LoraConcept], weight: float):
    """A copy of ``pipe`` with ``W + weight * sum_i dW_i`` merged into each layer and every token added:
    ``weight`` 1 is PEFT's summed LoRAs, ``1 / n`` their average."""
    fused = type(pipe)(
        **{
            **pipe.components,
            "tokenizer": copy.deepcopy(pipe.tokenizer),
            "unet": copy.deepcopy(pipe.unet),
            "text_encoder": copy.deepcopy(pipe.text_encoder),
        },
        requires_safety_checker=False,
    )
    ids = add_tokens(fused.tokenizer, [c.token for c in concepts])
    fused.text_encoder.resize_token_embeddings(len(fused.tokenizer))
    table = fused.text_encoder.get_input_embeddings().weight.data
    for token_id, concept in zip(ids, concepts, strict=True):
        table[token_id] = concept.token_vector
    with torch.no_grad():
        for name in ("unet", "text_encoder"):
            model = getattr(fused, name)
            for concept in concepts:
                for path, delta in concept.deltas[name].items():
                    model.get_submodule(path).weight.add_(delta, alpha=weight)
    return fused
