"""Exact export of concepts to the standard LoRA and textual-inversion formats.

Every slot update factors exactly as ``dW = L R^T`` (rank 2r additive, rank r rotational), and a set
of concepts in disjoint slots is just the column-concatenation of their factors, so the export is
lossless: ``W + lora_B @ lora_A`` equals the fused weight up to float rounding.

Two key styles:
- ``peft``: ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` as diffusers'
  ``load_lora_weights`` reads them;
- ``kohya``: ``lora_unet_<path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  as AUTOMATIC1111 and ComfyUI read them (diffusers reads them too).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from spectral_diffusion.atomic import atomic_path
from spectral_diffusion.core.model import SpectralAdapters

LORA_STYLES = ("peft", "kohya")
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
KOHYA_PREFIX_SDXL = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def _strengths(adapters: SpectralAdapters, names: Sequence[str], strengths: Mapping[str, float] | None):
    strengths = dict(strengths or {})
    return {name: float(strengths.get(name, adapters.strength(name))) for name in names}


def fused_factors(
    adapters: SpectralAdapters, names: Sequence[str], strengths: Mapping[str, float] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer key: (L, R) with ``sum_i a_i dW_i = L R^T``, stacking the concepts' factors."""
    if not names:
        raise ValueError("name at least one concept to export")
    scale = _strengths(adapters, names, strengths)
    per_concept = {name: adapters.lora_factors(name) for name in names}
    fused = {}
    for key in adapters.layers:
        lefts = [scale[name] * per_concept[name][key][0] for name in names]
        rights = [per_concept[name][key][1] for name in names]
        fused[key] = (torch.cat(lefts, dim=1).detach(), torch.cat(rights, dim=1).detach())
    return fused


def _kohya_name(component: str, path: str, sdxl: bool) -> str:
    prefix = (KOHYA_PREFIX_SDXL if sdxl else KOHYA_PREFIX)[component]
    if component != "unet" and not path.startswith("text_model."):
        # transformers 5 dropped this level from CLIPTextModel (not from CLIPTextModelWithProjection,
        # SDXL's second encoder); kohya keys always spell it exactly once
        path = "text_model." + path
    return f"{prefix}_{path.replace('.', '_')}"


def lora_state_dict(
    adapters: SpectralAdapters,
    names: Sequence[str],
    strengths: Mapping[str, float] | None = None,
    style: str = "peft",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """LoRA tensors for the given concepts; loading them adds exactly ``sum_i a_i dW_i``."""
    if style not in LORA_STYLES:
        raise ValueError(f"unknown LoRA style {style!r}; use one of {LORA_STYLES}")
    sdxl = "text_encoder_2" in adapters.components
    out = {}
    for key, (left, right) in fused_factors(adapters, names, strengths).items():
        component, _, path = key.partition(".")
        layer = adapters.layers[key]
        down, up = right.T.contiguous(), left.contiguous()
        if isinstance(layer.base_layer, torch.nn.Conv2d):
            down, up = down[:, :, None, None], up[:, :, None, None]
        if style == "peft":
            out[f"{key}.lora_A.weight"] = down.to(dtype)
            out[f"{key}.lora_B.weight"] = up.to(dtype)
        else:
            name = _kohya_name(component, path, sdxl)
            out[f"{name}.lora_down.weight"] = down.to(dtype)
            out[f"{name}.lora_up.weight"] = up.to(dtype)
            out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)  # scale alpha/rank = 1
    return out


def textual_inversion_state_dict(adapters: SpectralAdapters, name: str) -> dict[str, torch.Tensor]:
    """A concept's trigger-token embeddings as textual-inversion tensors.

    SD 1.x / 2.x: ``emb_params`` (t x d), read by ``pipe.load_textual_inversion(file, token=...)``.
    SDXL: ``clip_l`` and ``clip_g``, the AUTOMATIC1111 SDXL embedding layout.
    """
    vectors = adapters.concept_token_vectors(name)
    if not vectors:
        return {}
    if "text_encoder_2" in vectors:
        return {"clip_l": vectors["text_encoder"].contiguous(), "clip_g": vectors["text_encoder_2"].contiguous()}
    return {"emb_params": vectors["text_encoder"].contiguous()}


def embedding_path(lora_path: str | os.PathLike, concept: str) -> Path:
    """Where the textual-inversion file of ``concept`` goes beside a LoRA file."""
    lora_path = Path(lora_path)
    return lora_path.with_name(f"{lora_path.stem}.{concept}.ti.safetensors")


def export_lora(
    adapters: SpectralAdapters,
    names: Sequence[str],
    out_path: str | os.PathLike,
    strengths: Mapping[str, float] | None = None,
    style: str = "peft",
    dtype: torch.dtype = torch.float32,
) -> list[Path]:
    """Write the LoRA file and one textual-inversion file per concept with trigger tokens.

    Returns the paths written, the LoRA file first. All writes are atomic.
    """
    out_path = Path(out_path)
    tensors = lora_state_dict(adapters, names, strengths, style, dtype)
    concepts = [adapters.concept(name) for name in names]
    metadata = {
        "spectral_concepts": json.dumps([c.name for c in concepts]),
        "spectral_tokens": json.dumps({c.name: c.tokens for c in concepts}),
        "lora_style": style,
        "base_fingerprint": adapters.fingerprint,
    }
    with atomic_path(out_path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    written = [out_path]
    for concept in concepts:
        embeddings = textual_inversion_state_dict(adapters, concept.name)
        if embeddings:
            path = embedding_path(out_path, concept.name)
            with atomic_path(path) as tmp:
                save_file(embeddings, str(tmp), metadata={"tokens": json.dumps(concept.tokens)})
            written.append(path)
    return written
