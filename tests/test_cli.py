"""The CLI round trip on builtin:tiny, and one-line errors for user mistakes."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

from spectral_diffusion.frontends.cli import main, parse_concepts


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


def test_round_trip(tmp_path, capsys, models_home):
    lib = str(tmp_path / "lib")
    common = ["--library", lib, "--model", "builtin:tiny"]
    red, blue = _images(tmp_path / "red", (220, 30, 30)), _images(tmp_path / "blue", (30, 30, 220))

    code, out, err = _run(capsys, "train", "--images", str(red), "--name", "red-ball", "--class-word", "ball",
                          "--steps", "3", *common)
    assert code == 0, err
    assert "into slot 0" in out
    code, out, err = _run(capsys, "train", "--images", str(blue), "--name", "blue-ball", "--variant", "rotational",
                          "--steps", "3", *common)
    assert code == 0, err
    assert "into slot 1" in out

    code, out, _ = _run(capsys, "list", "--json", *common)
    listed = {c["name"]: c for c in json.loads(out)}
    assert set(listed) == {"red-ball", "blue-ball"}
    assert listed["blue-ball"]["variant"] == "rotational"
    code, out, _ = _run(capsys, "list", *common)
    assert "<red-ball>" in out and "SLOT" in out

    image_path = tmp_path / "out.png"
    code, out, err = _run(capsys, "generate", "--prompt", "<red-ball> next to <blue-ball>",
                          "--concepts", "red-ball,blue-ball:0.8", "--steps", "2", "--out", str(image_path), *common)
    assert code == 0, err
    assert Image.open(image_path).size == (64, 64)

    lora = tmp_path / "fused.safetensors"
    code, out, err = _run(capsys, "fuse", "--concepts", "red-ball,blue-ball", "--format", "lora",
                          "--out", str(lora), *common)
    assert code == 0, err
    assert lora.exists() and (tmp_path / "fused.red-ball.ti.safetensors").exists()

    exported = tmp_path / "red.safetensors"
    assert _run(capsys, "export", "red-ball", "--format", "spectral", "--out", str(exported), *common)[0] == 0
    code, out, err = _run(capsys, "delete", "blue-ball", *common)
    assert code == 0, err
    code, out, _ = _run(capsys, "list", "--json", *common)
    assert [c["name"] for c in json.loads(out)] == ["red-ball"]

    # importing a concept under a new name into its own (taken) slot is refused, in one line
    code, out, err = _run(capsys, "import", str(exported), "--name", "red-copy", *common)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


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
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr
