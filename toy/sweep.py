"""Compare pretraining recipes of ``builtin:toy`` side by side: one process per recipe, snapshots scored.

    python -m toy.sweep --device cuda --out sweep-out          # on a machine with a GPU: minutes
    python -m toy.sweep --variants v3 --steps-scale 0.01       # a smoke run of the machinery on a CPU

The scenes, the VAE and the latents are made once (``toy.pretrain``'s phases 1 and 2, cached in
``--work``); then every variant trains its UNet and text encoder in its own process, from the same
seeds, and its EMA weights are scored by ``toy.evaluate`` (all captions, 4 seeds) at fractions of its
steps. Recipes are compared at equal cost on the 2-core CPU that the real recipe must fit: a variant
with twice the batch gets half the steps. The best finished variant's pipeline is exported to
``--out``/model. ``--deadline`` stops every variant in time (what it reached is still scored and exported).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from spectral_diffusion.atomic import atomic_write_text
from toy import pretrain

logger = logging.getLogger("toy.sweep")

# name -> (recipe, why it is in the sweep). Steps are CPU-equal: on 2 CPU cores a step of batch 64 costs
# 1.89x one of batch 32 (docs/toy.md), so 12 000 steps of 32 cost what 6 300 of 64 do.
_B32 = pretrain.DiffusionRecipe(batch=32, steps=12_000)
VARIANTS = {
    "v2-long": (
        replace(_B32, lr=3e-4, warmup=300, schedule="constant"),
        "v2's recipe (batch 32, lr 3e-4, constant) for the whole budget: is more steps alone enough?",
    ),
    "b32-lr1e-3": (_B32, "batch 32, lr 1e-3, cosine decay to zero at the last step"),
    "b32-lr2e-3": (replace(_B32, lr=2e-3), "batch 32, a higher peak learning rate"),
    "b32-lr5e-4": (replace(_B32, lr=5e-4), "batch 32, a lower peak learning rate"),
    "v3": (
        pretrain.DiffusionRecipe(),
        "batch 64, lr 1e-3, cosine: twice the batch, half the steps (the shipped recipe)",
    ),
}
EVAL_FRACTIONS = (1 / 3, 2 / 3, 1.0)


def score(unet_state, text_encoder, vae, device: str, classifier_model, seeds: int = 4) -> dict:
    """toy.evaluate's rows for a pipeline made of these weights (the EMA UNet, the text encoder as it is)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from spectral_diffusion.testing.bpe import build_tokenizer
    from toy import evaluate

    unet = pretrain.make_unet().to(device)
    unet.load_state_dict(unet_state)
    scheduler = DDIMScheduler(
        **pretrain.SCHEDULER, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing"
    )
    was_training = text_encoder.training
    pipe = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=build_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    rows, _ = evaluate.evaluate(pipe, classifier_model, seeds)
    text_encoder.train(was_training)
    return {
        "held_out": rows["held_out_single"]["shape_and_colour"],
        "seen": rows["seen_single"]["shape_and_colour"],
        "position": rows["positioned_single"]["position"],
        "positioned_shape_colour": rows["positioned_single"]["shape_and_colour"],
        "pair_sets": rows["pairs"]["shape_and_colour"],
        "pair_positions": rows["pairs"]["positions"],
        "rows": rows,
    }


def run_variant(name: str, args) -> None:
    from toy import classifier

    recipe = _scaled(VARIANTS[name][0], args.steps_scale)
    if args.lr:
        recipe = replace(recipe, lr=args.lr)
    vae, scene_list, mean, std, scaling = pretrain.prepare_latents(args.work, args.scenes, args.vae_steps, args.device)
    vae = vae.to(args.device)
    reader = classifier.load()  # it reads a few images at a time: the CPU is fast enough
    folder = args.work / name
    results_file = folder / "results.json"
    results = {"name": name, "recipe": asdict(recipe), "why": VARIANTS[name][1], "snapshots": []}
    started = time.monotonic()

    def on_step(step, ema_state, text_encoder):
        results["step"], results["seconds"] = step, round(time.monotonic() - started, 1)
        if step in eval_steps:
            t0 = time.monotonic()
            snapshot = {"step": step, **score(ema_state, text_encoder, vae, args.device, reader, args.seeds)}
            snapshot["eval_seconds"] = round(time.monotonic() - t0, 1)
            results["snapshots"].append(snapshot)
            logger.info("%s @ %d: %s", name, step, {k: v for k, v in snapshot.items() if k != "rows"})
        if step % 200 == 0 or step in eval_steps:
            _write_json(results_file, results)

    folder.mkdir(parents=True, exist_ok=True)
    if args.fit_deadline:
        recipe = _fit_to_deadline(recipe, folder, scene_list, mean, std, scaling, args)
        results["recipe"] = asdict(recipe)
    eval_steps = {max(1, round(f * recipe.steps)) for f in EVAL_FRACTIONS}
    minutes = max(0.05, (args.deadline - (time.time() - args.t0)) / 60) if args.deadline else None
    unet, text_encoder, tokenizer, steps, losses = pretrain.train_diffusion(
        folder, scene_list, mean, std, scaling, recipe, minutes, args.device, on_step
    )
    results["finished"] = steps >= recipe.steps
    if not any(s["step"] == steps for s in results["snapshots"]):
        snapshot = {
            "step": steps,
            **score(
                unet.to(args.device).state_dict(), text_encoder.to(args.device), vae, args.device, reader, args.seeds
            ),
        }
        results["snapshots"].append(snapshot)
    info = pretrain.training_info(args.scenes, args.vae_steps, recipe, steps, args.device, losses, variant=name)
    pretrain.export(folder / "model", unet.cpu(), vae.cpu(), text_encoder.cpu(), tokenizer, info)
    results["losses_per_100"] = [
        round(sum(losses[i : i + 100]) / len(losses[i : i + 100]), 4) for i in range(0, len(losses), 100)
    ]
    _write_json(results_file, results)


def _fit_to_deadline(recipe, folder, scene_list, mean, std, scaling, args, probe_seconds: float = 20.0):
    """Train ``probe_seconds``, then shorten the recipe to the steps that fit before the deadline (rounded
    down to 500). The probe lies inside the warm-up, where the cosine's length changes the rate by < 0.1%."""
    stamps = []
    pretrain.train_diffusion(
        folder,
        scene_list,
        mean,
        std,
        scaling,
        recipe,
        probe_seconds / 60,
        args.device,
        lambda step, *_: stamps.append((step, time.monotonic())),
    )
    (first, t_first), (last, t_last) = stamps[len(stamps) // 4], stamps[-1]
    rate = (last - first) / (t_last - t_first)
    left = args.deadline - (time.time() - args.t0)
    steps = min(recipe.steps, int((last + rate * left * 0.95) // 500 * 500))
    logger.info("%.1f steps/s, %.0f s left: %d steps", rate, left, steps)
    return replace(recipe, steps=max(steps, last + 1))


def _scaled(recipe: pretrain.DiffusionRecipe, scale: float) -> pretrain.DiffusionRecipe:
    if scale == 1.0:
        return recipe
    steps = max(2, round(recipe.steps * scale))
    return replace(recipe, steps=steps, warmup=max(1, round(recipe.warmup * scale)))


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1))


def collect(names, work: Path) -> dict:
    out = {}
    for name in names:
        file = work / name / "results.json"
        out[name] = json.loads(file.read_text()) if file.exists() else {"name": name, "status": "no results yet"}
    return out


def best(results: dict) -> str | None:
    """The variant whose last snapshot scores best on the issue's four prompt rows, finished ones first."""

    def total(r):
        last = r["snapshots"][-1]
        return last["held_out"] + last["position"] + last["pair_sets"] + last["pair_positions"]

    scored = [r for r in results.values() if r.get("snapshots")]
    done = [r for r in scored if r.get("finished")] or scored
    return max(done, key=total)["name"] if done else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("toy-sweep"))
    parser.add_argument("--out", type=Path, default=Path("toy-sweep/out"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--scenes", type=int, default=40000)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale every variant's steps (smoke runs)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per caption when scoring")
    parser.add_argument("--deadline", type=float, default=None, help="seconds from the start for the whole sweep")
    parser.add_argument(
        "--fit-deadline", action="store_true", help="shorten every variant's steps to what fits before --deadline"
    )
    parser.add_argument("--lr", type=float, default=None, help="override every variant's learning rate")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.t0 = args.t0 or time.time()
    if args.device == "cuda":  # fp32 as on the CPU the recipe is made for
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if args.child:
        torch.set_num_threads(2)
        run_variant(args.child, args)
        return
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    pretrain.prepare_latents(args.work, args.scenes, args.vae_steps, args.device)
    logger.info("shared phases done after %.0f s", time.time() - args.t0)
    common = [
        "--work",
        str(args.work),
        "--device",
        args.device,
        "--scenes",
        str(args.scenes),
        "--vae-steps",
        str(args.vae_steps),
        "--steps-scale",
        str(args.steps_scale),
        "--seeds",
        str(args.seeds),
        "--t0",
        str(args.t0),
    ]
    if args.deadline:
        common += ["--deadline", str(args.deadline)] + (["--fit-deadline"] if args.fit_deadline else [])
    if args.lr:
        common += ["--lr", str(args.lr)]
    children = {n: subprocess.Popen([sys.executable, "-m", "toy.sweep", "--child", n, *common]) for n in names}
    args.out.mkdir(parents=True, exist_ok=True)
    while any(c.poll() is None for c in children.values()):
        time.sleep(10)
        _write_json(args.out / "sweep.json", collect(names, args.work))
    results = collect(names, args.work)
    results["_exit_codes"] = {n: c.returncode for n, c in children.items()}
    winner = best({n: results[n] for n in names})
    results["_best"] = winner
    results["_seconds"] = round(time.time() - args.t0, 1)
    _write_json(args.out / "sweep.json", results)
    if winner:
        subprocess.run(["tar", "-C", str(args.work / winner), "-cf", str(args.out / "model.tar"), "model"], check=True)
    logger.info("best: %s after %.0f s", winner, time.time() - args.t0)


if __name__ == "__main__":
    main()
