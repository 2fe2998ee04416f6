"""Spectral Diffusion web app: train concepts, manage the library, generate with concepts fused.

    python app.py [--model builtin:toy] [--library concepts] [--host 127.0.0.1] [--port 7860]
                  [--auth user:password] [--share] [--device cpu]

The page is a thin layer over ``spectral_diffusion.frontends.service.Service``; nothing is loaded until a
request needs the model. This file lays out the page (one builder per tab) and wires its events to the
handlers of ``app_ui.py``. Every action is also a named API endpoint for ``gradio_client``:

    train_concept(images, name, class_word, variant, rank, steps,
                  [lr_unet, lr_text, lr_embedding, batch_size, resolution, seed, masks, captions])
        -> (status, previews, record); status: {name, state, step, total_steps, loss, eta_seconds, slot, token,
           message}, state preparing / running / done (record set) / cancelled / failed (both raise)
    list_concepts() -> [record, ...]
    delete_concept(name, confirm) -> message
    import_concept(file, name) -> record
    export_concept(name, format) -> [files]
    generate(prompt, concepts, negative, seed, steps, guidance, width, height, num_images, scheduler, [layout])
        -> (images, message)
    export_fused(concepts, format) -> [files]
    cancel_training() -> message

``concepts`` is text: ``"dog,cat:0.8"`` (strength 1.0 when omitted) or JSON ``{"dog": 1, "cat": 0.8}``.
``layout`` (optional, "" = global fusion): ``auto``, a preset (``left-right``, ``top-bottom``, ``thirds``,
``grid``) or a layout JSON ``{"prompt", "negative", "regions": [{"concept", "box": [x0, y0, x1, y1], "prompt"}]}``.
Bracketed parameters are optional: calls without them work as before.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import sys
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import httpx  # noqa: E402

import app_ui as handlers  # noqa: E402
import app_values  # noqa: E402
from app_tabs import (  # noqa: E402
    CONCEPT_ROWS,
    CSS,
    MAX_FILE_SIZE,
    PRIVATE,
    QUIET,
    GenerateTab,
    LibraryTab,
    TrainTab,
    build_generate_tab,
    build_library_tab,
    build_train_tab,
    card_index,
)
from spectral_diffusion.frontends.service import Service  # noqa: E402
from spectral_diffusion.library.store import LIBRARY_ENV, default_library  # noqa: E402
from spectral_diffusion.models.registry import DEFAULT_MODEL, default_rank  # noqa: E402

# run as a script this module is __main__: the app's loggers share the name "app" (see app_ui.py)
logger = logging.getLogger("app")

STARTUP_SECONDS = 180  # how long start-up waits for the page to answer (a loaded machine is slow, not broken)
# after a success: close the error toasts of earlier failures (gradio keeps them for 10 s, or until closed)
CLOSE_ERROR_TOASTS = "() => document.querySelectorAll('.toast-body.error [data-testid=toast-close]').forEach(b => b.click())"
# the prompt box's caret as a character offset, kept when the box loses focus (a concept card is clicked)
PROMPT_CARET = "() => { const box = document.querySelector('#generate-prompt textarea'); " \
               "return box ? Array.from(box.value.slice(0, box.selectionStart)).length : -1; }"


class PageEvents:
    """The built tabs and the events between them; ``wire`` attaches every event once."""

    def __init__(self, service: Service, train: TrainTab, library: LibraryTab, generate: GenerateTab):
        self.service, self.train, self.library, self.generate = service, train, library, generate
        self.card_names = gr.State([])  # concepts of the Generate tab's cards, in order
        self.library_names = gr.State([])  # concepts of the Library tab's cards, in order
        self.refresh_inputs = [library.selected, *generate.row_names]
        self.refresh_outputs = [library.slot_maps, library.cards, library.table, library.listing, library.selected,
                                generate.cards, self.card_names, self.library_names, *generate.row_names]
        self.slot_inputs = [train.rank, train.name]
        self.selected_image = gr.State(None)  # the index of the generated image clicked last
        # outputs of events that can fail: each shows a red Error badge until an event updates it again
        self.error_outputs = [generate.gallery, generate.info, generate.fused_files, library.exported,
                              library.delete_message, library.listing, library.imported]

    def bound(self, handler):
        """``handler`` with the service as its first argument (the API keeps the other parameters' names).
        A plain handler runs in a thread of its own (``handlers.in_own_thread``: no model work on gradio's
        long-lived threads); a generator only follows a training, which has its own thread."""
        bound = functools.partial(handler, self.service)
        bound.__name__ = handler.__name__  # gradio names an event after its function
        bound.__doc__ = None  # and describes an endpoint with its docstring: partial's would show
        return bound if inspect.isgeneratorfunction(handler) else handlers.in_own_thread(bound)

    def clear_errors(self, event):
        """Once ``event`` succeeds, nothing of earlier failures stays: their error toasts close and the red
        Error badges they left on other outputs clear (a no-change update of those outputs ends their
        error state)."""
        return event.success(lambda: (gr.skip(),) * len(self.error_outputs), None, self.error_outputs,
                             js=CLOSE_ERROR_TOASTS, show_progress="hidden", **PRIVATE)

    def then_refresh(self, event):
        """Refresh the library views and the slot hint after ``event``, whatever its outcome."""
        return event.then(self.bound(handlers.refresh), self.refresh_inputs, self.refresh_outputs, **PRIVATE).then(
            self.bound(handlers.slot_info), self.slot_inputs, self.train.slot_hint, **PRIVATE)

    def wire(self, demo: gr.Blocks) -> None:
        slot_info = self.bound(handlers.slot_info)
        demo.load(self.bound(handlers.refresh), self.refresh_inputs, self.refresh_outputs, **PRIVATE).then(
            slot_info, self.slot_inputs, self.train.slot_hint, **PRIVATE)
        # the name is checked as it is typed: "name taken" shows in the slot line, before Train is pressed
        gr.on([self.train.rank.change, self.train.name.change], slot_info, self.slot_inputs, self.train.slot_hint,
              **QUIET)
        self.wire_train()
        self.wire_library()
        self.wire_generate()

    def wire_train(self) -> None:
        tab = self.train
        inputs = [tab.images, tab.name, tab.class_word, tab.variant, tab.rank, tab.steps, *tab.advanced]
        # the page's button: every outcome in the status line, a cancel as a notice (no Error badges)
        trained = tab.train_button.click(
            self.bound(handlers.train_on_page), inputs,
            [tab.progress, tab.previews, tab.trained, tab.loss_chart, tab.cancel_message, tab.name],
            concurrency_limit=None, **PRIVATE)
        self.clear_errors(trained)
        self.then_refresh(trained)
        # the API's endpoint (bad input and a cancel are errors for a client) on a button never shown
        self.then_refresh(tab.api_trigger.click(self.bound(handlers.train_concept), inputs,
                                                [tab.api_status, tab.previews, tab.api_record],
                                                api_name="train_concept", concurrency_limit=None))
        tab.cancel_button.click(self.bound(handlers.cancel_training), None, tab.cancel_message,
                                api_name="cancel_training", concurrency_limit=None)
        tab.images.change(handlers.upload_thumbnails, tab.images, tab.thumbnails, **QUIET)
        captions = tab.advanced[-1]
        tab.images.change(handlers.caption_rows, [tab.images, captions], captions, **QUIET)

    def wire_library(self) -> None:
        tab = self.library
        listed = tab.refresh_button.click(self.bound(handlers.list_concepts), None, tab.listing,
                                          api_name="list_concepts")
        listed.then(self.bound(handlers.refresh), self.refresh_inputs, self.refresh_outputs, **PRIVATE)
        exported = tab.export_button.click(self.bound(handlers.export_concept), [tab.selected, tab.export_format],
                                           tab.exported, api_name="export_concept")
        deleted = tab.delete_button.click(self.bound(handlers.delete_concept), [tab.selected, tab.sure],
                                          tab.delete_message, api_name="delete_concept")
        self.then_refresh(deleted).then(lambda: False, None, tab.sure, **PRIVATE)
        imported = tab.import_button.click(self.bound(handlers.import_concept), [tab.import_file, tab.import_name],
                                           tab.imported, api_name="import_concept")
        imported.success(handlers.imported_summary, tab.imported, tab.imported_summary, **PRIVATE)
        imported.failure(lambda: "", None, tab.imported_summary, **PRIVATE)  # no summary of an earlier import
        self.then_refresh(imported)
        for event in (listed, exported, deleted, imported):
            self.clear_errors(event)

        def select_card(evt: gr.SelectData, names):
            return handlers.select_card(card_index(evt), names)

        tab.cards.select(select_card, self.library_names, tab.selected, **PRIVATE)

    def wire_generate(self) -> None:
        tab = self.generate

        def pick_concept(evt: gr.SelectData, names, prompt, cursor, *rows):
            return handlers.pick_concept(self.service, card_index(evt), names, prompt, cursor, *rows)

        # a card's token goes in at the prompt's caret: the box remembers it as it loses focus to the click
        tab.prompt.blur(None, None, tab.prompt_cursor, js=PROMPT_CARET, **PRIVATE)
        tab.cards.select(pick_concept, [self.card_names, tab.prompt, tab.prompt_cursor, *tab.row_names],
                         [tab.prompt, tab.prompt_cursor, *tab.row_names], **PRIVATE)
        rows = tab.row_names + tab.row_strengths
        gr.on([row.change for row in rows], handlers.rows_to_spec, rows, tab.concepts, show_progress="hidden",
              **PRIVATE)
        self.wire_layout()
        # the button and the prompt's Enter key are one event: one endpoint, one queue
        generated = gr.on([tab.generate_button.click, tab.prompt.submit], self.bound(handlers.generate),
                          [tab.prompt, tab.concepts, *tab.settings, tab.layout_text], [tab.gallery, tab.info],
                          api_name="generate", concurrency_limit=1)
        generated.success(handlers.result_overlay, tab.gallery, tab.overlay, **PRIVATE)
        generated.success(lambda: None, None, self.selected_image, **PRIVATE)  # new images: none selected
        self.clear_errors(generated)
        fused = tab.fused_button.click(self.bound(handlers.export_fused), [tab.concepts, tab.fused_format],
                                       tab.fused_files, api_name="export_fused")
        self.clear_errors(fused)

    def wire_layout(self) -> None:
        """The layout editor: any change redraws the layout and rewrites the generate endpoint's layout text;
        a PNG's settings fill every field (which then redraws the layout)."""
        tab = self.generate
        negative, width, height = tab.settings[0], tab.settings[4], tab.settings[5]
        inputs = [tab.layout_mode, tab.prompt, negative, width, height, *tab.layout_rows]
        gr.on([component.change for component in inputs], self.bound(handlers.layout_editor), inputs,
              [tab.layout_text, tab.layout_picture, *[row.box_row for row in tab.rows]], **QUIET)
        loaded = [tab.prompt, *tab.settings[:6], tab.settings[7], *tab.row_names, *tab.row_strengths,
                  tab.layout_mode, *tab.layout_rows[CONCEPT_ROWS:], tab.settings_message]
        tab.settings_file.upload(functools.partial(handlers.load_settings, rows=CONCEPT_ROWS), tab.settings_file,
                                 loaded, **PRIVATE)

        # a generated image's settings back into the form: the image clicked last, else the first
        def select_image(evt: gr.SelectData):
            return card_index(evt)

        tab.gallery.select(select_image, None, self.selected_image, **PRIVATE)
        tab.use_settings.click(functools.partial(handlers.image_settings, rows=CONCEPT_ROWS),
                               [tab.gallery, self.selected_image], loaded, **PRIVATE)


def build_app(service: Service) -> gr.Blocks:
    """The Blocks app over ``service``; launch it with ``launch(demo, ...)``."""
    with gr.Blocks(title="Spectral Diffusion", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# Spectral Diffusion\nTeach the model your concepts from a few photos each, then fuse them in one "
            f"prompt. Model `{service.model}` · library `{service.library.root}`"
        )
        with gr.Tabs():
            train = build_train_tab(default_rank(service.model), app_values.training_settings(service))
            library = build_library_tab()
            generate = build_generate_tab()
        PageEvents(service, train, library, generate).wire(demo)
    demo.queue(max_size=256, default_concurrency_limit=1)
    return demo


# ----- start-up -------------------------------------------------------------------------------------


def _skips_gradio_self_check() -> dict:
    """Gradio's launch checks that the page answers with ONE ``HEAD /`` of a 3 s timeout
    (``networking.url_ok``: a timeout ends the check at once) and raises "When localhost is not accessible,
    a shareable link must be created" when it does not: on a loaded machine the first page render takes
    longer. Its ``_frontend=False`` skips that check; ``wait_until_serving`` does it with patience instead."""
    return {"_frontend": False} if "_frontend" in inspect.signature(gr.Blocks.launch).parameters else {}


def wait_until_serving(url: str, seconds: float = STARTUP_SECONDS) -> None:
    """Return once ``url`` answers (any HTTP status: the login page counts); raise after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            httpx.head(url, timeout=30, verify=False)
            return
        except httpx.HTTPError as error:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the web server at {url} did not answer within {seconds:.0f} s ({error})") from None
            time.sleep(0.5)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, auth: str | None = None,
           share: bool = False, prevent_thread_lock: bool = False, quiet: bool = False):
    """Start the server with the app's settings and wait until it answers; returns what ``Blocks.launch``
    returns. Robust under load: see ``_skips_gradio_self_check``."""
    credentials = parse_auth(auth) if auth else None
    result = demo.launch(
        server_name=host,
        server_port=port,
        auth=credentials,
        share=share,
        prevent_thread_lock=True,
        quiet=quiet,
        show_error=True,
        max_file_size=MAX_FILE_SIZE,
        ssr_mode=False,
        theme=gr.themes.Soft(),
        css=CSS,
        **_skips_gradio_self_check(),
    )
    wait_until_serving(demo.local_url)
    if not prevent_thread_lock:
        demo.block_thread()
    return result


def parse_auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth needs user:password")
    return user, password


def _log_to_stdout() -> None:
    """The URL, one line per request and the app's errors (tracebacks for bugs only) go to stdout, the
    server log; other libraries warn only, and diffusers/transformers/hub draw no loading bars."""
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Spectral Diffusion web app")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="builtin:toy (default), builtin:tiny, a Hugging Face model id or a local diffusers folder")
    parser.add_argument("--library", default=str(default_library()),
                        help=f"concept library folder (default: %(default)s, from ${LIBRARY_ENV} or the user's data folder)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require this login")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    args = parser.parse_args(argv)
    _log_to_stdout()
    if args.auth is not None:
        try:
            parse_auth(args.auth)
        except ValueError as error:
            parser.error(str(error))
    service = Service(model=args.model, library=args.library, device=args.device)  # loads nothing yet
    demo = build_app(service)
    launch(demo, args.host, args.port, auth=args.auth, share=args.share, prevent_thread_lock=True, quiet=True)
    logger.info("Spectral Diffusion is running at %s", demo.local_url)
    if demo.share_url:
        logger.info("public link: %s", demo.share_url)
    demo.block_thread()  # until Ctrl-C, which closes the server
    return 0


if __name__ == "__main__":
    sys.exit(main())
