"""Resumable training checkpoints: the trainable parameters, AdamW's state, the RNG and the progress.

A checkpoint folder holds one ``checkpoint-<step>.safetensors`` (tensors) and ``state.json`` naming
it, each written atomically and the JSON last, so a crash leaves the previous checkpoint readable.
Reading refuses (``CheckpointError``) anything damaged, made on another base model, from other training
images (or captions, or masks) or with other settings than the resuming run, before any of it is applied:
``--resume`` continues the very run it names or says why it cannot, it never quietly trains something
else. The library removes a run's checkpoint once its concept is added, and on ``delete``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from spectral_diffusion.atomic import atomic_path, atomic_write_text
from spectral_diffusion.errors import CheckpointError
from spectral_diffusion.training.config import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_STATE = "state.json"
CHECKPOINT_FORMAT = "spectral-diffusion-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_TENSORS = re.compile(r"checkpoint-\d{7,}\.safetensors")
# Fields that may differ between a checkpointed run and the run resuming it.
RESUME_FREE_FIELDS = (
    "resume",
    "checkpoint_every",
    "preview_every",
    "preview_prompt",
    "preview_steps",
    "cpu",
    "gradient_checkpointing",
)


@dataclass
class ResumePoint:
    """Where a resumed run continues: its step and the losses recorded up to it."""

    step: int
    losses: list[float]
    eval_losses: dict[int, float]


def saved_step(folder: str | Path) -> tuple[int, int] | None:
    """(step, total steps) of the checkpoint in ``folder``, for messages; None if there is none readable."""
    try:
        state = json.loads((Path(folder) / CHECKPOINT_STATE).read_text(encoding="utf-8"))
        step, total = state["step"], state["config"]["steps"]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
        return None
    return (step, total) if isinstance(step, int) and isinstance(total, int) else None


def config_for_resume(config: TrainConfig) -> dict:
    """The settings a resuming run must share with the checkpointed one."""
    data = config.to_json()
    for key in RESUME_FREE_FIELDS:
        data.pop(key, None)
    return data


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def adam_tensors(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as flat CPU tensors named ``optim.<index>.<key>``."""
    tensors = {}
    for i, param in enumerate(params):
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"optim.{i}.{key}"] = value.detach().cpu().reshape(-1).contiguous()
    return tensors


def adam_state(entry: dict[str, torch.Tensor], param: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state from flat checkpoint tensors (its ``step`` stays a CPU scalar)."""
    if (
        set(entry) != {"step", "exp_avg", "exp_avg_sq"}
        or entry["step"].numel() != 1
        or any(entry[k].numel() != param.numel() for k in ("exp_avg", "exp_avg_sq"))
    ):
        raise CheckpointError(f"checkpoint optimiser state {index} does not fit this model")
    return {
        "step": entry["step"].reshape(()),
        "exp_avg": entry["exp_avg"].reshape(param.shape).to(param.device),
        "exp_avg_sq": entry["exp_avg_sq"].reshape(param.shape).to(param.device),
    }


class Checkpoints:
    """The checkpoint of one run in ``config.checkpoint_dir``, over the trainer's parameters and optimiser.

    ``scaler`` is accelerate's fp16 gradient scaler (None without one); ``fingerprint`` identifies
    the base model so a checkpoint is never resumed on another one; ``inputs`` (``{"fingerprint": ...,
    "images": count}``, from ``ConceptDataset.fingerprint``) the training images, captions and masks.
    """

    def __init__(
        self,
        config: TrainConfig,
        fingerprint: str,
        params: list[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scaler,
        device: torch.device,
        inputs: dict | None = None,
    ):
        self.config, self.fingerprint, self.inputs = config, fingerprint, inputs
        self.params, self.optimizer, self.scaler, self.device = params, optimizer, scaler, device
        self.folder = Path(config.checkpoint_dir) if config.checkpoint_dir else None

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.params)}
        tensors.update(adam_tensors(self.optimizer, self.params))
        tensors.update(rng_tensors(self.device))
        return tensors

    def save(self, step: int, losses: list[float], eval_losses: dict[int, float]) -> None:
        """Tensors (safetensors) then the JSON state naming them, each written atomically."""
        name = f"checkpoint-{step:07d}.safetensors"
        with atomic_path(self.folder / name) as tmp:
            save_file(self._tensors(), str(tmp))
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "tensors": name,
            "config": config_for_resume(self.config),
            "base_fingerprint": self.fingerprint,
            "inputs": self.inputs,
            "losses": losses,
            "eval_losses": {str(k): v for k, v in eval_losses.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        atomic_write_text(self.folder / CHECKPOINT_STATE, json.dumps(state, indent=1))
        for old in self.folder.glob("checkpoint-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        logger.info("checkpoint at step %d in %s", step, self.folder)

    def load(self) -> ResumePoint | None:
        """Apply the folder's checkpoint to the parameters, optimiser, RNG and scaler; None if there is none."""
        state_path = self.folder / CHECKPOINT_STATE
        if not state_path.is_file():
            logger.warning("resume: no checkpoint in %s; training %s from step 0", self.folder, self.config.name)
            return None
        state = self._read_state(state_path)
        try:
            tensors = load_file(str(self.folder / state["tensors"]))
        except Exception as error:  # a damaged file is reported, never half-applied
            raise CheckpointError(f"checkpoint {self.folder / state['tensors']} is unreadable ({error})") from None
        resumed = self._apply(tensors, state)
        logger.info("resumed from step %d of %s", resumed.step, self.folder)
        return resumed

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
        if state.get("base_fingerprint") != self.fingerprint:
            raise CheckpointError(f"checkpoint in {path.parent} was made on another base model; start afresh")
        self._check_inputs(path, state.get("inputs"))
        self._check_settings(path, state.get("config", {}))
        step = state.get("step")
        if not isinstance(step, int) or not 0 <= step <= self.config.steps:
            raise CheckpointError(f"checkpoint {path} has an invalid step {step!r}")
        return state

    def _check_inputs(self, path: Path, theirs) -> None:
        if self.inputs is None:  # a caller that does not know its inputs (tests of the file format)
            return
        fresh = "train without --resume to start afresh (or delete the checkpoint)"
        if not isinstance(theirs, dict) or "fingerprint" not in theirs:
            raise CheckpointError(
                f"checkpoint in {path.parent} does not record its training images (an earlier version made "
                f"it), so resuming could continue another concept; {fresh}"
            )
        if theirs["fingerprint"] != self.inputs["fingerprint"]:
            then, now = theirs.get("images", "?"), self.inputs.get("images", "?")
            raise CheckpointError(
                f"checkpoint in {path.parent} was made from other training images or captions ({then} images "
                f"then, {now} now); resume with the same photos, or {fresh}"
            )

    def _check_settings(self, path: Path, theirs: dict) -> None:
        mine = config_for_resume(self.config)
        # A checkpoint made before a setting existed was made with that setting's default.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
        theirs = {**{k: defaults[k] for k in mine if k not in theirs and k in defaults}, **theirs}
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if changed:
            detail = ", ".join(f"{k}={theirs.get(k)!r} (now {mine.get(k)!r})" for k in changed[:4])
            raise CheckpointError(
                f"checkpoint in {path.parent} was made with other settings: {detail}; resume with the same "
                "settings or delete the checkpoint"
            )

    def _apply(self, tensors: dict[str, torch.Tensor], state: dict) -> ResumePoint:
        for i, param in enumerate(self.params):
            saved = tensors.get(f"param.{i}")
            if saved is None or saved.shape != param.shape or not torch.isfinite(saved).all():
                raise CheckpointError(f"checkpoint tensor param.{i} is missing or does not fit this model")
        with torch.no_grad():
            for i, param in enumerate(self.params):
                param.copy_(tensors[f"param.{i}"])
        for i, param in enumerate(self.params):
            prefix = f"optim.{i}."
            entry = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if entry:
                self.optimizer.state[param] = adam_state(entry, param, i)
        restore_rng(tensors, self.device)
        if state.get("scaler") and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        step = state["step"]
        return ResumePoint(
            step=step,
            losses=[float(x) for x in state.get("losses", [])][:step],
            eval_losses={int(k): float(v) for k, v in state.get("eval_losses", {}).items()},
        )
