"""How well does one spectral slot learn a new concept alone? Cheap diagnostic runs on ``builtin:toy``.

    python -m bench.quality.concept_quality                 # all rows, about 25 minutes on one CPU core
    python -m bench.quality.concept_quality --rows lora,default --shapes heart
    python -m bench.quality.concept_quality --report        # only rewrite the table from the JSON
    python -m bench.quality.concept_quality --rows lora,unet_3e-3 --seeds 4 --contexts 4 --name concept-quality-confirm

Each row trains one or two novel shapes (heart, moon by default) alone from their 5 captioned photos
with one change from the product's settings, then scores what the concept draws by itself:

* *identity alone*: the scene classifier's probability of the concept's shape, on single prompts in
  new contexts (colour, background, position) -- the fusion benchmark's measure, with fewer seeds
  and contexts by default (2 and 2, against 4 and 4 there; ``--seeds``/``--contexts``), so with 4
  images per shape a difference of one image (0.25 per shape) is noise;
* *identity on pair prompts*: the same concept, still the only one loaded, asked for on one side of
  a two-object prompt of the fusion benchmark with the other concept replaced by a shape the model
  knows ("a red <heart> on the left and a blue square on the right ..."), which tests whether it
  carries over to scenes unlike its photos;
* *time*: seconds per concept, and the ratio to the PEFT LoRA row (``bench/baselines/lora_concept.py``: same
  layers, rank, steps, data, loss) measured in the same invocation. The machine is shared, so
  absolute times are under background load; compare ratios.

Results accumulate in ``docs/concept-quality.json`` (one entry per row, the latest run wins), so rows
can be run in several invocations; ``docs/concept-quality-table.md`` is written from it (and
``docs/concept-quality.md`` discusses it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.baselines.lora_concept import fused_pipeline, train_lora_concept
from bench.quality.fusion_quality import pair_prompts, single_prompts, token
from bench.support import ROOT
from spectral_diffusion.core.model import SpectralAdapters
from spectral_diffusion.formats.adapter_file import install_adapter
from spectral_diffusion.generation.diffusion import generate
from spectral_diffusion.models.registry import default_rank, load_pipeline, training_defaults
from spectral_diffusion.training.config import TrainConfig
from spectral_diffusion.training.trainer import train_concept
from toy import classifier, scenes

logger = logging.getLogger("bench.quality.concept_quality")

MODEL = "builtin:toy"
INFERENCE_STEPS, GUIDANCE = 25, 5.0


@dataclass(frozen=True)
class Sampling:
    """How many seeds and new contexts each concept is drawn with (the fusion benchmark uses 4 and 4)."""

    seeds: int = 2
    contexts: int = 2


PARTNER = "square"  # the other object of a pair prompt: a pretraining shape, so only one concept is loaded
BEST_UNET_LR = 3e-3  # the diagnostic rows vary one thing at this UNet rate (the lr rows show why)


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    changes: dict
    lora: bool = False
    masks: bool = False


def _at_best(**changes) -> dict:
    return {"lr_unet": BEST_UNET_LR, **changes}


ROWS = (
    Row("lora", "PEFT LoRA, lr_unet 1e-3 (the product setting before this change)", {"lr_unet": 1e-3}, lora=True),
    Row("lora_3e-3", "PEFT LoRA, lr_unet 3e-3", {"lr_unet": 3e-3}, lora=True),
    Row("lora_1e-2", "PEFT LoRA, lr_unet 1e-2", {"lr_unet": 1e-2}, lora=True),
    Row("default", "spectral, lr_unet 1e-3 (the product setting before this change)", {"lr_unet": 1e-3}),
    Row("unet_3e-3", "spectral, lr_unet 3e-3 (the new product setting)", {"lr_unet": 3e-3}),
    Row("unet_1e-2", "spectral, lr_unet 1e-2", {"lr_unet": 1e-2}),
    Row("text_1e-3", "spectral, lr_unet 3e-3, lr_text 1e-3", _at_best(lr_text=1e-3)),
    Row(
        "spectrum_1e-3",
        "spectral, s_k-independent step (lr_scale spectrum), lr_unet 1e-3",
        {"lr_unet": 1e-3, "lr_scale": "spectrum"},
    ),
    Row("spectrum_3e-3", "spectral, lr_scale spectrum, lr_unet 3e-3", _at_best(lr_scale="spectrum")),
    Row("slot_3", "spectral, lr_unet 3e-3, slot 3 (lower singular values)", _at_best(slot=3)),
    Row("rank_4", "spectral, lr_unet 3e-3, rank 4", _at_best(rank=4)),
    Row("rank_16", "spectral, lr_unet 3e-3, rank 16", _at_best(rank=16)),
    Row("c_off", "spectral, lr_unet 3e-3, c not trained", _at_best(train_c=False)),
    Row("text_off", "spectral, lr_unet 3e-3, no text-encoder slot (lr_text 0)", _at_best(lr_text=0.0)),
    Row("rotational", "spectral rotational, lr_unet 3e-3", _at_best(variant="rotational")),
    Row("rotational_1e-2", "spectral rotational, lr_unet 1e-2", {"variant": "rotational", "lr_unet": 1e-2}),
    Row("rotational_3e-2", "spectral rotational, lr_unet 3e-2", {"variant": "rotational", "lr_unet": 3e-2}),
    Row("rotational_1e-1", "spectral rotational, lr_unet 1e-1", {"variant": "rotational", "lr_unet": 1e-1}),
    Row("rotational_1e-3", "spectral rotational, lr_unet 1e-3", {"variant": "rotational", "lr_unet": 1e-3}),
    Row(
        "rotational_emb_3e-2",
        "spectral rotational, lr_unet 3e-3, lr_embedding 3e-2",
        _at_best(variant="rotational", lr_embedding=3e-2),
    ),
    Row(
        "rotational_text_1e-3",
        "spectral rotational, lr_unet 3e-3, lr_text 1e-3",
        _at_best(variant="rotational", lr_text=1e-3),
    ),
    Row("rotational_600", "spectral rotational, lr_unet 3e-3, 600 steps", _at_best(variant="rotational", steps=600)),
    Row(
        "rotational_1e-3_600",
        "spectral rotational, lr_unet 1e-3, 600 steps",
        {"variant": "rotational", "lr_unet": 1e-3, "steps": 600},
    ),
    Row(
        "rotational_3e-4_600",
        "spectral rotational, lr_unet 3e-4, 600 steps",
        {"variant": "rotational", "lr_unet": 3e-4, "steps": 600},
    ),
    Row(
        "rotational_1e-3_1000",
        "spectral rotational, lr_unet 1e-3, 1000 steps",
        {"variant": "rotational", "lr_unet": 1e-3, "steps": 1000},
    ),
    Row("rotational_rank_16", "spectral rotational, lr_unet 3e-3, rank 16", _at_best(variant="rotational", rank=16)),
    Row(
        "rotational_rank_16_1e-3",
        "spectral rotational, lr_unet 1e-3, rank 16",
        {"variant": "rotational", "lr_unet": 1e-3, "rank": 16},
    ),
    Row("masked", "spectral, lr_unet 3e-3, masked loss (background 0.1)", _at_best(background_weight=0.1), masks=True),
    Row("augment", "spectral, lr_unet 3e-3, zoom-out/shift p 0.5 (masks, exact)", _at_best(augment_p=0.5), masks=True),
    Row("augment_nomask", "spectral, lr_unet 3e-3, zoom-out p 0.5 (no masks, border colour)", _at_best(augment_p=0.5)),
)


def train_config(shape: str, seed: int, changes: dict, mask_dir: Path | None, steps: int | None = None) -> TrainConfig:
    """The product's settings for builtin:toy (slot 0) with ``changes``; both adapter kinds get these."""
    options = {**training_defaults(MODEL), "rank": default_rank(MODEL), **changes}
    if mask_dir is not None:
        options["mask_dir"] = str(mask_dir)
    if steps:
        options["steps"] = steps
    return TrainConfig(name=shape, tokens=[token(shape)], resolution=scenes.IMAGE_SIZE, seed=seed, **options)


def _identity(model, images, shape: str) -> list[float]:
    reading = classifier.read(model, images)["shape"][:, scenes.SHAPES.index(shape)]
    return [float(v) for v in reading]


def _prompts(shape: str, contexts: int) -> tuple[list, list]:
    """New-context single prompts, and two pair prompts of the fusion benchmark with ``shape`` in them
    whose other concept is replaced by a shape the model knows (a token of no loaded concept is refused)."""
    pairs = []
    for prompt in [p for p in pair_prompts() if shape in p.concepts][:2]:
        (other,) = [c for c in prompt.concepts if c != shape]
        pairs.append(dataclasses.replace(prompt, text=prompt.text.replace(token(other), PARTNER)))
    return single_prompts(shape, contexts), pairs


def _score(pipe, model, shape: str, sampling: Sampling) -> tuple[float, float]:
    singles, pairs = _prompts(shape, sampling.contexts)

    def draw(p):
        return generate(pipe, p.text, sampling.seeds, scenes.IMAGE_SIZE, INFERENCE_STEPS, GUIDANCE, seed=1234)

    alone = [v for p in singles for v in _identity(model, draw(p), shape)]
    pair = [v for p in pairs for v in _identity(model, draw(p), shape)]
    return float(np.mean(alone)), float(np.mean(pair))


def run_row(
    pipe, model, row: Row, shapes, work: Path, sampling: Sampling, steps: int | None = None, train_seed: int = 0
) -> dict:
    alone, pair, seconds = [], [], []
    for index, shape in enumerate(shapes):
        folder, masks = work / shape, work / f"{shape}-masks"
        if not folder.is_dir():
            scenes.write_concept_images(shape, folder, mask_folder=masks)
        config = train_config(shape, train_seed + index, row.changes, masks if row.masks else None, steps)
        start = time.perf_counter()
        if row.lora:
            concept = train_lora_concept(pipe, folder, config)
            seconds.append(time.perf_counter() - start)
            scores = _score(fused_pipeline(pipe, [concept], 1.0), model, shape, sampling)
        else:
            adapter = train_concept(pipe, folder, config, svd_cache_dir=work / "svd").adapter
            seconds.append(time.perf_counter() - start)
            adapters = SpectralAdapters.from_pipeline(pipe)
            try:
                install_adapter(adapters, adapter)
                scores = _score(pipe, model, shape, sampling)
            finally:
                adapters.unpatch()
        alone.append(scores[0])
        pair.append(scores[1])
        logger.info("%s %s: identity alone %.2f, on pairs %.2f, %.0f s", row.key, shape, *scores, seconds[-1])
    return {
        "key": row.key,
        "label": row.label,
        "shapes": list(shapes),
        "identity_alone": float(np.mean(alone)),
        "identity_pair": float(np.mean(pair)),
        "per_shape_alone": alone,
        "seconds": float(np.mean(seconds)),
        "changes": row.changes,
        "seeds": sampling.seeds,
        "contexts": sampling.contexts,
        "train_seed": train_seed,
        "finished": time.strftime("%Y-%m-%d %H:%M"),
    }


# ---------------------------------------------------------------------------------- report


def write_table(results: dict, path: Path) -> None:
    """The Markdown table of every row measured so far, in ROWS order; time relative to the LoRA row."""
    lora_seconds = results.get("lora", {}).get("seconds")
    header = (
        "| row | identity alone | identity on pair prompts (alone) | per shape (alone) | s / concept | "
        "time vs LoRA |\n|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in ROWS:
        r = results.get(row.key)
        if r is None:
            continue
        ratio = f"{r['seconds'] / lora_seconds:.2f}x" if lora_seconds else "-"
        per_shape = ", ".join(f"{s} {v:.2f}" for s, v in zip(r["shapes"], r["per_shape_alone"], strict=True))
        lines.append(
            f"| {row.label} | {r['identity_alone']:.2f} | {r['identity_pair']:.2f} | {per_shape} | "
            f"{r['seconds']:.0f} | {ratio} |"
        )
    path.write_text(header + "\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="identity of one concept alone, per training setting")
    parser.add_argument("--rows", default="", help="comma-separated row keys (default: all)")
    parser.add_argument("--shapes", default="heart,moon")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="only rewrite the table from the JSON")
    parser.add_argument("--steps", type=int, default=None, help="override the training steps (smoke runs)")
    parser.add_argument("--seeds", type=int, default=Sampling.seeds)
    parser.add_argument("--contexts", type=int, default=Sampling.contexts, help="new-context prompts per shape")
    parser.add_argument("--name", default="concept-quality", help="results file stem (several sweeps side by side)")
    parser.add_argument("--train-seed", type=int, default=0, help="training seed of the first shape (next: +1, ...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / f"{args.name}.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    by_key = {r.key: r for r in ROWS}
    wanted = [by_key[k] for k in args.rows.split(",")] if args.rows else list(ROWS)  # in the order asked
    if not args.report:
        pipe, model = load_pipeline(MODEL), classifier.load()
        shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
        with tempfile.TemporaryDirectory(prefix="concept-quality-") as tmp:
            for row in wanted:
                results[row.key] = run_row(
                    pipe,
                    model,
                    row,
                    shapes,
                    Path(tmp),
                    Sampling(args.seeds, args.contexts),
                    args.steps,
                    args.train_seed,
                )
                store.write_text(json.dumps(results, indent=1) + "\n")  # each row kept as soon as it is done
    write_table(results, args.out / f"{args.name}-table.md")


if __name__ == "__main__":
    main()
