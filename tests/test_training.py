"""Concept training on the built-in tiny models: learning, isolation, resume, cancellation, DDP, SDXL.

The runs are tiny (32 px, batch 2, rank 4) so the whole file stays within a few CPU minutes; one
reference run of ``STEPS`` steps is shared by the tests that inspect its outcome.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from torch import nn

from spectral_diffusion.core.layers import SpectralLayer
from spectral_diffusion.core.model import SpectralAdapters
from spectral_diffusion.core.svd import top_k_svd
from spectral_diffusion.errors import CheckpointError, ImageDataError, TrainingCancelled
from spectral_diffusion.formats.adapter_file import load_adapter, read_adapter, save_adapter
from spectral_diffusion.models.registry import load_pipeline
from spectral_diffusion.training.config import TrainConfig, TrainProgress, default_steps
from spectral_diffusion.training.trainer import train_concept

REPO = Path(__file__).resolve().parent.parent
STEPS = 20
CUT = 8  # the interrupted run stops after this step


def make_images(folder: Path, count: int = 4) -> Path:
    """A fixed, seeded image set: coloured discs on plain backgrounds, not all square."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (80 if i % 2 else 64, 64), (40 * i, 110, 200 - 30 * i))
        ImageDraw.Draw(image).ellipse((10 + 4 * i, 12, 46 + 4 * i, 48), fill=(250, 200, 0))
        image.save(folder / f"img{i}.png")
    return folder


def config(**changes) -> TrainConfig:
    settings = {
        "name": "dot",
        "class_word": "dog",
        "rank": 4,
        "slot": 1,
        "steps": STEPS,
        "resolution": 32,
        "lr_unet": 1e-3,
        "lr_text": 1e-4,
        "lr_embedding": 1e-2,
        "preview_steps": 2,
        "seed": 3,
    }
    settings.update(changes)
    return TrainConfig(**settings)


def snapshot(pipe) -> dict[str, dict[str, torch.Tensor]]:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {
        name: {key: value.detach().clone() for key, value in getattr(pipe, name).state_dict().items()}
        for name in names
        if getattr(pipe, name, None) is not None
    }


def assert_pipeline_untouched(pipe, before, tokenizer_sizes) -> None:
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    for name, tensors in before.items():
        assert after[name].keys() == tensors.keys(), name
        changed = [key for key, value in tensors.items() if not torch.equal(value, after[name][key])]
        assert not changed, f"{name} weights changed: {changed[:3]}"
        module = getattr(pipe, name)
        assert not any(isinstance(m, SpectralLayer) for m in module.modules()), f"{name} still patched"
        assert "forward" not in vars(module), f"{name} keeps a wrapped forward"
        assert not module.training
        assert all(p.dtype == torch.float32 for p in module.parameters())
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            assert type(getattr(pipe, name).get_input_embeddings()) is nn.Embedding
    assert {name: len(getattr(pipe, name)) for name in tokenizer_sizes} == tokenizer_sizes


def tokenizer_sizes(pipe) -> dict[str, int]:
    return {name: len(getattr(pipe, name)) for name in ("tokenizer", "tokenizer_2") if getattr(pipe, name, None)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("concept-images"))


@pytest.fixture(scope="module")
def reference(models_home, images):
    """One uninterrupted seeded run, shared by the tests that inspect its outcome."""
    pipe = load_pipeline("builtin:tiny")
    before, sizes = snapshot(pipe), tokenizer_sizes(pipe)
    events: list[TrainProgress] = []
    result = train_concept(pipe, images, config(), progress=events.append)
    return SimpleNamespace(pipe=pipe, before=before, sizes=sizes, result=result, events=events)


def test_training_lowers_the_loss_on_a_fixed_evaluation_batch(reference):
    result = reference.result
    assert sorted(result.eval_losses) == [0, STEPS]
    start, end = result.eval_losses[0], result.eval_losses[STEPS]
    assert end < 0.995 * start, f"evaluation loss {start:.5f} -> {end:.5f}"
    assert len(result.losses) == STEPS and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.preview.size == (32, 32)


def test_progress_reports_every_step(reference):
    events = reference.events
    assert [e.step for e in events] == list(range(1, STEPS + 1))
    assert all(e.total_steps == STEPS and e.eta_seconds >= 0 for e in events)
    assert events[-1].eta_seconds == 0 and events[-1].preview is not None
    assert all(e.preview is None for e in events[:-1])  # preview_every=0: the final preview only


def test_only_the_slot_and_token_rows_change(reference):
    """The base weights are bit-identical; the update lives in slot 1's spectral parameters and tokens."""
    assert_pipeline_untouched(reference.pipe, reference.before, reference.sizes)
    adapter = reference.result.adapter
    assert adapter.info.slot == 1 and adapter.info.tokens == ["<dot>"]
    unet = reference.before["unet"]
    for key in list(adapter.layers)[:6]:
        component, _, path = key.partition(".")
        if component != "unet":
            continue
        expected = top_k_svd(unet[f"{path}.weight"].reshape(unet[f"{path}.weight"].shape[0], -1), 8)
        tensors = adapter.layers[key]
        torch.testing.assert_close(tensors["s"], expected.s[4:8], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tensors["U"].abs(), expected.U[:, 4:8].abs(), rtol=1e-4, atol=1e-5)
    moved = [key for key, tensors in adapter.layers.items() if tensors["A"].abs().max() > 0]
    assert len(moved) > 0.9 * len(adapter.layers)
    table = reference.before["text_encoder"]["embeddings.token_embedding.weight"]
    dog = reference.pipe.tokenizer("dog", add_special_tokens=False).input_ids
    start = table[dog].mean(dim=0)
    token = adapter.token_vectors["text_encoder"]
    assert token.shape == (1, table.shape[1]) and not torch.allclose(token[0], start)


def test_result_is_a_valid_adapter_file(reference, tmp_path):
    path = save_adapter(reference.result.adapter, tmp_path / "dot.safetensors")
    data = read_adapter(path)
    assert data.train_config["steps"] == STEPS and data.train_config["resolution"] == 32
    assert data.train_config["lr_embedding"] == 1e-2 and "checkpoint_dir" not in data.train_config
    assert data.base_model == "builtin:tiny" or data.base_model.endswith("tiny")
    pipe = reference.pipe
    adapters = SpectralAdapters.from_pipeline(pipe)
    try:
        load_adapter(adapters, path)
        ids = pipe.tokenizer(["a photo of <dot> dog"], padding="max_length", return_tensors="pt").input_ids
        with torch.no_grad():
            assert torch.isfinite(pipe.text_encoder(ids)[0]).all()
    finally:
        adapters.unpatch()


def test_resume_continues_to_the_same_adapter(reference, images, tmp_path, monkeypatch):
    """Stop after CUT steps (checkpointed), resume, and land on the uninterrupted run's adapter."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    checkpoints = tmp_path / "checkpoints"
    pipe = load_pipeline("builtin:tiny")
    before, sizes = snapshot(pipe), tokenizer_sizes(pipe)
    events: list[TrainProgress] = []
    first = config(checkpoint_every=5, checkpoint_dir=str(checkpoints))
    with pytest.raises(TrainingCancelled, match=f"cancelled at step {CUT}/{STEPS}"):
        train_concept(pipe, images, first, progress=events.append, should_stop=lambda: len(events) >= CUT)
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"checkpoint-{CUT:07d}.safetensors", "state.json"]
    assert not any(workdir.iterdir())
    assert_pipeline_untouched(pipe, before, sizes)

    resumed = train_concept(pipe, images, config(checkpoint_every=5, checkpoint_dir=str(checkpoints), resume=True))
    assert resumed.resumed_from == CUT
    expected = reference.result.adapter.tensors()
    got = resumed.adapter.tensors()
    assert got.keys() == expected.keys()
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert worst < 1e-6, f"resumed adapter differs from the uninterrupted one by {worst}"
    assert resumed.losses == pytest.approx(reference.result.losses, abs=1e-6)
    assert resumed.eval_losses[0] == pytest.approx(reference.result.eval_losses[0])

    with pytest.raises(CheckpointError, match="steps=20 \\(now 30\\)"):
        train_concept(pipe, images, config(steps=30, checkpoint_dir=str(checkpoints), resume=True))
    state = json.loads((checkpoints / "state.json").read_text())
    (checkpoints / "state.json").write_text(json.dumps({**state, "tensors": "../elsewhere.safetensors"}))
    with pytest.raises(CheckpointError, match="invalid tensor file"):
        train_concept(pipe, images, config(checkpoint_dir=str(checkpoints), resume=True))
    assert_pipeline_untouched(pipe, before, sizes)


def test_cancel_before_the_first_step_leaves_no_trace(tiny_pipe, images, tmp_path, monkeypatch):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    before, sizes = snapshot(tiny_pipe), tokenizer_sizes(tiny_pipe)
    checkpoints = tmp_path / "checkpoints"
    run = config(checkpoint_every=2, checkpoint_dir=str(checkpoints))
    with pytest.raises(TrainingCancelled, match="cancelled at step 0/"):
        train_concept(tiny_pipe, images, run, should_stop=lambda: True)
    assert not any(workdir.iterdir())
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
    assert_pipeline_untouched(tiny_pipe, before, sizes)


def test_a_crash_in_a_callback_restores_the_pipeline(tiny_pipe, images):
    before, sizes = snapshot(tiny_pipe), tokenizer_sizes(tiny_pipe)

    def explode(progress):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        train_concept(tiny_pipe, images, config(steps=3, gradient_checkpointing=True), progress=explode)
    assert_pipeline_untouched(tiny_pipe, before, sizes)
    assert not tiny_pipe.unet.is_gradient_checkpointing


def test_an_fp16_vae_runs_in_fp32_and_is_given_back(tiny_pipe, images):
    tiny_pipe.vae.to(torch.float16)  # SDXL's VAE overflows in fp16; its config asks for an upcast
    before = {k: v.clone() for k, v in tiny_pipe.vae.state_dict().items()}
    result = train_concept(tiny_pipe, images, config(steps=1))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert tiny_pipe.vae.dtype == torch.float16
    assert all(torch.equal(v, tiny_pipe.vae.state_dict()[k]) for k, v in before.items())


def test_bf16_mixed_precision_keeps_trainable_parameters_in_fp32(models_home, images, monkeypatch):
    seen = {}
    original = SpectralAdapters.trainable_parameters

    def spy(self, name):
        groups = original(self, name)
        seen["trainable"] = {p.dtype for group in groups.values() for p in group}
        seen["base"] = {layer.base_layer.weight.dtype for layer in self.layers.values()}
        return groups

    monkeypatch.setattr(SpectralAdapters, "trainable_parameters", spy)
    result = train_concept("builtin:tiny", images, config(steps=3, mixed_precision="bf16"))
    assert seen == {"trainable": {torch.float32}, "base": {torch.bfloat16}}
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.adapter.train_config["mixed_precision"] == "bf16"
    assert all(torch.isfinite(t).all() for t in result.adapter.tensors().values())


def test_prior_preservation_min_snr_v_prediction_and_accumulation(tiny_pipe, images, tmp_path):
    from diffusers import DDIMScheduler

    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config, prediction_type="v_prediction")
    class_dir = tmp_path / "class-images"
    run = config(
        steps=2,
        prior_preservation=True,
        num_class_images=2,
        class_inference_steps=2,
        class_images_dir=str(class_dir),
        min_snr_gamma=5.0,
        gradient_accumulation=2,
        batch_size=1,
    )
    result = train_concept(tiny_pipe, images, run)
    assert sorted(p.name for p in class_dir.iterdir()) == ["class-0000.png", "class-0001.png"]
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.adapter.train_config["min_snr_gamma"] == 5.0


def test_unsupported_prediction_type_is_refused(tiny_pipe, images):
    from diffusers import DDIMScheduler

    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config, prediction_type="sample")
    with pytest.raises(ValueError, match="'sample'"):
        train_concept(tiny_pipe, images, config(steps=1))


def test_sdxl_training_with_two_tokens_and_previews(tiny_sdxl_pipe, images):
    before, sizes = snapshot(tiny_sdxl_pipe), tokenizer_sizes(tiny_sdxl_pipe)
    events: list[TrainProgress] = []
    run = config(steps=3, tokens=["<dot>", "<dot-2>"], preview_every=2)
    result = train_concept(tiny_sdxl_pipe, images, run, progress=events.append)
    assert [e.preview is not None for e in events] == [False, True, True]
    adapter = result.adapter
    assert set(adapter.token_vectors) == {"text_encoder", "text_encoder_2"}
    assert [tuple(v.shape) for v in adapter.token_vectors.values()] == [(2, 32), (2, 32)]
    assert {key.split(".")[0] for key in adapter.layers} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(torch.isfinite(t).all() for t in adapter.tensors().values())
    assert any(t["A"].abs().max() > 0 for k, t in adapter.layers.items() if k.startswith("text_encoder_2."))
    assert result.preview.size == (32, 32)
    assert_pipeline_untouched(tiny_sdxl_pipe, before, sizes)


def test_bad_images_are_refused_with_their_message(models_home, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageDataError, match="no images found"):
        train_concept("builtin:tiny", empty, config())
    broken = make_images(tmp_path / "broken", 2)
    (broken / "zz.png").write_bytes(b"garbage")
    with pytest.raises(ImageDataError, match="cannot read image zz.png"):
        train_concept("builtin:tiny", broken, config())
    small = make_images(tmp_path / "small", 2)
    Image.new("RGB", (12, 12)).save(small / "zz.png")
    with pytest.raises(ImageDataError, match=r"zz.png is too small \(12x12\)"):
        train_concept("builtin:tiny", small, config())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank": 0}, "rank"),
        ({"steps": 0}, "steps"),
        ({"resolution": 30}, "multiple of 8"),
        ({"variant": "diagonal"}, "variant"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"targets": "everything"}, "target preset"),
        ({"lr_unet": -1.0}, "lr_unet"),
        ({"prior_preservation": True, "class_word": ""}, "class word"),
        ({"resume": True}, "checkpoint_dir"),
        ({"tokens": ["no brackets"]}, "trigger token"),
        ({"min_snr_gamma": 0}, "min_snr_gamma"),
        ({"flip_p": 2.0}, "flip_p"),
    ],
)
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        config(**changes)


def test_config_defaults_and_json():
    run = TrainConfig(name="my-dog")
    assert run.tokens == ["<my-dog>"] and run.rank == 8 and run.batch_size == 2
    assert (run.lr_unet, run.lr_text, run.lr_embedding) == (1e-4, 1e-5, 1e-3)
    data = run.to_json()
    assert json.loads(json.dumps(data)) == data
    assert TrainConfig.from_json({**data, "unknown": 1}) == run
    assert default_steps(64) == 150 and default_steps(512) == 1000 and default_steps(1024) == 1000


def test_two_process_data_parallel_run_gives_identical_adapters(models_home, images, tmp_path):
    load_pipeline("builtin:tiny")  # built once, before two processes race for it
    env = {
        **os.environ,
        "SPECTRAL_DIFFUSION_HOME": str(models_home),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "tests" / "dist_train_worker.py"),
        str(images),
        str(tmp_path),
        "3",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world_size"] for i in infos] == [2, 2] and infos[0]["backend"] == "gloo"
    assert infos[0]["losses"] != infos[1]["losses"]  # each rank trained on its own share of the batch
    first, second = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(first[k].abs().max() > 0 for k in first if k.endswith(".A"))


# ----- masked loss, s_k-independent steps, c off ----------------------------------------------------


def test_masked_loss_is_the_plain_loss_with_a_white_mask_and_weights_the_background():
    from spectral_diffusion.training.objective import latent_weights, per_example_loss

    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)
    plain = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    white = latent_weights(torch.ones(2, 1, 32, 32), (4, 4), 0.1)
    assert torch.allclose(per_example_loss(pred, target), plain)
    assert torch.allclose(per_example_loss(pred, target, white), plain)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, :, :16] = 1.0  # the left half is the concept
    mask[:, :, :8, 16:24] = 0.5  # a latent half covered: area pooling gives it half weight plus background
    weights = latent_weights(mask, (4, 4), 0.25)
    assert weights.shape == (2, 1, 4, 4)
    assert torch.all(weights[:, :, :, :2] == 1.0) and torch.all(weights[:, :, 1:, 2:] == 0.25)
    assert torch.allclose(weights[:, :, 0, 2], torch.full((2, 1), 0.25 + 0.75 * 0.5))
    error = (pred - target) ** 2
    assert torch.allclose(per_example_loss(pred, target, weights), (error * weights).mean(dim=(1, 2, 3)))
    background_only = torch.zeros(2, 1, 32, 32)
    assert torch.allclose(per_example_loss(pred, target, latent_weights(background_only, (4, 4), 0.25)), 0.25 * plain)


def test_masks_config_defaults_and_validation(tmp_path):
    assert config().background_loss_weight == 1.0
    assert config(mask_dir=str(tmp_path)).background_loss_weight == 0.1
    assert config(mask_dir=str(tmp_path), background_weight=0.3).background_loss_weight == 0.3
    assert "mask_dir" not in config(mask_dir=str(tmp_path)).to_json()  # a local path, not recorded
    for changes, message in (
        ({"background_weight": 2.0}, "background_weight"),
        ({"augment_p": -1}, "augment_p"),
        ({"augment_min_scale": 0.01}, "augment scales"),
        ({"lr_scale": "x"}, "lr_scale"),
    ):
        with pytest.raises(ValueError, match=message):
            config(**changes)


def test_a_short_training_with_masks_and_augmentation_runs(tiny_pipe, images, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in images.glob("*.png"):
        with Image.open(path) as photo:
            size = photo.size
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).ellipse((10, 12, 50, 48), fill=255)
        mask.save(masks / path.name)
    result = train_concept(tiny_pipe, images, config(steps=3, mask_dir=str(masks), augment_p=1.0))
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.adapter.train_config["background_weight"] is None  # the default, 0.1 with masks
    (images.parent / "no-masks").mkdir(exist_ok=True)
    with pytest.raises(ImageDataError, match="no mask for image"):
        train_concept(tiny_pipe, images, config(steps=1, mask_dir=str(images.parent / "no-masks")))


def test_spectrum_scale_divides_each_column_step_by_its_singular_value(tiny_pipe, images):
    from spectral_diffusion.training.lr_scale import StepScale

    adapters = SpectralAdapters.from_pipeline(tiny_pipe)
    try:
        adapters.spectrum(8)
        from spectral_diffusion.core.config import ConceptInfo

        adapters.new_concept(ConceptInfo("dot", 1, 4, "additive", ["<dot>"], ""))
        layer = next(iter(adapters.layers.values())).concept("dot")
        scale = StepScale(adapters, "dot", "spectrum")
        before = scale.before()
        with torch.no_grad():
            layer.A.add_(1.0)  # a step of 1 on every entry
        scale.after(before)
        assert torch.allclose(layer.A[0], 1.0 / layer.s)
        assert StepScale(adapters, "dot", "uniform").pairs == []
    finally:
        adapters.unpatch()


def test_spectrum_scale_and_c_off_train(tiny_pipe, images):
    result = train_concept(tiny_pipe, images, config(steps=2, lr_scale="spectrum", train_c=False))
    tensors = result.adapter.tensors()
    shifts = [t for key, t in tensors.items() if key.endswith(".c")]
    factors = [t for key, t in tensors.items() if key.endswith(".A")]
    assert shifts and all(float(t.abs().max()) == 0.0 for t in shifts)
    assert factors and any(float(t.abs().max()) > 0.0 for t in factors)


def test_cli_masks_reach_the_train_config(tmp_path):
    from spectral_diffusion.frontends.cli import build_parser
    from spectral_diffusion.frontends.cli_commands import _train_request

    args = build_parser().parse_args(["train", "--images", str(tmp_path), "--name", "dot", "--masks", "m"])
    run = _train_request(args).config("builtin:tiny", str(tmp_path))
    assert run.mask_dir == "m" and run.background_loss_weight == 0.1
    plain = build_parser().parse_args(["train", "--images", str(tmp_path), "--name", "dot"])
    assert _train_request(plain).config("builtin:tiny", str(tmp_path)).mask_dir is None


def _make_rank_deficient(pipe, drop: int = 4) -> None:
    """Zero the last ``drop`` singular values of one 32 x 32 attention layer of the real tiny UNet."""
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    U, S, Vh = torch.linalg.svd(layer.weight.data.double())
    S[-drop:] = 0.0
    with torch.no_grad():
        layer.weight.copy_(((U * S) @ Vh).float())


def test_a_rank_deficient_layer_takes_its_last_slot_out_of_the_capacity(tiny_pipe, images, tmp_path):
    """The last slot of a rank-deficient model used to train "successfully" and then never load (issue
    24): capacity now excludes it, training it is refused before any step, and the library records it."""
    from spectral_diffusion.core.config import ConceptInfo
    from spectral_diffusion.errors import SlotConflictError
    from spectral_diffusion.frontends.workflows import TrainRequest, train_into_library
    from spectral_diffusion.library.store import Library

    _make_rank_deficient(tiny_pipe)  # rank 28 of 32: rank-4 slot 7 would sit on zero singular values
    adapters = SpectralAdapters.from_pipeline(tiny_pipe)
    assert adapters.structural_capacity(4) == 8 and adapters.capacity(4) == 7 and adapters.capacity(2) == 14
    with pytest.raises(SlotConflictError, match="slot 7 at rank 4 is unusable.*only 28 non-degenerate.*slots 0-6"):
        adapters.new_concept(ConceptInfo("dot", 7, 4, "additive", ["<dot>"]))
    fingerprint, capacity = adapters.fingerprint, adapters.capacity(4)
    adapters.unpatch()

    events: list[TrainProgress] = []
    with pytest.raises(SlotConflictError, match="slot 7 at rank 4 is unusable"):
        train_concept(tiny_pipe, images, config(slot=7), progress=events.append)
    assert events == []

    library, files = Library(tmp_path / "lib"), sorted(images.iterdir())
    request = TrainRequest("dot", images, class_word="dog", rank=4, steps=2, resolution=32, slot=7)
    with pytest.raises(SlotConflictError, match="slot 7 does not exist at rank 4: this base model has 7 slots"):
        train_into_library(
            library, tiny_pipe, request, files, model="builtin:tiny", fingerprint=fingerprint, capacity=capacity
        )
    request.slot = 6  # the last usable slot trains, and the library's slot map knows the capacity
    record, _ = train_into_library(
        library, tiny_pipe, request, files, model="builtin:tiny", fingerprint=fingerprint, capacity=capacity
    )
    assert record.slot == 6 and record.metadata["smallest_dim"] == 28
    assert library.slot_report(fingerprint, 4).capacity == 7
    loaded = SpectralAdapters.from_pipeline(tiny_pipe)
    try:
        load_adapter(loaded, record.adapter_path)  # the base-model check passes
    finally:
        loaded.unpatch()


def test_resume_refuses_a_checkpoint_of_other_photos_or_captions(tiny_pipe, images, tmp_path):
    """Issue 24: `delete ring2`, then `train ring2 --resume` from cross photos "trained" in 6 s and drew
    a ring: resume never checked the images. A checkpoint records what it was trained from."""
    checkpoints = tmp_path / "checkpoints"
    events: list[TrainProgress] = []
    first = config(steps=6, checkpoint_every=1, checkpoint_dir=str(checkpoints))
    with pytest.raises(TrainingCancelled):
        train_concept(tiny_pipe, images, first, progress=events.append, should_stop=lambda: len(events) >= 2)
    state = json.loads((checkpoints / "state.json").read_text())
    assert state["inputs"]["images"] == 4 and len(state["inputs"]["fingerprint"]) == 16

    resume = config(steps=6, checkpoint_every=1, checkpoint_dir=str(checkpoints), resume=True)
    other = make_images(tmp_path / "other", 3)
    with pytest.raises(
        CheckpointError,
        match=r"other training images or captions \(4 images then, 3 now\).*"
        "without --resume",
    ):
        train_concept(tiny_pipe, other, resume)
    captioned = tmp_path / "captioned"
    captioned.mkdir()
    for path in sorted(images.iterdir()):
        (captioned / path.name).write_bytes(path.read_bytes())
    (captioned / "img0.txt").write_text("a {token} on a red background")
    with pytest.raises(CheckpointError, match="other training images or captions"):
        train_concept(tiny_pipe, captioned, resume)
    (checkpoints / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "inputs"}))
    with pytest.raises(CheckpointError, match="does not record its training images"):
        train_concept(tiny_pipe, images, resume)
    (checkpoints / "state.json").write_text(json.dumps(state))
    assert train_concept(tiny_pipe, images, resume).resumed_from == 2  # the same photos resume


def test_the_library_drops_a_checkpoint_on_success_and_on_delete(tiny_pipe, images, tmp_path):
    from spectral_diffusion.frontends.workflows import TrainRequest, train_into_library
    from spectral_diffusion.library.store import Library

    library, files = Library(tmp_path / "lib"), sorted(images.iterdir())
    adapters = SpectralAdapters.from_pipeline(tiny_pipe)
    facts = {"model": "builtin:tiny", "fingerprint": adapters.fingerprint, "capacity": adapters.capacity(4)}
    adapters.unpatch()
    request = TrainRequest("ring", images, rank=4, steps=4, resolution=32, checkpoint_every=1)
    saved = library.checkpoint_dir("ring")
    with pytest.raises(TrainingCancelled):
        train_into_library(library, tiny_pipe, request, files, should_stop=lambda: saved.is_dir(), **facts)
    assert (saved / "state.json").is_file() and not library.exists("ring")
    assert library.delete("ring") == ["checkpoint"] and not saved.exists()  # an unfinished training's

    record, _ = train_into_library(library, tiny_pipe, request, files, **facts)
    assert record.name == "ring" and not saved.exists()  # finished: no checkpoint left to resume
    saved.mkdir(parents=True)
    (saved / "state.json").write_text("{}")
    assert library.delete("ring") == ["concept", "checkpoint"] and not saved.exists()


def test_previews_draw_the_first_photos_own_caption(tmp_path):
    from spectral_diffusion.training.data import ConceptDataset
    from spectral_diffusion.training.trainer import preview_prompt
    from toy import scenes

    scenes.write_concept_images("heart", tmp_path / "heart")
    captioned = ConceptDataset(tmp_path / "heart", "<heart>", resolution=32)
    settings = TrainConfig(name="heart", class_word="shape")
    first = (tmp_path / "heart" / "heart-0.txt").read_text().strip().replace("{token}", "<heart>")
    assert preview_prompt(captioned, settings) == first  # e.g. "a blue <heart> on the left on a white background"
    for sidecar in (tmp_path / "heart").glob("*.txt"):
        sidecar.unlink()
    plain = ConceptDataset(tmp_path / "heart", "<heart>", resolution=32)
    assert preview_prompt(plain, settings) == "a photo of <heart> shape"
