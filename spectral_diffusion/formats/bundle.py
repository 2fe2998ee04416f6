"""The fused-bundle file: several concepts and their strengths in ONE safetensors file.

Tensor keys are each concept's v1 adapter keys prefixed by its name (``dog/unet.<path>.A``); the
metadata holds every concept's v1 metadata and the fusion strengths. A single v1 adapter file reads
as a bundle of one, so anything that loads bundles loads plain adapters too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from spectral_diffusion import __version__
from spectral_diffusion.atomic import atomic_path
from spectral_diffusion.core import slots
from spectral_diffusion.core.config import ConceptInfo
from spectral_diffusion.core.strengths import normalize_strengths
from spectral_diffusion.errors import AdapterFormatError, RequestError
from spectral_diffusion.formats.adapter_file import FORMAT as ADAPTER_FORMAT
from spectral_diffusion.formats.adapter_file import (
    AdapterData,
    adapter_data_from_tensors,
    check_adapter_metadata,
    read_adapter,
    read_safetensors_header,
)

BUNDLE_FORMAT = "spectral-bundle"
BUNDLE_VERSION = "1"
MAX_BUNDLE_CONCEPTS = 256


def _check_bundle_name(name: str) -> None:
    # the name prefixes tensor keys as "<name>/...", so it must not contain the separator
    if not isinstance(name, str) or not name or "/" in name or len(name) > 128:
        raise AdapterFormatError(f"concept name {name!r} cannot go into a bundle (empty, too long or has '/')")


def write_bundle(
    concepts: Mapping[str, AdapterData], path: str | os.PathLike, strengths: Mapping[str, float] | None = None
) -> Path:
    """Write several concepts into ONE safetensors file, atomically.

    Tensor keys are the concepts' v1 keys prefixed by their name (``dog/unet.<path>.A``); metadata:
    ``format`` = ``spectral-bundle``, ``format_version`` = ``1``, ``concepts`` = JSON
    ``{name: that concept's v1 metadata}``, ``strengths`` = JSON ``{name: strength}``.
    """
    if not concepts:
        raise ValueError("a bundle needs at least one concept")
    strengths = {name: float((strengths or {}).get(name, 1.0)) for name in concepts}
    tensors: dict[str, torch.Tensor] = {}
    metas = {}
    for name, data in concepts.items():
        _check_bundle_name(name)
        data = data.renamed(name)
        metas[name] = data.metadata()
        tensors.update({f"{name}/{key}": tensor for key, tensor in data.tensors().items()})
    metadata = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "concepts": json.dumps(metas),
        "strengths": json.dumps(strengths),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package_version": __version__,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _bundle_fail(path: Path, problem: str) -> AdapterFormatError:
    return AdapterFormatError(f"{path.name}: {problem}")


def _bundle_json(path: Path, meta: dict, key: str, default=None):
    if key not in meta and default is not None:
        return default
    try:
        value = json.loads(meta[key])
    except (KeyError, json.JSONDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise _bundle_fail(path, f"bundle metadata {key!r} is missing or not valid JSON") from None
    if not isinstance(value, dict):
        raise _bundle_fail(path, f"bundle metadata {key!r} should be a JSON object")
    return value


def _bundle_infos(path: Path, concepts: dict) -> dict[str, ConceptInfo]:
    """Check every concept's v1 metadata before any tensor is read."""
    if not concepts or len(concepts) > MAX_BUNDLE_CONCEPTS:
        raise _bundle_fail(path, f"holds {len(concepts)} concepts; a bundle holds 1 to {MAX_BUNDLE_CONCEPTS}")
    infos = {}
    for name, meta in concepts.items():
        try:
            _check_bundle_name(name)
        except AdapterFormatError as error:
            raise _bundle_fail(path, str(error)) from None
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise _bundle_fail(path, f"metadata of concept {name!r} must map keys to strings")
        if meta.get("name") != name:
            raise _bundle_fail(path, f"concept {name!r} is named {meta.get('name')!r} in its own metadata")
        infos[name] = check_adapter_metadata(meta, f"{path.name} [{name}]")
    for a, b in combinations(infos.values(), 2):
        if slots.overlap(a.columns, b.columns):
            raise _bundle_fail(path, f"concepts {a.name!r} and {b.name!r} overlap in slot columns")
    return infos


def _bundle_strengths(path: Path, meta: dict, names: Iterable[str]) -> dict[str, float]:
    raw = _bundle_json(path, meta, "strengths", default={})
    try:
        strengths = normalize_strengths({name: raw.get(name, 1.0) for name in names})
    except RequestError as error:
        raise _bundle_fail(path, str(error)) from None
    return strengths


def _split_tensors(path: Path, tensors: dict[str, torch.Tensor], names: Iterable[str]) -> dict[str, dict]:
    groups: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for key, tensor in tensors.items():
        name, sep, rest = key.partition("/")
        if not sep or name not in groups:
            raise _bundle_fail(path, f"tensor {key!r} belongs to no concept of the bundle")
        groups[name][rest] = tensor
    return groups


def _read_bundle_header(path: Path) -> tuple[dict | None, dict[str, float]]:
    """Check the header and every concept's metadata, reading no tensor: (concepts' v1 metadata,
    strengths); concepts is None for a single-concept v1 adapter file (a bundle of one)."""
    meta = read_safetensors_header(path).get("__metadata__") or {}
    if meta.get("format") == ADAPTER_FORMAT:
        return None, {check_adapter_metadata(meta, path.name).name: 1.0}
    if meta.get("format") != BUNDLE_FORMAT:
        raise _bundle_fail(
            path, f"is not a spectral bundle (format {meta.get('format')!r}, expected {BUNDLE_FORMAT!r})"
        )
    if meta.get("format_version") != BUNDLE_VERSION:
        raise _bundle_fail(
            path,
            f"has bundle format_version {meta.get('format_version')!r}; this version reads version "
            f"{BUNDLE_VERSION} only: upgrade the package to load it",
        )
    concepts = _bundle_json(path, meta, "concepts")
    _bundle_infos(path, concepts)
    return concepts, _bundle_strengths(path, meta, concepts)


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a fused bundle (not a single adapter file); reads the header only."""
    meta = read_safetensors_header(path).get("__metadata__") or {}
    return meta.get("format") == BUNDLE_FORMAT


def read_bundle_and_strengths(path: str | os.PathLike) -> tuple[list[AdapterData], dict[str, float]]:
    """Read and fully validate a bundle (or a single v1 adapter file): its concepts and stored strengths."""
    path = Path(path)
    concepts, strengths = _read_bundle_header(path)
    if concepts is None:
        return [read_adapter(path)], strengths
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors' own checks after ours
        raise _bundle_fail(path, f"is corrupt ({error})") from None
    groups = _split_tensors(path, tensors, concepts)
    datas = [adapter_data_from_tensors(concepts[name], groups[name], f"{path.name} [{name}]") for name in concepts]
    return datas, strengths


def read_bundle(path: str | os.PathLike) -> list[AdapterData]:
    """Read and fully validate a bundle (or a single v1 adapter file); ``AdapterFormatError`` otherwise."""
    return read_bundle_and_strengths(path)[0]


def bundle_strengths(path: str | os.PathLike) -> dict[str, float]:
    """The fusion strengths stored in a bundle (1.0 for a single adapter file); reads no tensor."""
    return _read_bundle_header(Path(path))[1]
