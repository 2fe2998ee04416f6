import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file

from spectral_diffusion.core.config import ConceptInfo
from spectral_diffusion.core.model import SpectralAdapters
from spectral_diffusion.errors import AdapterFormatError, BaseModelMismatchError
from spectral_diffusion.formats.adapter_file import adapter_from_model, load_adapter, read_adapter, save_adapter
from spectral_diffusion.models.registry import load_pipeline

from .conftest import randomize_concept, rewrite_safetensors


@pytest.fixture
def saved(tiny_pipe, tmp_path):
    """A trained-looking rotational+additive pair of concepts saved to files, plus their model."""
    adapters = SpectralAdapters.from_pipeline(tiny_pipe)
    adapters.new_concept(ConceptInfo("dog", 2, 4, "additive", ["<dog1>"], "dog"))
    adapters.new_concept(ConceptInfo("cat", 3, 4, "rotational", ["<cat1>"], "cat"))
    randomize_concept(adapters, "dog", seed=1)
    randomize_concept(adapters, "cat", seed=2)
    paths = {}
    for name in ("dog", "cat"):
        data = adapter_from_model(adapters, name, "builtin:tiny", {"steps": 3})
        paths[name] = save_adapter(data, tmp_path / f"{name}.safetensors")
    return adapters, paths


def _outputs(adapters, prompt="<dog1> next to <cat1>"):
    tokenizer, text_encoder, unet = (
        adapters.tokenizers["tokenizer"],
        adapters.components["text_encoder"],
        adapters.components["unet"],
    )
    ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 32, 32, generator=g)
    with torch.no_grad():
        states = text_encoder(ids)[0]
        return states, unet(sample, torch.tensor([300]), states).sample


def test_metadata_follows_format_v1(saved):
    _, paths = saved
    data = read_adapter(paths["dog"])
    meta = data.metadata()
    assert meta["format"] == "spectral-adapter" and meta["format_version"] == "1"
    assert json.loads(meta["tokens"]) == ["<dog1>"]
    assert meta["variant"] == "additive" and meta["rank"] == "4" and meta["slot"] == "2"
    assert json.loads(meta["train_config"]) == {"steps": 3}
    tensors = load_file(paths["dog"])
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert {f"{key}.{p}" for p in ("U", "s", "V", "A", "B", "c")} <= set(tensors)
    assert tensors["text_encoder.token_embeddings"].shape == (1, 32)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.G_U" in load_file(paths["cat"])


def test_save_load_gives_identical_outputs(saved, models_home):
    adapters, paths = saved
    expected = _outputs(adapters)
    fresh_adapters = SpectralAdapters.from_pipeline(load_pipeline("builtin:tiny"))
    for name in ("dog", "cat"):
        load_adapter(fresh_adapters, paths[name])
    got = _outputs(fresh_adapters)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert fresh_adapters.concept("cat").slot == 3


def _assert_refused(adapters, path, match, error=AdapterFormatError):
    before = {k: v.clone() for k, v in adapters.components["unet"].state_dict().items()}
    concepts = dict(adapters.concepts)
    with pytest.raises(error, match=match):
        load_adapter(adapters, path)
    assert adapters.concepts == concepts
    for k, v in adapters.components["unet"].state_dict().items():
        assert torch.equal(v, before[k])


@pytest.fixture
def target(models_home):
    return SpectralAdapters.from_pipeline(load_pipeline("builtin:tiny"))


def test_pickle_renamed_is_refused(target, tmp_path):
    path = tmp_path / "evil.safetensors"
    torch.save({"a": torch.zeros(2)}, path)  # a zip of pickles
    _assert_refused(target, path, "not a safetensors file")
    path.write_bytes(pickle.dumps({"a": 1}))
    _assert_refused(target, path, "not a safetensors file")


def test_truncated_file_is_refused(saved, target, tmp_path):
    raw = saved[1]["dog"].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(raw[: len(raw) // 2])
    _assert_refused(target, path, "truncated or corrupt")
    path.write_bytes(raw[:5])
    _assert_refused(target, path, "too short")


def test_nan_tensor_is_refused(saved, target, tmp_path):
    def poison(t):
        key = next(k for k in t if k.endswith(".A"))
        t[key][0, 0] = float("nan")

    _assert_refused(
        target, rewrite_safetensors(saved[1]["dog"], tmp_path / "nan.safetensors", poison), "NaN or infinite"
    )


def test_wrong_shape_is_refused(saved, target, tmp_path):
    def mangle(t):
        key = next(k for k in t if k.endswith(".B"))
        t[key] = t[key][:, :2].contiguous()

    _assert_refused(target, rewrite_safetensors(saved[1]["dog"], tmp_path / "shape.safetensors", mangle), "has shape")


def test_missing_tensor_is_refused(saved, target, tmp_path):
    def drop(t):
        del t[next(k for k in t if k.endswith(".c"))]

    _assert_refused(
        target, rewrite_safetensors(saved[1]["dog"], tmp_path / "miss.safetensors", drop), "missing tensors"
    )


def test_unknown_format_version_is_refused(saved, target, tmp_path):
    path = rewrite_safetensors(
        saved[1]["dog"], tmp_path / "v2.safetensors", edit_meta=lambda m: m.update(format_version="2")
    )
    _assert_refused(target, path, "format_version '2'.*upgrade")
    path = rewrite_safetensors(
        saved[1]["dog"], tmp_path / "other.safetensors", edit_meta=lambda m: m.update(format="lora")
    )
    _assert_refused(target, path, "is not a spectral adapter")
    path = rewrite_safetensors(saved[1]["dog"], tmp_path / "meta.safetensors", edit_meta=lambda m: m.pop("created_at"))
    _assert_refused(target, path, "missing metadata")
    path = rewrite_safetensors(saved[1]["dog"], tmp_path / "rank.safetensors", edit_meta=lambda m: m.update(rank="x"))
    _assert_refused(target, path, "should be an integer")


def test_huge_declared_header_is_refused(target, tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    _assert_refused(target, path, "bad header")


def test_another_base_model_is_refused(saved, target, tmp_path):
    # same architecture, different weights: the stored singular vectors no longer fit
    with torch.no_grad():
        for layer in target.layers.values():
            layer.base_layer.weight.mul_(-1.0).add_(0.05 * torch.randn_like(layer.base_layer.weight))
    _assert_refused(target, saved[1]["dog"], "another base model: at layer ", BaseModelMismatchError)


def test_another_architecture_is_refused(saved, models_home):
    sdxl = SpectralAdapters.from_pipeline(load_pipeline("builtin:tiny-sdxl"))
    _assert_refused(sdxl, saved[1]["dog"], "do not match", BaseModelMismatchError)


def test_load_under_another_name_and_slot_conflict(saved, target):
    load_adapter(target, saved[1]["dog"])
    from spectral_diffusion.errors import SlotConflictError

    with pytest.raises(SlotConflictError, match="already loaded"):
        load_adapter(target, saved[1]["dog"])
    with pytest.raises(SlotConflictError, match="overlaps concept 'dog'"):
        load_adapter(target, saved[1]["dog"], name="dog2")


def test_save_is_atomic(saved, tmp_path, monkeypatch):
    adapters, paths = saved
    original = paths["dog"].read_bytes()
    from spectral_diffusion.formats import adapter_file

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_file, "save_file", crash)
    with pytest.raises(OSError):
        save_adapter(adapter_from_model(adapters, "dog", "builtin:tiny"), paths["dog"])
    assert paths["dog"].read_bytes() == original
    assert not [p for p in paths["dog"].parent.iterdir() if p.name.startswith(".tmp-")]


def test_float16_triplets_shrink_the_file_and_still_load(saved, tmp_path):
    adapters, paths = saved
    data = adapter_from_model(adapters, "dog", "builtin:tiny")
    half = save_adapter(data, tmp_path / "dog-fp16.safetensors", triplet_dtype="float16")
    stored = load_file(str(half))
    assert {stored[k].dtype for k in stored if k.rsplit(".", 1)[1] in ("U", "s", "V")} == {torch.float16}
    assert {stored[k].dtype for k in stored if k.rsplit(".", 1)[1] in ("A", "B", "c")} == {torch.float32}
    assert half.stat().st_size < paths["dog"].stat().st_size
    back = read_adapter(half)
    assert back.triplet_dtype == "float16" and back.metadata()["triplet_dtype"] == "float16"
    assert "triplet_dtype" not in read_adapter(paths["dog"]).metadata()  # fp32 files are as before
    assert back.layers[next(iter(back.layers))]["U"].dtype == torch.float32  # loading upcasts
    adapters.remove_concept("dog")
    load_adapter(adapters, half)  # the half-precision triplets pass the (adjusted) base-model check
    assert adapters.concept("dog").slot == 2


def test_float16_rounding_stays_well_inside_the_adjusted_tolerance(saved):
    """The compatibility measure of fp16-rounded triplets against the base weight, vs the bound."""
    from spectral_diffusion.core.compatibility import COMPATIBILITY_TOLERANCE, compatibility_tolerance

    adapters, _ = saved
    worst = 0.0
    for key, tensors in adapters.concept_layer_tensors("dog").items():
        U, s, V = (tensors[p].half().float() for p in ("U", "s", "V"))
        projected = U.T @ adapters.layers[key].weight_matrix.float() @ V
        worst = max(worst, float(torch.linalg.norm(projected - torch.diag(s)) / torch.linalg.norm(s)))
    assert worst < compatibility_tolerance(torch.float16) / 4
    assert compatibility_tolerance(torch.float32) == COMPATIBILITY_TOLERANCE
    assert COMPATIBILITY_TOLERANCE < compatibility_tolerance(torch.float16) < 2 * COMPATIBILITY_TOLERANCE


def _other_base_model(adapters):
    with torch.no_grad():
        for layer in adapters.layers.values():
            layer.base_layer.weight.mul_(-1.0).add_(0.05 * torch.randn_like(layer.base_layer.weight))


def test_float16_file_of_another_base_model_is_refused(saved, target, tmp_path):
    _other_base_model(target)
    data = adapter_from_model(saved[0], "dog", "builtin:tiny")
    half = save_adapter(data, tmp_path / "dog-fp16.safetensors", triplet_dtype="float16")
    _assert_refused(target, half, "another base model: at layer ", BaseModelMismatchError)


def test_fused_install_checks_all_concepts_and_is_all_or_nothing(saved, target):
    from spectral_diffusion.formats.adapter_file import install_adapters

    adapters, paths = saved
    datas = [read_adapter(paths[name]) for name in ("dog", "cat")]
    for name in ("dog", "cat"):
        adapters.remove_concept(name)
    assert [info.name for info in install_adapters(adapters, datas)] == ["dog", "cat"]
    assert sorted(adapters.concepts) == ["cat", "dog"]
    _other_base_model(target)
    with pytest.raises(BaseModelMismatchError, match="another base model"):
        install_adapters(target, datas)
    assert target.concepts == {}
