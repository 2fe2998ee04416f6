"""Built-in models that need no download, and resolution of ``--model`` values.

The tests, CI and a first run of the app must work with no network and no weights on
disk, so the package builds small Stable-Diffusion-architecture pipelines itself from
fixed seeds and saves them once through the ordinary ``save_pretrained`` /
``from_pretrained`` path.  Everything downstream (patching, training, export) then sees
what it sees with a real model: the same classes, module paths, configs and loaders.

``builtin:toy``, the default, is different: a pipeline pretrained by ``python -m toy.pretrain``
on procedural scenes (``spectral_diffusion.models.scenes``) and shipped inside the package as an ordinary
diffusers folder (``spectral_diffusion/models/toy``, about 21 MB of fp32 safetensors).  It draws
32 x 32 pictures of coloured shapes and learns a new concept on a CPU in minutes.

The seed-built models live in ``models_home()/models/<name>``, e.g. ``builtin:tiny`` in
``~/.cache/spectral_diffusion/models/tiny``.

Tiny model sizes (both pipelines): UNet block channels (32, 64), 2 layers per block,
latent ``sample_size`` 32, a 2-block VAE (``vae_scale_factor`` 2, 4 latent channels),
so the default image is 64 x 64 pixels.  Text encoders have hidden size 32, 4 layers,
4 heads and an intermediate size of 37 (not a multiple of the hidden size, so that
m / n shape mix-ups fail loudly).  Their images are noise: they exercise code paths.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import torch
from filelock import FileLock

from spectral_diffusion.errors import SpectralDiffusionError

logger = logging.getLogger(__name__)


class ModelNotFoundError(SpectralDiffusionError, ValueError):
    """A ``--model`` value names nothing loadable; the message says what to do."""


BUILTIN_PREFIX = "builtin:"

# Name -> one-line description, shown by ``models`` and in error messages.
BUILTIN_MODELS: dict[str, str] = {
    "builtin:toy": (
        "small Stable Diffusion 1.x pipeline pretrained on procedural scenes (coloured shapes), "
        "32x32 images; the default"
    ),
    "builtin:tiny": (
        "tiny Stable Diffusion 1.x architecture, random weights, 64x64 images (tests)"
    ),
    "builtin:tiny-sdxl": (
        "tiny Stable Diffusion XL architecture, random weights, 64x64 images (tests)"
    ),
}

# Slot width r for concepts on the built-in models (their layers are 32 to 128 wide), and elsewhere.
BUILTIN_RANKS = {"builtin:toy": 8, "builtin:tiny": 4, "builtin:tiny-sdxl": 4}
DEFAULT_RANK = 8


def default_rank(model: str) -> int:
    """The rank a new concept gets on ``model`` unless one is given."""
    return BUILTIN_RANKS.get(str(model).strip(), DEFAULT_RANK)


# TrainConfig settings that suit a built-in model better than the defaults tuned for real SD models.
# builtin:toy was trained from scratch on 32 px scenes: a new shape needs larger steps than a
# pretrained SD needs for a dog, and captions say "on the left", so images are never mirrored.
BUILTIN_TRAINING: dict[str, dict] = {
    "builtin:toy": {"steps": 300, "batch_size": 4, "lr_unet": 1e-3, "lr_text": 1e-4, "lr_embedding": 1e-2,
                    "flip_p": 0.0},
}


def training_defaults(model: str) -> dict:
    """``TrainConfig`` fields that ``model`` trains best with, unless the user sets them."""
    return dict(BUILTIN_TRAINING.get(str(model).strip(), {}))


# Built-in models shipped as ready diffusers folders inside the package (not built on first use).
SHIPPED_MODELS: dict[str, Path] = {"builtin:toy": Path(__file__).resolve().parent / "toy"}

# Bump when a builder's output changes, so stale cached folders are rebuilt.
BUILD_VERSION = 2
MARKER_FILE = "spectral_diffusion_builtin.json"

MAX_LENGTH = 77
TEXT_HIDDEN = 32
TINY_SAMPLE_SIZE = 32  # latent pixels; x vae_scale_factor 2 = 64 px images
VAE_SCALE_FACTOR = 2
DEFAULT_IMAGE_SIZE = TINY_SAMPLE_SIZE * VAE_SCALE_FACTOR

_SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

# --------------------------------------------------------------------------- tokenizer

# Common prompt words; each becomes a single BPE token.  Letters only, because CLIP's
# pre-tokenizer splits on everything else.  Order and duplicates do not matter.
_WORDS = """
a an the of in on at to and or with without from by for near next behind under over
above below beside between inside outside into onto around top bottom left right front
back middle center is are this that it its his her their my your our style photo
photograph picture image painting drawing sketch illustration render rendering portrait
landscape closeup close up shot view scene art artwork digital oil watercolor pencil
charcoal ink cartoon anime comic realistic photorealistic cinematic dramatic lighting
light soft hard sunlight shadow shadows studio natural golden hour high quality detailed
highly sharp focus blurry blur bokeh masterpiece best worst low resolution dog dogs
puppy cat cats kitten mug cup bottle vase teapot bowl plate chair table sofa couch bed
lamp clock book books car bike bicycle boat house building tree trees flower flowers
plant grass bird fish horse cow sheep rabbit bear lion tiger fox wolf duck person people
man woman boy girl child baby face hand hands eyes hair hat shirt dress jacket shoes toy
teddy robot ball box bag backpack sunglasses glasses candle sculpture statue red green
blue yellow orange purple pink brown black white gray grey silver gold golden beige cyan
magenta violet teal navy turquoise colorful colourful dark bright pale pastel vivid neon
circle circles square squares triangle triangles star stars rectangle hexagon diamond
heart oval shape shapes round flat line lines dot dots stripe stripes striped spotted
checkered pattern grid wooden wood metal metallic glass plastic stone marble ceramic
paper fabric fur furry fluffy leather smooth rough shiny glossy matte wet dry soft
velvet knitted woven rusty polished transparent small big large tiny huge little tall
short long wide thin thick giant miniature background backgrounds room kitchen bedroom
garden park forest beach ocean sea lake river mountain mountains sky clouds cloud city
street road field desert snow rain night day sunset sunrise morning evening water wall
floor window door space moon sun planet underwater jungle village castle sitting
standing lying running jumping walking sleeping eating playing swimming flying holding
wearing looking smiling one two three four five many several some group pair very new
old young cute happy sad beautiful ugly vintage modern retro futuristic abstract simple
minimalist dotted cross ring
"""


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map (BPE never sees whitespace)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def tokenizer_words() -> list[str]:
    """The word list that the built-in tokenizer turns into single tokens."""
    return sorted(set(_WORDS.split()))


def _word_symbols(word: str, byte_map: dict[int, str]) -> tuple[str, ...]:
    """A word as CLIP's BPE first sees it: a symbol per byte, ``</w>`` on the last."""
    symbols = [byte_map[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    return tuple(symbols)


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """``word`` with every occurrence of ``pair`` merged, left to right."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """CLIP's BPE encoding: repeatedly merge the lowest-ranked adjacent pair present."""
    while len(word) > 1:
        best = min(pairwise(word), key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        word = _merge_pair(word, best)
    return word


def _train_merges(words: list[tuple[str, ...]]) -> list[tuple[str, str]]:
    """Plain BPE training: merge the most frequent pair (ties: the smallest pair) until
    every word is whole.

    Shared sub-words ("ing</w>", "er") fall out naturally and keep unknown words short.
    """
    merges: list[tuple[str, str]] = []
    current = list(words)
    while True:
        counts = Counter(pair for w in current for pair in pairwise(w))
        if not counts:
            return merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        current = [_merge_pair(w, pair) for w in current]


def _repair_merges(words: list[tuple[str, ...]], merges: list[tuple[str, str]]) -> None:
    """Append merges until CLIP's rank-order encoding makes every word one token.

    Training merges pair by pair across all words, while encoding picks the lowest rank
    within one word; rarely the two disagree, so leftover pieces get explicit merges.
    """
    while True:
        ranks = {pair: i for i, pair in enumerate(merges)}
        broken = [pieces for w in words if len(pieces := _bpe(w, ranks)) > 1]
        if not broken:
            return
        for pieces in broken:
            head = pieces[0]
            for piece in pieces[1:]:
                if (head, piece) not in ranks:
                    ranks[(head, piece)] = len(merges)
                    merges.append((head, piece))
                head += piece


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Copies of the built-in vocabulary and merges (callers may modify them)."""
    vocab, merges = _clip_vocab_and_merges()
    return dict(vocab), list(merges)


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small, deterministic CLIP-format BPE vocabulary (vocab.json contents, merges).

    Layout follows CLIP's: the 256 byte symbols, the same with ``</w>``, one entry per
    merge, then ``<|startoftext|>`` and ``<|endoftext|>`` last.  Any text still
    tokenizes (it falls back to byte symbols); the listed words are single tokens.
    """
    byte_map = _bytes_to_unicode()
    symbols = list(byte_map.values())
    words = [_word_symbols(w, byte_map) for w in tokenizer_words()]
    merges = _train_merges(words)
    _repair_merges(words, merges)
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_clip_vocab(folder: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (CLIP's file format) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges()
    (folder / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False), encoding="utf-8"
    )
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def build_tokenizer():
    """A ``CLIPTokenizer`` over the built-in vocabulary.

    Max length 77 and pad token ``<|endoftext|>``, as SD's tokenizer.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="sd-tokenizer-") as tmp:
        write_clip_vocab(tmp)
        return CLIPTokenizer.from_pretrained(
            tmp, model_max_length=MAX_LENGTH, pad_token="<|endoftext|>"
        )


# ------------------------------------------------------------------------- tiny models


def _text_config(tokenizer, projection_dim: int | None = None):
    """A CLIP text config of 4 small layers whose special ids match ``tokenizer``."""
    from transformers import CLIPTextConfig

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _tiny_vae():
    """A 2-block VAE: downsampling factor 2, 4 latent channels, SD's scaling factor."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=DEFAULT_IMAGE_SIZE,
        scaling_factor=0.18215,
    )


def _tiny_sd_unet():
    """SD 1.x layout in miniature: cross-attention at the high-resolution level."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=TINY_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def _tiny_sdxl_unet():
    """SDXL layout in miniature: linear projections, text_time added conditioning.

    The added embedding input is 6 size/crop numbers x ``addition_time_embed_dim``
    plus the pooled, projected output of the second text encoder.
    """
    from diffusers import UNet2DConditionModel

    time_dim = 8
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=TINY_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * TEXT_HIDDEN,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + TEXT_HIDDEN,
        norm_num_groups=32,
    )


def _tiny_sd_components() -> dict:
    """Components of ``builtin:tiny``, each initialised from its own fixed seed."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    scheduler = DDIMScheduler(
        **_SD_SCHEDULER,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="leading",
    )
    return {
        "unet": _tiny_sd_unet(),
        "vae": _tiny_vae(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def _tiny_sdxl_components() -> dict:
    """Components of ``builtin:tiny-sdxl``; both tokenizers are the built-in one."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer, projection_dim=TEXT_HIDDEN)
    )
    scheduler = EulerDiscreteScheduler(
        **_SD_SCHEDULER, interpolation_type="linear", timestep_spacing="leading"
    )
    return {
        "unet": _tiny_sdxl_unet(),
        "vae": _tiny_vae(),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": build_tokenizer(),
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }


def _write_marker(folder: Path, name: str) -> None:
    """Written last: its presence means a complete build of this builder version."""
    marker = {"name": name, "build_version": BUILD_VERSION}
    (folder / MARKER_FILE).write_text(
        json.dumps(marker, indent=2) + "\n", encoding="utf-8"
    )


def is_complete_build(path: str | os.PathLike, name: str | None = None) -> bool:
    """Whether ``path`` holds a finished current-version build (of ``name``)."""
    try:
        marker = json.loads((Path(path) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("build_version") != BUILD_VERSION:
        return False
    return name is None or marker.get("name") == name


def _save_pipeline(pipe, folder: Path) -> None:
    """Save through diffusers, plus CLIP vocab files that older loaders can read."""
    pipe.save_pretrained(folder, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        if (folder / sub).is_dir():
            write_clip_vocab(folder / sub)


def _discard(folder: Path) -> None:
    """Remove ``folder`` by first renaming it aside: no reader sees it half-deleted."""
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    os.replace(folder, trash / folder.name)
    shutil.rmtree(trash, ignore_errors=True)


def _clear_destination(path: Path) -> None:
    """Make room for a fresh build, refusing to delete anything that is not ours."""
    if not path.exists():
        return
    if path.is_dir() and ((path / MARKER_FILE).exists() or not any(path.iterdir())):
        logger.info("replacing outdated build in %s", path)
        _discard(path)
        return
    raise FileExistsError(
        f"{path} exists and is not a built-in model folder; "
        "remove it or choose another path"
    )


def _remove_stale_temporaries(path: Path) -> None:
    """Delete what crashed builds left beside ``path`` (only called under the lock)."""
    for pattern in (f".{path.name}.tmp-*", f".{path.name}.old-*"):
        for stale in path.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def _build_atomically(path, name: str, make_pipeline: Callable[[], object]) -> Path:
    """Build into a temporary sibling, then rename into place, under a sibling lock.

    Concurrent builders (two app workers, the CLI) wait on the lock; the later one finds
    the marker and returns.  A crash never leaves a half model at ``path``; its stray
    temporary folder is removed by the next build.
    """
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock")):
        if is_complete_build(path, name):
            return path
        _clear_destination(path)
        _remove_stale_temporaries(path)
        logger.info("building %s into %s", name, path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is ordinary data
        try:
            _save_pipeline(make_pipeline(), tmp)
            _write_marker(tmp, name)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tiny(path: str | os.PathLike) -> Path:
    """Build ``builtin:tiny`` (SD 1.x architecture, 64x64 px) into ``path``."""

    def make():
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(**_tiny_sd_components())

    return _build_atomically(path, "builtin:tiny", make)


def build_tiny_sdxl(path: str | os.PathLike) -> Path:
    """Build ``builtin:tiny-sdxl`` (SDXL architecture, 64x64 px) into ``path``."""

    def make():
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(**_tiny_sdxl_components())

    return _build_atomically(path, "builtin:tiny-sdxl", make)


# Name -> builder(path) -> path, for the built-in models made from seeds on first use.
_BUILDERS: dict[str, Callable[[str | os.PathLike], Path]] = {
    "builtin:tiny": build_tiny,
    "builtin:tiny-sdxl": build_tiny_sdxl,
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
        raise ModelNotFoundError(
            f"unknown built-in model {name!r}; built-in models: {_builtin_list()}"
        )
    path = builtin_path(name)
    if is_complete_build(path, name):
        return path
    return _BUILDERS[name](path)


# A Hugging Face repo id: "name" or "owner/name", letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$"
)


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
        raise ModelNotFoundError(
            f"model {model!r} is a file, not a diffusers folder "
            "(one with model_index.json)"
        )
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
        return json.loads(
            (Path(source) / "model_index.json").read_text(encoding="utf-8")
        )
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(source)


def _load_error(model: str, source: str, err: Exception) -> ModelNotFoundError:
    """A message for a failed load that tells the user what to try next."""
    if model.startswith(BUILTIN_PREFIX):
        hint = f"the build in {source} looks damaged; delete that folder to rebuild it"
    else:
        hint = (
            "check the id (and your network or Hugging Face login), or pass a local "
            f"diffusers folder; built-in models: {_builtin_list()}"
        )
    return ModelNotFoundError(
        f"could not load model {model!r} ({type(err).__name__}: {err}). {hint}"
    )


# What diffusers / huggingface_hub raise for a missing, unreachable or malformed model
# (a bad model_index.json gives KeyError / AttributeError); anything else propagates.
_LOAD_ERRORS = (OSError, ValueError, KeyError, AttributeError, TypeError)


def load_pipeline(
    model: str, torch_dtype: torch.dtype = torch.float32, device: str = "cpu"
):
    """Resolve ``model`` and load it as a diffusers pipeline on ``device``.

    The safety checker is not loaded: it is a second large download, and generation
    here is user-driven and local.
    """
    from diffusers import DiffusionPipeline

    source = resolve_model(model)
    local = Path(source).is_dir()
    kwargs: dict = {"dtype": torch_dtype}
    if local:
        kwargs["local_files_only"] = True
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
