"""How the web app's handlers are called: errors shown to the user, one log line per request, model work
in a thread of its own.

Bad input, the package's ``SpectralDiffusionError`` and the app's own ``InputError``, is shown to the
user as ``gr.Error``; anything else is a bug: logged with its traceback, shown as a generic internal
error. Each request to an endpoint is one line of the server log at INFO.
"""

from __future__ import annotations

import contextvars
import functools
import html
import inspect
import logging
import threading
import time
from collections.abc import Callable

import gradio as gr

from spectral_diffusion.errors import SpectralDiffusionError
from webapp.forms import InputError

logger = logging.getLogger(__name__)

INTERNAL_ERROR = "internal error, see the server log"
USER_ERRORS = (SpectralDiffusionError, InputError)


# ----- errors and the request log -------------------------------------------------------------------


def user_message(error: Exception) -> str:
    return str(error) or type(error).__name__


def _from_api_client() -> bool:
    """Whether the request being handled comes from an API client rather than the page. The page's own
    client marks its requests ``x-gradio-user: app`` (gradio_client: ``api``, MCP: ``mcp``, curl: none);
    outside a request (a handler called directly) the answer is no."""
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    headers = getattr(request, "headers", None)
    return request is not None and headers is not None and headers.get("x-gradio-user") != "app"


def error_text(message: str) -> str:
    """An error message as ``gr.Error`` should carry it. The page renders the message as HTML through a
    sanitiser that drops unknown tags, so "prompt uses <heart>" would read "prompt uses": the page gets it
    HTML-escaped; API clients, which read it as text, get it as it is."""
    return message if _from_api_client() else html.escape(message, quote=False)


def _shown_error(error: Exception, where: str) -> gr.Error:
    """The ``gr.Error`` the page shows for ``error``: its message for bad input, a generic one for a bug.
    Either way it is the request's one log line: bad input without a traceback, a bug with one."""
    if isinstance(error, USER_ERRORS):
        logger.info("%s refused: %s", where, user_message(error))
        return gr.Error(error_text(user_message(error)), print_exception=False)
    logger.error("%s: internal error", where, exc_info=error)
    return gr.Error(INTERNAL_ERROR, print_exception=False)


def log_done(where: str, started: float, summary: str = "") -> None:
    logger.info("%s: %s(%.1f s)", where, f"{summary} " if summary else "", time.monotonic() - started)


def user_errors(fn: Callable | None = None, *, summary: Callable | None = None) -> Callable:
    """Raise every error of ``fn`` as ``gr.Error`` (see ``_shown_error``); keeps generators generators.
    Logs one line per call; ``summary(result)`` (or the last value yielded) words its outcome."""
    if fn is None:
        return functools.partial(user_errors, summary=summary)
    where = fn.__name__

    def done(started: float, result) -> None:
        log_done(where, started, summary(result) if summary and result is not None else "")

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            started, last = time.monotonic(), None
            try:
                for last in fn(*args, **kwargs):
                    yield last
            except gr.Error:
                raise
            except Exception as error:
                raise _shown_error(error, where) from error
            done(started, last)

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started = time.monotonic()
        try:
            result = fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:
            raise _shown_error(error, where) from error
        done(started, result)
        return result

    return wrapper


# ----- model work off gradio's worker threads -------------------------------------------------------


def in_own_thread(fn: Callable) -> Callable:
    """``fn`` run in a thread of its own that ends with the call, in the caller's context (gradio's request,
    its notices); its result or error is the caller's.

    Why: torch's OpenMP runtime (libgomp) gives each thread that runs torch ops a team of helper threads
    for the rest of that thread's life, and while the live teams hold more threads than there are CPUs it
    stops spin-waiting between parallel regions: every region then sleeps and wakes. gradio's worker
    threads live as long as the server, so model work done on them (the page's first refresh loads the
    model and computes its spectrum; a generation; an export) left a team alive beside the training
    thread's, and training steps ran 1.4-1.7x slower than the CLI's (README, "Web app"). A thread per call
    takes its team with it, so a training alone has the CPUs' only team, as the CLI has."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        context, outcome = contextvars.copy_context(), {}

        def run() -> None:
            try:
                outcome["result"] = context.run(fn, *args, **kwargs)
            except BaseException as error:  # noqa: BLE001 - handed to the caller below
                outcome["error"] = error

        thread = threading.Thread(target=run, name=f"app-{getattr(fn, '__name__', 'call')}", daemon=True)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome.pop("error")
        return outcome["result"]

    return wrapper
