"""Spectral Diffusion web app: train concepts, manage the library, generate with concepts fused.

    python app.py [--model builtin:toy] [--library concepts] [--host 127.0.0.1] [--port 7860]
                  [--auth user:password] [--share] [--device cpu]

The page is a thin layer over ``spectral_diffusion.frontends.service.Service``; nothing is loaded until a
request needs the model. Every action is also a named API endpoint for ``gradio_client``:

    train_concept(images, name, class_word, variant, rank, steps) -> (progress html, previews, record)
    list_concepts() -> [record, ...]
    delete_concept(name, confirm) -> message
    import_concept(file, name) -> record
    export_concept(name, format) -> [files]
    generate(prompt, concepts, negative, seed, steps, guidance, width, height, num_images, scheduler)
        -> (images, message)
    export_fused(concepts, format) -> [files]
    cancel_training() -> message

``concepts`` is text: ``"dog,cat:0.8"`` (strength 1.0 when omitted) or JSON ``{"dog": 1, "cat": 0.8}``.
"""

from __future__ import annotations

import argparse
import functools
import html
import inspect
import os
import sys
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from spectral_diffusion.errors import SpectralDiffusionError  # noqa: E402
from spectral_diffusion.frontends.service import (  # noqa: E402
    EXPORT_FORMATS,
    Service,
    TrainingStatus,
    default_rank,
    format_concepts,
    parse_concepts,
)

DEFAULT_MODEL = "builtin:toy"
DEFAULT_LIBRARY = "concepts"
CONCEPT_ROWS = 8  # concept pickers on the Generate tab (4 shown, 4 more folded)
SCHEDULERS = ["default", "ddim", "dpm++", "euler", "euler-a"]
VARIANTS = ["additive", "rotational"]
MAX_FILE_SIZE = "1gb"  # one upload: images are limited further by data.py, adapters can be large (SDXL)
POLL_SECONDS = 0.5

CSS = """
.sd-bar {height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; margin: 4px 0 6px 0;}
.sd-bar > div {height: 100%; background: var(--color-accent); transition: width .3s;}
.sd-status {font-size: 0.95em;}
"""


# ----- errors ---------------------------------------------------------------------------------------


def _user_message(error: Exception) -> str:
    # gradio 6 shows an error's text verbatim (trigger tokens like <my-dog> stay visible): no escaping
    return str(error) or type(error).__name__


def user_errors(fn: Callable) -> Callable:
    """Show the package's errors (and ValueError from bad input) as ``gr.Error``; keeps generators."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (SpectralDiffusionError, ValueError) as error:
                raise gr.Error(_user_message(error), print_exception=False) from error

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (SpectralDiffusionError, ValueError) as error:
            raise gr.Error(_user_message(error), print_exception=False) from error

    return wrapper


# ----- small conversions ----------------------------------------------------------------------------


def _file_paths(files) -> list[str]:
    """Paths of gr.File values (str paths, FileData-like dicts or objects with ``.name``)."""
    if files is None:
        return []
    if not isinstance(files, (list, tuple)):
        files = [files]
    paths = []
    for item in files:
        if isinstance(item, dict):
            item = item.get("path") or item.get("name")
        elif not isinstance(item, (str, os.PathLike)):
            item = getattr(item, "path", None) or getattr(item, "name", None)
        if item:
            paths.append(str(item))
    return paths


def _whole(label: str, value, minimum: int = 0) -> int:
    """An int from a number widget or an API argument (None and "" mean 0)."""
    if value is None or value == "":
        return 0
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a whole number, got {value!r}") from None
    if number != int(number) or number < minimum:
        raise ValueError(f"{label} must be a whole number of at least {minimum}, got {value!r}")
    return int(number)


def _real(label: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a number, got {value!r}") from None


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def progress_html(status: TrainingStatus) -> str:
    """The Train tab's progress bar: state, step, loss and ETA."""
    name = html.escape(status.name)
    if status.state == "done":
        fraction, text = 1.0, f"Done: {html.escape(status.message)}"
    elif status.state == "idle":
        fraction, text = 0.0, html.escape(status.message)
    elif status.state == "preparing":
        fraction, text = 0.0, f"{name + ': ' if name else ''}{html.escape(status.message or 'preparing')}…"
    else:
        total = max(status.total_steps, 1)
        fraction = status.step / total
        loss = "…" if status.loss is None else f"{status.loss:.4f}"
        text = f"Training {name}: step {status.step}/{total} · loss {loss} · ETA {_eta(status.eta_seconds)}"
        if status.state in ("cancelled", "failed"):
            text = f"{name}: {html.escape(status.message)}"
    return (
        f'<div class="sd-status"><div class="sd-bar"><div style="width:{fraction * 100:.1f}%"></div></div>'
        f'<span id="train-status-text">{text}</span></div>'
    )


def record_json(record, this_model: bool = True) -> dict:
    """What the API says about one concept (no server paths)."""
    return {
        "name": record.name,
        "token": record.token,
        "tokens": list(record.tokens),
        "slot": record.slot,
        "rank": record.rank,
        "variant": record.variant,
        "class_word": record.class_word,
        "base_model": record.base_model,
        "base_fingerprint": record.base_fingerprint,
        "created_at": record.created_at,
        "image_count": record.image_count,
        "this_model": this_model,
    }


def _card(record):
    """(image, caption) for a concept card."""
    from PIL import Image

    image = None
    if record.preview_path is not None and Path(record.preview_path).is_file():
        try:
            with Image.open(record.preview_path) as raw:
                image = raw.convert("RGB")
        except OSError:
            image = None
    if image is None:
        image = Image.new("RGB", (64, 64), (225, 228, 235))
    return image, record.token or record.name


def stack_images(images):
    """Pictures one under the other on white (the slot maps of several base models as one image)."""
    from PIL import Image

    if not images:
        return None
    width = max(image.width for image in images)
    out = Image.new("RGB", (width, sum(image.height for image in images)), (255, 255, 255))
    top = 0
    for image in images:
        out.paste(image, (0, top))
        top += image.height
    return out


TABLE_HEADERS = ["name", "trigger token", "slot", "variant", "rank", "class word", "images", "base model", "created"]


def _table_row(record) -> list:
    return [record.name, " ".join(record.tokens), record.slot, record.variant, record.rank, record.class_word,
            record.image_count, record.base_model, record.created_at]


# ----- the app --------------------------------------------------------------------------------------


def build_app(service: Service) -> gr.Blocks:
    """The Blocks app over ``service``; launch it with ``launch(demo, ...)``."""

    # ----- API functions (named endpoints) ----------------------------------------------------------

    @user_errors
    def train_concept(images, name, class_word, variant, rank, steps):
        paths = _file_paths(images)
        if not paths:
            raise gr.Error("upload the concept's images first (3-20 photos work best)")
        name = (name or "").strip()
        if not name:
            raise gr.Error("give the concept a name, e.g. my-dog (its trigger token will be <my-dog>)")
        future = service.start_training(
            name,
            paths,
            class_word=(class_word or "").strip(),
            variant=variant or "additive",
            rank=_whole("rank", rank) or None,
            steps=_whole("steps", steps) or None,
        )
        shown = -1
        while True:
            try:
                record = future.result(timeout=POLL_SECONDS)
                break
            except FutureTimeout:
                status = service.status
                previews = gr.skip()
                if len(status.previews) != shown:
                    shown = len(status.previews)
                    previews = list(status.previews)
                yield progress_html(status), previews, gr.skip()
            except Exception:
                yield progress_html(service.status), gr.skip(), gr.skip()  # show "cancelled" / "failed"
                raise
        yield progress_html(service.status), list(service.status.previews), record_json(record)

    @user_errors
    def cancel_training():
        if service.cancel_training():
            return "cancelling: the training stops after its current step"
        return "no training is running"

    @user_errors
    def list_concepts():
        fingerprint = service.fingerprint
        return [record_json(r, r.base_fingerprint == fingerprint) for r in service.concepts(this_model_only=False)]

    @user_errors
    def delete_concept(name, confirm):
        if not name:
            raise gr.Error("pick the concept to delete")
        if not confirm:
            raise gr.Error(f"tick “I am sure” to delete {name}: this cannot be undone")
        service.delete_concept(name)
        return f"deleted {name}"

    @user_errors
    def import_concept(file, name):
        paths = _file_paths(file)
        if len(paths) != 1:
            raise gr.Error("upload one adapter file (.safetensors)")
        record = service.import_concept(paths[0], name=(name or "").strip() or None)
        return record_json(record)

    @user_errors
    def export_concept(name, format):
        if not name:
            raise gr.Error("pick the concept to download")
        return [str(p) for p in service.export_concept(name, format or "spectral")]

    @user_errors
    def generate(prompt, concepts, negative, seed, steps, guidance, width, height, num_images, scheduler):
        seed_value = None if seed is None or seed == "" or _real("seed", seed) < 0 else _whole("seed", seed)
        images = service.generate(
            prompt or "",
            parse_concepts(concepts or ""),
            negative_prompt=negative or "",
            seed=seed_value,
            steps=_whole("steps", steps, 1),
            guidance=_real("guidance", guidance),
            width=_whole("width", width) or None,
            height=_whole("height", height) or None,
            num_images=_whole("num_images", num_images, 1),
            scheduler=scheduler or "default",
        )
        used = images[0].info.get("seed", seed_value) if images else seed_value
        paths = service.save_images(images, stem=f"seed{used}")
        return [str(p) for p in paths], f"{len(paths)} image(s), seed {used}"

    @user_errors
    def export_fused(concepts, format):
        chosen = parse_concepts(concepts or "")
        if not chosen:
            raise gr.Error("pick at least one concept to fuse")
        return [str(p) for p in service.export_fused(chosen, format or "spectral")]

    # ----- page helpers (private events) ------------------------------------------------------------

    def slot_info(rank):
        try:
            rank = _whole("rank", rank) or default_rank(service.model)
            slot = service.next_slot(rank)
            capacity = service.capacity(rank)
        except (SpectralDiffusionError, ValueError) as error:
            return f"**No slot available:** {html.escape(str(error))}"
        return (f"This concept will take **slot {slot}** of `{service.model}` "
                f"(rank {rank}: {capacity} slots of singular vectors).")

    def refresh(selected, *rows):
        fingerprint = service.fingerprint
        records = service.concepts(this_model_only=False)
        here = [r for r in records if r.base_fingerprint == fingerprint]
        names = [r.name for r in here]
        all_names = [r.name for r in records]
        cards = [_card(r) for r in records]
        maps = stack_images([image for _, image in service.slot_maps()])
        table = [_table_row(r) for r in records]
        listing = [record_json(r, r.base_fingerprint == fingerprint) for r in records]
        pick = gr.Dropdown(choices=all_names, value=selected if selected in all_names else None)
        row_updates = [gr.Dropdown(choices=names, value=v if v in names else None) for v in rows]
        return (maps, cards, table, listing, pick, [_card(r) for r in here], names, all_names, *row_updates)

    def pick_concept(evt: gr.SelectData, names, prompt, *rows):
        """Clicking a concept card: its trigger token goes into the prompt, the concept into a row."""
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        if not names or index >= len(names):
            return (gr.skip(),) * (1 + len(rows))
        name = names[index]
        record = next((r for r in service.concepts() if r.name == name), None)
        token = record.token if record else f"<{name}>"
        prompt = prompt or ""
        if token not in prompt:
            prompt = f"{prompt.rstrip()} {token}".strip()
        values = list(rows)
        if name not in values:
            free = next((i for i, v in enumerate(values) if not v), None)
            if free is not None:
                values[free] = name
        return (prompt, *values)

    def select_card(evt: gr.SelectData, names):
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        return names[index] if names and index < len(names) else gr.skip()

    def rows_to_spec(*values):
        names, strengths = values[:CONCEPT_ROWS], values[CONCEPT_ROWS:]
        chosen = {}
        for name, strength in zip(names, strengths, strict=True):
            if name:
                chosen[name] = float(strength)
        return format_concepts(chosen)

    # ----- layout -----------------------------------------------------------------------------------

    rank0 = default_rank(service.model)
    with gr.Blocks(title="Spectral Diffusion", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# Spectral Diffusion\nTeach the model your concepts from a few photos each, then fuse them in one "
            f"prompt. Model `{service.model}` · library `{service.library.root}`"
        )
        card_names = gr.State([])  # concepts of the Generate tab's cards, in order
        library_names = gr.State([])  # concepts of the Library tab's cards, in order
        with gr.Tabs():
            # ----- Train ----------------------------------------------------------------------------
            with gr.Tab("Train", id="train"), gr.Row():
                with gr.Column(scale=3):
                    images = gr.File(label="Images of the concept (drag and drop 3-20 photos)",
                                     file_count="multiple", file_types=["image"], elem_id="train-images")
                    with gr.Row():
                        name = gr.Textbox(label="Name", placeholder="my-dog", elem_id="train-name")
                        class_word = gr.Textbox(label="Class word", placeholder="dog", elem_id="train-class")
                    with gr.Row():
                        variant = gr.Radio(VARIANTS, value="additive", label="Variant",
                                           info="rotational: zero interference between concepts")
                        rank = gr.Number(value=rank0, precision=0, minimum=1, label="Rank",
                                         elem_id="train-rank")
                        steps = gr.Number(value=0, precision=0, minimum=0, label="Steps (0 = automatic)",
                                          elem_id="train-steps")
                    slot_md = gr.Markdown(elem_id="train-slot")
                    with gr.Row():
                        train_button = gr.Button("Train", variant="primary", elem_id="train-button")
                        cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
                with gr.Column(scale=2):
                    progress = gr.HTML(progress_html(TrainingStatus(message="no training yet")),
                                       label="Progress", elem_id="train-progress")
                    previews = gr.Gallery(label="Previews", columns=3, height=260, format="png",
                                          elem_id="train-previews")
                    trained = gr.JSON(label="Trained concept", elem_id="train-result")
                    cancel_md = gr.Markdown()

            # ----- Library --------------------------------------------------------------------------
            with gr.Tab("Library", id="library"), gr.Row():
                with gr.Column(scale=3):
                    gr.Markdown("**Slot maps**: which singular-vector slots each base model's concepts hold")
                    slot_maps = gr.Image(show_label=False, type="pil", format="png", interactive=False,
                                         elem_id="slot-maps")
                    cards = gr.Gallery(label="Concepts", columns=5, height=240, format="png", preview=False,
                                       fit_columns=False, object_fit="contain", elem_id="library-cards")
                    table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, wrap=True,
                                         elem_id="library-table")
                    refresh_button = gr.Button("Refresh", size="sm")
                    with gr.Accordion("Library as JSON", open=False):
                        listing = gr.JSON(label="list_concepts")
                with gr.Column(scale=2):
                    selected = gr.Dropdown(label="Concept", choices=[], allow_custom_value=True,
                                           elem_id="library-concept")
                    with gr.Group():
                        export_format = gr.Radio(list(EXPORT_FORMATS), value="spectral", label="Download as",
                                                 info="spectral: our adapter · lora: diffusers/PEFT · "
                                                      "kohya: AUTOMATIC1111/ComfyUI (+ textual inversion)")
                        export_button = gr.Button("Download")
                        exported = gr.File(label="Files", file_count="multiple", interactive=False)
                    with gr.Group():
                        sure = gr.Checkbox(label="I am sure: delete this concept and free its slot")
                        delete_button = gr.Button("Delete", variant="stop")
                        delete_md = gr.Markdown()
                    with gr.Group():
                        import_file = gr.File(label="Import an adapter (.safetensors)",
                                              file_types=[".safetensors"])
                        import_name = gr.Textbox(label="Import under the name (optional)")
                        import_button = gr.Button("Import")
                        imported = gr.JSON(label="Imported concept")

            # ----- Generate -------------------------------------------------------------------------
            with gr.Tab("Generate", id="generate"):
                with gr.Row(equal_height=True):
                    prompt = gr.Textbox(label="Prompt (click a concept below to insert its trigger token)", lines=2,
                                        scale=5, elem_id="generate-prompt",
                                        placeholder="a photo of <my-dog> and <my-cat> on a sofa")
                    generate_button = gr.Button("Generate", variant="primary", scale=1, elem_id="generate-button")
                with gr.Row():
                    with gr.Column(scale=1):
                        gen_cards = gr.Gallery(label="Your concepts: click one to use it", columns=5, height=170,
                                               allow_preview=False, preview=False, fit_columns=False,
                                               object_fit="contain", format="png", elem_id="generate-cards")
                        row_names, row_strengths = [], []

                        def concept_row(index):
                            with gr.Row(equal_height=True):
                                row_names.append(gr.Dropdown(choices=[], label=f"Concept {index + 1}", scale=2,
                                                             allow_custom_value=True, elem_id=f"concept-{index}"))
                                row_strengths.append(gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Strength",
                                                               scale=3, elem_id=f"strength-{index}"))

                        for index in range(CONCEPT_ROWS // 2):
                            concept_row(index)
                        with gr.Accordion("More concepts", open=False):
                            for index in range(CONCEPT_ROWS // 2, CONCEPT_ROWS):
                                concept_row(index)
                        concepts = gr.Textbox(label="Fused concepts (name:strength, …; filled from the rows)",
                                              elem_id="generate-concepts")
                        negative = gr.Textbox(label="Negative prompt", elem_id="generate-negative")
                        with gr.Row():
                            seed = gr.Number(value=0, precision=0, label="Seed (-1 = random)", elem_id="seed")
                            gen_steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="gen-steps")
                            guidance = gr.Slider(0.0, 20.0, value=7.5, step=0.5, label="Guidance")
                        with gr.Row():
                            width = gr.Number(value=0, precision=0, minimum=0, step=8, label="Width (0 = model's)")
                            height = gr.Number(value=0, precision=0, minimum=0, step=8,
                                               label="Height (0 = model's)")
                            num_images = gr.Slider(1, 8, value=1, step=1, label="Images")
                            scheduler = gr.Dropdown(SCHEDULERS, value="default", label="Scheduler")
                    with gr.Column(scale=1):
                        gallery = gr.Gallery(label="Images", columns=2, height=440, format="png",
                                             elem_id="generate-gallery")
                        gen_info = gr.Markdown(elem_id="generate-info")
                        with gr.Group():
                            fused_format = gr.Radio(list(EXPORT_FORMATS), value="spectral",
                                                    label="Download the fused adapter as")
                            fused_button = gr.Button("Download fused adapter")
                            fused_files = gr.File(label="Fused files", file_count="multiple", interactive=False)

        # ----- events -------------------------------------------------------------------------------
        private = {"api_visibility": "private"}
        refresh_outputs = [slot_maps, cards, table, listing, selected, gen_cards, card_names, library_names,
                           *row_names]
        refresh_inputs = [selected, *row_names]

        def after(event):
            """Refresh the library views and the slot hint after an event, whatever its outcome."""
            return event.then(refresh, refresh_inputs, refresh_outputs, **private).then(
                slot_info, rank, slot_md, **private)

        demo.load(refresh, refresh_inputs, refresh_outputs, **private).then(slot_info, rank, slot_md, **private)
        rank.change(slot_info, rank, slot_md, **private)

        after(train_button.click(train_concept, [images, name, class_word, variant, rank, steps],
                                 [progress, previews, trained], api_name="train_concept", concurrency_limit=None))
        cancel_button.click(cancel_training, None, cancel_md, api_name="cancel_training", concurrency_limit=None)

        refresh_button.click(list_concepts, None, listing, api_name="list_concepts").then(
            refresh, refresh_inputs, refresh_outputs, **private)
        export_button.click(export_concept, [selected, export_format], exported, api_name="export_concept")
        after(delete_button.click(delete_concept, [selected, sure], delete_md, api_name="delete_concept")).then(
            lambda: False, None, sure, **private)
        after(import_button.click(import_concept, [import_file, import_name], imported, api_name="import_concept"))

        cards.select(select_card, library_names, selected, **private)
        gen_cards.select(pick_concept, [card_names, prompt, *row_names], [prompt, *row_names], **private)
        gr.on([c.change for c in row_names + row_strengths], rows_to_spec, row_names + row_strengths, concepts,
              show_progress="hidden", **private)
        generate_button.click(
            generate,
            [prompt, concepts, negative, seed, gen_steps, guidance, width, height, num_images, scheduler],
            [gallery, gen_info],
            api_name="generate",
            concurrency_limit=1,
            concurrency_id="generate",  # one queue with the prompt's Enter key
        )
        prompt.submit(
            generate,
            [prompt, concepts, negative, seed, gen_steps, guidance, width, height, num_images, scheduler],
            [gallery, gen_info],
            concurrency_limit=1,
            concurrency_id="generate",
            **private,
        )
        fused_button.click(export_fused, [concepts, fused_format], fused_files, api_name="export_fused")

    demo.queue(max_size=256, default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, auth: str | None = None,
           share: bool = False, prevent_thread_lock: bool = False, quiet: bool = False):
    """Start the server with the app's settings; returns what ``Blocks.launch`` returns."""
    credentials = parse_auth(auth) if auth else None
    return demo.launch(
        server_name=host,
        server_port=port,
        auth=credentials,
        share=share,
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        show_error=True,
        max_file_size=MAX_FILE_SIZE,
        ssr_mode=False,
        theme=gr.themes.Soft(),
        css=CSS,
    )


def parse_auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth needs user:password")
    return user, password


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Spectral Diffusion web app")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="builtin:toy (default), builtin:tiny, a Hugging Face model id or a local diffusers folder")
    parser.add_argument("--library", default=DEFAULT_LIBRARY, help="concept library folder (default: concepts)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require this login")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    args = parser.parse_args(argv)
    if args.auth is not None:
        try:
            parse_auth(args.auth)
        except ValueError as error:
            parser.error(str(error))
    service = Service(model=args.model, library=args.library, device=args.device)  # loads nothing yet
    demo = build_app(service)
    launch(demo, args.host, args.port, auth=args.auth, share=args.share, prevent_thread_lock=True, quiet=True)
    print(f"Spectral Diffusion is running at {demo.local_url}", flush=True)
    if demo.share_url:
        print(f"public link: {demo.share_url}", flush=True)
    demo.block_thread()  # until Ctrl-C, which closes the server
    return 0


if __name__ == "__main__":
    sys.exit(main())
