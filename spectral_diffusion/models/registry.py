"""The built-in models, and resolution of ``--model`` values to something diffusers can load.

The tests, CI and a first run of the app must work with no network and no weights on disk, so
every ``builtin:`` name is either shipped with the package or built from seeds on first use.

``builtin:toy``, the default, is a pipeline pretrained by ``python -m toy.pretrain`` on procedural
scenes (``toy/scenes.py``, in the repository) and shipped inside the package as an ordinary
diffusers folder (``spectral_diffusion/models/toy``, about 21 MB of fp32 safetensors).  It draws
32 x 32 pictures of coloured shapes and learns a new concept on a CPU in minutes.

The seed-built models (``spectral_diffusion.testing.tiny``, for tests) live in ``models_home()/models/<name>``,
e.g. ``builtin:tiny`` in ``~/.cache/spectral_diffusion/models/tiny``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch

from spectral_diffusion.errors import ModelNotFoundError
from spectral_diffusion.models.build import build_atomically, is_complete_build
from spectral_diffusion.models.captions import CaptionGrammar
from spectral_diffusion.testing.tiny import tiny_pipeline, tiny_sdxl_pipeline

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"

# Name -> one-line description, shown by ``models`` and in error messages.
BUILTIN_MODELS: dict[str, str] = {
    "builtin:toy": (
        "small Stable Diffusion 1.x pipeline pretrained on procedural scenes (coloured shapes), "
        "32x32 images; the default"
    ),
    "builtin:tiny": ("tiny Stable Diffusion 1.x architecture, random weights, 64x64 images (tests)"),
    "builtin:tiny-sdxl": ("tiny Stable Diffusion XL architecture, random weights, 64x64 images (tests)"),
}

# The model the CLI, the service and the app use when none is given.
DEFAULT_MODEL = "builtin:toy"

# Slot width r for concepts on the built-in models (their layers are 32 to 128 wide), and elsewhere.
BUILTIN_RANKS = {"builtin:toy": 8, "builtin:tiny": 4, "builtin:tiny-sdxl": 4}
DEFAULT_RANK = 8


def default_rank(model: str) -> int:
    """The rank a new concept gets on ``model`` unless one is given."""
    return BUILTIN_RANKS.get(str(model).strip(), DEFAULT_RANK)


# TrainConfig settings that suit a built-in model better than the defaults tuned for real SD models.
# builtin:toy was trained from scratch on 32 px scenes: a new shape needs larger steps than a
# pretrained SD needs for a dog, and captions say "on the left", so images are never mirrored.
# lr_unet 3e-3 is measured by bench/quality/concept_quality.py (docs/concept-quality.md): a slot needs about 3x a
# LoRA's UNet rate; at 1e-3 it learnt worse than a LoRA, at 3e-3 as well as one (identity alone 0.74 vs 0.74)
# while 1e-2 gains on pair prompts but loses identity alone and fusion. Scaling rule for
# real models (TrainConfig's defaults, the paper's SD1.5 setting, also used for SD2.x / SDXL): what
# transfers is the per-direction step lr x mean(s_k) of the slot, which lr_scale="spectrum" makes the
# configured number; toy's slots have s_k ~ 1, so its rates are already per-direction steps.
BUILTIN_TRAINING: dict[str, dict] = {
    # Half the examples cut out, shrunk and moved to a caption position, 3 in 10 recoloured (the colours the
    # photos show least picked most), 3 in 10 two photos side by side (captions follow each): a concept
    # learned from 5 photos is then drawn where, how large and in the colour asked (91%, 72%, 81% where its
    # photos never showed it). With recolour targets drawn uniformly, a colour none of the photos showed
    # came up in 1 example of 20 and the purple moon was never drawn (new colour 72%); recolour_p 0.5 bought
    # the colour back but lost placement and identity. More pairs trade placement of a concept alone away
    # (pair_p 0.5: 61% instead of 96%). 600 steps rather than 300: at 300 a new shape came out half-learnt
    # (the moon a blunt C, identity alone 0.76; 0.92 at 600, 0.86 at 900), and a left-right pair was
    # placed in 62% instead of 77%. bench/quality/regional_quality.py, docs/fusion-quality.md.
    "builtin:toy": {
        "steps": 600,
        "batch_size": 4,
        "lr_unet": 3e-3,
        "lr_text": 1e-4,
        "lr_embedding": 1e-2,
        "flip_p": 0.0,
        "augment_p": 0.5,
        "pair_p": 0.3,
        "recolour_p": 0.3,
    },
}


def training_defaults(model: str) -> dict:
    """``TrainConfig`` fields that ``model`` trains best with, unless the user sets them."""
    return dict(BUILTIN_TRAINING.get(str(model).strip(), {}))


# The grammar of the captions builtin:toy was pretrained on (toy/scenes.py draws its scenes with these
# words): zoom / shift, recolour and pair augmentation rewrite a concept's captions in it.
BUILTIN_CAPTIONS: dict[str, CaptionGrammar] = {
    "builtin:toy": CaptionGrammar(
        positions={
            "left": (0.2, 0.5),
            "right": (0.8, 0.5),
            "top": (0.5, 0.2),
            "bottom": (0.5, 0.8),
            "center": (0.5, 0.5),
        },
        phrases={
            "left": "on the left",
            "right": "on the right",
            "top": "at the top",
            "bottom": "at the bottom",
            "center": "in the center",
        },
        sizes={"small": 0.3, "large": 0.5},
        pairs=(("left", "right"), ("top", "bottom")),  # small objects never overlap there
        colours={
            "red": (215, 40, 40),
            "green": (40, 165, 60),
            "blue": (40, 80, 220),
            "yellow": (240, 210, 40),
            "orange": (245, 135, 25),
            "purple": (135, 55, 185),
        },
    ),
}


def caption_grammar(model: str) -> CaptionGrammar | None:
    """The caption grammar ``model`` (a name, or a shipped model's folder) was trained on, or None (its
    captions are then never rewritten)."""
    model = str(model).strip()
    shipped = {str(folder): name for name, folder in SHIPPED_MODELS.items()}
    return BUILTIN_CAPTIONS.get(shipped.get(model, model))


# Built-in models shipped as ready diffusers folders inside the package (not built on first use).
SHIPPED_MODELS: dict[str, Path] = {"builtin:toy": Path(__file__).resolve().parent / "toy"}

# Name -> what makes the pipeline, for the built-in models made from seeds and saved on first use.
_BUILDERS: dict[str, Callable[[], object]] = {
    "builtin:tiny": tiny_pipeline,
    "builtin:tiny-sdxl": tiny_sdxl_pipeline,
}

# -------------------------------------------------------------------------- resolution


def models_home() -> Path:
    """The package's cache root.

    ``$SPECTRAL_DIFFUSION_HOME`` if set, else ``~/.cache/spectral_diffusion``.
    """
    env = os.environ.get("SPECTRAL_DIFFUSION_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "spectral_diffusion"


def builtin_path(name: str) -> Path:
    """Where built-in model ``name`` lives (whether or not it is built yet)."""
    if name in SHIPPED_MODELS:
        return SHIPPED_MODELS[name]
    return models_home() / "models" / name.removeprefix(BUILTIN_PREFIX)


def _builtin_list() -> str:
    return ", ".join(BUILTIN_MODELS)


def _shipped_folder(name: str) -> Path:
    path = SHIPPED_MODELS[name]
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"the weights of {name} are missing from the package ({path}); reinstall spectral-diffusion "
            "from a full checkout, or make them again with: python -m toy.pretrain"
        )
    return path


def ensure_builtin(name: str) -> Path:
    """The folder of built-in model ``name``: shipped with the package, or built first if missing or outdated."""
    if name in SHIPPED_MODELS:
        return _shipped_folder(name)
    if name not in _BUILDERS:
        raise ModelNotFoundError(f"unknown built-in model {name!r}; built-in models: {_builtin_list()}")
    path = builtin_path(name)
    if is_complete_build(path, name):
        return path
    return build_atomically(path, name, _BUILDERS[name])


# A Hugging Face repo id: "name" or "owner/name", letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


def _looks_like_path(model: str) -> bool:
    """Whether a missing ``model`` was meant as a folder (so not for the hub)."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or "\\" in model
        or model.endswith("/")
        or model.count("/") > 1
        or not _HUB_ID.match(model)
    )


def _check_local_folder(path: Path, model: str) -> str:
    """A local folder is usable only as a diffusers pipeline folder."""
    if not path.is_dir():
        raise ModelNotFoundError(f"model {model!r} is a file, not a diffusers folder (one with model_index.json)")
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"folder {model!r} has no model_index.json, so it is not a diffusers "
            "pipeline; pass a folder saved with save_pretrained, a Hugging Face id, "
            f"or one of the built-in models: {_builtin_list()}"
        )
    return str(path)


def resolve_model(model: str) -> str:
    """Turn a ``--model`` value into what ``from_pretrained`` takes: folder or hub id.

    Built-in names are built on first use; local paths are checked now, so that a typo
    gives a clear message rather than a hub lookup; anything else is a hub id.
    """
    model = str(model).strip()
    if model.startswith(BUILTIN_PREFIX):
        return str(ensure_builtin(model))
    path = Path(model).expanduser()
    if model and path.exists():
        return _check_local_folder(path, model)
    if not model or _looks_like_path(model):
        raise ModelNotFoundError(
            f"model {model!r}: no such folder, and not a Hugging Face model id; "
            "pass a local diffusers folder, a hub id such as 'owner/name', "
            f"or one of: {_builtin_list()}"
        )
    return model


def _model_index(source: str, local: bool) -> dict:
    """The pipeline's model_index.json, read first to pick the load options."""
    if local:
        return json.loads((Path(source) / "model_index.json").read_text(encoding="utf-8"))
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(source)


HUB_TIMEOUT_SECONDS = 3.0


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers at all (one quick TCP connect, asked once per process)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_TIMEOUT_SECONDS).close()
    except OSError:
        return False
    return True


def _check_in_hub_cache(model: str, source: str, local: bool) -> None:
    """Offline, a hub id must already be in the local cache: say so at once instead of retrying."""
    if local:
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "model_index.json"), str):
        return
    raise ModelNotFoundError(
        f"model {model!r} is not in the local Hugging Face cache and the hub cannot be reached (offline); "
        f"download it once where there is network (`hf download {source}`), or pass a local diffusers "
        f"folder; built-in models: {_builtin_list()}"
    )


def _load_error(model: str, source: str, err: Exception) -> ModelNotFoundError:
    """A message for a failed load that tells the user what to try next."""
    if model.startswith(BUILTIN_PREFIX):
        hint = f"the build in {source} looks damaged; delete that folder to rebuild it"
    else:
        hint = (
            "check the id (and your network or Hugging Face login), or pass a local "
            f"diffusers folder; built-in models: {_builtin_list()}"
        )
    return ModelNotFoundError(f"could not load model {model!r} ({type(err).__name__}: {err}). {hint}")


# What diffusers / huggingface_hub raise for a missing, unreachable or malformed model
# (a bad model_index.json gives KeyError / AttributeError); anything else propagates.
_LOAD_ERRORS = (OSError, ValueError, KeyError, AttributeError, TypeError)

# transformers and diffusers build modules on the meta device inside a process-wide context while they
# load; two loads at once in one process (the app training and importing at the same time) then see each
# other's context and end with "Cannot copy out of meta tensor". One load at a time per process.
_LOAD_LOCK = threading.Lock()


def load_pipeline(model: str, torch_dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Resolve ``model`` and load it as a diffusers pipeline on ``device``.

    The safety checker is not loaded: it is a second large download, and generation
    here is user-driven and local.
    """
    from diffusers import DiffusionPipeline

    source = resolve_model(model)
    local = Path(source).is_dir()
    kwargs: dict = {"dtype": torch_dtype}
    if local or not hub_reachable():
        _check_in_hub_cache(model, source, local)
        kwargs["local_files_only"] = True  # offline: no retries, no waiting for a network that is not there
    with _LOAD_LOCK:
        try:
            if "safety_checker" in _model_index(source, local):
                kwargs["safety_checker"] = None
            pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
        except _LOAD_ERRORS as err:
            raise _load_error(model, source, err) from err
        logger.info("loaded %s (%s) from %s", model, type(pipe).__name__, source)
        return pipe.to(device)


def is_sdxl(pipe) -> bool:
    """Whether ``pipe`` has SDXL's second text encoder (and SDXL's conditioning)."""
    return getattr(pipe, "text_encoder_2", None) is not None
