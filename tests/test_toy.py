"""builtin:toy: shipped in the package, loads through plain diffusers, draws what it is told; the
pretraining script resumes from its checkpoints; the classifier that judges it is itself accurate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spectral_diffusion.generation.diffusion import generate
from spectral_diffusion.models import registry as builtin
from toy import scenes

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = builtin.SHIPPED_MODELS["builtin:toy"]


def test_toy_is_the_default_model_and_ships_small():
    import webapp.main
    from spectral_diffusion.frontends import cli

    assert cli.DEFAULT_MODEL == webapp.main.DEFAULT_MODEL == "builtin:toy"
    assert builtin.resolve_model("builtin:toy") == str(TOY)
    assert json.loads((TOY / "training.json").read_text())["recipe"] == "v3"
    size = sum(p.stat().st_size for p in TOY.rglob("*") if p.is_file())
    assert size <= 30 * 2**20
    assert not any(p.suffix in {".bin", ".pt", ".pkl", ".ckpt"} for p in TOY.rglob("*"))


@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import StableDiffusionPipeline

    # The ordinary diffusers path, as for a hub model: nothing of ours is involved in loading.
    pipe = StableDiffusionPipeline.from_pretrained(TOY, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reader():
    from toy import classifier

    return classifier.load()


def test_toy_draws_the_colour_shape_and_background_it_is_told(toy_pipe, reader):
    from toy import classifier

    hits = 0
    cases = [("red", "circle", "white"), ("blue", "square", "black"), ("yellow", "triangle", "gray")]
    for colour, shape, background in cases:
        images = generate(toy_pipe, f"a {colour} {shape} on a {background} background", 2, 32, 20, 5.0, seed=3)
        assert images[0].size == (32, 32)
        read = classifier.read(reader, images)
        for i in range(2):
            hits += (
                (scenes.SHAPES[int(read["shape"][i].argmax())] == shape)
                + (classifier.COLOUR_NAMES[int(read["colour"][i].argmax())] == colour)
                + (classifier.BACKGROUND_NAMES[int(read["background"][i].argmax())] == background)
            )
    assert hits >= 15  # of 18 readings; a model that ignores its prompt gets about 5


def test_toy_puts_an_object_where_it_is_told(toy_pipe, reader):
    from toy import classifier

    hits = 0
    words = ("left", "right", "top", "bottom")
    for word in words:
        prompt = f"a large red circle {scenes.POSITION_PHRASES[word]} on a white background"
        read = classifier.read(reader, generate(toy_pipe, prompt, 2, 32, 20, 5.0, seed=3))
        hits += sum(classifier.POSITION_NAMES[int(read["where"][i].argmax())] == word for i in range(2))
    assert hits >= 6  # of 8; the first toy model (positions ignored, placed by the noise) got 1 or 2


@pytest.mark.parametrize("old_model", ["v1", "v2"])
def test_an_adapter_trained_on_an_earlier_toy_model_is_refused_by_name(models_home, old_model):
    from spectral_diffusion.errors import BaseModelMismatchError
    from spectral_diffusion.formats.adapter_file import read_adapter
    from spectral_diffusion.generation.fusion import Studio

    # 3 training steps each; v1 had other layer shapes, v2 has v3's shapes but other weights
    old = read_adapter(Path(__file__).parent / "data" / f"toy-{old_model}-heart.safetensors")
    assert old.base_model == "builtin:toy"
    studio = Studio("builtin:toy")
    with pytest.raises(
        BaseModelMismatchError, match="concept 'heart', made for builtin:toy .*cannot be loaded into builtin:toy"
    ):
        studio.load_concept("heart", old)
    assert "heart" not in studio.adapters.concepts


@pytest.mark.parametrize("weights", ["classifier", "classifier-shapes"])
def test_classifier_reads_fresh_renders(reader, weights):
    from toy import classifier

    model = reader if weights == "classifier" else classifier.load(classifier.SHAPES_WEIGHTS)
    accuracy = classifier.accuracy(model, count=300, seed=31_000_000)
    assert accuracy["background"] > 0.97
    assert accuracy["shape_set"] > 0.85 and accuracy["colour_set"] > 0.85
    assert accuracy["positions"] > 0.9 and accuracy["shape_at_position"] > 0.85 and accuracy["size_at_position"] > 0.9


def test_varied_outlines_stay_the_shape_they_are_labelled():
    """The second classifier learns from varied strokes, holes and bites: a ring must keep its hole, a
    moon its bite, and nothing may vanish, or it would learn wrong labels."""
    import random

    import numpy as np

    from toy import classifier, scenes

    outline = classifier._varied_outline(random.Random(0))
    size, r = 128, 19.2  # a small object on the 4x supersampled canvas: the thinnest strokes
    disc = np.asarray(scenes.shape_mask("circle", size, 64, 64, r)) > 127
    for _ in range(40):
        ring = np.asarray(outline("ring", size, 64, 64, r)) > 127
        assert not ring[62:67, 62:67].any() and ring.sum() > 0.3 * disc.sum()
        moon = np.asarray(outline("moon", size, 64, 64, r)) > 127
        assert 0 < moon.sum() < 0.75 * disc.sum() and not moon[64, 70:80].any()  # bitten from the right
        for shape in scenes.SHAPES:
            plain = (np.asarray(scenes.shape_mask(shape, size, 64, 64, r)) > 127).sum()
            assert (np.asarray(outline(shape, size, 64, 64, r)) > 127).sum() > 0.4 * plain


def test_pretraining_checkpoints_resume_and_export_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from toy import pretrain

    work, out = tmp_path / "work", tmp_path / "model"
    args = [
        "--work",
        str(work),
        "--export",
        str(out),
        "--scenes",
        "48",
        "--vae-steps",
        "2",
        "--threads",
        "2",
        "--steps",
        "6",
        "--warmup",
        "2",
    ]
    pretrain.main([*args, "--minutes", "0.001"])  # stops early, after at least one step
    first = json.loads((work / "diffusion" / "state.json").read_text())
    assert 1 <= first["step"] < 6 and json.loads((work / "vae" / "state.json").read_text())["step"] == 2
    pretrain.main(args)  # resumes: the step count carries on to the recipe's end
    second = json.loads((work / "diffusion" / "state.json").read_text())
    assert second["step"] == 6 and second["losses"][: first["step"]] == first["losses"]
    info = json.loads((out / "training.json").read_text())
    assert info["diffusion_steps"] == 6 and info["diffusion"]["steps"] == 6 and info["recipe"] == pretrain.RECIPE
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, safety_checker=None)
    assert pipe.vae.config.scaling_factor != 1.0  # set from the encoded scenes' spread
    with torch.no_grad():
        image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)

    # continued elsewhere from the export alone: same VAE and step count, the rate warmed up again
    again = tmp_path / "again"
    pretrain.main(
        [
            "--work",
            str(again),
            "--export",
            str(tmp_path / "model2"),
            "--scenes",
            "48",
            "--threads",
            "2",
            "--steps",
            "8",
            "--warmup",
            "2",
            "--restart-from",
            str(out),
        ]
    )
    state = json.loads((again / "diffusion" / "state.json").read_text())
    assert state["step"] == 8 and state["restarted_at"] == 6 and state["losses"][:6] == second["losses"]
    record = json.loads((tmp_path / "model2" / "training.json").read_text())
    assert record["restarted_at"] == 6 and record["restarted_from"]["diffusion_steps"] == 6
    vae_before = pipe.vae.state_dict()
    vae_after = StableDiffusionPipeline.from_pretrained(
        tmp_path / "model2", local_files_only=True, safety_checker=None
    ).vae.state_dict()
    assert all(torch.equal(vae_before[k], vae_after[k]) for k in vae_before)
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        pretrain.main(["--work", str(again), "--export", str(tmp_path / "model3"), "--restart-from", str(out)])


def test_the_diffusion_recipe_schedule_and_its_checks():
    from toy.pretrain import DiffusionRecipe, _rewarm

    recipe = DiffusionRecipe(steps=1000, lr=1e-3, warmup=100)
    assert recipe.lr_at(0) == pytest.approx(1e-5, rel=1e-2) and recipe.lr_at(99) == pytest.approx(1e-3, rel=0.03)
    assert recipe.lr_at(500) == pytest.approx(0.5e-3) and recipe.lr_at(1000) == 0.0
    assert DiffusionRecipe(steps=1000, lr=3e-4, warmup=10, schedule="constant").lr_at(999) == 3e-4
    assert _rewarm(50, None) == 1.0 and _rewarm(50, 50) < 0.01 and _rewarm(400, 50) == 1.0
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        DiffusionRecipe(schedule="linear")
    with pytest.raises(ValueError, match="invalid diffusion recipe"):
        DiffusionRecipe(steps=0)


def test_batched_drawing_gives_the_images_of_one_call_per_prompt(toy_pipe):
    import numpy as np

    from toy import evaluate

    prompts = ["a red star on a gray background", "a blue circle on the left on a white background"]
    batched = evaluate.draw(toy_pipe, prompts, 2, 3, 5.0)
    for prompt, images in zip(prompts, batched, strict=True):
        single = generate(toy_pipe, prompt, 2, 32, 3, 5.0, seed=7)
        for a, b in zip(single, images, strict=True):
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_the_sweep_prefers_finished_variants_and_scales_recipes():
    from toy import pretrain, sweep

    def result(name, held, finished):
        return {
            "name": name,
            "finished": finished,
            "snapshots": [{"held_out": held, "position": 1, "pair_sets": held, "pair_positions": held}],
        }

    results = {"a": result("a", 0.9, False), "b": result("b", 0.5, True), "c": {"name": "c"}}
    assert sweep.best(results) == "b"
    assert sweep.best({"a": result("a", 0.9, False), "c": {"name": "c"}}) == "a"
    assert sweep.best({"c": {"name": "c"}}) is None
    small = sweep._scaled(pretrain.DiffusionRecipe(), 0.01)
    assert small.steps == 63 and small.warmup == 5 and small.lr == pretrain.DiffusionRecipe().lr


def test_toy_trains_with_its_own_defaults_unless_the_user_overrides_them(tmp_path):
    from spectral_diffusion.frontends.cli import build_parser
    from spectral_diffusion.frontends.cli_commands import _train_request
    from spectral_diffusion.frontends.service import Service

    def _train_config(args, rank, slot):
        assert _train_request(args).rank_for(args.model) == rank
        return _train_request(args).config(args.model, args.library, slot=slot)

    parser = build_parser()
    toy = _train_config(parser.parse_args(["train", "--images", "x", "--name", "a"]), 8, 0)
    assert (toy.lr_unet, toy.flip_p, toy.steps) == (3e-3, 0.0, builtin.BUILTIN_TRAINING["builtin:toy"]["steps"])
    mine = _train_config(parser.parse_args(["train", "--images", "x", "--name", "a", "--steps", "7"]), 8, 0)
    assert (mine.steps, mine.lr_unet) == (7, 3e-3)
    other = _train_config(parser.parse_args(["train", "--model", "builtin:tiny", "--images", "x", "--name", "a"]), 4, 0)
    assert other.lr_unet == 1e-4 and other.steps is None
    service = Service(model="builtin:toy", library=tmp_path / "lib", train_defaults={"steps": 5})
    assert service.train_defaults["steps"] == 5 and service.train_defaults["lr_unet"] == 3e-3


def test_position_diagnostics_measure_captions_and_object_centres():
    from toy import positions, pretrain

    first = positions.caption_statistics(count=600)
    second = positions.caption_statistics(count=600, keep=pretrain.CAPTION_MIX)
    assert first["named_pairs_listing_left_or_top_first"] == 1.0  # v1: the order gave positions away
    assert 0.35 < second["named_pairs_listing_left_or_top_first"] < 0.65
    assert second["objects_with_position_named"] > first["objects_with_position_named"] + 0.15
    for word, (x, y) in scenes.POSITIONS.items():
        image = scenes.render(scenes.Scene((scenes.SceneObject("circle", "red", "small", position=word),), "white"))
        cx, cy = positions.object_centre(image)
        assert abs(cx - x) < 0.03 and abs(cy - y) < 0.03
    assert positions.object_centre(scenes.render(scenes.Scene((), "black"))) is None


def test_an_ensemble_of_readers_loads_as_one_and_reads_the_mean_of_its_members(tmp_path):
    from toy import classifier, scenes

    torch.manual_seed(0)
    ensemble = classifier.ReaderEnsemble(2).eval()
    path = tmp_path / "readers.safetensors"
    classifier.save(ensemble, path, {}, shape_variation=True)
    loaded = classifier.load(path)
    assert isinstance(loaded, classifier.ReaderEnsemble) and len(loaded.members) == 2
    images = [scenes.render(scenes.random_scene(k)) for k in range(3)]
    together = classifier.read(loaded, images)
    first, second = (classifier.read(member, images) for member in ensemble.members)
    for key, value in together.items():
        torch.testing.assert_close(value, (first[key] + second[key]) / 2)
    assert not torch.allclose(first["shape"], second["shape"])  # two members, not one read twice
