import pytest
import torch

from spectral_diffusion.core.config import ConceptInfo, TargetConfig
from spectral_diffusion.core.model import SpectralAdapters
from spectral_diffusion.core.svd import SvdCache
from spectral_diffusion.core.tokens import TokenError
from spectral_diffusion.errors import SlotConflictError

from .conftest import randomize_concept, unet_inputs, unet_output

pytestmark = pytest.mark.usefixtures("one_thread")


def _text(pipe, prompt):
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_patch_reports_layers_and_unpatch_restores(tiny_pipe):
    originals = {name: module for name, module in tiny_pipe.unet.named_modules()}
    adapters = SpectralAdapters.from_pipeline(tiny_pipe)
    report = adapters.report()
    assert len(report["unet"]) == 4 * 12  # to_q/k/v/out.0 of 12 attention blocks
    assert len(report["text_encoder"]) == 4 * 4
    assert all(p.endswith(("to_q", "to_k", "to_v", "to_out.0")) for p in report["unet"])
    adapters.unpatch()
    for name, module in tiny_pipe.unet.named_modules():
        assert originals[name] is module


def test_optional_targets_include_feed_forward_and_projections(tiny_pipe):
    adapters = SpectralAdapters.from_pipeline(tiny_pipe, TargetConfig.preset("all"))
    paths = adapters.report()
    assert any(p.endswith("ff.net.0.proj") for p in paths["unet"])
    assert any(p.endswith("proj_in") for p in paths["unet"])
    assert any(p.endswith("fc1") for p in paths["text_encoder"])
    with pytest.raises(ValueError, match="unknown adapter targets"):
        TargetConfig(unet=("to_nothing",))


@pytest.mark.parametrize("variant", ["additive", "rotational"])
def test_fresh_concept_reproduces_base_outputs(tiny_pipe, variant):
    inputs = unet_inputs(tiny_pipe)
    base_unet, base_text = unet_output(tiny_pipe, inputs), _text(tiny_pipe, "a photo of a dog")
    adapters = SpectralAdapters.from_pipeline(tiny_pipe, TargetConfig.preset("all"))
    adapters.new_concept(ConceptInfo("dog", 1, 4, variant, ["<dog1>"], "dog"))
    torch.testing.assert_close(unet_output(tiny_pipe, inputs), base_unet, rtol=0, atol=1e-5)
    torch.testing.assert_close(_text(tiny_pipe, "a photo of a dog"), base_text, rtol=0, atol=1e-6)


def test_backward_reaches_only_the_concepts_parameters_and_token_row(tiny_pipe):
    adapters = SpectralAdapters.from_pipeline(tiny_pipe)
    adapters.new_concept(ConceptInfo("dog", 0, 4, "additive", ["<dog1>"], "dog"))
    adapters.new_concept(ConceptInfo("cat", 1, 4, "rotational", ["<cat1>"], "cat"))
    randomize_concept(adapters, "dog")
    groups = adapters.trainable_parameters("dog")
    ids = tiny_pipe.tokenizer("<dog1> and <cat1>", padding="max_length", max_length=77, return_tensors="pt").input_ids
    states = tiny_pipe.text_encoder(ids)[0]
    sample, t, _ = unet_inputs(tiny_pipe)
    tiny_pipe.unet(sample, t, states.expand(2, -1, -1)).sample.pow(2).mean().backward()
    own = {id(p) for group in groups.values() for p in group}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for group in groups.values() for p in group)
    for model in (tiny_pipe.unet, tiny_pipe.text_encoder):
        for name, param in model.named_parameters():
            if id(param) not in own:
                assert param.grad is None, name
    assert len(groups["embeddings"]) == 1 and groups["embeddings"][0].shape == (1, 32)


@pytest.mark.parametrize("variant", ["additive", "rotational"])
def test_merge_matches_live_and_unmerge_restores_base(tiny_pipe, variant):
    inputs = unet_inputs(tiny_pipe)
    base = unet_output(tiny_pipe, inputs)
    weights = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    adapters = SpectralAdapters.from_pipeline(tiny_pipe)
    adapters.new_concept(ConceptInfo("dog", 0, 4, variant))
    adapters.new_concept(ConceptInfo("cat", 1, 4, variant))
    randomize_concept(adapters, "dog", seed=1)
    randomize_concept(adapters, "cat", seed=2)
    adapters.set_strength("cat", 0.7)
    live = unet_output(tiny_pipe, inputs)
    assert (live - base).abs().max() > 1e-3
    adapters.merge()
    torch.testing.assert_close(unet_output(tiny_pipe, inputs), live, rtol=1e-4, atol=1e-4)
    adapters.unmerge()
    adapters.unpatch()
    torch.testing.assert_close(unet_output(tiny_pipe, inputs), base, rtol=0, atol=1e-5)
    for key, value in tiny_pipe.unet.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-6)


def test_fused_weights_are_base_plus_sum_of_deltas(tiny_pipe):
    adapters = SpectralAdapters.from_pipeline(tiny_pipe)
    base = {k: layer.weight_matrix.clone() for k, layer in adapters.layers.items()}
    for slot, name in enumerate(["dog", "cat", "mug"]):
        adapters.new_concept(ConceptInfo(name, slot, 4, ["additive", "rotational"][slot % 2]))
        randomize_concept(adapters, name, seed=slot)
    deltas = {name: adapters.delta_weights(name) for name in ["dog", "cat", "mug"]}
    adapters.merge()
    for key, layer in adapters.layers.items():
        expected = base[key] + sum(deltas[name][key].reshape(base[key].shape) for name in deltas)
        torch.testing.assert_close(layer.weight_matrix, expected, rtol=0, atol=1e-5)


def test_slot_conflicts_and_capacity(tiny_pipe):
    adapters = SpectralAdapters.from_pipeline(tiny_pipe)
    assert adapters.capacity(4) == 8  # the smallest adapted dimension is 32
    adapters.new_concept(ConceptInfo("dog", 0, 4, "additive", ["<dog1>"]))
    with pytest.raises(SlotConflictError, match="overlaps concept 'dog'"):
        adapters.new_concept(ConceptInfo("cat", 0, 4, "additive"))
    with pytest.raises(SlotConflictError, match="this model has 8 slots"):
        adapters.new_concept(ConceptInfo("cat", 8, 4, "additive"))
    with pytest.raises(TokenError, match="already used"):
        adapters.new_concept(ConceptInfo("cat", 1, 4, "additive", ["<dog1>"]))
    with pytest.raises(TokenError, match="is not valid"):
        adapters.new_concept(ConceptInfo("cat", 1, 4, "additive", ["dog"]))


def test_several_trigger_tokens_side_by_side(tiny_pipe):
    adapters = SpectralAdapters.from_pipeline(tiny_pipe)
    adapters.new_concept(ConceptInfo("dog", 0, 4, "additive", ["<dog1>"], "dog"))
    adapters.new_concept(ConceptInfo("cat", 1, 4, "additive", ["<cat1>", "<cat2>"], "cat"))
    randomize_concept(adapters, "cat", seed=3)
    tok = tiny_pipe.tokenizer
    ids = tok("<dog1> and <cat1> <cat2>", add_special_tokens=False).input_ids
    assert len(ids) == 4
    embedding = tiny_pipe.text_encoder.get_input_embeddings()
    out = embedding(torch.tensor([ids]))[0]
    torch.testing.assert_close(out[0], embedding.vectors["dog"][0])
    torch.testing.assert_close(out[2:], embedding.vectors["cat"])
    dog_word = tok("dog", add_special_tokens=False).input_ids
    torch.testing.assert_close(embedding.vectors["dog"][0], embedding.base_layer.weight[dog_word].mean(0))


def test_sdxl_two_encoders_and_tokenizers(tiny_sdxl_pipe):
    pipe = tiny_sdxl_pipe
    adapters = SpectralAdapters.from_pipeline(pipe)
    report = adapters.report()
    assert set(report) == {"unet", "text_encoder", "text_encoder_2"}
    adapters.new_concept(ConceptInfo("dog", 0, 4, "additive", ["<dog1>"], "dog"))
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        assert len(tok("<dog1>", add_special_tokens=False).input_ids) == 1
    assert set(adapters.concept_token_vectors("dog")) == {"text_encoder", "text_encoder_2"}


def test_spectrum_is_cached_per_base_model(tiny_pipe, tmp_path, monkeypatch):
    cache = SvdCache(tmp_path)
    first = SpectralAdapters.from_pipeline(tiny_pipe, svd_cache=cache)
    spectrum = first.spectrum(8)
    first.unpatch()
    from spectral_diffusion.core import svd

    monkeypatch.setattr(svd, "top_k_svd_many", lambda *a, **k: pytest.fail("recomputed"))
    second = SpectralAdapters.from_pipeline(tiny_pipe, svd_cache=cache)
    again = second.spectrum(8)
    assert second.fingerprint == first.fingerprint
    for key in spectrum:
        torch.testing.assert_close(again[key].s, spectrum[key].s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pipeline(models_home, dtype):
    from spectral_diffusion.models.registry import load_pipeline

    pipe = load_pipeline("builtin:tiny", torch_dtype=dtype)
    adapters = SpectralAdapters.from_pipeline(pipe)
    adapters.new_concept(ConceptInfo("dog", 0, 4, "additive", ["<dog1>"], "dog"))
    randomize_concept(adapters, "dog")
    assert all(p.dtype == torch.float32 for g in adapters.trainable_parameters("dog").values() for p in g)
    sample, t, states = unet_inputs(pipe)
    out = pipe.unet(sample.to(dtype), t, states.to(dtype)).sample
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_an_adapter_with_degenerate_triplets_is_told_apart_from_another_base_model(tiny_pipe):
    """Earlier versions wrote U ~ 1e33 for a lost singular value; loading said "trained on another base
    model (relative error inf)". It now says what happened and what to do."""
    from spectral_diffusion.errors import BaseModelMismatchError

    from .conftest import trained_looking_adapter

    adapters = SpectralAdapters.from_pipeline(tiny_pipe)
    data = trained_looking_adapter(adapters, "old", 1, 4)
    key = next(iter(data.layers))
    data.layers[key]["U"][:, -1] = 2.6e33
    with pytest.raises(BaseModelMismatchError, match="degenerate .*train the concept again"):
        adapters.load_concept(data.info, data.layers, data.token_vectors)
