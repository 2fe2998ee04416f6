"""One rank of the data-parallel training test; started by ``torchrun`` from tests/test_training.py.

Usage: ``torchrun --standalone --nproc_per_node 2 tests/dist_train_worker.py IMAGES OUT STEPS``. Each rank
trains ``builtin:tiny`` (``SPECTRAL_DIFFUSION_HOME`` must point at the models home of the test session)
and writes its adapter tensors to ``OUT/rank<R>.safetensors`` and its view of the run to
``OUT/rank<R>.json``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from spectral_diffusion.training.config import TrainConfig
from spectral_diffusion.training.trainer import train_concept


def main(images: str, out: str, steps: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    config = TrainConfig(
        name="dot",
        class_word="dog",
        rank=4,
        slot=1,
        steps=steps,
        resolution=32,
        batch_size=1,
        cpu=True,
        lr_unet=1e-3,
        lr_text=1e-4,
        lr_embedding=1e-2,
        preview_steps=1,
        seed=5,
    )
    result = train_concept("builtin:tiny", images, config)
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = Path(out)
    save_file(result.adapter.tensors(), str(folder / f"rank{rank}.safetensors"))
    info = {"rank": rank, "world_size": world, "backend": dist.get_backend(), "losses": result.losses}
    (folder / f"rank{rank}.json").write_text(json.dumps(info))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
