"""The CLI round trip on builtin:tiny, and one-line errors for user mistakes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from spectral_diffusion.frontends.cli import main, parse_concepts

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(folder, colour, count=4):
    folder.mkdir(parents=True)
    for i in range(count):
        image = Image.new("RGB", (64, 64), (240, 240, 240))
        ImageDraw.Draw(image).ellipse((8 + i * 4, 8, 40 + i * 4, 40), fill=colour)
        image.save(folder / f"{i}.png")
    return folder


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_concepts():
    assert parse_concepts("dog, cat:0.8") == {"dog": 1.0, "cat": 0.8}


def test_train_steps_zero_means_automatic():
    from spectral_diffusion.frontends.workflows import TrainRequest

    assert TrainRequest("x", ".", steps=0).steps is None
    assert TrainRequest("x", ".", steps=0).config("builtin:tiny", "lib").steps is None


def test_round_trip(tmp_path, capsys, models_home):
    lib = str(tmp_path / "lib")
    common = ["--library", lib, "--model", "builtin:tiny"]
    red, blue = _images(tmp_path / "red", (220, 30, 30)), _images(tmp_path / "blue", (30, 30, 220))

    code, out, err = _run(
        capsys, "train", "--images", str(red), "--name", "red-ball", "--class-word", "ball", "--steps", "3", *common
    )
    assert code == 0, err
    assert "into slot 0" in out
    code, out, err = _run(
        capsys,
        "train",
        "--images",
        str(blue),
        "--name",
        "blue-ball",
        "--variant",
        "rotational",
        "--steps",
        "3",
        *common,
    )
    assert code == 0, err
    assert "into slot 1" in out

    code, out, _ = _run(capsys, "list", "--json", *common)
    listed = {c["name"]: c for c in json.loads(out)}
    assert set(listed) == {"red-ball", "blue-ball"}
    assert listed["blue-ball"]["variant"] == "rotational"
    code, out, _ = _run(capsys, "list", *common)
    assert "<red-ball>" in out and "SLOT" in out

    image_path = tmp_path / "out.png"
    code, out, err = _run(
        capsys,
        "generate",
        "--prompt",
        "<red-ball> next to <blue-ball>",
        "--concepts",
        "red-ball,blue-ball:0.8",
        "--steps",
        "2",
        "--out",
        str(image_path),
        *common,
    )
    assert code == 0, err
    assert Image.open(image_path).size == (64, 64)

    lora = tmp_path / "fused.safetensors"
    code, out, err = _run(
        capsys, "fuse", "--concepts", "red-ball,blue-ball", "--format", "lora", "--out", str(lora), *common
    )
    assert code == 0, err
    assert lora.exists() and (tmp_path / "fused.red-ball.ti.safetensors").exists()

    # a fused bundle loads back: import adds each of its concepts (into another library here)
    bundle = tmp_path / "set.safetensors"
    assert _run(capsys, "fuse", "--concepts", "red-ball,blue-ball:0.5", "--out", str(bundle), *common)[0] == 0
    other = ["--library", str(tmp_path / "other"), "--model", "builtin:tiny"]
    code, out, err = _run(capsys, "import", str(bundle), *other)
    assert code == 0, err
    assert out.splitlines() == [
        "imported red-ball (slot 0, token <red-ball>)",
        "imported blue-ball (slot 1, token <blue-ball>)",
    ]
    code, out, err = _run(capsys, "import", str(bundle), "--name", "x", "--library", str(tmp_path / "third"))
    assert code == 2 and "keep their own names" in err

    exported = tmp_path / "red.safetensors"
    assert _run(capsys, "export", "red-ball", "--format", "spectral", "--out", str(exported), *common)[0] == 0
    code, out, err = _run(capsys, "delete", "blue-ball", *common)
    assert code == 0, err
    code, out, _ = _run(capsys, "list", "--json", *common)
    assert [c["name"] for c in json.loads(out)] == ["red-ball"]

    # importing a concept under a new name into its own (taken) slot is refused, in one line
    code, out, err = _run(capsys, "import", str(exported), "--name", "red-copy", *common)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    # under its own (taken) name the advice is not "pick another name": that would hit the slot next
    code, out, err = _run(capsys, "import", str(exported), *common)
    assert code == 2 and err.count("\n") == 1 and "another name would not help" in err
    assert "Delete 'red-ball' first" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["delete", "nobody"], "nobody"),
        (["generate", "--prompt", "x", "--concepts", "ghost", "--out", "x.png"], "ghost"),
        (["train", "--images", "/does/not/exist", "--name", "x"], "exist"),
        (["train", "--images", ".", "--name", "../evil"], "name"),
        (["import", "/does/not/exist.safetensors"], "exist"),
    ],
)
def test_user_mistakes_are_one_line(tmp_path, capsys, models_home, argv, message):
    code, out, err = _run(capsys, *argv, "--library", str(tmp_path / "lib"))
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_module_entry_point_exit_status(tmp_path, models_home):
    env = dict(os.environ, SPECTRAL_DIFFUSION_HOME=str(models_home))
    result = subprocess.run(
        [sys.executable, "-m", "spectral_diffusion", "delete", "nobody", "--library", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr


def _train(capsys, tmp_path, name, colour, common, *extra):
    folder = _images(tmp_path / name, colour)
    code, out, err = _run(capsys, "train", "--images", str(folder), "--name", name, "--steps", "2", *extra, *common)
    assert code == 0, err
    return out


def test_regional_generation_from_the_cli(tmp_path, capsys, models_home):
    lib = str(tmp_path / "lib")
    common = ["--library", lib, "--model", "builtin:tiny"]
    _train(capsys, tmp_path, "red", (220, 30, 30), common)
    _train(capsys, tmp_path, "blue", (30, 30, 220), common)
    prompt = "<red> on the left and <blue> on the right"
    base = ["generate", "--prompt", prompt, "--steps", "2", "--seed", "5", *common]
    outs = {}
    for label, flags in {
        # the presets give each region its clause of the prompt
        "regions": ["--region", "red:0,0,0.5,1:<red> on the left", "--region", "blue:0.5,0,1,1:<blue> on the right"],
        "preset": ["--layout", "left-right"],
        "auto": ["--layout", "auto"],
        "routed": ["--layout", "left-right", "--regional-mode", "routed"],
    }.items():
        outs[label] = tmp_path / f"{label}.png"
        code, out, err = _run(capsys, *base, *flags, "--out", str(outs[label]))
        assert code == 0, err
    pixels = {label: np.asarray(Image.open(path)) for label, path in outs.items()}
    np.testing.assert_array_equal(pixels["regions"], pixels["preset"])  # the same boxes, three ways
    np.testing.assert_array_equal(pixels["regions"], pixels["auto"])
    assert np.abs(pixels["routed"].astype(int) - pixels["preset"]).max() > 0  # one routed pass draws otherwise
    layout = tmp_path / "layout.json"
    layout.write_text(
        json.dumps(
            {
                "prompt": prompt,
                "regions": [
                    {"concept": "red", "box": [0, 0, 0.5, 1], "prompt": "<red> on the left"},
                    {"concept": "blue", "box": [0.5, 0, 1, 1], "prompt": "<blue> on the right"},
                ],
            }
        )
    )
    code, _, err = _run(
        capsys,
        "generate",
        "--layout",
        str(layout),
        "--steps",
        "2",
        "--seed",
        "5",
        "--out",
        str(tmp_path / "file.png"),
        *common,
    )
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "file.png")), pixels["regions"])
    # the PNG carries its settings: --from-png makes the same picture again
    code, _, err = _run(
        capsys, "generate", "--from-png", str(outs["regions"]), "--out", str(tmp_path / "again.png"), *common
    )
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again.png")), pixels["regions"])
    code, _, err = _run(
        capsys, "generate", "--from-png", str(outs["routed"]), "--out", str(tmp_path / "r.png"), *common
    )
    assert code == 0, err  # the regional mode comes back with the rest of the settings
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "r.png")), pixels["routed"])
    with Image.open(outs["regions"]) as image:
        assert image.text["parameters"].startswith(prompt) and "Seed: 5" in image.text["parameters"]


def test_random_seed_is_printed_and_list_filters_by_model(tmp_path, capsys, models_home):
    lib = str(tmp_path / "lib")
    common = ["--library", lib, "--model", "builtin:tiny"]
    _train(capsys, tmp_path, "red", (220, 30, 30), common)
    code, out, err = _run(
        capsys,
        "generate",
        "--prompt",
        "<red>",
        "--concepts",
        "red",
        "--steps",
        "2",
        "--seed",
        "-1",
        "--out",
        str(tmp_path / "r.png"),
        *common,
    )
    assert code == 0, err
    seed = int(err.strip().split()[-1])
    from spectral_diffusion.generation.pnginfo import read_settings

    assert read_settings(tmp_path / "r.png")["seed"] == seed
    assert "red" in _run(capsys, "list", "--library", lib, "--model", "builtin:tiny")[1]
    assert "no concepts of builtin:toy" in _run(capsys, "list", "--library", lib, "--model", "builtin:toy")[1]
    assert "red" in _run(capsys, "list", "--library", lib)[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", "<a>", "--region", "a:0,0,2,1", "--out", "x.png"], "leaves the image"),
        (["generate", "--prompt", "x", "--layout", "nowhere.json", "--out", "x.png"], "neither a file"),
        (["generate", "--prompt", "x", "--region", "a:0,0,1,1", "--baked", "--out", "x.png"], "live slots"),
        (["generate", "--out", "x.png"], "needs --prompt"),
        (["generate", "--prompt", "x", "--steps", "0", "--out", "x.png"], "steps"),
        (["train", "--images", ".", "--name", "x", "--rank", "0"], "rank"),
        (["train", "--images", ".", "--name", "x", "--steps", "100000000"], "steps must be at most 20000"),
        (
            ["generate", "--prompt", "x", "--steps", "100000", "--out", "x.png"],
            "steps must be a whole number from 1 to",
        ),
        (
            ["generate", "--prompt", "x", "--out", "m.jpg"],
            "writes PNG files (they store the settings --from-png reads), not a .jpg file; use --out m.png",
        ),
        (["generate", "--prompt", "x", "--out", "m"], "not a file without an extension; use --out m.png"),
        (["generate", "--prompt", "", "--out", "x.png"], "the prompt is empty"),
        (["generate", "--prompt", "  ", "--out", "x.png"], "the prompt is empty"),
    ],
)
def test_bad_generate_and_train_arguments_fail_before_any_model_loads(tmp_path, capsys, argv, message, monkeypatch):
    from spectral_diffusion.models import registry

    monkeypatch.setattr(registry, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    code, out, err = _run(capsys, *argv, "--library", str(tmp_path / "lib"))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_one_unusable_image_gives_one_line_and_no_warning(tmp_path, models_home):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "x.png").write_text("not an image")
    env = dict(os.environ, SPECTRAL_DIFFUSION_HOME=str(models_home))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spectral_diffusion",
            "train",
            "--images",
            str(folder),
            "--name",
            "x",
            "--library",
            str(tmp_path / "lib"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "x.png" in result.stderr


def test_a_region_for_a_concept_not_in_concepts_is_refused_by_every_frontend(tmp_path, capsys, monkeypatch):
    """Issue 24 item 3: --region, --layout FILE and the service's layout refuse an unchosen concept."""
    from spectral_diffusion.errors import RequestError
    from spectral_diffusion.frontends.service import Service
    from spectral_diffusion.models import registry

    monkeypatch.setattr(registry, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    common = ["--library", str(tmp_path / "lib"), "--out", str(tmp_path / "x.png")]
    code, _, err = _run(
        capsys,
        "generate",
        "--prompt",
        "<a> and <b>",
        "--concepts",
        "a",
        "--region",
        "a:0,0,0.5,1",
        "--region",
        "b:0.5,0,1,1",
        *common,
    )
    assert code == 2 and err.count("\n") == 1
    assert "places concept 'b'" in err and "--concepts a,b" in err
    layout = {
        "prompt": "<a> and <b>",
        "regions": [{"concept": "a", "box": [0, 0, 0.5, 1]}, {"concept": "b", "box": [0.5, 0, 1, 1]}],
    }
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    code, _, err = _run(capsys, "generate", "--layout", str(tmp_path / "layout.json"), "--concepts", "b", *common)
    assert code == 2 and "places concept 'a'" in err
    service = Service(model="builtin:tiny", library=tmp_path / "lib", output_dir=tmp_path / "out")
    with pytest.raises(RequestError, match="places concept 'b'"):
        service.generate("<a> and <b>", {"a": 1.0}, layout=json.dumps(layout))


def test_each_image_of_a_batch_carries_its_own_seed_and_from_png_reproduces_it(tmp_path, capsys, models_home):
    """Issue 24 item 4: image k of --num-images N --seed S is drawn from S + k and says so in its PNG."""
    from spectral_diffusion.generation.pnginfo import read_settings

    common = ["--library", str(tmp_path / "lib"), "--model", "builtin:tiny", "--steps", "2"]
    code, out, err = _run(
        capsys,
        "generate",
        "--prompt",
        "a red ball",
        "--num-images",
        "4",
        "--seed",
        "1",
        "--out",
        str(tmp_path / "batch.png"),
        *common,
    )
    assert code == 0, err
    paths = [tmp_path / f"batch-{k}.png" for k in range(4)]
    assert out.split() == [str(p) for p in paths]
    assert [read_settings(p)["seed"] for p in paths] == [1, 2, 3, 4]
    with Image.open(paths[3]) as image:
        assert "Seed: 4," in image.text["parameters"]
    pixels = [np.asarray(Image.open(p), dtype=np.int16) for p in paths]
    code, _, err = _run(
        capsys,
        "generate",
        "--from-png",
        str(paths[3]),
        "--out",
        str(tmp_path / "again.png"),
        "--library",
        str(tmp_path / "lib"),
        "--model",
        "builtin:tiny",
    )
    assert code == 0, err
    again = np.asarray(Image.open(tmp_path / "again.png"), dtype=np.int16)
    # the same picture: batched arithmetic rounds a few pixels one level apart from a single image's
    assert np.abs(again - pixels[3]).max() <= 1 and np.abs(again - pixels[3]).mean() < 0.05
    assert np.abs(again - pixels[0]).mean() > 5  # and not image 0's
    # the seed alone gives image k again as well
    code, _, err = _run(
        capsys, "generate", "--prompt", "a red ball", "--seed", "3", "--out", str(tmp_path / "k.png"), *common
    )
    assert code == 0, err
    assert np.abs(np.asarray(Image.open(tmp_path / "k.png"), dtype=np.int16) - pixels[2]).max() <= 1


def test_the_last_seed_of_a_batch_must_exist():
    from spectral_diffusion.errors import RequestError
    from spectral_diffusion.generation.request import MAX_SEED, GenerationRequest

    assert GenerationRequest(prompt="x", seed=MAX_SEED - 3, num_images=4).seed == MAX_SEED - 3
    with pytest.raises(RequestError, match="image k is drawn from seed \\+ k"):
        GenerationRequest(prompt="x", seed=MAX_SEED - 2, num_images=4)


def test_every_frontend_has_the_same_generation_defaults():
    """Issue 24 item 6: one set of generation defaults (steps, guidance, seed, ...) for every frontend."""
    import dataclasses
    import inspect

    from spectral_diffusion.frontends.cli import build_parser
    from spectral_diffusion.frontends.service import Service
    from spectral_diffusion.generation.request import DEFAULTS, GenerationRequest

    request = GenerationRequest(prompt="x")
    flags = build_parser().parse_args(["generate", "--out", "x.png"])
    service = inspect.signature(Service.generate).parameters
    for key, value in dataclasses.asdict(DEFAULTS).items():
        assert getattr(request, key) == value, key
        assert service[key].default == value, key
        assert getattr(flags, {"negative_prompt": "negative"}.get(key, key)) == value, key
    assert (DEFAULTS.steps, DEFAULTS.seed) == (25, 0)


def test_the_last_slot_of_builtin_toy_trains_generates_and_exports(tmp_path, capsys, models_home):
    """Issue 24: `train --slot 7` on builtin:toy reported success, then generate and export failed with
    "trained on another base model ... relative error inf" (the SVD had lost the slot's last singular
    value). The last slot now round-trips; a slot beyond the model's capacity is refused up front."""
    lib = str(tmp_path / "lib")
    common = ["--library", lib, "--model", "builtin:toy"]
    shapes = _images(tmp_path / "shapes", (220, 30, 30))
    code, out, err = _run(
        capsys, "train", "--images", str(shapes), "--name", "last", "--slot", "7", "--steps", "2", *common
    )
    assert code == 0, err
    assert "into slot 7" in out
    code, out, err = _run(
        capsys,
        "generate",
        "--prompt",
        "<last>",
        "--concepts",
        "last",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "out.png"),
        *common,
    )
    assert code == 0, err
    code, out, err = _run(
        capsys, "export", "last", "--format", "lora", "--out", str(tmp_path / "last.safetensors"), *common
    )
    assert code == 0, err
    code, out, err = _run(
        capsys, "train", "--images", str(shapes), "--name", "beyond", "--slot", "8", "--steps", "2", *common
    )
    assert code == 2 and "slot 8 does not exist at rank 8" in err and "8 slots (0-7)" in err


def test_sizes_far_beyond_the_models_native_size_are_refused(tmp_path, capsys, models_home):
    """Issue 24 item 9: --width 4096 on a small model ran for minutes; now one line names the native size."""
    import time

    common = ["--library", str(tmp_path / "lib"), "--model", "builtin:tiny"]  # native 64 x 64 px
    started = time.perf_counter()
    code, _, err = _run(
        capsys, "generate", "--prompt", "x", "--width", "4096", "--out", str(tmp_path / "x.png"), *common
    )
    # one error line (a third-party loading bar may precede it when other tests enabled those bars)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: width 4096 is more than 4x")
    assert "width 4096 is more than 4x this model's native size of 64x64 px; ask for at most 256" in err
    assert time.perf_counter() - started < 60 and not (tmp_path / "x.png").exists()
    code, _, err = _run(
        capsys,
        "generate",
        "--prompt",
        "x",
        "--height",
        "264",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "x.png"),
        *common,
    )
    assert code == 2 and "ask for at most 256" in err
    code, _, err = _run(
        capsys,
        "generate",
        "--prompt",
        "x",
        "--width",
        "256",
        "--height",
        "128",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "ok.png"),
        *common,
    )
    assert code == 0, err
    assert Image.open(tmp_path / "ok.png").size == (256, 128)
    # training: a resolution past 4x the native one is refused before the first step, nothing is added
    photos = _images(tmp_path / "photos", (200, 40, 40), count=3)
    code, _, err = _run(
        capsys, "train", "--images", str(photos), "--name", "big", "--resolution", "512", "--steps", "1", *common
    )
    assert code == 2 and "resolution 512 is more than 4x this model's native 64 px; train at 256 px or less" in err
    assert "big" not in _run(capsys, "list", *common)[1]


def test_a_concept_named_twice_is_refused(capsys):
    """Issue 24 item 10: --concepts heart,heart used to collapse silently into one heart."""
    from spectral_diffusion.core.strengths import parse_concepts as parse
    from spectral_diffusion.errors import RequestError

    for spec in ("heart,heart", "heart, moon:0.5, heart:2", '{"heart": 1, "heart": 0.5}', '["heart", "heart"]'):
        with pytest.raises(RequestError, match="concept 'heart' is named more than once"):
            parse(spec)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--prompt", "<heart>", "--concepts", "heart,heart", "--out", "x.png"])
    assert exit_.value.code == 2 and "concept 'heart' is named more than once" in capsys.readouterr().err
    assert parse("heart,moon:0.5") == {"heart": 1.0, "moon": 0.5}


def test_fewer_photos_than_the_minimum_are_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """Issue 24 item 10: one photo trained with only a warning; now CLI and app refuse below 3."""
    from spectral_diffusion.errors import ImageDataError
    from spectral_diffusion.frontends.service import Service
    from spectral_diffusion.frontends.workflows import TrainRequest
    from spectral_diffusion.images import MIN_IMAGES
    from spectral_diffusion.models import registry

    monkeypatch.setattr(registry, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    assert MIN_IMAGES == 3
    for count in (1, 2):
        photos = _images(tmp_path / f"photos-{count}", (200, 40, 40), count=count)
        code, _, err = _run(capsys, "train", "--images", str(photos), "--name", "x", "--library", str(tmp_path / "lib"))
        assert code == 2 and err.count("\n") == 1
        assert f"only {count} image(s) of the concept; training needs at least 3 (3-20 work best)" in err
    service = Service(model="builtin:tiny", library=tmp_path / "lib", output_dir=tmp_path / "out")
    with pytest.raises(ImageDataError, match="training needs at least 3"):
        service.start_training(TrainRequest("x", sorted((tmp_path / "photos-2").iterdir())))
    assert not service.training and not (tmp_path / "lib").exists()


def test_the_default_library_is_the_same_from_any_folder(tmp_path, capsys, caplog, monkeypatch, models_home):
    """Issue 24 item 11: the default library was ./concepts, so each folder had its own."""
    from spectral_diffusion.core.model import SpectralAdapters
    from spectral_diffusion.formats.adapter_file import save_adapter
    from spectral_diffusion.library.store import LIBRARY_ENV, Library, default_library
    from spectral_diffusion.models.registry import load_pipeline

    from .conftest import trained_looking_adapter

    monkeypatch.delenv(LIBRARY_ENV, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    monkeypatch.chdir(first)
    assert default_library() == tmp_path / "data" / "spectral_diffusion" / "concepts" == Library().root
    adapters = SpectralAdapters.from_pipeline(load_pipeline("builtin:tiny"))
    path = save_adapter(trained_looking_adapter(adapters, "dog", 0, 4), tmp_path / "dog.safetensors")
    code, out, err = _run(capsys, "import", str(path), "--model", "builtin:tiny")
    assert code == 0, err
    monkeypatch.chdir(second)
    assert "dog" in _run(capsys, "list")[1]  # imported in one folder, listed from another
    monkeypatch.setenv(LIBRARY_ENV, str(tmp_path / "mine"))  # the environment names another library
    assert default_library() == tmp_path / "mine"
    assert "no concepts in" in _run(capsys, "list")[1]
    # concepts left in ./concepts (the old default) are pointed out, not silently out of view
    (second / "concepts" / "cat").mkdir(parents=True)
    (second / "concepts" / "cat" / "concept.json").write_text("{}")
    with caplog.at_level("WARNING", logger="spectral_diffusion"):
        assert _run(capsys, "list")[0] == 0
    assert f"{second / 'concepts'} holds 1 concept(s), but the library in use is {tmp_path / 'mine'}" in caplog.text
    assert f"pass --library {second / 'concepts'}" in caplog.text


def test_ctrl_c_during_training_keeps_a_checkpoint_and_resume_says_where_it_starts(
    tmp_path, capsys, caplog, models_home, monkeypatch
):
    """Issue 24: Ctrl-C said "nothing was written" while a checkpoint existed; a resume printed no
    "resumed from step N" and its bar counted the checkpoint's steps as done in no time (1.4M step/s)."""
    from spectral_diffusion.training import trainer

    lib = tmp_path / "lib"
    common = ["--library", str(lib), "--model", "builtin:tiny"]
    photos = _images(tmp_path / "photos", (30, 160, 30))
    train = ["train", "--images", str(photos), "--name", "dot", "--steps", "4", "--checkpoint-every", "1", *common]
    real_step = trainer._Trainer.train_step

    def interrupted_at_step_3(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(trainer._Trainer, "train_step", interrupted_at_step_3)
    code, out, err = _run(capsys, *train)
    assert code == 130
    message = err.strip().splitlines()[-1]
    assert "nothing was written" not in message
    assert f"checkpoint at step 2 of 4 is kept in {lib / '.checkpoints' / 'dot'}" in message
    assert "same command with --resume" in message

    monkeypatch.setattr(trainer._Trainer, "train_step", real_step)
    code, out, err = _run(capsys, *train, "--resume")
    assert code == 0, err
    assert "training dot: resumed from step 2 of 4" in err and "(resumed from step 2)" in out
    assert not (lib / ".checkpoints" / "dot").exists()  # finished: the checkpoint is gone

    monkeypatch.setattr(trainer._Trainer, "train_step", interrupted_at_step_3)
    code, out, err = _run(capsys, "train", "--images", str(photos), "--name", "other", "--steps", "4", *common)
    assert code == 130 and "no checkpoint was written (train with --checkpoint-every N" in err
    code, out, err = _run(
        capsys, "train", "--images", str(photos), "--name", "other", "--steps", "2", "--resume", *common
    )
    assert code == 0, err  # --resume without a checkpoint warns and starts afresh
    assert "resume: no checkpoint in" in caplog.text and "training other from step 0" in caplog.text


def test_a_resumed_progress_bar_starts_at_the_checkpoint(capsys):
    from spectral_diffusion.frontends.cli_commands import _tqdm_progress
    from spectral_diffusion.training.config import TrainProgress

    progress = _tqdm_progress("training dot")
    for step in (9, 10):
        progress(TrainProgress(step, 20, 0.5, 1.0, first_step=8))
    assert progress.bar.format_dict["initial"] == 9 and progress.bar.n == 10  # the rate counts 1 step, not 10
    progress.close()
    assert "training dot: resumed from step 8 of 20" in capsys.readouterr().err
