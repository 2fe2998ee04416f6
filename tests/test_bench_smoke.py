"""The benchmark code runs: its smallest pieces, at toy sizes, with no timing assertions."""

from __future__ import annotations

import json

import torch
from torch import nn

from bench.baselines.reference import ReferenceSpectralLinear
from bench.common import Sample, Timings, run_rounds
from bench.speed import layers as bench_layers
from bench.speed import report

EYE_BOTH_PLACED = 38  # docs/fusion-quality.md: "38 of 48 by eye" (the labels in regional_eye_labels.json)
EYE_SIDE_BY_SIDE = 45  # the same page: each concept alone, pasted side by side, "45 of 48"


def test_per_layer_bench_at_one_small_shape():
    rows = bench_layers.run(shapes=[("toy", 24, 40, 6)], rank=4, rounds=1, warmup=0, log=lambda *_: None)
    assert len(rows) == 1
    row = rows[0]
    assert (row.n_in, row.n_out, row.tokens) == (24, 40, 6)
    assert set(row.timings.samples) == set(bench_layers.VARIANTS)
    assert all(len(samples) == 1 for samples in row.timings.samples.values())
    assert row.base_ms > 0
    assert all(row.ratio(variant) > 0 for variant in bench_layers.VARIANTS)


def test_every_layer_variant_starts_from_the_base_weights():
    layers = bench_layers.build_variants(24, 40, rank=4)
    x = torch.randn(3, 24)
    with torch.no_grad():
        base = layers["base"](x)
        # the reference rebuilds W from its full SVD; with zero trainables it is the base layer
        reference = ReferenceSpectralLinear.from_linear(layers["base"], 4)
        torch.testing.assert_close(reference(x), base, atol=1e-5, rtol=1e-5)
        for name in ("lora", "additive", "rotational", "reference"):
            assert layers[name](x).shape == base.shape
    trainable = {name: sum(p.numel() for p in layer.parameters() if p.requires_grad) for name, layer in layers.items()}
    assert trainable["base"] == 0
    assert trainable["lora"] == 4 * (24 + 40)
    assert trainable["additive"] == 4 * (24 + 40) + 4
    assert trainable["rotational"] == 2 * 4 * 4 + 4


def test_rounds_are_interleaved_and_ratios_paired():
    calls = []
    timings = run_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert len(calls) == 8 and calls.count("a") == 4
    assert all(len(samples) == 3 for samples in timings.samples.values())
    fixed = Timings({"x": [Sample(2.0, 2.0), Sample(4.0, 4.0)], "y": [Sample(1.0, 1.0), Sample(1.0, 1.0)]})
    assert fixed.ratios("x", "y") == [2.0, 4.0]
    assert fixed.ratio("x", "y") == 3.0
    assert fixed.spread("x", "y") == (2.0, 4.0)


def test_report_renders_whatever_was_measured(tmp_path):
    rows = bench_layers.run(shapes=[("toy", 16, 16, 4)], rank=2, rounds=1, warmup=0, log=lambda *_: None)
    results = {
        "meta": {
            "date": "2026-01-01T00:00:00+00:00",
            "command": "python -m bench.speed.run",
            "quick": True,
            "total_s": 1.0,
            "threads": 1,
            "threads_note": "test",
            "metric": "wall",
            "gpu_note": "none",
            "background_before": "0.00 cores",
            "background_during": "0.00 cores",
            "machine": {
                "cpu": "cpu",
                "cores": "1",
                "memory": "1 GiB",
                "python": "3",
                "torch": "t",
                "diffusers": "d",
                "transformers": "t",
                "peft": "p",
            },
        },
        "layers": rows,
    }
    text = report.markdown(results, None)
    assert text.startswith("# Benchmarks")
    assert "## 2. Per-layer forward + backward" in text and "| toy |" in text
    assert report.goals(results) == []
    assert "per-layer" in report.console(results)
    assert report.plot(results, tmp_path / "plot.png").exists()


def test_peft_lora_wrapper_leaves_the_model_plain():
    from bench.common import peft_lora_modules

    holder = bench_layers._Holder(nn.Linear(8, 8))
    wrapped, params = peft_lora_modules(holder, ["to_q"], rank=2, suffixes=("to_q",))
    assert isinstance(holder.to_q, nn.Linear)
    assert wrapped["to_q"] is not holder.to_q and len(params) == 2


def test_lora_baseline_trains_its_layers_and_token_and_fuses_as_a_weighted_sum(tiny_pipe, tmp_path):
    from bench.baselines.lora_concept import fused_pipeline, train_lora_concept
    from spectral_diffusion.training.config import TrainConfig
    from toy import scenes

    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    vocab = len(tiny_pipe.tokenizer)
    scenes.write_concept_images("heart", tmp_path / "heart", count=2, size=64)
    config = TrainConfig(name="heart", rank=2, steps=2, batch_size=1, lr_unet=1e-2, lr_text=1e-2, resolution=64)
    heart = train_lora_concept(tiny_pipe, tmp_path / "heart", config)
    scenes.write_concept_images("moon", tmp_path / "moon", count=2, size=64)
    moon = train_lora_concept(
        tiny_pipe, tmp_path / "moon", TrainConfig(**{**config.__dict__, "name": "moon", "tokens": ["<moon>"]})
    )
    # The base pipeline is untouched; every targeted layer learned something.
    assert len(tiny_pipe.tokenizer) == vocab
    assert all(torch.equal(v, tiny_pipe.unet.state_dict()[k]) for k, v in before.items())
    assert {p.rsplit(".", 1)[-1] for p in heart.deltas["unet"]} >= {"to_q", "to_k", "to_v", "0"}
    assert all(d.abs().max() > 0 for d in heart.deltas["unet"].values())
    assert len(heart.losses) == 2

    fused = fused_pipeline(tiny_pipe, [heart, moon], 0.5)
    path = next(iter(heart.deltas["unet"]))
    expected = before[f"{path}.weight"] + 0.5 * (heart.deltas["unet"][path] + moon.deltas["unet"][path])
    torch.testing.assert_close(fused.unet.get_submodule(path).weight, expected, atol=1e-6, rtol=1e-6)
    ids = fused.tokenizer.convert_tokens_to_ids(["<heart>", "<moon>"])
    table = fused.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(table[ids[0]], heart.token_vector)
    torch.testing.assert_close(table[ids[1]], moon.token_vector)


def test_gpu_bench_runs_every_path_on_cpu_in_tiny_mode():
    from bench.speed import gpu

    lines = []
    results = gpu.main(["--device", "cpu", "--tiny", "--dtype", "float32", "--models", "sd15,sdxl"], log=lines.append)
    assert [r["model"] for r in results] == ["sd15", "sdxl"]
    for r in results:
        assert r["train_lora_s"] > 0 and r["train_ours_s"] > 0 and r["svd_s"] > 0
        assert r["infer_base_s"] > 0 and r["infer_live4_s"] > 0 and r["infer_baked_s"] > 0
    assert any("ours / LoRA" in line for line in lines) and any("images/s" in line for line in lines)


def test_quick_run_does_not_write_the_docs_and_heavy_load_is_not_a_miss():
    import argparse

    from bench.speed import run

    quick = argparse.Namespace(quick=True, no_write=False, write_docs=False)
    assert not run.should_write_docs(quick)
    assert run.should_write_docs(argparse.Namespace(quick=True, no_write=False, write_docs=True))
    assert run.should_write_docs(argparse.Namespace(quick=False, no_write=False, write_docs=False))
    assert not run.should_write_docs(argparse.Namespace(quick=False, no_write=True, write_docs=False))
    meta = {"machine": {"cores": "2"}, "loadavg_before": 2.5, "loadavg_after": 0.1}
    assert report.heavy_load(meta) and not report.heavy_load({**meta, "loadavg_before": 0.2})
    goal = report.Goal("x", "<= 1x", "2x", False, heavy_load=True)
    assert goal.verdict == "not judged (heavy background load)"


def test_memory_item_runs_one_process_per_variant_and_reports_the_os_peak():
    from bench.speed import memory as bench_memory

    result = bench_memory.run(quick=True, threads=1, size="tiny", variants=("lora", "additive"), log=lambda *_: None)
    assert set(result.runs) == {"lora", "additive"} and result.steps == bench_memory.QUICK_STEPS
    for data in result.runs.values():
        phases = [p["phase"] for p in data["phases"]]
        assert phases[:2] == ["imports", "model built"] and phases[-1] == f"step {bench_memory.QUICK_STEPS}"
        # the OS's figure is the worker's own, not the launcher's nor this process's
        assert abs(data["ru_maxrss_kib"] - data["phases"][-1]["VmHWM"]) < 0.05 * data["ru_maxrss_kib"]
        assert next(p for p in data["phases"] if p["phase"] == "adapted")["trainable"] > 0
    assert result.ratio("lora") == 1.0 and 0.5 < result.ratio("additive") < 2.0
    assert len(bench_memory.table(result)) == 2
    (row,) = [g for g in report.goals({"memory": result}) if g.item.startswith("4. peak RSS")]
    assert row.met is not None and not row.load_sensitive
    assert "## Memory of a training run" in "\n".join(report.memory_section(result))


def test_report_keeps_the_hand_written_profiling_section():
    old = "# Benchmarks\n\n## 3. SVD\n\nold\n\n## Why the missed goals are missed\n\nshares 40%\n\n## Notes\n\nx\n"
    kept = report.kept_sections(old)
    assert kept == {"Why the missed goals are missed": "## Why the missed goals are missed\n\nshares 40%\n"}
    meta = {
        "date": "d",
        "command": "c",
        "quick": True,
        "total_s": 1.0,
        "threads": 1,
        "threads_note": "t",
        "metric": "wall",
        "gpu_note": "none",
        "background_before": "0.00 cores",
        "background_during": "0.00 cores",
        "machine": {
            "cpu": "cpu",
            "cores": "1",
            "memory": "1 GiB",
            "python": "3",
            "torch": "t",
            "diffusers": "d",
            "transformers": "t",
            "peft": "p",
        },
    }
    sizes = __import__("bench.speed.files", fromlist=["FileSizes"]).FileSizes(
        bytes={"ours, additive, fp16 triplets": 151, "PEFT LoRA": 100}
    )
    text = report.markdown({"meta": meta, "sizes": sizes}, None, kept)
    assert "shares 40%" in text
    assert f"**missed** ([why]({report.WHY_ANCHOR}))" in text


def test_eye_labels_match_the_documented_count_and_refuse_other_pictures():
    from PIL import Image

    from bench.quality import regional_quality

    labels = json.loads(regional_quality.EYE_LABELS.read_text())
    both = sum(len(set(sides["left"]) & set(sides["right"])) for sides in labels["left-right"].values())
    assert both == EYE_BOTH_PLACED  # --layout left-right
    assert regional_quality.eye_both_placed(labels) == {"left-right": EYE_BOTH_PLACED, "side-by-side": EYE_SIDE_BY_SIDE}
    rows = regional_quality.pairs()
    assert set(labels["left-right"]) == {row[0]["pair"] for row in rows}
    blank = [Image.new("RGB", (32, 32), "white")] * 8
    drawn = [
        {"pair": rows[0][0]["pair"], "scenes": rows[0], "alone": [blank, blank], "paths": {"left-right": (blank, 1.0)}}
    ]
    assert regional_quality.eye_agreement(None, drawn, labels) is None  # other pictures: no score against the labels


def test_regional_scenes_differ_seed_by_seed_and_come_out_the_same_every_run():
    from bench.quality import regional_quality

    rows = regional_quality.pairs()
    assert len(rows) == 6 and all(len(row) == 8 for row in rows)
    for row in rows:
        assert len({(s["colours"], s["background"], s["concepts"]) for s in row}) >= 6  # not 8 copies of one prompt
        assert {s["concepts"] for s in row} == {row[0]["concepts"], row[0]["concepts"][::-1]}  # both sides
        assert all(s["colours"][0] != s["colours"][1] for s in row)
        assert [s["seed"] for s in row] == list(range(8))
        for s in row:
            for side, concept in enumerate(s["concepts"]):
                assert f"<{concept}>" in s["region_prompts"][side]
                assert regional_quality.SIDES[side] in s["region_prompts"][side]
    assert regional_quality.pairs() == rows  # fixed: a rerun draws the same scenes


def test_regional_scoring_follows_each_scene_s_sides():
    """Rendered pictures of heart + moon, sides swapped on the second: both placed in both, and a
    picture whose sides disagree with its scene is not."""
    from bench.quality import regional_quality
    from toy import classifier, scenes

    row = [
        regional_quality.scene("heart", "moon", "red", "blue", "white", seed=0),
        regional_quality.scene("moon", "heart", "red", "blue", "white", seed=1),
        regional_quality.scene("heart", "moon", "red", "blue", "white", seed=2),
    ]
    drawn_as = [("heart", "moon"), ("moon", "heart"), ("moon", "heart")]  # the third swapped: wrong sides
    pictures = [
        scenes.render(
            scenes.Scene(
                (scenes.SceneObject(left, "red", position="left"), scenes.SceneObject(right, "blue", position="right"))
            )
        )
        for left, right in drawn_as
    ]
    tally = regional_quality.Tally()
    reading = classifier.read(classifier.load(), pictures)
    tally.add((reading, reading), row, seconds=3.0)
    assert tally.placed == [1.0, 1.0, 0.0]
    assert tally.seconds == [1.0]
    assert tally.bleed[4] > 0.5 and max(tally.bleed[:4]) < 0.5  # the wrong-sided picture shows the other concept


def test_travel_prompts_keep_what_is_asked_on_every_background():
    from bench.quality import regional_quality
    from toy import scenes

    on_white = regional_quality.travel_prompts("heart")
    for background in scenes.BACKGROUNDS:
        items = regional_quality.travel_prompts("heart", background)
        assert [(i["kind"], i["colour"], i["position"]) for i in items] == [
            (i["kind"], i["colour"], i["position"]) for i in on_white
        ]
        assert all(i["prompt"].endswith(f"on a {background} background") and "<heart>" in i["prompt"] for i in items)


def test_side_by_side_pastes_each_concept_alone_into_its_half_and_is_scored_beside_the_paths():
    """Rendered heart alone on the left and moon alone on the right: the pasted picture holds each half
    unchanged, and ``score`` reads it as its own row (both placed, no bleeding, no time)."""
    import numpy as np

    from bench.quality import regional_quality
    from toy import classifier, scenes

    row = [regional_quality.scene("heart", "moon", "red", "blue", "white", seed=0)]
    left = scenes.render(scenes.Scene((scenes.SceneObject("heart", "red", position="left"),)))
    right = scenes.render(scenes.Scene((scenes.SceneObject("moon", "blue", position="right"),)))
    pasted = regional_quality.side_by_side([[left], [right]])[0]
    half = left.width // 2
    assert np.array_equal(np.asarray(pasted)[:, :half], np.asarray(left.convert("RGB"))[:, :half])
    assert np.array_equal(np.asarray(pasted)[:, half:], np.asarray(right.convert("RGB"))[:, half:])
    drawn = [
        {"pair": row[0]["pair"], "scenes": row, "alone": [[left], [right]], "paths": {"left-right": ([left], 1.0)}}
    ]
    result = regional_quality.score(classifier.load(), drawn, ["left-right"])
    reference = result["rows"][-1]
    assert reference["path"] == regional_quality.SIDE_BY_SIDE and reference["seconds"] is None
    assert reference["both_placed"] == 1.0 and reference["bleeding"] < 0.1
    assert result["rows"][0]["both_placed"] == 0.0  # the heart alone is not both concepts
    assert regional_quality.SIDE_BY_SIDE in result["per_pair"][0]
    result["by_half"] = regional_quality.score(classifier.load(), drawn, ["left-right"], halves=True)
    result |= {"train_seconds": None, "pairs": 1, "seeds": 1, "travel": {}, "classifier": "classifier.safetensors"}
    text = regional_quality.markdown(result)
    assert "| - |" in text  # the side-by-side reference took no time of its own
    assert "Each half read alone" in text and "0% -> 0%" in text


def test_each_half_read_alone_sees_only_its_own_half():
    """A rendered heart on the left beside a ring on the right: with the right half painted over, the
    reader finds the heart on the left and nothing on the right; whole, it finds both."""
    import numpy as np

    from bench.quality import regional_quality
    from toy import classifier, scenes

    picture = scenes.render(
        scenes.Scene(
            (scenes.SceneObject("heart", "red", position="left"), scenes.SceneObject("ring", "blue", position="right"))
        )
    )
    left_only = np.asarray(regional_quality.only_half(picture, 0))
    half = left_only.shape[1] // 2
    assert np.array_equal(left_only[:, :half], np.asarray(picture.convert("RGB"))[:, :half])
    assert np.abs(left_only[:, half:].astype(int) - scenes.BACKGROUNDS["white"]).max() <= 2  # the kept half's white
    model = classifier.load()
    left, right = (regional_quality.scenes_position(side) for side in regional_quality.SIDES)
    whole, _ = regional_quality.read_sides(model, [picture], halves=False)
    assert whole["where"][0, left] > 0.5 and whole["where"][0, right] > 0.5
    by_left, by_right = regional_quality.read_sides(model, [picture], halves=True)
    assert by_left["where"][0, left] > 0.5 and by_left["where"][0, right] < 0.5
    assert by_right["where"][0, right] > 0.5 and by_right["where"][0, left] < 0.5
    assert int(by_left["shape_at"][0, left].argmax()) == scenes.SHAPES.index("heart")
    assert int(by_right["shape_at"][0, right].argmax()) == scenes.SHAPES.index("ring")


def test_a_concept_asked_for_small_counts_only_when_drawn_small():
    """Rendered hearts where a "small" prompt asks for one: the small one counts, the large one does not."""
    from bench.quality import regional_quality
    from toy import classifier, scenes

    item = next(i for i in regional_quality.travel_prompts("heart") if i["kind"] == "new size")
    assert item["size"] == "small" and "small" in item["prompt"]
    drawn = [
        scenes.render(scenes.Scene((scenes.SceneObject("heart", item["colour"], size, position=item["position"]),)))
        for size in ("small", "large")
    ]
    hits = regional_quality.score_travel(classifier.load(), [("heart", item, drawn)])
    assert hits == {"new size": 0.5}
