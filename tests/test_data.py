"""Training images: safe opening, refusal messages, captions and augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from spectral_diffusion import images
from spectral_diffusion.errors import ImageDataError, SpectralDiffusionError
from spectral_diffusion.images import find_images, open_image
from spectral_diffusion.training.data import ConceptDataset, caption_templates, collate, mix_seed, read_caption


def _picture(width=80, height=64, seed=0) -> Image.Image:
    image = Image.new("RGB", (width, height), (30 * seed % 255, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width // 4, height - 1), fill=(250, 0, 0))  # a left-side marker, to see flips
    draw.ellipse((width // 3, 8, width // 3 + 24, 32), fill=(255, 220, 0))
    return image


@pytest.fixture
def folder(tmp_path):
    for i in range(3):
        _picture(seed=i).save(tmp_path / f"img{i}.png")
    return tmp_path


def test_find_images_lists_image_files_only(folder):
    (folder / "img0.txt").write_text("a caption")
    (folder / ".hidden.png").write_bytes(b"")
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.png").write_bytes(b"")
    assert [p.name for p in find_images(folder)] == ["img0.png", "img1.png", "img2.png"]
    assert find_images([folder / "img1.png"]) == [folder / "img1.png"]
    assert find_images(str(folder / "img2.png")) == [folder / "img2.png"]


def test_find_images_refusals_say_what_is_wrong(tmp_path, folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageDataError, match="no images found in .*empty"):
        find_images(empty)
    with pytest.raises(ImageDataError, match="does not exist"):
        find_images(tmp_path / "missing")
    with pytest.raises(ImageDataError, match="nope.png does not exist"):
        find_images([tmp_path / "nope.png"])
    with pytest.raises(ImageDataError, match="3 images found .* more than the 2"):
        find_images(folder, max_images=2)
    with pytest.raises(ImageDataError, match="no images found in the given list"):
        find_images([])
    assert issubclass(ImageDataError, SpectralDiffusionError) and issubclass(ImageDataError, ValueError)


def test_open_image_applies_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    _picture(80, 40).save(path, exif=exif)
    image = open_image(path, min_size=16)
    assert image.size == (40, 80) and image.mode == "RGB"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_open_image_flattens_alpha_on_white(tmp_path, mode):
    path = tmp_path / f"alpha-{mode}.png"
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle((0, 0, 19, 39), fill=(0, 0, 0, 255))
    if mode == "P":
        image = rgba.convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = image.getpixel((30, 10))
        image.save(path, transparency=image.getpixel((30, 10)))
    else:
        rgba.convert(mode).save(path)
    out = open_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((30, 10)) == (255, 255, 255)  # transparent -> white, not black
    assert out.getpixel((5, 10)) == (0, 0, 0)


def test_open_image_converts_grayscale(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (32, 32), 77).save(path)
    assert open_image(path).getpixel((1, 1)) == (77, 77, 77)


def test_open_image_refuses_unreadable_and_truncated_files(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImageDataError, match="cannot read image notes.png"):
        open_image(bad)
    whole = tmp_path / "whole.png"
    Image.effect_noise((64, 64), 50).save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[:300])
    with pytest.raises(ImageDataError, match="cannot read image cut.png"):
        open_image(cut)


def test_open_image_refuses_small_images(tmp_path):
    path = tmp_path / "small.png"
    _picture(30, 20).save(path)
    with pytest.raises(ImageDataError, match=r"small.png is too small \(30x20\).*at least 32 pixels"):
        open_image(path, min_size=32)


def test_open_image_refuses_huge_pixel_counts(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    _picture(40, 40).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(ImageDataError, match="big.png is 40x40, more than"):
        open_image(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own bomb guard fires first
    with pytest.raises(ImageDataError, match="decompression bomb"):
        open_image(path)


def test_caption_templates_put_the_token_before_the_class_word():
    captions = caption_templates("<my-dog>", "dog")
    assert "a photo of <my-dog> dog" in captions
    assert all("<my-dog> dog" in c for c in captions)
    assert "a photo of <my-dog>" in caption_templates("<my-dog>", "")
    assert all("  " not in c for c in caption_templates("<my-dog>", ""))


def test_sidecar_captions(tmp_path):
    image = tmp_path / "a.png"
    _picture().save(image)
    assert read_caption(image, "<tok>", "dog") is None
    (tmp_path / "a.txt").write_text("{token} on a  beach\n")
    assert read_caption(image, "<tok>", "dog") == "<tok> on a beach"
    (tmp_path / "a.txt").write_text("my <tok> sleeping")
    assert read_caption(image, "<tok>", "dog") == "my <tok> sleeping"
    (tmp_path / "a.txt").write_text("sleeping on a sofa")
    assert read_caption(image, "<tok>", "dog") == "<tok> dog, sleeping on a sofa"
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ImageDataError, match="cannot read caption file a.txt"):
        read_caption(image, "<tok>", "dog")


def test_dataset_examples(folder):
    (folder / "img1.txt").write_text("{token} in the snow")
    dataset = ConceptDataset(folder, "<tok>", "dog", resolution=32, seed=1)
    assert len(dataset) == 3
    item = dataset[4]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert float(item["pixel_values"].min()) >= -1.0 and float(item["pixel_values"].max()) <= 1.0
    assert item["caption"] == "<tok> in the snow"  # index 4 is image 1, which has a sidecar
    assert item["original_size"] == (64, 80)  # (height, width) as opened
    assert dataset[0]["caption"] in caption_templates("<tok>", "dog")
    torch.testing.assert_close(dataset[5]["pixel_values"], dataset[5]["pixel_values"])  # deterministic
    center = dataset.example(0)
    assert center["crop_top_left"] == (0, 4)  # 80x64 -> 40x32, centre crop of the width
    assert center["caption"] == "a photo of <tok> dog"


def test_flip_mirrors_the_same_crop(folder):
    kwargs = {"resolution": 32, "seed": 0}
    plain = ConceptDataset(folder, "<tok>", "dog", flip_p=0.0, **kwargs)
    flipped = ConceptDataset(folder, "<tok>", "dog", flip_p=1.0, **kwargs)
    a = plain.example(0, torch.Generator().manual_seed(5))
    b = flipped.example(0, torch.Generator().manual_seed(5))
    torch.testing.assert_close(b["pixel_values"], a["pixel_values"].flip(-1))
    assert a["caption"] == b["caption"]
    top, left = a["crop_top_left"]
    assert b["crop_top_left"] == (top, 40 - 32 - left)


def test_dataset_refuses_small_images_and_accepts_pil_images(folder):
    _picture(20, 20).save(folder / "tiny.png")
    with pytest.raises(ImageDataError, match="tiny.png is too small"):
        ConceptDataset(folder, "<tok>", resolution=64)  # minimum: half the resolution
    dataset = ConceptDataset(
        [_picture(), _picture(64, 64).convert("RGBA")], "", "dog", resolution=32, templates=["a photo of dog"]
    )
    assert dataset[1]["caption"] == "a photo of dog"
    assert dataset[1]["pixel_values"].shape == (3, 32, 32)


def test_dataset_works_with_a_dataloader(folder):
    dataset = ConceptDataset(folder, "<tok>", "dog", resolution=32)
    batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate)))
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and len(batch["caption"]) == 2


def test_mix_seed_separates_its_inputs():
    seeds = {mix_seed(s, step, rank) for s in range(3) for step in range(50) for rank in range(2)}
    assert len(seeds) == 300
    assert mix_seed(1, 2) == mix_seed(1, 2) and 0 <= mix_seed(1, 2) < 2**63


# ----- foreground masks and the zoom-out / shift augmentation ------------------------------------------


def _scene_folder(tmp_path, shape="heart"):
    from toy import scenes

    photos, masks = tmp_path / "photos", tmp_path / "masks"
    scenes.write_concept_images(shape, photos, count=3, mask_folder=masks)
    return photos, masks


def test_masks_load_by_file_name_and_follow_crops_and_flips(tmp_path, folder):
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(3):
        mask = Image.new("L", (80, 64), 0)
        ImageDraw.Draw(mask).rectangle((0, 0, 19, 63), fill=255)  # the red left-side marker
        mask.save(masks / f"img{i}.png")
    data = ConceptDataset(folder, "<tok>", resolution=32, mask_dir=masks, flip_p=1.0)
    example = data.example(0, torch.Generator().manual_seed(0))
    mask, pixels = example["mask"], example["pixel_values"]
    assert mask.shape == (1, 32, 32) and float(mask.min()) == 0.0 and float(mask.max()) == 1.0
    red = (pixels[0] > 0.9) & (pixels[1] < -0.9)  # the marker's pixels, wherever crop and flip put them
    assert bool((mask[0][red] > 0.5).all()) and bool((mask[0][~red] < 0.5).all())
    assert collate([example, data.example(1)])["mask"].shape == (2, 1, 32, 32)


def test_a_missing_mask_is_a_clear_error_and_a_wrong_size_is_resized(tmp_path, folder):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (40, 32), 255).save(masks / "img0.png")  # half the image's size: resized
    Image.new("L", (80, 64), 255).save(masks / "img1.jpg")  # another suffix: found by its stem
    with pytest.raises(ImageDataError, match="no mask for image img2.png"):
        ConceptDataset(folder, "<tok>", resolution=32, mask_dir=masks)
    Image.new("RGBA", (80, 64), (255, 255, 255, 0)).save(masks / "img2.png")  # transparent = background
    data = ConceptDataset(folder, "<tok>", resolution=32, mask_dir=masks)
    assert float(data.example(0)["mask"].min()) == 1.0 and float(data.example(2)["mask"].max()) == 0.0
    with pytest.raises(ImageDataError, match="does not exist"):
        ConceptDataset(folder, "<tok>", resolution=32, mask_dir=tmp_path / "nowhere")


def test_zoom_out_pastes_the_concept_on_its_background_and_captions_follow(tmp_path):
    from toy import scenes

    photos, masks = _scene_folder(tmp_path)
    data = ConceptDataset(
        photos,
        "<heart>",
        resolution=32,
        mask_dir=masks,
        flip_p=0.0,
        augment_p=1.0,
        augment_scale=(0.5, 0.6),
        captions=scenes.GRAMMAR,
    )
    plain = ConceptDataset(photos, "<heart>", resolution=32, mask_dir=masks, flip_p=0.0)
    scene = scenes.concept_scenes("heart", 3)[0]
    background = torch.tensor(scenes.BACKGROUNDS[scene.background]) / 127.5 - 1.0
    for seed in range(6):
        example = data.example(0, torch.Generator().manual_seed(seed))
        mask, pixels = example["mask"][0], example["pixel_values"]
        assert 0 < float(mask.mean()) < 0.5 * float(plain.example(0)["mask"].mean())  # shrunk, still there
        outside = pixels[:, mask == 0]
        assert torch.allclose(outside, background[:, None].expand_as(outside), atol=0.02)
        words = example["caption"].split()
        assert words[:2] == ["a", "small"] and "<heart>" in words
        ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
        centre = ((xs.float().mean() + 0.5) / 32, (ys.float().mean() + 0.5) / 32)
        nearest = min(
            scenes.POSITIONS,
            key=lambda p: (scenes.POSITIONS[p][0] - centre[0]) ** 2 + (scenes.POSITIONS[p][1] - centre[1]) ** 2,
        )
        assert scenes.POSITION_PHRASES[nearest] in example["caption"]
    assert data.example(0)["caption"] == plain.example(0)["caption"]  # the evaluation view is never zoomed
    # a model with no caption grammar: the concept still moves (anywhere), the captions stay as written
    free = ConceptDataset(
        photos, "<heart>", resolution=32, mask_dir=masks, flip_p=0.0, augment_p=1.0, augment_scale=(0.5, 0.6)
    )
    kept = free.example(0, torch.Generator().manual_seed(1))
    assert 0 < float(kept["mask"].mean()) < 0.5 * float(plain.example(0)["mask"].mean())
    assert kept["caption"] == plain.example(0)["caption"]


def test_zoom_out_without_masks_uses_the_border_colour_and_is_off_by_default(folder):
    from spectral_diffusion.training.augment import zoom

    image = _picture()
    zoomed, mask = zoom(image.crop((0, 0, 64, 64)), None, 0.5, (1.0, 1.0))
    assert mask is None and zoomed.size == (64, 64)
    assert zoomed.getpixel((2, 2)) == image.getpixel((40, 63))  # the border's colour fills the free room
    off = ConceptDataset(folder, "<tok>", resolution=32)
    again = ConceptDataset(folder, "<tok>", resolution=32, augment_p=0.0)
    one, two = off.example(1, torch.Generator().manual_seed(4)), again.example(1, torch.Generator().manual_seed(4))
    assert torch.equal(one["pixel_values"], two["pixel_values"]) and "mask" not in one


def test_on_a_plain_background_the_concept_itself_moves_to_the_asked_position():
    from spectral_diffusion.training.augment import plain_background, zoom

    photo = Image.new("RGB", (32, 32), (245, 245, 245))
    ImageDraw.Draw(photo).ellipse((8, 8, 23, 23), fill=(215, 40, 40))  # a 16 px disc in the middle
    assert plain_background(photo) and not plain_background(_picture())
    moved, mask = zoom(photo, None, 0.5, (0.0, 0.0), centre=(0.8, 0.5))
    assert mask is None
    red = np.asarray(moved)[..., 0].astype(int) - np.asarray(moved)[..., 1] > 100
    ys, xs = np.nonzero(red)
    assert abs((xs.mean() + 0.5) / 32 - 0.8) < 0.05 and abs((ys.mean() + 0.5) / 32 - 0.5) < 0.05
    assert 0.4 * 16 <= xs.max() - xs.min() + 1 <= 0.6 * 16  # the disc, half its size: not the whole photo shrunk
    assert moved.getpixel((2, 2)) == (245, 245, 245)


def test_recolouring_redraws_the_concept_and_the_caption_follows(tmp_path):
    from spectral_diffusion.training.augment import recolour
    from toy import scenes

    photo = Image.new("RGB", (32, 32), scenes.BACKGROUNDS["white"])
    ImageDraw.Draw(photo).ellipse((8, 8, 23, 23), fill=scenes.COLOURS["red"])
    image, caption = recolour(photo, None, "a red <moon> on the left", scenes.GRAMMAR, "orange")
    assert caption == "an orange <moon> on the left"
    assert image.getpixel((16, 16)) == scenes.COLOURS["orange"] and image.getpixel((1, 1)) == photo.getpixel((1, 1))
    # a caption that names no colour of the grammar cannot follow: nothing is recoloured
    assert recolour(photo, None, "a photo of <moon>", scenes.GRAMMAR, "blue") is None
    assert recolour(photo, None, "a red <moon>", None, "blue") is None
    scenes.write_concept_images("moon", tmp_path / "moon")
    data = ConceptDataset(
        tmp_path / "moon", "<moon>", resolution=32, flip_p=0.0, recolour_p=1.0, captions=scenes.GRAMMAR
    )
    plain = ConceptDataset(tmp_path / "moon", "<moon>", resolution=32, flip_p=0.0, captions=scenes.GRAMMAR)
    captions = [data[k]["caption"] for k in range(12)]
    assert len({next(w for w in c.split() if w in scenes.COLOURS) for c in captions}) >= 3
    for k, caption in enumerate(captions):
        said = next(w for w in caption.split() if w in scenes.COLOURS)
        pixels = (data[k]["pixel_values"].permute(1, 2, 0) + 1) * 127.5
        background = pixels[0, 0]
        inside = (pixels - background).abs().amax(dim=-1) > 60
        drawn = pixels[inside].median(dim=0).values
        assert torch.allclose(drawn, torch.tensor(scenes.COLOURS[said], dtype=torch.float32), atol=12), caption
    assert plain[0]["caption"] == ConceptDataset(tmp_path / "moon", "<moon>", resolution=32, flip_p=0.0)[0]["caption"]


def test_recolouring_evens_out_the_colours_the_photos_show(tmp_path):
    """Moon's five photos show five colours of six: recolouring picks the sixth (purple) most often, so
    that every colour is about as common among the examples (drawn uniformly, purple was 1 in 20)."""
    from toy import scenes

    scenes.write_concept_images("moon", tmp_path / "moon")
    shown = {s.objects[0].colour for s in scenes.concept_scenes("moon")}
    assert shown == set(scenes.COLOURS) - {"purple"}
    data = ConceptDataset(
        tmp_path / "moon", "<moon>", resolution=32, flip_p=0.0, recolour_p=0.3, captions=scenes.GRAMMAR
    )
    said = [next(w for w in data[k]["caption"].split() if w in scenes.COLOURS) for k in range(600)]
    share = {colour: said.count(colour) / len(said) for colour in scenes.COLOURS}
    assert all(abs(value - 1 / 6) < 0.05 for value in share.values()), share


def test_pairs_put_two_photos_side_by_side_with_one_two_object_caption(tmp_path):
    from spectral_diffusion.training.augment import split_caption
    from toy import scenes

    scenes.write_concept_images("moon", tmp_path / "moon")
    dataset = ConceptDataset(
        tmp_path / "moon", "<moon>", resolution=32, flip_p=0.0, pair_p=1.0, captions=scenes.GRAMMAR
    )
    captions = [dataset[k]["caption"] for k in range(8)]
    for caption in captions:
        assert caption.count("<moon>") == 2 and " and " in caption, caption
        assert caption.endswith(" background"), caption
    assert any("on the left and" in c for c in captions) and any("at the top and" in c for c in captions)
    example = dataset[0]
    # two separate objects: the left and right halves (or top and bottom) each hold concept pixels
    pixels = example["pixel_values"]
    background = pixels[:, 0, 0][:, None, None]
    differs = (pixels - background).abs().amax(dim=0) > 0.3
    first, second = (differs[:, :16], differs[:, 16:]) if "left" in example["caption"] else (differs[:16], differs[16:])
    assert first.any() and second.any()
    # off by default, never for a model with no caption grammar, and captions outside the grammar are never joined
    assert (
        "and"
        not in ConceptDataset(tmp_path / "moon", "<moon>", resolution=32, flip_p=0.0, captions=scenes.GRAMMAR)[0][
            "caption"
        ]
    )
    assert (
        " and " not in ConceptDataset(tmp_path / "moon", "<moon>", resolution=32, flip_p=0.0, pair_p=1.0)[0]["caption"]
    )
    assert split_caption("a photo of <moon>", scenes.GRAMMAR) is None
    assert split_caption("a red <moon> on the left and a blue circle on the right", scenes.GRAMMAR) is None
    assert split_caption("a blue <moon> on the left on a white background", None) is None
