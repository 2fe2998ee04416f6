"""The CLI's commands: thin glue from parsed arguments to the library, training and the studio."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.frontends.workflows import (
    TrainRequest,
    build_layout,
    check_concepts_exist,
    export_concept,
    import_into_library,
    prepare_training,
    slot_overview,
    train_into_library,
)

logger = logging.getLogger(__name__)


def emit(data) -> None:
    """Write a command's result to stdout (JSON for dicts/lists, text otherwise)."""
    if isinstance(data, (dict, list)):
        print(json.dumps(data, indent=2))
    else:
        print(data)


def out_paths(out: str, count: int) -> list[Path]:
    """One image: ``FILE``; several: ``FILE-0.png``, ``FILE-1.png``, ..."""
    path = Path(out)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def _library(args):
    from spectral_diffusion.library.store import Library

    return Library(args.library)


def _studio(args):
    from spectral_diffusion.generation.fusion import Studio

    return Studio(args.model, device=args.device)


class _TqdmProgress:
    """A training's progress bar. It appears with the first finished step and counts the rate from there
    (``initial``): neither that step, timed from the bar's birth, nor a resumed run's checkpoint steps
    pass for steps done in no time (the bar read 1.4M step/s). A resumed run says where it resumed."""

    def __init__(self, label: str):
        self.label, self.bar = label, None

    def __call__(self, progress) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            if progress.first_step:
                tqdm.write(
                    f"{self.label}: resumed from step {progress.first_step} of {progress.total_steps}", file=sys.stderr
                )
            self.bar = tqdm(total=progress.total_steps, initial=progress.step, desc=self.label, unit="step")
        self.bar.n = progress.step
        self.bar.set_postfix(loss=f"{progress.loss:.4f}", refresh=False)
        self.bar.refresh()
        if progress.step >= progress.total_steps:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tqdm_progress(total_label: str) -> _TqdmProgress:
    return _TqdmProgress(total_label)


def interrupted_message(args: argparse.Namespace) -> str:
    """What Ctrl-C left behind: for a training, whether a checkpoint can resume it (and how)."""
    if getattr(args, "command", None) != "train":
        return "interrupted; nothing was written"
    from spectral_diffusion.library.workdirs import CHECKPOINTS_DIR
    from spectral_diffusion.training.checkpoint import saved_step

    folder = Path(args.library) / CHECKPOINTS_DIR / args.name
    saved = saved_step(folder)
    if saved is None:
        return (
            f"interrupted; {args.name} was not added to the library and no checkpoint was written "
            "(train with --checkpoint-every N to be able to resume)"
        )
    step, total = saved
    return (
        f"interrupted; {args.name} was not added to the library. Its checkpoint at step {step} of {total} "
        f"is kept in {folder}: run the same command with --resume to continue from there (or "
        f"`delete {args.name}` to drop it)"
    )


def _distributed_rank() -> tuple[int, int]:
    """(rank, world size) when started by ``accelerate launch`` / ``torchrun``, else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _train_request(args) -> TrainRequest:
    return TrainRequest(
        name=args.name,
        images=args.images,
        class_word=args.class_word,
        variant=args.variant,
        rank=args.rank,
        steps=args.steps,
        resolution=args.resolution,
        seed=args.seed,
        slot=args.slot,
        token=args.token,
        mixed_precision=args.mixed_precision,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        masks=args.masks,
        preview_every=0,  # the CLI saves only the final preview
    )


def cmd_train(args: argparse.Namespace) -> None:
    from spectral_diffusion.models.registry import load_pipeline
    from spectral_diffusion.training.trainer import train_concept

    library = _library(args)
    request = _train_request(args)
    images = prepare_training(library, request, args.model)  # everything checked before the model is loaded
    process, world = _distributed_rank()
    if world > 1 and args.slot is None:
        raise SpectralDiffusionError("multi-process training needs an explicit --slot K (all processes must agree)")
    pipe = load_pipeline(args.model, device=args.device)
    if process != 0:  # data-parallel helpers train alongside; only the main process writes the library
        config = request.config(args.model, args.library, slot=args.slot)
        train_concept(pipe, images, config, base_model_name=args.model)
        return
    with tempfile.TemporaryDirectory(prefix="spectral-svd-") as svd_cache:  # the capacity's SVD, reused by training
        progress = _tqdm_progress(f"training {args.name}")
        try:
            record, result = train_into_library(
                library,
                pipe,
                request,
                images,
                model=args.model,
                progress=progress,
                svd_cache_dir=svd_cache,
            )
        finally:
            progress.close()  # an interrupted bar ends its line before the error message
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    emit(f"trained {record.name} into slot {record.slot}{resumed}: {record.adapter_path}")


def cmd_list(args: argparse.Namespace) -> None:
    records = _library(args).list()
    if args.model is not None:
        records = [record for record in records if record.base_model == args.model]
    if args.json:
        emit([record.to_json() for record in records])
        return
    if not records:
        emit(f"no concepts of {args.model} in {args.library}" if args.model else f"no concepts in {args.library}")
        return
    rows = [("NAME", "TOKEN", "SLOT", "VARIANT", "RANK", "BASE MODEL")]
    rows += [(r.name, " ".join(r.tokens), str(r.slot), r.variant, str(r.rank), r.base_model) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    emit("\n".join(lines + [""] + _capacity_lines(_library(args), records)))


def _capacity_lines(library, records) -> list[str]:
    """One line per base model: how many slots are taken of how many (at the smallest rank in use)."""
    lines = []
    for entry in slot_overview(library, base_models={r.base_fingerprint: r.base_model for r in records}):
        report = entry.report
        total = "?" if report.capacity is None else str(report.capacity)
        lines.append(
            f"{entry.base_model} (base {report.base_fingerprint}): {len(report.taken)} of {total} slots "
            f"taken at rank {report.rank}"
        )
    return lines


def _load_concepts(studio, library, names) -> None:
    for name in names:
        studio.load_concept(name, library.adapter(name))


# generate flags and the stored-settings keys they take their value from with --from-png
_FROM_PNG = {
    "prompt": "prompt",
    "negative": "negative_prompt",
    "steps": "steps",
    "guidance": "guidance",
    "seed": "seed",
    "width": "width",
    "height": "height",
    "scheduler": "scheduler",
    "regional_mode": "regional_mode",
}


def _with_png_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every flag left at its default from the settings stored in ``--from-png``."""
    from spectral_diffusion.frontends.cli import build_parser
    from spectral_diffusion.generation.pnginfo import read_settings

    settings = read_settings(args.from_png)
    defaults = build_parser().parse_args(["generate", "--out", "x"])
    for flag, key in _FROM_PNG.items():
        if getattr(args, flag) == getattr(defaults, flag) and settings.get(key) is not None:
            setattr(args, flag, settings[key])
    if not args.concepts and isinstance(settings.get("concepts"), dict):
        args.concepts = settings["concepts"]
    if not args.layout and not args.region and settings.get("layout"):
        args.layout = settings["layout"]
    return args


def _generation_request(args: argparse.Namespace, library):
    from spectral_diffusion.generation.request import GenerationRequest

    layout = build_layout(library, args.prompt or "", args.negative, args.layout, args.region)
    prompt = layout.prompt if layout is not None else args.prompt
    if prompt is None:
        raise SpectralDiffusionError("generate needs --prompt TEXT (or --layout FILE.json, or --from-png FILE)")
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=layout.negative if layout is not None else args.negative,
        concepts=args.concepts,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        scheduler=args.scheduler,
        mode="baked" if args.baked else "live",
        layout=layout,
        regional_mode=args.regional_mode,
    )


def check_png_out(out: str) -> None:
    """generate writes PNG only: its settings (what ``--from-png`` reads) live in PNG text chunks."""
    suffix = Path(out).suffix
    if suffix.lower() != ".png":
        what = f"a {suffix} file" if suffix else "a file without an extension"
        raise SpectralDiffusionError(
            f"generate writes PNG files (they store the settings --from-png reads), not {what}; "
            f"use --out {Path(out).with_suffix('.png')}"
        )


def cmd_generate(args: argparse.Namespace) -> None:
    from spectral_diffusion.generation.pnginfo import save_png

    check_png_out(args.out)
    if args.from_png:
        args = _with_png_settings(args)
    library = _library(args)
    request = _generation_request(args, library)  # every setting checked before the model is loaded
    check_concepts_exist(library, request.concepts)
    studio = _studio(args)
    _load_concepts(studio, library, request.concepts)
    started = time.perf_counter()
    images = studio.generate(request)
    paths = out_paths(args.out, len(images))
    for image, path in zip(images, paths, strict=True):
        save_png(image, path)
    logger.info("generated %d image(s) in %.1f s", len(images), time.perf_counter() - started)
    if request.seed is None:
        first = int(images[0].info["seed"])
        several = f" (image k: seed {first} + k)" if len(images) > 1 else ""
        print(f"seed {first}{several}", file=sys.stderr)
    emit("\n".join(str(path) for path in paths))


def cmd_fuse(args: argparse.Namespace) -> None:
    library, studio = _library(args), _studio(args)
    _load_concepts(studio, library, args.concepts)
    written = studio.export_fused(args.concepts, args.out, format=args.format)
    emit("\n".join(str(path) for path in written))


def cmd_export(args: argparse.Namespace) -> None:
    written = export_concept(_library(args), lambda: _studio(args), args.name, args.format, args.out)
    emit("\n".join(str(path) for path in written))


def cmd_import(args: argparse.Namespace) -> None:
    records = import_into_library(_library(args), args.file, name=args.name)
    emit("\n".join(f"imported {r.name} (slot {r.slot}, token {' '.join(r.tokens)})" for r in records))


def cmd_delete(args: argparse.Namespace) -> None:
    removed = _library(args).delete(args.name)
    if removed == ["checkpoint"]:
        emit(f"deleted the checkpoint of an unfinished training of {args.name}")
    else:
        emit(f"deleted {args.name}" + (" and its training checkpoint" if "checkpoint" in removed else ""))


def cmd_models(args: argparse.Namespace) -> None:
    from spectral_diffusion.models.registry import BUILTIN_MODELS, ensure_builtin

    rows = [
        {"name": name, "description": text, "path": str(ensure_builtin(name))} for name, text in BUILTIN_MODELS.items()
    ]
    if args.json:
        emit(rows)
    else:
        emit("\n".join(f"{row['name']}\t{row['path']}\n    {row['description']}" for row in rows))


__all__ = ["cmd_train", "cmd_list", "cmd_generate", "cmd_fuse", "cmd_export", "cmd_import", "cmd_delete", "cmd_models"]
