"""Spectral Diffusion: train concepts into slots of a Stable Diffusion model, fuse them, generate, export.

``spectral-diffusion <command>`` or ``python -m spectral_diffusion <command>``; the contract of every
command is in the repository's docs/design.md, section 6.

Every user mistake ends as one ``error: ...`` line on stderr and exit status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from spectral_diffusion.core.config import VARIANTS
from spectral_diffusion.formats import EXPORT_FORMATS
from spectral_diffusion.generation.request import DEFAULTS, REGIONAL_MODES
from spectral_diffusion.generation.schedulers import SCHEDULERS
from spectral_diffusion.images import MAX_IMAGES, MIN_IMAGES, RECOMMENDED_IMAGES
from spectral_diffusion.library.store import LIBRARY_ENV, default_library, stray_library_note
from spectral_diffusion.models.registry import BUILTIN_RANKS, DEFAULT_MODEL, DEFAULT_RANK
from spectral_diffusion.training.config import MIXED_PRECISION

EXIT_USER_ERROR = 2

logger = logging.getLogger("spectral_diffusion.frontends.cli")


def parse_concepts(text: str) -> dict[str, float]:
    """``"dog,cat:0.8"`` -> ``{"dog": 1.0, "cat": 0.8}`` (``core.strengths.parse_concepts``, as an argparse type)."""
    from spectral_diffusion.core.strengths import parse_concepts as parse
    from spectral_diffusion.errors import SpectralDiffusionError

    try:
        concepts = parse(text)
    except SpectralDiffusionError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not concepts:
        raise argparse.ArgumentTypeError("name at least one concept, e.g. --concepts dog,cat:0.8")
    return concepts


def _slot(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--slot takes 'auto' or a slot number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("--slot must be 0 or more")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="builtin:NAME, a hub id or a diffusers folder")
    parser.add_argument(
        "--library",
        default=str(default_library()),
        help=f"concept library folder (default: %(default)s, from ${LIBRARY_ENV} or the user's data folder)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="train one concept into the library")
    train.add_argument(
        "--images",
        required=True,
        help=f"folder of {RECOMMENDED_IMAGES[0]}-{RECOMMENDED_IMAGES[1]} images of the concept "
        f"(at least {MIN_IMAGES}, at most {MAX_IMAGES}); a photo.txt beside photo.png is its "
        "caption",
    )
    train.add_argument("--name", required=True)
    train.add_argument("--class-word", default="", help="what the concept is, e.g. dog")
    train.add_argument("--token", default=None, help="trigger token (default <NAME>)")
    ranks = ", ".join(f"{rank} on {name}" for name, rank in BUILTIN_RANKS.items())
    train.add_argument("--rank", type=int, default=None, help=f"slot width r (default {DEFAULT_RANK}; {ranks})")
    train.add_argument("--slot", type=_slot, default=None, help="auto (lowest free) or a slot number")
    train.add_argument("--variant", choices=VARIANTS, default="additive")
    train.add_argument("--steps", type=int, default=None, help="optimiser steps (default or 0: the model's own)")
    train.add_argument("--resolution", type=int, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="no")
    train.add_argument("--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N steps")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this name")
    train.add_argument(
        "--masks",
        default=None,
        help="folder of foreground masks, one per image under the same file name (white = the "
        "concept); the loss on the background is down-weighted",
    )


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="generate images with concepts fused")
    gen.add_argument("--prompt", default=None, help="the prompt (required unless --layout FILE.json or --from-png)")
    gen.add_argument(
        "--concepts", type=parse_concepts, default={}, help="a,b:0.8 (strength 1.0 if omitted; each concept once)"
    )
    gen.add_argument("--negative", default=DEFAULTS.negative_prompt)
    gen.add_argument("--steps", type=int, default=DEFAULTS.steps)
    gen.add_argument("--guidance", type=float, default=DEFAULTS.guidance)
    gen.add_argument("--seed", type=int, default=DEFAULTS.seed, help="-1: a random seed (printed)")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument(
        "--num-images", type=int, default=DEFAULTS.num_images, help="image k is drawn from seed + k (stored in its PNG)"
    )
    gen.add_argument("--scheduler", default=DEFAULTS.scheduler, help=", ".join(SCHEDULERS))
    gen.add_argument("--baked", action="store_true", help="merge the concepts into the weights first")
    gen.add_argument(
        "--regional-mode",
        default=DEFAULTS.regional_mode,
        choices=REGIONAL_MODES,
        help="how a layout is drawn: passes (one UNet pass per region, only its concept on; the default) or "
        "routed (one pass, each concept's slot routed to its box: faster, concepts less alike)",
    )
    gen.add_argument(
        "--layout",
        default=None,
        help="regional composition: FILE.json, or auto / left-right / top-bottom / thirds / grid "
        "(concepts placed in the order their tokens appear in the prompt)",
    )
    gen.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="NAME:x0,y0,x1,y1:PROMPT",
        help="one concept's box (fractions of the image) and region prompt; repeat per concept "
        "(with --concepts, each placed concept must be in it)",
    )
    gen.add_argument(
        "--from-png",
        default=None,
        metavar="FILE",
        help="take the settings stored in an image this tool generated (flags given override)",
    )
    gen.add_argument(
        "--out",
        required=True,
        help="FILE.png, PNG only: it stores the settings (several images: FILE-0.png, FILE-1.png, ...)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectral-diffusion", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    listing = sub.add_parser("list", help="list the library")
    listing.add_argument("--json", action="store_true")
    _add_generate(sub)

    fuse = sub.add_parser("fuse", help="write several concepts as one file")
    fuse.add_argument("--concepts", type=parse_concepts, required=True)
    fuse.add_argument("--out", required=True)
    fuse.add_argument("--format", choices=EXPORT_FORMATS, default="spectral")

    export = sub.add_parser("export", help="write one concept as a file")
    export.add_argument("name")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="spectral")
    export.add_argument("--out", required=True)

    imp = sub.add_parser("import", help="add an adapter file, or every concept of a fused bundle, to the library")
    imp.add_argument("file")
    imp.add_argument("--name", default=None)

    delete = sub.add_parser("delete", help="remove a concept and free its slot")
    delete.add_argument("name")

    models = sub.add_parser("models", help="the built-in models and where they are saved")
    models.add_argument("--json", action="store_true")

    for child in sub.choices.values():
        _common(child)
    listing.set_defaults(model=None)  # list shows every base model unless --model picks one
    return parser


def _quiet_third_party() -> None:
    """Hide diffusers/transformers chatter (loading bars, optional-dependency notes) unless -v."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    from spectral_diffusion.errors import SpectralDiffusionError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        _quiet_third_party()
    from spectral_diffusion.frontends import cli_commands

    if args.library == str(default_library()):  # concepts of the old default (./concepts) are not lost from view
        note = stray_library_note(args.library)
        if note:
            logger.warning(note)
    try:
        getattr(cli_commands, f"cmd_{args.command}")(args)
    except SpectralDiffusionError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        print(f"error: {error.strerror}: {error.filename}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"error: {cli_commands.interrupted_message(args)}", file=sys.stderr)
        return 130
    return 0
