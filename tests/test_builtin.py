"""Tests of the offline built-in models and of ``--model`` resolution (no network)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spectral_diffusion.errors import ModelNotFoundError, SpectralDiffusionError
from spectral_diffusion.models import registry as builtin
from spectral_diffusion.models.build import MARKER_FILE, build_atomically, is_complete_build
from spectral_diffusion.testing import bpe, tiny


def build_tiny(path) -> Path:
    return build_atomically(path, "builtin:tiny", tiny.tiny_pipeline)


def build_tiny_sdxl(path) -> Path:
    return build_atomically(path, "builtin:tiny-sdxl", tiny.tiny_sdxl_pipeline)


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory) -> Path:
    """One models home for the module, so each built-in model is built once."""
    return tmp_path_factory.mktemp("sd-home")


@pytest.fixture
def home(shared_home, monkeypatch) -> Path:
    monkeypatch.setenv("SPECTRAL_DIFFUSION_HOME", str(shared_home))
    return shared_home


@pytest.fixture
def fresh_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SPECTRAL_DIFFUSION_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# --------------------------------------------------------------------------- tokenizer


def test_vocab_is_small_and_clip_shaped():
    vocab, merges = bpe.clip_vocab_and_merges()
    assert 1000 <= len(vocab) <= 2000
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert vocab["<|endoftext|>"] == len(vocab) - 1
    assert vocab["<|startoftext|>"] == len(vocab) - 2
    assert "a</w>" in vocab and "a" in vocab
    assert all(a + b in vocab for a, b in merges)
    assert bpe.clip_vocab_and_merges() == (vocab, merges)  # deterministic


def test_every_listed_word_is_one_token():
    tok = bpe.build_tokenizer()
    split = {w: tok.tokenize(w) for w in bpe.tokenizer_words()}
    assert {w: t for w, t in split.items() if t != [w + "</w>"]} == {}
    assert len(bpe.tokenizer_words()) >= 300


def test_tokenizer_round_trip_and_unknown_words():
    tok = bpe.build_tokenizer()
    assert tok.model_max_length == 77
    assert tok.pad_token == "<|endoftext|>"
    text = "a photo of a zqxj dog in the style of vermeer, 3 stars!"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]  # unknown words fall back to bytes
    assert tok.decode(ids, skip_special_tokens=True) == text.replace(",", " ,").replace("!", " !")
    padded = tok(text, padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == tok.pad_token_id


def test_add_tokens_makes_one_token():
    tok = bpe.build_tokenizer()
    size = len(tok)
    assert len(tok.tokenize("<my-dog>")) > 1
    assert tok.add_tokens(["<my-dog>"]) == 1
    assert len(tok) == size + 1
    assert tok.tokenize("a <my-dog> on a sofa") == [
        "a</w>",
        "<my-dog>",
        "on</w>",
        "a</w>",
        "sofa</w>",
    ]


# --------------------------------------------------------------------------- building


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.rglob("*.safetensors")):
        for key, value in load_file(file).items():
            tensors[f"{file.relative_to(folder)}:{key}"] = value
    return tensors


@pytest.mark.parametrize("build", [build_tiny, build_tiny_sdxl])
def test_building_twice_gives_identical_weights(tmp_path, build):
    first = _weights(build(tmp_path / "a"))
    second = _weights(build(tmp_path / "b"))
    assert first.keys() == second.keys() and len(first) > 50
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "a" / "tokenizer" / "vocab.json").read_bytes() == (
        tmp_path / "b" / "tokenizer" / "vocab.json"
    ).read_bytes()


def test_build_leaves_only_the_model_and_a_lock(tmp_path):
    path = build_tiny(tmp_path / "m")
    assert is_complete_build(path, "builtin:tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", "m"]
    assert build_tiny(path) == path  # complete: not rebuilt


def test_concurrent_builders_do_not_corrupt(tmp_path):
    target = tmp_path / "m"
    results, errors = [], []

    def worker():
        try:
            results.append(build_tiny(target))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [target.absolute()] * 3
    assert is_complete_build(target, "builtin:tiny")


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny(tmp_path / "m")
    assert (tmp_path / "m" / "precious.txt").read_text() == "keep me"


def test_outdated_build_is_rebuilt(fresh_home):
    path = builtin.ensure_builtin("builtin:tiny")
    assert path == fresh_home / "models" / "tiny"
    marker = path / MARKER_FILE
    marker.write_text(json.dumps({"name": "builtin:tiny", "build_version": 0}))
    assert not is_complete_build(path)
    assert builtin.ensure_builtin("builtin:tiny") == path
    assert is_complete_build(path, "builtin:tiny")


# --------------------------------------------------------------------------- resolution


def test_models_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECTRAL_DIFFUSION_HOME", str(tmp_path))
    assert builtin.models_home() == tmp_path
    monkeypatch.delenv("SPECTRAL_DIFFUSION_HOME")
    assert builtin.models_home() == Path.home() / ".cache" / "spectral_diffusion"


def test_registry_lists_the_builtin_models():
    assert {"builtin:tiny", "builtin:tiny-sdxl"} <= set(builtin.BUILTIN_MODELS)
    assert all(builtin.BUILTIN_MODELS.values())


def test_resolve_builtin_and_local_folder(home):
    path = builtin.resolve_model("builtin:tiny")
    assert path == str(home / "models" / "tiny")
    assert (Path(path) / "model_index.json").is_file()
    assert builtin.resolve_model(path) == path


def test_resolve_passes_hub_ids_through(home):
    assert builtin.resolve_model("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    assert not (home / "models" / "stable-diffusion-v1-5").exists()


@pytest.mark.parametrize("name", ["missing", "a/b/c", "./x"])
def test_resolve_missing_folder_raises(tmp_path, name):
    model = str(tmp_path / name) if name == "missing" else name
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        builtin.resolve_model(model)


def test_resolve_folder_without_model_index_raises(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"model_index\.json"):
        builtin.resolve_model(str(tmp_path))


def test_unknown_builtin_raises(home):
    with pytest.raises(ModelNotFoundError, match="builtin:tiny"):
        builtin.resolve_model("builtin:nope")


def test_broken_folder_load_raises_model_not_found(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="could not load"):
        builtin.load_pipeline(str(tmp_path))


def test_model_not_found_is_a_user_error():
    assert issubclass(ModelNotFoundError, SpectralDiffusionError)
    assert issubclass(ModelNotFoundError, ValueError)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize(
    ("name", "cls", "sdxl"),
    [
        ("builtin:tiny", "StableDiffusionPipeline", False),
        ("builtin:tiny-sdxl", "StableDiffusionXLPipeline", True),
    ],
)
def test_load_and_generate(home, name, cls, sdxl):
    pipe = builtin.load_pipeline(name)
    assert type(pipe).__name__ == cls and builtin.is_sdxl(pipe) is sdxl
    assert pipe.vae_scale_factor == tiny.VAE_SCALE_FACTOR
    assert pipe.unet.dtype == torch.float32
    assert getattr(pipe, "safety_checker", None) is None
    assert pipe.text_encoder.get_input_embeddings().num_embeddings == len(pipe.tokenizer)
    assert pipe.tokenizer("a photo of a dog").input_ids == bpe.build_tokenizer()("a photo of a dog").input_ids
    out = pipe(
        "a photo of a red dog on a sofa",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
    )
    assert len(out.images) == 1 and out.images[0].size == (64, 64)


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "closed endpoint"])
def test_unknown_hub_id_offline_fails_at_once_with_one_clear_message(offline, monkeypatch, tmp_path):
    """No network: one error saying the model is not in the local cache, not a minute of retries."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # online mode, but nothing listens there: connection refused at once
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    builtin.hub_reachable.cache_clear()
    try:
        started = time.monotonic()
        with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache") as caught:
            builtin.load_pipeline("foo/bar")
        assert time.monotonic() - started < 10
        assert "\n" not in str(caught.value) and "hf download foo/bar" in str(caught.value)
    finally:
        builtin.hub_reachable.cache_clear()


def test_pipelines_load_from_several_threads_at_once(models_home):
    """The app loads a pipeline for training and another for an import at the same time; without one
    load at a time per process, transformers' meta-device context leaks between the threads
    ("Cannot copy out of meta tensor": 11 of 12 concurrent loads failed here)."""
    import threading

    from spectral_diffusion.models.registry import load_pipeline

    load_pipeline("builtin:tiny")  # built once, so the threads below only load
    errors, pipes = [], []

    def load() -> None:
        try:
            pipes.append(load_pipeline("builtin:tiny"))
        except Exception as err:  # noqa: BLE001 - the test reports whatever a thread raised
            errors.append(repr(err))

    for _ in range(2):
        threads = [threading.Thread(target=load) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert len(pipes) == 6 and all(p.unet.device.type == "cpu" for p in pipes)
