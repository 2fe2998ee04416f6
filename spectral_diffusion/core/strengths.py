"""Concept strengths: parsing a user's concept spec, and the one check every fused set goes through.

``parse_concepts`` reads what users type (``"a,b:0.8"``, JSON); ``normalize_strengths`` validates
the typed result wherever a fused set is made (requests, activation, bundles).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence

from spectral_diffusion.errors import RequestError

MAX_STRENGTH = 2.0


def is_finite_number(value) -> bool:
    """An int or float that is neither a bool nor inf / nan."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def normalize_strengths(concepts: Mapping[str, float] | Iterable[str] | None) -> dict[str, float]:
    """Validated ``{name: strength}``; a bare iterable of names means strength 1.0 each."""
    if concepts is None:
        return {}
    if isinstance(concepts, str):
        raise RequestError("concepts must be a mapping of name to strength or a list of names, not one string")
    items = concepts.items() if isinstance(concepts, Mapping) else ((name, 1.0) for name in concepts)
    out: dict[str, float] = {}
    for name, strength in items:
        if not isinstance(name, str) or not name:
            raise RequestError(f"concept names must be non-empty text, got {name!r}")
        if not is_finite_number(strength) or abs(strength) > MAX_STRENGTH:
            raise RequestError(
                f"strength of concept {name!r} must be a number from {-MAX_STRENGTH} to {MAX_STRENGTH}, "
                f"got {strength!r}"
            )
        out[name] = float(strength)
    return out


def parse_concepts(spec: str | Mapping[str, float] | Sequence[str] | None) -> dict[str, float]:
    """``{name: strength}`` from ``"a,b:0.8"``, a JSON object / list, a mapping or a list of names.

    A name without a strength gets 1.0; blanks are ignored. Strengths are range-checked later, by the
    generation request. Raises ``RequestError`` for text that is neither form.
    """
    if spec is None:
        return {}
    if isinstance(spec, str):
        text = spec.strip()
        if text[:1] in ("{", "["):
            return parse_concepts(_json_spec(text))
        items = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, strength = part.partition(":")
            items.append((name.strip(), strength.strip() or 1.0))
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = [(name, 1.0) for name in spec]
    checked = [_checked_strength(name, strength) for name, strength in items]
    _refuse_repeats([name for name, _ in checked])
    return dict(checked)


def _refuse_repeats(names: Sequence[str]) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise RequestError(
                f"concept {name!r} is named more than once; name each concept once, with one strength "
                f"(e.g. {name}:1.5 for a stronger one)"
            )
        seen.add(name)


def _pairs_without_repeats(pairs: list) -> dict:
    _refuse_repeats([str(key).strip() for key, _ in pairs])
    return dict(pairs)


def _json_spec(text: str):
    try:
        value = json.loads(text, object_pairs_hook=_pairs_without_repeats)
    except json.JSONDecodeError as error:
        raise RequestError(f"concepts look like JSON but are not valid JSON ({error})") from None
    except RecursionError:
        raise RequestError('concepts JSON is nested too deeply; send {"name": strength}') from None
    return value if isinstance(value, (dict, list)) else str(value)


def _checked_strength(name, strength) -> tuple[str, float]:
    if not isinstance(name, str) or not name.strip():
        raise RequestError(f"a concept name must be non-empty text, got {name!r}")
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise RequestError(
            f"strength of concept {name!r} must be a number, got {strength!r} (write name:0.8)"
        ) from None
    if not math.isfinite(value):
        raise RequestError(f"strength of concept {name!r} must be finite, got {strength!r}")
    return name.strip(), value


def format_concepts(concepts: Mapping[str, float]) -> str:
    """The inverse of ``parse_concepts``: ``"a,b:0.8"``."""
    return ",".join(name if strength == 1.0 else f"{name}:{strength:g}" for name, strength in concepts.items())
