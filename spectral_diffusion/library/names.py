"""Concept names: they become folder names, so they are checked before anything touches the disk."""

from __future__ import annotations

import re

from spectral_diffusion.core.names import NAME_MAX_LENGTH, NAME_PATTERN
from spectral_diffusion.errors import LibraryError

__all__ = ["NAME_MAX_LENGTH", "NAME_PATTERN", "matches_name_pattern", "name_problem", "validate_name"]

_NAME_RE = re.compile(NAME_PATTERN)
# Folder names Windows refuses whatever the extension; a library may be shared with Windows users.
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul"} | {f"{d}{i}" for d in ("com", "lpt") for i in range(1, 10)}


def matches_name_pattern(text: str) -> bool:
    """Whether ``text`` has the shape of a concept name (what a folder scan looks for)."""
    return _NAME_RE.fullmatch(text) is not None


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid concept name, else raise ``LibraryError`` saying why."""
    if not isinstance(name, str):
        raise LibraryError(f"a concept name must be text, got {type(name).__name__}")
    if matches_name_pattern(name) and name not in _WINDOWS_DEVICES:
        return name
    raise LibraryError(name_problem(name))


def name_problem(name: str) -> str:
    """What is wrong with an invalid concept name, and how to fix it."""
    if not name:
        return "a concept name cannot be empty"
    if len(name) > NAME_MAX_LENGTH:
        return f"concept name is {len(name)} characters long; {NAME_MAX_LENGTH} at most"
    if "/" in name or "\\" in name or ".." in name or name.startswith("."):
        return f"concept name {name!r} looks like a path; use a plain name such as 'my-dog'"
    if name != name.lower() and matches_name_pattern(name.lower()):
        return f"concept names are lowercase: use {name.lower()!r}"
    if name in _WINDOWS_DEVICES:
        return f"{name!r} is a reserved device name on Windows; pick another name"
    return (
        f"concept name {name!r} is not valid: use lowercase letters, digits, '-' and '_', starting with a "
        "letter or digit (e.g. 'my-dog')"
    )
