"""HF Accelerate for a training run: one ``Accelerator`` per run, and a warning on a precision that cannot work.

Accelerate handles devices, DDP when launched with ``torchrun`` / ``accelerate launch``, and autocast
for ``mixed_precision``; the trainer only asks it for those.
"""

from __future__ import annotations

import logging

import torch

from spectral_diffusion.training.config import TrainConfig

logger = logging.getLogger(__name__)


def make_accelerator(config: TrainConfig, sdxl: bool):
    from accelerate import Accelerator
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
        _forget_accelerator_state()
        return Accelerator(**kwargs)


def _forget_accelerator_state() -> None:
    """Let a second run in this process (the app, tests) use another precision than the first.

    Accelerate keeps one process-wide ``AcceleratorState`` and refuses a new ``Accelerator`` with
    other settings. Accelerate 1.15 has no public way to drop it (its own test base class calls this
    same private method), so the call is kept here alone. The distributed process group
    (``PartialState``) is kept.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def check_precision(pipe, config: TrainConfig, accelerator) -> None:
    if config.mixed_precision == "fp16" and not accelerator.native_amp:
        logger.warning("fp16 mixed precision needs a GPU; training in fp32 (bf16 works on CPUs)")
    if pipe.unet.dtype != torch.float32 and config.mixed_precision == "no":
        logger.warning(
            "the pipeline is in %s but mixed_precision is 'no': gradients may underflow; pass "
            "mixed_precision='fp16' or 'bf16' to train with autocast",
            pipe.unet.dtype,
        )
