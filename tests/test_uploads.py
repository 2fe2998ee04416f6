"""Issue 8, item 2: uploaded training images.

The upload path is ``images.find_images`` + ``images.open_image``, which ``Service.start_training`` (the
app's Train tab) runs on every file before any model or library work. Every input below either works,
converted properly to 8-bit RGB, or is refused with an ``ImageDataError`` whose message says what to do;
a refused upload writes nothing to the library and starts no training.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bench.support import png16, png_bomb, sparse
from spectral_diffusion import images
from spectral_diffusion.frontends.service import Service
from spectral_diffusion.frontends.workflows import TrainRequest
from spectral_diffusion.images import (
    MAX_FILE_BYTES,
    MAX_IMAGES,
    MAX_TOTAL_BYTES,
    ImageDataError,
    find_images,
    open_image,
)
from spectral_diffusion.library.store import Library

from .reliability_helpers import make_adapter, record_stats, snapshot

REFUSAL_LIMIT_S = 5.0  # refusing must not decode a bomb or walk thousands of files slowly
FIGURES = {"refused": 0, "converted": 0, "failures": 0}


@pytest.fixture(scope="module", autouse=True)
def figures():
    yield
    record_stats(
        "uploads", refused_kinds=FIGURES["refused"], converted_kinds=FIGURES["converted"], failures=FIGURES["failures"]
    )


def picture(size=(64, 64), colour=(200, 30, 30)) -> Image.Image:
    image = Image.new("RGB", size, (240, 240, 240))
    ImageDraw.Draw(image).rectangle((0, 0, size[0] // 2 - 1, size[1] - 1), fill=colour)
    return image


# ----- refused inputs -----------------------------------------------------------------------------


def _refused_inputs(folder: Path) -> dict[str, tuple[list[Path] | Path, str]]:
    """name -> (what is uploaded: a list of files or a folder, the message expected)."""
    good = folder / "good.png"
    picture().save(good)
    cases: dict[str, tuple[list[Path] | Path, str]] = {}

    def single(name: str, content: bytes, message: str) -> None:
        path = folder / name
        path.write_bytes(content)
        cases[name] = ([good, path], message)

    single("notes.png", b"these are my notes, not a picture\n" * 10, "cannot read image notes.png: not an image")
    single("page.jpg", b"<!doctype html><html><body><script>alert(1)</script></body></html>", "not an image")
    single("empty.png", b"", "not an image")
    single("doc.png", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "not an image")
    single("script.gif", b"#!/bin/sh\nrm -rf /\n", "not an image")
    jpeg = io.BytesIO()
    picture((256, 256)).save(jpeg, format="JPEG")
    single("cut.jpg", jpeg.getvalue()[:400], "damaged")
    single("svg.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "not an image")

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("dog.png", good.read_bytes())
    single("photos.zip", archive.getvalue(), "upload images, not archives")
    single("renamed-zip.png", archive.getvalue(), "archive, not an image: upload images, not archives")
    tarred = io.BytesIO()
    with tarfile.open(fileobj=tarred, mode="w") as tar:
        tar.add(good, arcname="dog.png")
    single("photos.tar", tarred.getvalue(), "upload images, not archives")
    single("renamed-tar.jpg", tarred.getvalue(), "archive, not an image")
    single("renamed-gz.webp", gzip.compress(tarred.getvalue()), "archive, not an image")
    only_zip = folder / "only-zip"
    only_zip.mkdir()
    (only_zip / "photos.zip").write_bytes(archive.getvalue())
    cases["folder with only a zip"] = (only_zip, "only the archive photos.zip: upload images, not archives")

    outside = folder / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    picture().save(secret)
    link = folder / "link.png"
    link.symlink_to(secret)
    cases["symlink in an upload list"] = ([good, link], "link.png is a symbolic link")
    (folder / "passwd.png").symlink_to("/etc/passwd")
    cases["symlink to /etc/passwd"] = ([good, folder / "passwd.png"], "passwd.png is a symbolic link")
    linked = folder / "linked-folder"
    linked.mkdir()
    picture().save(linked / "a.png")
    (linked / "b.png").symlink_to(secret)
    cases["folder with a symlink leading out"] = (linked, "b.png is a symbolic link to a file outside the image folder")

    cases["header-only bomb 30000x30000"] = (
        [good, png_bomb(folder / "declared.png", 30000, 30000, rows=2)],
        "enormous size|megapixels",
    )
    cases["real bomb 10000x10000 (100 MP)"] = (
        [good, png_bomb(folder / "bomb.png", 10000, 10000)],
        "enormous size|megapixels",
    )
    cases["70 megapixels"] = (
        [good, png_bomb(folder / "huge.png", 10000, 7000, rows=2)],
        "is 10000x7000, more than 64 megapixels",
    )
    cases["one file over the size limit"] = (
        [good, sparse(folder / "big.png", MAX_FILE_BYTES + 2**20)],
        "big.png is 65 MB, more than the 64 MB one image may have",
    )
    many = [sparse(folder / f"part-{i}.png", 60 * 2**20) for i in range(MAX_TOTAL_BYTES // (60 * 2**20) + 1)]
    cases["total over the size limit"] = (many, "images in the given list add up to 540 MB, more than 512 MB")
    cases["missing file"] = ([good, folder / "missing.png"], "missing.png does not exist")
    return cases


@pytest.fixture(scope="module")
def refused_inputs(tmp_path_factory):
    return _refused_inputs(tmp_path_factory.mktemp("refused"))


@pytest.fixture
def service(tmp_path, models_home):
    return Service(model="builtin:tiny", library=tmp_path / "library", output_dir=tmp_path / "outputs")


def test_refused_uploads_say_why_and_write_nothing(refused_inputs, service, tmp_path):
    library_root = tmp_path / "library"
    Library(library_root).add(make_adapter("resident", 0))  # an existing concept that must stay untouched
    before = snapshot(library_root)
    for case, (upload, message) in refused_inputs.items():
        started = time.perf_counter()
        with pytest.raises(ImageDataError, match=message):
            service.start_training(TrainRequest(f"case-{len(case)}", upload))
        elapsed = time.perf_counter() - started
        assert elapsed < REFUSAL_LIMIT_S, f"{case}: {elapsed:.1f} s"
        assert not service.training, case
        assert snapshot(library_root) == before, case
        FIGURES["refused"] += 1
    assert service.status.state == "idle"  # no training was ever started


def test_thousands_of_files_are_refused_quickly(tmp_path, service):
    folder = tmp_path / "thousands"
    folder.mkdir()
    small = io.BytesIO()
    picture((8, 8)).save(small, format="PNG")
    for i in range(3000):
        (folder / f"img-{i:04d}.png").write_bytes(small.getvalue())
    started = time.perf_counter()
    with pytest.raises(ImageDataError, match=f"3000 images found in .*more than the {MAX_IMAGES}"):
        service.start_training(TrainRequest("many", folder))
    listed = sorted(folder.iterdir())
    with pytest.raises(ImageDataError, match=f"3000 images found in the given list, more than the {MAX_IMAGES}"):
        service.start_training(TrainRequest("many", listed))
    assert time.perf_counter() - started < 2 * REFUSAL_LIMIT_S
    assert not (tmp_path / "library").exists()
    assert [p.name for p in find_images(listed[:MAX_IMAGES])][-1] == f"img-{MAX_IMAGES - 1:04d}.png"
    FIGURES["refused"] += 2


def test_limits_are_documented_constants(monkeypatch, tmp_path):
    assert MAX_FILE_BYTES == 64 * 2**20 and MAX_TOTAL_BYTES == 512 * 2**20 and images.MAX_PIXELS == 64 * 2**20
    good = tmp_path / "good.png"
    picture().save(good)
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 100)
    with pytest.raises(ImageDataError, match="more than the 0 MB one image may have"):
        open_image(good)  # open_image checks the size too, for callers that skip find_images


# ----- inputs that work ---------------------------------------------------------------------------


def _converted_inputs(folder: Path) -> dict[str, tuple[Path, tuple[int, int], tuple[int, int, int], int]]:
    """name -> (file, probe pixel, expected RGB there, tolerance)."""
    cases = {}
    red, blue, green = (220, 20, 20), (20, 20, 220), (20, 200, 20)

    frames = [Image.new("RGB", (48, 48), c) for c in (red, blue, green)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    cases["animated GIF (first frame)"] = (folder / "animated.gif", (10, 10), red, 12)
    frames[0].save(folder / "animated.png", save_all=True, append_images=frames[1:], duration=100)
    cases["animated PNG (first frame)"] = (folder / "animated.png", (10, 10), red, 0)
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    cases["animated WebP (first frame)"] = (folder / "animated.webp", (10, 10), red, 4)

    Image.new("CMYK", (48, 48), (255, 0, 0, 0)).save(folder / "cmyk.jpg", quality=95)
    cases["CMYK JPEG"] = (folder / "cmyk.jpg", (10, 10), (0, 255, 255), 8)
    Image.new("CMYK", (48, 48), (0, 255, 255, 0)).save(folder / "cmyk.tif")
    cases["CMYK TIFF"] = (folder / "cmyk.tif", (10, 10), (255, 0, 0), 0)

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    cases["16-bit grey PNG"] = (png16(folder / "grey16.png", ramp), (32, 5), (130, 130, 130), 2)
    Image.fromarray(ramp).save(folder / "grey16.tif")
    cases["16-bit grey TIFF"] = (folder / "grey16.tif", (63, 5), (255, 255, 255), 0)
    rgb16 = np.zeros((32, 32, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 2] = 65535, 32768
    cases["16-bit RGB PNG"] = (png16(folder / "rgb16.png", rgb16), (5, 5), (255, 0, 128), 1)
    Image.fromarray((ramp / 65535).astype(np.float32)).save(folder / "float.tif")
    cases["32-bit float TIFF"] = (folder / "float.tif", (32, 5), (130, 130, 130), 2)

    palette = picture((48, 48), blue).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(folder / "palette.png")
    cases["palette PNG"] = (folder / "palette.png", (5, 5), blue, 0)
    transparent = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    ImageDraw.Draw(transparent).rectangle((0, 0, 23, 47), fill=(*green, 255))
    transparent.save(folder / "transparent.png")
    cases["transparent RGBA PNG (on white)"] = (folder / "transparent.png", (40, 5), (255, 255, 255), 0)
    cases["transparent RGBA PNG (opaque half)"] = (folder / "transparent.png", (5, 5), green, 0)
    indexed = transparent.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    clear = indexed.getpixel((40, 5))
    indexed.save(folder / "transparent-palette.png", transparency=clear)
    cases["palette PNG with transparency"] = (folder / "transparent-palette.png", (40, 5), (255, 255, 255), 0)
    transparent.convert("LA").save(folder / "grey-alpha.png")
    cases["grey + alpha PNG"] = (folder / "grey-alpha.png", (40, 5), (255, 255, 255), 0)
    transparent.save(folder / "transparent.webp", lossless=True)
    cases["transparent WebP"] = (folder / "transparent.webp", (40, 5), (255, 255, 255), 0)
    Image.new("1", (48, 48), 1).save(folder / "bilevel.png")
    cases["1-bit PNG"] = (folder / "bilevel.png", (5, 5), (255, 255, 255), 0)
    Image.new("L", (48, 48), 90).save(folder / "grey.jpg")
    cases["grey JPEG"] = (folder / "grey.jpg", (5, 5), (90, 90, 90), 2)
    picture((48, 48), red).save(folder / "plain.bmp")
    cases["BMP"] = (folder / "plain.bmp", (5, 5), red, 0)
    return cases


@pytest.fixture(scope="module")
def converted_inputs(tmp_path_factory):
    return _converted_inputs(tmp_path_factory.mktemp("converted"))


def test_unusual_images_are_converted_properly(converted_inputs):
    for case, (path, probe, expected, tolerance) in converted_inputs.items():
        found = find_images([path])
        image = open_image(found[0])
        assert image.mode == "RGB", case
        got = image.getpixel(probe)
        assert all(abs(a - b) <= tolerance for a, b in zip(got, expected, strict=True)), (case, got, expected)
        FIGURES["converted"] += 1


def test_the_library_stores_converted_copies(converted_inputs, tmp_path, models_home):
    """``Library.add`` re-encodes the training images as PNG: the stored copies are right too."""
    library = Library(tmp_path / "library")
    cases = list(converted_inputs.items())
    record = library.add(make_adapter("odd-formats", 1), images=[path for _, (path, *_rest) in cases])
    assert record.image_count == len(cases)
    for stored, (case, (_, probe, expected, tolerance)) in zip(record.images, cases, strict=True):
        with Image.open(stored) as image:
            assert image.format == "PNG", case
            got = image.convert("RGB").getpixel(probe) if image.mode not in ("RGBA", "LA", "PA") else None
        if got is not None and expected != (255, 255, 255):  # stored copies keep their alpha, not flattened
            assert all(abs(a - b) <= tolerance for a, b in zip(got, expected, strict=True)), (case, got, expected)


def test_symlinks_inside_the_image_folder_are_followed(tmp_path):
    folder = tmp_path / "photos"
    (folder / "originals").mkdir(parents=True)
    picture().save(folder / "originals" / "dog.png")
    (folder / "dog-link.png").symlink_to(folder / "originals" / "dog.png")
    assert [p.name for p in find_images(folder)] == ["dog-link.png"]
    assert open_image(find_images(folder)[0]).size == (64, 64)


def test_a_good_upload_passes_the_same_checks(service, tmp_path):
    """The checks refuse only what they should: three ordinary photos go through."""
    paths = []
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        picture(colour=colour).save(tmp_path / f"photo-{i}.jpg")
        paths.append(tmp_path / f"photo-{i}.jpg")
    assert find_images(paths) == paths
    assert all(open_image(p).mode == "RGB" for p in paths)
    assert os.path.getsize(paths[0]) < MAX_FILE_BYTES
