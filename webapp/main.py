"""The web app's page and server: ``build_app`` over a service, ``launch`` it, ``main`` for ``python app.py``."""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import time

import gradio as gr
import httpx

from spectral_diffusion.frontends.service import Service
from spectral_diffusion.library.store import LIBRARY_ENV, default_library, user_data_folder
from spectral_diffusion.models.registry import DEFAULT_MODEL, default_rank
from webapp.events import PageEvents
from webapp.forms import training_settings
from webapp.layout import MAX_FILE_SIZE, build_library_tab, build_train_tab
from webapp.layout_generate import build_generate_tab
from webapp.style import CSS

logger = logging.getLogger(__name__)

STARTUP_SECONDS = 180  # how long start-up waits for the page to answer (a loaded machine is slow, not broken)


def build_app(service: Service) -> gr.Blocks:
    """The Blocks app over ``service``; launch it with ``launch(demo, ...)``."""
    with gr.Blocks(title="Spectral Diffusion", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# Spectral Diffusion\nTeach the model your concepts from a few photos each, then fuse them in one "
            f"prompt. Model `{service.model}` · library `{service.library.root}`"
        )
        with gr.Tabs():
            train = build_train_tab(default_rank(service.model), training_settings(service))
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


def launch(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = None,
    auth: str | None = None,
    share: bool = False,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
):
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
    logging.getLogger("webapp").setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``python app.py``'s flags (a bad ``--auth`` exits with the usage message)."""
    parser = argparse.ArgumentParser(description="Spectral Diffusion web app")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="builtin:toy (default), builtin:tiny, a Hugging Face model id or a local diffusers folder",
    )
    parser.add_argument(
        "--library",
        default=str(default_library()),
        help=f"concept library folder (default: %(default)s, from ${LIBRARY_ENV} or the user's data folder)",
    )
    parser.add_argument(
        "--outputs",
        default=str(user_data_folder() / "outputs"),
        help="folder that keeps generated images (PNG, settings inside) and exported adapters (default: %(default)s)",
    )
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
    return args


def service_for(args: argparse.Namespace) -> Service:
    """The service the flags ask for; it loads nothing yet."""
    return Service(model=args.model, library=args.library, device=args.device, output_dir=args.outputs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _log_to_stdout()
    demo = build_app(service_for(args))
    launch(demo, args.host, args.port, auth=args.auth, share=args.share, prevent_thread_lock=True, quiet=True)
    # The URL goes on a line of its own: people and scripts copy it from there.
    logger.info("Spectral Diffusion is running at %s", demo.local_url)
    logger.info("images and exports are kept in %s", args.outputs)
    if demo.share_url:
        logger.info("public link: %s", demo.share_url)
    demo.block_thread()  # until Ctrl-C, which closes the server
    return 0
