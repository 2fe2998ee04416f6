"""Regional composition: layouts, soft masks, routed slots and regional cross-attention."""

import pytest
import torch

from spectral_diffusion.core.config import ConceptInfo, TargetConfig
from spectral_diffusion.core.model import SpectralAdapters
from spectral_diffusion.core.routing import token_grid
from spectral_diffusion.errors import LayoutError, RoutingError
from spectral_diffusion.generation.layout import (
    Layout,
    Region,
    auto_layout,
    concept_clauses,
    parse_region,
    preset_boxes,
    preset_layout,
    region_masks,
)
from spectral_diffusion.generation.passes import region_passes
from spectral_diffusion.generation.regional import (
    OWN_PROMPT_CONTEXT_SHARE,
    RegionalContext,
    RegionInput,
    encode_layout,
    regional_attention,
)

from .conftest import randomize_concept

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT = (8, 12)  # non-square: 8 x 12 -> 4 x 6 -> 2 x 3 -> 1 x 2
SELF_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _concept(adapters, name, slot, seed, rank=4, tokens=None):
    tokens = [f"<{name}>"] if tokens is None else tokens
    adapters.new_concept(ConceptInfo(name, slot, rank, "additive", tokens, "dog"))
    randomize_concept(adapters, name, seed=seed, scale=0.2)


def _half_masks(size=LATENT):
    left = torch.zeros(size)
    left[:, : size[1] // 2] = 1
    return left, 1 - left


def _unet_inputs(unet, size=LATENT, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, unet.config.in_channels, *size, generator=g)
    states = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor([10, 500][:batch]), states


def _run(unet, inputs, **kwargs):
    with torch.no_grad():
        return unet(*inputs, **kwargs).sample


def _text(pipe, prompt):
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


# ----- layouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "is a JSON object"),
        ({"regions": [{"box": [0, 0, 1, 1]}]}, 'no "prompt"'),
        ({"prompt": "x"}, '"regions"'),
        ({"prompt": "x", "regions": []}, "at least one region"),
        ({"prompt": "x", "regions": [{"box": [0, 0, 1, 1]}] * 9}, "at most 8 regions"),
        ({"prompt": "x", "regions": [{"concept": "a"}]}, 'no "box"'),
        ({"prompt": "x", "regions": [{"box": [0, 0, 1.5, 1]}]}, "leaves the image"),
        ({"prompt": "x", "regions": [{"box": [-0.1, 0, 1, 1]}]}, "leaves the image"),
        ({"prompt": "x", "regions": [{"box": [0.5, 0, 0.5, 1]}]}, "x0 < x1 and y0 < y1"),
        ({"prompt": "x", "regions": [{"box": [0, 0.6, 1, 0.2]}]}, "x0 < x1 and y0 < y1"),
        ({"prompt": "x", "regions": [{"box": [0, 0, 1]}]}, "four numbers"),
        ({"prompt": "x", "regions": [{"box": "0,0,1,1"}]}, "four numbers"),
        ({"prompt": "x", "regions": [{"box": [0, 0, True, 1]}]}, "finite numbers"),
        ({"prompt": "x", "regions": [{"box": [0, 0, float("nan"), 1]}]}, "finite numbers"),
        ({"prompt": 3, "regions": [{"box": [0, 0, 1, 1]}]}, "prompt must be text"),
        ({"prompt": "x", "regions": [{"box": [0, 0, 1, 1], "prompt": 5}]}, "must be text"),
        ({"prompt": "x", "regions": [{"box": [0, 0, 1, 1], "negative": []}]}, "must be text"),
        ({"prompt": "x", "regions": [{"box": [0, 0, 1, 1], "concept": ""}]}, "concept name or null"),
        ({"prompt": "x", "regions": [{"box": [0, 0, 1, 1], "colour": "red"}]}, "unknown keys"),
        ({"prompt": "x", "regions": [{"box": [0, 0, 1, 1]}], "size": 3}, "unknown keys"),
        ({"prompt": "x", "regions": ["dog"]}, "must be an object"),
        (
            {
                "prompt": "x",
                "regions": [{"concept": "a", "box": [0, 0, 0.5, 1]}, {"concept": "a", "box": [0.5, 0, 1, 1]}],
            },
            "more than one region",
        ),
    ],
)
def test_bad_layouts_raise_layout_error(data, message):
    with pytest.raises(LayoutError, match=message):
        Layout.from_json(data)


def test_layout_json_round_trip_and_defaults():
    text = (
        '{"prompt": "<dog> and <cat> on a sofa", "negative": "blurry", "regions": ['
        '{"concept": "dog", "box": [0, 0, 0.5, 1], "prompt": "a photo of <dog> on a sofa"},'
        '{"concept": null, "box": [0.5, 0, 1, 1], "negative": ""}]}'
    )
    layout = Layout.from_json(text)
    assert layout.concepts == ["dog"]
    assert layout.regions[0].box == (0.0, 0.0, 0.5, 1.0)
    assert layout.region_prompt(layout.regions[1]) == "<dog> and <cat> on a sofa"  # omitted: the context's
    assert layout.region_negative(layout.regions[0]) == "blurry"
    assert layout.region_negative(layout.regions[1]) == ""
    assert Layout.from_json(layout.to_json()) == layout


def test_parse_region_cli_form():
    assert parse_region("heart:0,0,0.5,1:a red <heart>") == Region("heart", (0, 0, 0.5, 1), "a red <heart>")
    assert parse_region("heart:0,0,0.5,1") == Region("heart", (0, 0, 0.5, 1), None)
    assert parse_region(":0.5,0,1,1:a sofa: red") == Region(None, (0.5, 0, 1, 1), "a sofa: red")
    for bad, message in [
        ("heart", "NAME:x0,y0,x1,y1"),
        ("heart:0,0,1:x", "four numbers"),
        ("h:a,b,c,d", "four numbers"),
        ("h:0,0,2,1", "leaves the image"),
    ]:
        with pytest.raises(LayoutError, match=message):
            parse_region(bad)


def test_presets_and_auto_layout():
    assert preset_boxes("left-right", 2) == [(0, 0, 0.5, 1), (0.5, 0, 1, 1)]
    assert preset_boxes("top-bottom", 2) == [(0, 0, 1, 0.5), (0, 0.5, 1, 1)]
    assert [box[0] for box in preset_boxes("thirds", 3)] == pytest.approx([0, 1 / 3, 2 / 3])
    assert preset_boxes("grid", 3) == [(0, 0, 0.5, 0.5), (0.5, 0, 1, 0.5), (0, 0.5, 0.5, 1)]
    with pytest.raises(LayoutError, match="unknown layout preset"):
        preset_boxes("diagonal", 2)
    with pytest.raises(LayoutError, match="room for 1 to 2"):
        preset_boxes("left-right", 3)

    layout = auto_layout("a <cat> next to a <dog> and <owl>", {"dog": ["<dog>"], "owl": ["<owl>"], "cat": ["<cat>"]})
    assert layout.concepts == ["cat", "dog", "owl"]
    assert [region.box for region in layout.regions] == [(0, 0, 1 / 3, 1), (1 / 3, 0, 2 / 3, 1), (2 / 3, 0, 1, 1)]
    assert all(region.prompt is None for region in layout.regions)  # <cat> and <dog> share a clause
    with pytest.raises(LayoutError, match="none of its trigger tokens"):
        auto_layout("a <cat>", {"cat": ["<cat>"], "dog": ["<dog>"]})
    with pytest.raises(LayoutError, match="at least one concept"):
        auto_layout("a <cat>", {})


def test_automatic_layouts_give_each_concept_its_clause():
    tokens = {"dog": ["<dog>", "sks"], "cat": ["<cat>"], "owl": ["<owl>"]}
    layout = auto_layout("a photo of sks, <cat>; and <owl> on a sofa", tokens)
    assert [(r.concept, r.prompt) for r in layout.regions] == [
        ("dog", "a photo of sks"),
        ("cat", "<cat>"),
        ("owl", "<owl> on a sofa"),
    ]
    pair = "a red <cat> on the left, very fluffy, and a yellow <owl> on the right on a white background"
    tokens_of_two = {"owl": ["<owl>"], "cat": ["<cat>"]}
    layout = preset_layout("left-right", pair, tokens_of_two, "blurry")
    assert layout.prompt == pair and layout.negative == "blurry"
    assert [layout.region_prompt(r) for r in layout.regions] == [
        "a red <cat> on the left, very fluffy",
        "a yellow <owl> on the right on a white background",
    ]
    # the scene, set off by a comma or semicolon before the first concept or after the last, is shared
    scene = "masterpiece; a red <cat> on the left, very fluffy, and an <owl> on the right, in a park, at dusk"
    assert [region.prompt for region in preset_layout("left-right", scene, tokens_of_two).regions] == [
        "masterpiece; a red <cat> on the left, very fluffy, in a park, at dusk",
        "masterpiece; an <owl> on the right, in a park, at dusk",
    ]
    assert concept_clauses(", <dog> and <cat>, and a tree", [(2, 7), (12, 17)]) == ["<dog>", "<cat>, and a tree"]
    assert concept_clauses("<dog> and <cat>", [(0, 5)]) is None  # one concept: nothing to cut
    assert concept_clauses("<dog> next to <cat>", [(0, 5), (14, 19)]) is None
    assert concept_clauses("<dog>andy <cat>", [(0, 5), (10, 15)]) is None  # "and" inside a word is no separator
    assert preset_layout("top-bottom", "<cat>", {"cat": ["<cat>"]}).regions[0].prompt is None


def test_region_masks_whole_image_outside_zero_and_feathered_inward():
    layout = Layout("p", (Region("a", (0, 0, 1, 1)), Region("b", (0.25, 0, 0.75, 0.5)), Region(None, (0.5, 0, 1, 1))))
    whole, middle, right = region_masks(layout, 16, 24, feather=2)
    assert whole.dtype == torch.float32 and whole.shape == (16, 24)
    assert torch.equal(whole, torch.ones(16, 24))
    # middle box: columns [6, 18), rows [0, 8): exactly 0 outside
    outside = torch.ones(16, 24, dtype=torch.bool)
    outside[:8, 6:18] = False
    assert torch.equal(middle[outside], torch.zeros(int(outside.sum())))
    # inner edges ramp inward (left, right, bottom), the top edge is the image border: 1 up to it
    assert middle[0, 6] == pytest.approx(0.25) and middle[0, 7] == pytest.approx(0.75) and middle[0, 8] == 1
    assert middle[0, 17] == pytest.approx(0.25) and middle[7, 12] == pytest.approx(0.25)
    assert middle[0, 12] == 1 and middle[6, 12] == pytest.approx(0.75)
    # the right half touches the right, top and bottom borders: only its left edge is soft
    assert torch.equal(right[:, 14:], torch.ones(16, 10)) and torch.equal(right[:, :12], torch.zeros(16, 12))
    assert 0 < right[5, 12] < right[5, 13] < 1
    hard = region_masks(layout, 16, 24, feather=0)[1]
    assert set(hard.unique().tolist()) == {0.0, 1.0} and hard.sum() == 8 * 12
    with pytest.raises(LayoutError, match="feather"):
        region_masks(layout, 16, 24, feather=-1)


# ----- routed slots ------------------------------------------------------------------------------


def test_token_grid_levels_and_mismatch():
    assert [token_grid(n, 9, 13) for n in (117, 35, 12, 4, 1)] == [(9, 13), (5, 7), (3, 4), (2, 2), (1, 1)]
    assert token_grid(2, 8, 12) == (1, 2)
    with pytest.raises(RoutingError, match="fits no UNet level"):
        token_grid(7, 8, 12)


@pytest.mark.parametrize("conv", [False, True])
def test_layer_gives_zero_delta_outside_the_concepts_region(tiny_pipe, conv):
    adapters = SpectralAdapters.from_pipeline(tiny_pipe, TargetConfig.preset("all"))
    _concept(adapters, "dog", 0, seed=1)
    _concept(adapters, "cat", 1, seed=2)
    key = "unet.down_blocks.0.attentions.0.proj_in" if conv else SELF_Q
    layer = adapters.layers[key]
    assert layer.token_kind == "image" and layer.router is adapters.router
    channels = layer.in_features
    x = torch.randn(2, channels, *LATENT) if conv else torch.randn(2, LATENT[0] * LATENT[1], channels)
    left, right = _half_masks()
    with torch.no_grad():
        base, both = layer.base_layer(x), layer(x)
        adapters.set_enabled("cat", False)
        dog_only = layer(x)
        adapters.set_enabled("cat", True)
        with adapters.routed({"dog": left}):  # cat has no mask: it acts nowhere
            routed = layer(x)
        with adapters.routed({"dog": left, "cat": right}):
            routed_both = layer(x)
    assert not adapters.router.active
    tokens = (lambda t: t.flatten(2).transpose(1, 2)) if conv else (lambda t: t)
    inside = left.reshape(-1).bool()
    base, both, dog_only, routed, routed_both = map(tokens, (base, both, dog_only, routed, routed_both))
    assert not torch.allclose(dog_only[:, inside], base[:, inside], atol=1e-4)  # the concept does something
    assert torch.equal(routed[:, ~inside], base[:, ~inside])
    torch.testing.assert_close(routed[:, inside], dog_only[:, inside], rtol=0, atol=1e-6)
    assert not torch.allclose(routed_both, both, atol=1e-4)
    with torch.no_grad():
        adapters.set_enabled("dog", False)
        cat_only = tokens(layer(x))
    torch.testing.assert_close(routed_both[:, ~inside], cat_only[:, ~inside], rtol=0, atol=1e-6)


def test_whole_image_region_equals_global_fusion_and_zero_area_equals_base(tiny_pipe):
    inputs = _unet_inputs(tiny_pipe.unet)
    base = _run(tiny_pipe.unet, inputs)
    adapters = SpectralAdapters.from_pipeline(tiny_pipe, TargetConfig.preset("all"))
    _concept(adapters, "dog", 0, seed=3)
    fused = _run(tiny_pipe.unet, inputs)
    assert not torch.allclose(fused, base, atol=1e-3)
    with adapters.routed({"dog": torch.ones(LATENT)}):
        torch.testing.assert_close(_run(tiny_pipe.unet, inputs), fused, rtol=0, atol=1e-6)
    zero = torch.zeros(LATENT)
    with adapters.routed({"dog": zero}), adapters.text_only(set()):
        torch.testing.assert_close(_run(tiny_pipe.unet, inputs), base, rtol=0, atol=1e-6)
    # the full regional form: the concept's keys/values only feed its (empty) region's attention
    context = RegionalContext([RegionInput(inputs[2], zero, "dog")], adapters.text_only)
    with adapters.routed({"dog": zero}), regional_attention(tiny_pipe.unet, context):
        torch.testing.assert_close(_run(tiny_pipe.unet, inputs), base, rtol=0, atol=1e-6)
    assert not adapters.router.active
    torch.testing.assert_close(_run(tiny_pipe.unet, inputs), fused, rtol=0, atol=0)


def test_routed_restores_the_inactive_state_on_errors_and_checks_names(tiny_pipe):
    adapters = SpectralAdapters.from_pipeline(tiny_pipe)
    _concept(adapters, "dog", 0, seed=4)
    with pytest.raises(RuntimeError, match="boom"), adapters.routed({"dog": torch.ones(LATENT)}):
        assert adapters.router.active
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), adapters.text_only({"dog"}):
        raise RuntimeError("boom")
    assert not adapters.router.active
    with pytest.raises(KeyError, match="not loaded"), adapters.routed({"cow": torch.ones(LATENT)}):
        pass
    with pytest.raises(RoutingError, match="latent grid"), adapters.routed({"dog": torch.ones(LATENT)}, (4, 4)):
        pass
    adapters.merge()
    with adapters.routed({"dog": torch.ones(LATENT)}):
        assert not adapters.merged  # a baked delta cannot be routed
    assert adapters.merged


def test_text_only_switches_text_encoder_slots(tiny_pipe):
    base = _text(tiny_pipe, "a photo of a dog")
    adapters = SpectralAdapters.from_pipeline(tiny_pipe)
    _concept(adapters, "a", 0, seed=5)
    _concept(adapters, "b", 1, seed=6)
    assert all(layer.token_kind == "text" for key, layer in adapters.layers.items() if key.startswith("text_encoder."))
    assert not torch.allclose(_text(tiny_pipe, "a photo of a dog"), base, atol=1e-4)
    with adapters.text_only(set()):
        torch.testing.assert_close(_text(tiny_pipe, "a photo of a dog"), base, rtol=0, atol=1e-6)
    with adapters.text_only({"a"}):
        only_a = _text(tiny_pipe, "a photo of <a>")
    both = _text(tiny_pipe, "a photo of <a>")
    adapters.remove_concept("b")
    alone = _text(tiny_pipe, "a photo of <a>")
    assert not torch.allclose(both, alone, atol=1e-4)
    torch.testing.assert_close(only_a, alone, rtol=0, atol=1e-6)


def _shaped_unet(kind):
    """Tiny UNets with the real level structure: SD 1.x / 2.x (3 downsamples), SDXL (2, text_time)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    common = {"in_channels": 4, "out_channels": 4, "layers_per_block": 1, "norm_num_groups": 32, "sample_size": 8}
    if kind == "sdxl":
        return UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 32, 64),
            transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=32,
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 32,
            **common,
        )
    return UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        cross_attention_dim=32,
        attention_head_dim=8 if kind == "sd1" else (2, 4, 8, 8),
        use_linear_projection=kind == "sd2",
        **common,
    )


@pytest.mark.parametrize(("kind", "size"), [("sd1", (8, 12)), ("sd2", (9, 13)), ("sdxl", (8, 12))])
def test_routing_runs_on_sd1_sd2_sdxl_shaped_unets_at_non_square_sizes(kind, size):
    unet = _shaped_unet(kind)
    adapters = SpectralAdapters({"unet": unet}, targets=TargetConfig.preset("all"))
    adapters.new_concept(ConceptInfo("dog", 0, 2, "additive", [], "dog"))
    randomize_concept(adapters, "dog", seed=7, scale=0.2)
    inputs = _unet_inputs(unet, size, batch=1)
    extra = {}
    if kind == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}
    grids = []
    original = adapters.router.grid_for
    adapters.router.grid_for = lambda n: grids.append(original(n)) or grids[-1]
    left, _ = _half_masks(size)
    fused = _run(unet, inputs, **extra)
    with adapters.routed({"dog": left}):
        routed = _run(unet, inputs, **extra)
    assert torch.isfinite(routed).all() and not torch.allclose(routed, fused, atol=1e-4)
    levels = [size]
    while levels[-1] != (1, 1) and len(levels) < 4:
        levels.append(tuple(-(-v // 2) for v in levels[-1]))
    expected = set(levels[1:3]) if kind == "sdxl" else set(levels)  # SDXL: no attention at full size, 2 downsamples
    assert set(grids) == expected
    wrong = torch.ones(size[0] * 2 + 3, size[1])  # masks for another image size: no level fits
    with adapters.routed({"dog": wrong}), pytest.raises(RoutingError, match="fits no UNet level"):
        _run(unet, inputs, **extra)


# ----- regional cross-attention ------------------------------------------------------------------


def test_regional_attention_with_the_context_prompt_everywhere_equals_plain_attention(tiny_pipe):
    unet = tiny_pipe.unet
    sample, timesteps, states = _unet_inputs(unet)
    inputs = (sample, timesteps, states[:1].expand(2, -1, -1))  # one prompt: a batch-1 region broadcasts
    plain = _run(unet, inputs)
    processors = dict(unet.attn_processors)
    left, right = region_masks(Layout("p", (Region(None, (0, 0, 0.6, 1)), Region(None, (0.4, 0, 1, 1)))), *LATENT)
    context = RegionalContext([RegionInput(inputs[2], left), RegionInput(inputs[2][:1], right)])
    with regional_attention(unet, context):
        assert any(type(p).__name__ == "RegionalAttnProcessor" for p in unet.attn_processors.values())
        regional = _run(unet, inputs)
    torch.testing.assert_close(regional, plain, rtol=0, atol=1e-5)
    assert unet.attn_processors == processors
    # and a region with another prompt changes the image
    other = torch.randn_like(inputs[2])
    with regional_attention(unet, RegionalContext([RegionInput(other, left)])):
        assert not torch.allclose(_run(unet, inputs), plain, atol=1e-4)
    with pytest.raises(RuntimeError), regional_attention(unet, context):
        raise RuntimeError("boom")
    assert unet.attn_processors == processors


def test_regional_attention_blends_only_inside_the_region_at_the_block(tiny_pipe):
    block = tiny_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    hidden = torch.randn(2, LATENT[0] * LATENT[1], block.to_q.in_features)
    states, other = torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    left, _ = _half_masks()
    with torch.no_grad():
        plain, with_other = block(hidden, states), block(hidden, other)
        with regional_attention(tiny_pipe.unet, RegionalContext([RegionInput(other, left)])):
            regional = block(hidden, states)
    inside = left.reshape(-1).bool()
    torch.testing.assert_close(regional[:, ~inside], plain[:, ~inside], rtol=0, atol=1e-6)
    torch.testing.assert_close(regional[:, inside], with_other[:, inside], rtol=0, atol=1e-5)
    share = 1.0 - OWN_PROMPT_CONTEXT_SHARE
    with torch.no_grad(), regional_attention(tiny_pipe.unet, RegionalContext([RegionInput(other, left, share=share)])):
        shared = block(hidden, states)
    # out = W_o(ctx + share * (region - ctx)) + b: linear in the attention outputs, so the blend carries through
    torch.testing.assert_close(
        shared[:, inside], plain[:, inside] + share * (with_other - plain)[:, inside], rtol=0, atol=1e-5
    )
    torch.testing.assert_close(shared[:, ~inside], plain[:, ~inside], rtol=0, atol=1e-6)
    with pytest.raises(RoutingError, match="share"):
        RegionalContext([RegionInput(other, left, share=1.5)])
    too_many = RegionalContext([RegionInput(other.repeat(2, 1, 1), left)])
    with pytest.raises(RoutingError, match="batch"), torch.no_grad(), regional_attention(tiny_pipe.unet, too_many):
        block(hidden, states)


def test_inside_a_region_with_its_own_prompt_the_context_is_read_with_its_concept_on(tiny_pipe):
    adapters = SpectralAdapters.from_pipeline(tiny_pipe, TargetConfig.preset("all"))
    _concept(adapters, "dog", 0, seed=5)
    block = tiny_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    hidden = torch.randn(2, LATENT[0] * LATENT[1], block.to_q.in_features)
    states, other = torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    left, _ = _half_masks()
    share = 1.0 - OWN_PROMPT_CONTEXT_SHARE
    with torch.no_grad():
        with adapters.text_only({"dog"}):
            context_dog, region_dog = block(hidden, states), block(hidden, other)
        with adapters.text_only(set()):
            context_base = block(hidden, states)
        assert not torch.allclose(context_dog, context_base, atol=1e-4)  # the concept's keys/values matter here
        region = RegionInput(other, left, "dog", share=share)
        with regional_attention(tiny_pipe.unet, RegionalContext([region], adapters.text_only)):
            out = block(hidden, states)
    inside = left.reshape(-1).bool()
    # inside: the region's prompt and the context prompt, both read with the dog's text-side slot on
    expected = share * region_dog + (1 - share) * context_dog
    torch.testing.assert_close(out[:, inside], expected[:, inside], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, ~inside], context_base[:, ~inside], rtol=0, atol=1e-6)


def test_prompt_keys_and_values_are_projected_once_per_generation_and_never_go_stale(tiny_pipe):
    block = tiny_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    hidden = torch.randn(2, LATENT[0] * LATENT[1], block.to_q.in_features)
    states, other, third = torch.randn(2, 77, 32), torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    left, _ = _half_masks()
    projections = []
    hook = block.to_k.register_forward_hook(lambda module, args, out: projections.append(args[0].shape[0]))
    try:
        with torch.no_grad(), regional_attention(tiny_pipe.unet, RegionalContext([RegionInput(other, left)])):
            first = block(hidden, states)
            made = len(projections)
            again = block(hidden, states)  # the next denoising step: the same prompt tensors come back
            assert len(projections) == made  # nothing projected again
            changed = block(hidden, third)  # another context prompt: projected anew, not taken from before
    finally:
        hook.remove()
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    with torch.no_grad(), regional_attention(tiny_pipe.unet, RegionalContext([RegionInput(other, left)])):
        fresh = block(hidden, third)
    torch.testing.assert_close(changed, fresh, rtol=0, atol=0)
    assert not torch.allclose(changed, first, atol=1e-4)


def test_region_passes_blend_one_pass_per_region_with_only_its_concept_on(tiny_pipe):
    unet = tiny_pipe.unet
    adapters = SpectralAdapters.from_pipeline(tiny_pipe, TargetConfig.preset("all"))
    _concept(adapters, "dog", 0, seed=5)
    _concept(adapters, "cat", 1, seed=6)
    sample, timesteps, states = _unet_inputs(unet)
    dog_prompt, cat_prompt = torch.randn_like(states), torch.randn_like(states)

    def alone(name, prompt):
        masks = {name: torch.ones(LATENT)} if name else {}
        with adapters.routed(masks, latent_size=LATENT), adapters.text_only({name} if name else set()):
            return _run(unet, (sample, timesteps, prompt))

    # two boxes that cover the image: their feathered seam is normalised, no pass of the context
    layout = Layout("p", (Region("dog", (0, 0, 0.5, 1)), Region("cat", (0.5, 0, 1, 1))))
    left, right = region_masks(layout, *LATENT)
    context = RegionalContext([RegionInput(dog_prompt, left, "dog"), RegionInput(cat_prompt, right, "cat")])
    with region_passes(unet, adapters, context, LATENT):
        blended = _run(unet, (sample, timesteps, states))
        as_tuple = unet(sample, timesteps, states, return_dict=False)[0]
    expected = (left * alone("dog", dog_prompt) + right * alone("cat", cat_prompt)) / (left + right)
    torch.testing.assert_close(blended, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(as_tuple, blended, rtol=0, atol=0)
    assert "forward" not in vars(unet)  # the UNet's own forward is back
    # one box leaves room: there the context prompt is read with no concept on
    (box,) = region_masks(Layout("p", (Region("dog", (0, 0, 0.5, 1)),)), *LATENT)
    with region_passes(unet, adapters, RegionalContext([RegionInput(dog_prompt, box, "dog")]), LATENT):
        partial = _run(unet, (sample, timesteps, states))
    expected = box * alone("dog", dog_prompt) + (1 - box) * alone(None, states)
    torch.testing.assert_close(partial, expected, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError), region_passes(unet, adapters, context, LATENT):
        raise RuntimeError("boom")
    assert "forward" not in vars(unet)


def test_private_passes_each_denoise_their_own_latent_then_all_predict_on_the_put_together_one(tiny_pipe):
    from spectral_diffusion.generation.passes import composite, tracks

    unet = tiny_pipe.unet
    adapters = SpectralAdapters.from_pipeline(tiny_pipe, TargetConfig.preset("all"))
    _concept(adapters, "dog", 0, seed=5)
    _concept(adapters, "cat", 1, seed=6)
    sample, _, states = _unet_inputs(unet)  # one image: the dog's own latent, then the cat's
    timestep = torch.tensor(500)
    dog_prompt, cat_prompt = torch.randn_like(states[:1]), torch.randn_like(states[:1])
    layout = Layout("p", (Region("dog", (0, 0, 0.5, 1)), Region("cat", (0.5, 0, 1, 1))))
    left, right = region_masks(layout, *LATENT)
    context = RegionalContext([RegionInput(dog_prompt, left, "dog"), RegionInput(cat_prompt, right, "cat")])
    dog_weight, cat_weight = (track.weight[0] for track in tracks(context, LATENT, sample))
    torch.testing.assert_close(dog_weight + cat_weight, torch.ones_like(dog_weight))

    def alone(name, latent, prompt):
        with adapters.routed({name: torch.ones(LATENT)}, latent_size=LATENT), adapters.text_only({name}):
            return _run(unet, (latent[None], timestep, prompt))[0]

    with region_passes(unet, adapters, context, LATENT, private=1):
        private = _run(unet, (sample, timestep, states))
        together = _run(unet, (sample, timestep, states))
    torch.testing.assert_close(private[0], alone("dog", sample[0], dog_prompt), rtol=0, atol=1e-5)
    torch.testing.assert_close(private[1], alone("cat", sample[1], cat_prompt), rtol=0, atol=1e-5)
    put_together = dog_weight * sample[0] + cat_weight * sample[1]
    expected = dog_weight * alone("dog", put_together, dog_prompt) + cat_weight * alone("cat", put_together, cat_prompt)
    torch.testing.assert_close(together[0], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(together[1], expected, rtol=0, atol=0)  # every copy gets the blend
    torch.testing.assert_close(composite(sample, context, LATENT)[0], put_together, rtol=0, atol=1e-6)
    assert "forward" not in vars(unet)


def test_self_attention_keeps_two_concepts_regions_apart_and_nothing_else(tiny_pipe):
    from spectral_diffusion.generation.isolation import IsolatedSelfAttnProcessor, isolated_self_attention

    unet = tiny_pipe.unet
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    hidden = torch.randn(2, LATENT[0] * LATENT[1], block.to_q.in_features)
    left, right = _half_masks()
    inside = left.reshape(-1).bool()
    original = block.processor
    with torch.no_grad():
        plain = block(hidden, None)
        alone_left = block(hidden[:, inside], None)  # plain attention among the left tokens only
        block.set_processor(IsolatedSelfAttnProcessor([left, right], LATENT, isolation=0.0))
        torch.testing.assert_close(block(hidden, None), plain, rtol=0, atol=1e-5)
        block.set_processor(IsolatedSelfAttnProcessor([left, right], LATENT, isolation=1e4))
        walled = block(hidden, None)
        with isolated_self_attention(unet, [left, right], LATENT):
            damped = block(hidden, None)
    torch.testing.assert_close(walled[:, inside], alone_left, rtol=0, atol=1e-5)
    assert not torch.allclose(damped, plain, atol=1e-4) and not torch.allclose(damped, walled, atol=1e-4)
    assert isinstance(block.processor, IsolatedSelfAttnProcessor)  # the one set above came back on exit
    block.set_processor(original)
    # one concept region (or none): nothing is installed, the UNet is unchanged
    inputs = _unet_inputs(unet)
    base = _run(unet, inputs)
    with isolated_self_attention(unet, [left], LATENT):
        torch.testing.assert_close(_run(unet, inputs), base, rtol=0, atol=0)


@pytest.mark.parametrize("fixture", ["tiny_pipe", "tiny_sdxl_pipe"])
def test_encoded_layout_runs_the_pipeline_and_context_only_regions_match_plain(fixture, request):
    pipe = request.getfixturevalue(fixture)
    adapters = SpectralAdapters.from_pipeline(pipe)
    _concept(adapters, "dog", 0, seed=8)
    _concept(adapters, "cat", 1, seed=9)
    height, width = 2 * LATENT[0], 2 * LATENT[1]
    common = {
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
        "height": height,
        "width": width,
        "num_images_per_prompt": 2,
        "output_type": "latent",
    }

    def run(**kwargs):
        with torch.no_grad():
            return pipe(generator=torch.Generator().manual_seed(0), **common, **kwargs).images

    prompt = "<dog> and <cat> on a sofa"
    with adapters.text_only(set()):
        plain = run(prompt=prompt)
    neutral = Layout(prompt, (Region(None, (0, 0, 0.5, 1)), Region(None, (0.5, 0, 1, 1))))
    masks = region_masks(neutral, *LATENT)
    context, embeds = encode_layout(pipe, neutral, masks, adapters.text_only, 2, True)
    with adapters.text_only(set()), regional_attention(pipe.unet, context):
        torch.testing.assert_close(run(**embeds), plain, rtol=0, atol=1e-4)

    layout = Layout(prompt, (Region("dog", (0, 0, 0.5, 1), "a photo of <dog>"), Region("cat", (0.5, 0, 1, 1))))
    masks = region_masks(layout, *LATENT)
    context, embeds = encode_layout(pipe, layout, masks, adapters.text_only, 2, True)
    # a region with a prompt of its own shares its box with the context; one without is the context already
    assert [r.share for r in context.regions] == [1.0 - OWN_PROMPT_CONTEXT_SHARE, 1.0]
    concept_masks = {r.concept: m for r, m in zip(layout.regions, masks, strict=True) if r.concept}
    with adapters.routed(concept_masks), regional_attention(pipe.unet, context):
        images = run(**embeds)
    assert images.shape == plain.shape and torch.isfinite(images).all()
    assert not torch.allclose(images, plain, atol=1e-3)
    assert not adapters.router.active


def test_a_region_for_a_concept_that_was_not_chosen_is_refused():
    """Issue 24 item 3: a region's concept missing from the chosen concepts is an error, not silently added."""
    from spectral_diffusion.errors import RequestError
    from spectral_diffusion.generation.request import GenerationRequest

    layout = Layout("<dog> and <cat>", (Region("dog", (0, 0, 0.5, 1)), Region("cat", (0.5, 0, 1, 1))))
    with pytest.raises(RequestError, match=r"places concept 'cat'.*add it to the concepts \(--concepts dog:0.8,cat\)"):
        GenerationRequest(prompt=layout.prompt, concepts={"dog": 0.8}, layout=layout)
    # with no concepts chosen at all, the placed ones are selected at strength 1 (documented)
    assert GenerationRequest(prompt=layout.prompt, layout=layout).concepts == {"dog": 1.0, "cat": 1.0}
    both = GenerationRequest(prompt=layout.prompt, concepts={"cat": 0.5, "dog": 1.0}, layout=layout)
    assert both.concepts == {"cat": 0.5, "dog": 1.0}


def test_overlapping_concept_boxes_are_warned_about(caplog):
    from spectral_diffusion.generation.layout import concept_overlaps
    from spectral_diffusion.generation.request import GenerationRequest

    touching = Layout("p", (Region("dog", (0, 0, 0.5, 1)), Region("cat", (0.5, 0, 1, 1)), Region(None, (0, 0, 1, 1))))
    assert concept_overlaps(touching) == []  # shared edges and prompt-only regions are fine
    with caplog.at_level("WARNING", logger="spectral_diffusion"):
        GenerationRequest(prompt="p", layout=touching)
    assert not caplog.records
    crossing = Layout("p", (Region("dog", (0, 0, 0.6, 1)), Region("cat", (0.4, 0, 1, 0.5))))
    assert concept_overlaps(crossing) == [("dog", "cat", pytest.approx(0.1))]
    with caplog.at_level("WARNING", logger="spectral_diffusion"):
        GenerationRequest(prompt="p", layout=crossing)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "dog and cat overlap (10% of the image)" in caplog.text


@pytest.mark.parametrize("fixture", ["tiny_pipe", "tiny_sdxl_pipe"])
def test_passes_that_start_apart_run_the_pipeline_and_image_k_is_seed_plus_k(fixture, request):
    """SD and SDXL (pooled embeddings and time ids per latent): the copies split and come back together."""
    import numpy as np

    from spectral_diffusion.generation.compose import run_regional
    from spectral_diffusion.generation.request import GenerationRequest

    pipe = request.getfixturevalue(fixture)
    adapters = SpectralAdapters.from_pipeline(pipe)
    _concept(adapters, "dog", 0, seed=8)
    _concept(adapters, "cat", 1, seed=9)
    layout = Layout("<dog> and <cat>", (Region("dog", (0, 0, 0.5, 1)), Region("cat", (0.5, 0, 1, 1))))
    settings = dict(prompt=layout.prompt, steps=3, guidance=5.0, width=2 * LATENT[1], height=2 * LATENT[0])
    settings |= dict(layout=layout, concepts={"dog": 1.0, "cat": 1.0})
    with torch.no_grad():
        both = run_regional(pipe, adapters, GenerationRequest(**settings, num_images=2), seed=3, output_type="np")
        second = run_regional(pipe, adapters, GenerationRequest(**settings), seed=4, output_type="np")
    assert len(both) == 2 and both[0].shape == (2 * LATENT[0], 2 * LATENT[1], 3)
    np.testing.assert_allclose(both[1], second[0], atol=1e-5)
    assert np.abs(both[0] - both[1]).max() > 1e-4
