"""What the web app says, without gradio: the training progress line (HTML), a concept in words, the
library table's rows, the info line of a generation, and what the API says about concepts and trainings
(JSON-ready dicts). ``webapp/drawings.py`` draws the pictures."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence

from spectral_diffusion.core.strengths import format_concepts
from spectral_diffusion.frontends.service import TrainingStatus

TABLE_HEADERS = ["name", "trigger token", "slot", "variant", "rank", "class word", "images", "base model", "created"]


# ----- the Train and Library tabs ------------------------------------------------------------------


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
        if status.state == "cancelled":
            text = f"Cancelled {name} at step {status.step}/{total}: the library is unchanged"
        elif status.state == "failed":
            text = f"{name}: {html.escape(status.message)}"
    return (
        f'<div class="sd-status"><div class="sd-bar"><div style="width:{fraction * 100:.1f}%"></div></div>'
        f'<span id="train-status-text">{text}</span></div>'
    )


def problem_html(message: str) -> str:
    """The Train tab's status line when a training cannot start or fails: the one place it is shown."""
    return (
        f'<div class="sd-status"><div class="sd-bar"><div style="width:0%"></div></div>'
        f'<span id="train-status-text" class="sd-problem">{html.escape(message)}</span></div>'
    )


def status_json(status: TrainingStatus, record=None) -> dict:
    """What the ``train_concept`` endpoint says about a run, as data (the page shows ``progress_html``).

    ``state``: preparing, running, done, cancelled or failed; ``slot`` once reserved; ``token`` (and the
    final ``slot``) from the library ``record`` once done."""
    data = {
        "name": status.name,
        "state": status.state,
        "step": status.step,
        "total_steps": status.total_steps,
        "loss": None if status.loss is None else float(status.loss),
        "eta_seconds": None if status.eta_seconds is None else round(float(status.eta_seconds), 1),
        "slot": status.slot,
        "token": None,
        "message": status.message,
    }
    if record is not None:
        data.update(slot=record.slot, token=record.token)
    return data


def record_summary(record: dict, done: str) -> str:
    """A concept record (``record_json``) as one readable Markdown line; ``done`` says what happened
    ("Trained", "Imported")."""
    if not record:
        return ""
    tokens = " ".join(f"`{token}`" for token in record.get("tokens") or [record.get("token")])
    text = f"**{done} {html.escape(str(record.get('name')))}**: trigger token {tokens}, slot {record.get('slot')}"
    if record.get("base_model"):
        text += f" of `{record['base_model']}`"
    text += f" (rank {record.get('rank')}, {record.get('variant')})"
    if record.get("class_word"):
        text += f", class word “{html.escape(str(record['class_word']))}”"
    if record.get("image_count"):
        text += f", {record['image_count']} photo{'s' if record['image_count'] != 1 else ''}"
    if record.get("this_model", True):
        return f"{text}. Write {tokens} in a prompt on the Generate tab to draw it."
    return f"{text}. It was made for another base model: it cannot be used with this one."


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


def _short_date(created_at: str) -> str:
    """ "2025-01-02T03:04:05+00:00" as "2025-01-02 03:04" (the table's column stays narrow)."""
    text = str(created_at or "")
    return text[:16].replace("T", " ") if len(text) >= 16 and text[10:11] == "T" else text


def table_row(record) -> list:
    return [
        record.name,
        " ".join(record.tokens),
        record.slot,
        record.variant,
        record.rank,
        record.class_word,
        record.image_count,
        record.base_model,
        _short_date(record.created_at),
    ]


# ----- the Generate tab ----------------------------------------------------------------------------


def describe_layout(spec: str) -> str:
    """A few words for the info line: the preset's name, or how many regions a custom layout has."""
    spec = (spec or "").strip()
    if not spec:
        return ""
    if not spec.startswith("{"):
        return f"layout {spec}"
    try:
        count = len(json.loads(spec).get("regions", []))
    except (ValueError, AttributeError, TypeError):
        return "custom layout"
    return f"custom layout ({count} region{'s' if count != 1 else ''})"


def info_line(
    count: int,
    seed,
    size: tuple[int, int] | None,
    steps: int,
    guidance: float,
    scheduler: str,
    concepts: Mapping[str, float],
    layout: str,
    seconds: float,
    regional_mode: str = "",
    warnings: Sequence[str] = (),
) -> str:
    """What the Generate tab says after a generation: the seeds used (image k: ``seed`` + k), the settings
    (with a layout, how it was drawn), the time taken."""
    try:
        seeds = f"seeds {int(seed)}-{int(seed) + count - 1}" if count > 1 else f"seed {seed}"
    except (TypeError, ValueError):
        seeds = f"seed {seed}"
    parts = [f"{count} image(s), {seeds}"]
    if size:
        parts.append(f"{size[0]}×{size[1]}")
    parts += [
        f"{steps} steps",
        f"guidance {guidance:g}",
        f"scheduler {scheduler}",
        f"concepts {format_concepts(dict(concepts))}" if concepts else "no concepts",
    ]
    described = describe_layout(layout)
    if described:
        parts.append(f"{described} ({regional_mode})" if regional_mode else described)
    parts += [f"warning: {warning}" for warning in warnings]
    parts.append(f"{seconds:.1f} s")
    return " · ".join(parts)
