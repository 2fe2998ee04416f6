"""The caller's pipeline during a run: prepared for training, then given back exactly as it came.

``train_concept`` borrows a pipeline (the app's, a test's) that must come back unchanged: modes,
devices, dtypes, grad flags, gradient checkpointing, tokenizers and scheduler. Everything a run
changes on it goes through here, so what is changed and what is restored sit side by side.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from spectral_diffusion.core.config import TEXT_COMPONENTS, TOKENIZER_OF


def components(pipe) -> dict[str, torch.nn.Module]:
    names = ("unet", "vae") + TEXT_COMPONENTS
    return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}


@contextmanager
def borrowed(pipe) -> Iterator[None]:
    """Give the pipeline back exactly as it came: modes, devices, grad flags, tokenizers, scheduler.

    Tokenizers and the scheduler are swapped for copies (training adds trigger tokens to the
    tokenizer and previews move the scheduler), so the caller's objects are never touched.
    """
    modules = components(pipe)
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
        if pipe.vae.dtype != vae_dtype:  # undo upcast_vae: fp16 -> fp32 -> fp16 is exact
            pipe.vae.to(dtype=vae_dtype)


def _checkpointing_on(module: torch.nn.Module) -> bool:
    if hasattr(module, "is_activation_checkpointing"):  # transformers 5 (the other name is deprecated)
        return bool(module.is_activation_checkpointing)
    return bool(getattr(module, "is_gradient_checkpointing", False))


def set_checkpointing(module: torch.nn.Module, enable: bool) -> None:
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
        set_checkpointing(module, checkpointing)


def upcast_vae(pipe) -> None:
    """Run an fp16 VAE that asks for it (``force_upcast``, e.g. SDXL's) in fp32: in fp16 it overflows
    to NaN latents. ``borrowed`` casts it back afterwards."""
    vae = pipe.vae
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(dtype=torch.float32)


def cast_frozen(pipe, accelerator, owned: bool) -> None:
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
