"""Adapter file format v1 (docs/design.md section 4): one concept as safetensors plus JSON-ish metadata.

Reading validates the whole file before anything touches a model: the safetensors header is parsed by
hand first (no unpickling ever, no allocation driven by a declared size beyond the file's own size),
then metadata, key set, shapes and finiteness. Installing into a model then checks base-model
compatibility from the stored triplets; any failure leaves the model as it was.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from spectral_diffusion import __version__
from spectral_diffusion.atomic import atomic_path
from spectral_diffusion.core.compatibility import compatibility_tolerance
from spectral_diffusion.core.config import TEXT_COMPONENTS, VARIANTS, ConceptInfo, StoredConcept
from spectral_diffusion.core.model import SpectralAdapters
from spectral_diffusion.core.tokens import TOKEN_PATTERN
from spectral_diffusion.errors import AdapterFormatError

FORMAT = "spectral-adapter"
FORMAT_VERSION = "1"
COMPONENTS = ("unet",) + TEXT_COMPONENTS
TRIPLET_KEYS = ("U", "s", "V")
TRAINABLE_KEYS = {"additive": ("A", "B", "c"), "rotational": ("G_U", "G_V", "c")}
REQUIRED_METADATA = (
    "format",
    "format_version",
    "name",
    "variant",
    "rank",
    "slot",
    "tokens",
    "class_word",
    "base_model",
    "base_fingerprint",
    "targets",
    "train_config",
    "created_at",
    "package_version",
)
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_FILE_BYTES = 8 * 1024**3
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# Optional metadata key, written only for half-precision triplets: the file stays a v1 file (the dtype
# of U, s, V is self-describing in safetensors; older readers upcast them and still check the model).
TRIPLET_DTYPE_KEY = "triplet_dtype"
TRIPLET_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# extra metadata a training records: the base model's usable singular-vector columns (its slot capacity
# times the rank; fewer than min(m, n) where a layer is rank-deficient), for slot maps without the model
USABLE_COLUMNS_KEY = "usable_columns"


@dataclass
class AdapterData:
    """One concept, as read from or written to an adapter file."""

    info: ConceptInfo
    layers: dict[str, dict[str, torch.Tensor]]
    token_vectors: dict[str, torch.Tensor]
    base_model: str = ""
    base_fingerprint: str = ""
    targets: dict = field(default_factory=dict)
    train_config: dict = field(default_factory=dict)
    created_at: str = ""
    package_version: str = __version__
    extra_metadata: dict[str, str] = field(default_factory=dict)
    # how U, s, V are stored: "float32" (default) or "float16" (an additive file ~25% smaller)
    triplet_dtype: str = "float32"

    def metadata(self) -> dict[str, str]:
        meta = dict(self.extra_metadata)
        meta.pop(TRIPLET_DTYPE_KEY, None)
        if self.triplet_dtype != "float32":
            meta[TRIPLET_DTYPE_KEY] = self.triplet_dtype
        meta.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            name=self.info.name,
            variant=self.info.variant,
            rank=str(self.info.rank),
            slot=str(self.info.slot),
            tokens=json.dumps(self.info.tokens),
            class_word=self.info.class_word,
            base_model=self.base_model,
            base_fingerprint=self.base_fingerprint,
            targets=json.dumps(self.targets),
            train_config=json.dumps(self.train_config),
            created_at=self.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            package_version=self.package_version,
        )
        return meta

    def renamed(self, name: str) -> AdapterData:
        """This adapter with its concept called ``name`` (itself if it already is): a library import under
        another name, a bundle's or a studio's key."""
        if name == self.info.name:
            return self
        return replace(self, info=replace(self.info, name=name))

    def stored(self) -> StoredConcept:
        """What ``SpectralAdapters.load_concepts`` installs; the base-model check's bound follows the dtype
        the triplets were stored in."""
        tolerance = compatibility_tolerance(TRIPLET_DTYPES.get(self.triplet_dtype, torch.float16))
        return StoredConcept(self.info, self.layers, self.token_vectors, tolerance)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.triplet_dtype not in TRIPLET_DTYPES:
            raise ValueError(f"triplet_dtype must be one of {sorted(TRIPLET_DTYPES)}, got {self.triplet_dtype!r}")
        triplet_dtype = TRIPLET_DTYPES[self.triplet_dtype]
        out = {}
        for key, tensors in self.layers.items():
            for part, tensor in tensors.items():
                dtype = triplet_dtype if part in TRIPLET_KEYS else torch.float32
                out[f"{key}.{part}"] = tensor.detach().to(dtype).contiguous()
        for component, vectors in self.token_vectors.items():
            out[f"{component}.token_embeddings"] = vectors.detach().float().contiguous()
        return out


def adapter_from_model(
    adapters: SpectralAdapters,
    name: str,
    base_model: str,
    train_config: dict | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> AdapterData:
    """Snapshot a loaded concept into an ``AdapterData`` ready to save."""
    return AdapterData(
        info=adapters.concept(name),
        layers=adapters.concept_layer_tensors(name),
        token_vectors=adapters.concept_token_vectors(name),
        base_model=base_model,
        base_fingerprint=adapters.fingerprint,
        targets=adapters.targets.to_json(),
        train_config=dict(train_config or {}),
        extra_metadata=dict(extra_metadata or {}),
    )


def save_adapter(data: AdapterData, path: str | os.PathLike, triplet_dtype: str | None = None) -> Path:
    """Write atomically: a crash leaves the previous file (or none), never half of one.

    ``triplet_dtype="float16"`` stores the slot triplets in half precision (the trainable tensors stay
    float32); ``None`` keeps ``data.triplet_dtype``.
    """
    path = Path(path)
    if triplet_dtype is not None:
        data = replace(data, triplet_dtype=triplet_dtype)
    with atomic_path(path) as tmp:
        save_file(data.tensors(), str(tmp), metadata=data.metadata())
    return path


# ----- reading ------------------------------------------------------------------------------------


def _fail(path: Path | str, problem: str) -> AdapterFormatError:
    # a str labels a concept inside a container file (e.g. "fused.safetensors [dog]")
    label = path.name if isinstance(path, Path) else path
    return AdapterFormatError(f"{label}: {problem}")


def _read_header(path: Path) -> dict:
    """Parse and bound-check the safetensors header without trusting any declared size."""
    try:
        size = path.stat().st_size
    except OSError as error:
        raise _fail(path, f"cannot read the file ({error.strerror})") from None
    if not path.is_file():
        raise _fail(path, "is not a regular file")
    if size > MAX_FILE_BYTES:
        raise _fail(path, f"is {size} bytes, larger than any adapter ({MAX_FILE_BYTES} bytes at most)")
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _fail(path, "is not a safetensors file (too short); adapters are .safetensors files")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len == 0 or header_len > min(MAX_HEADER_BYTES, size - 8):
            raise _fail(path, "is not a safetensors file (bad header); pickled .pt/.ckpt/.bin files are refused")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise _fail(path, "is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise _fail(path, "is not a safetensors file (header is not a JSON object)")
    data_len = size - 8 - header_len
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise _fail(path, f"tensor {key!r} has a malformed header entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in FLOAT_DTYPES:
            raise _fail(path, f"tensor {key!r} has dtype {dtype!r}; adapters hold float tensors only")
        if not (isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 2**31 for d in shape)):
            raise _fail(path, f"tensor {key!r} has a malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _fail(path, f"tensor {key!r} has malformed data offsets")
        numel = 1
        for dim in shape:
            numel *= dim
        start, stop = offsets
        if not (0 <= start <= stop <= data_len) or stop - start != numel * FLOAT_DTYPES[dtype]:
            raise _fail(path, f"tensor {key!r} does not fit in the file: it is truncated or corrupt")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "has malformed metadata (values must be strings)")
    return header


def _json_field(path: Path, meta: dict, key: str, kind: type):
    try:
        value = json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise _fail(path, f"metadata {key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise _fail(path, f"metadata {key!r} should be a JSON {kind.__name__}")
    return value


def _int_field(path: Path, meta: dict, key: str, minimum: int) -> int:
    try:
        value = int(meta[key])
    except ValueError:
        raise _fail(path, f"metadata {key!r} should be an integer, got {meta[key]!r}") from None
    if value < minimum or value > 1_000_000:
        raise _fail(path, f"metadata {key!r} is out of range: {value}")
    return value


def _not_spectral(meta: dict) -> str:
    found = meta.get("format")
    what = "it has no spectral-adapter metadata" if found is None else f"its format is {found!r}"
    return (
        f"is not a spectral adapter ({what}): only spectral adapter files (written by `export --format "
        "spectral`, or a library's adapter.safetensors) can be imported; LoRA files are an export format and "
        "cannot be turned back into a concept"
    )


def _parse_metadata(path: Path, meta: dict) -> tuple[ConceptInfo, dict]:
    if meta.get("format") != FORMAT:
        raise _fail(path, _not_spectral(meta))
    if meta.get("format_version") != FORMAT_VERSION:
        raise _fail(
            path,
            f"has format_version {meta.get('format_version')!r}; this version of spectral-diffusion reads "
            f"version {FORMAT_VERSION} only: upgrade the package to load it",
        )
    missing = [key for key in REQUIRED_METADATA if key not in meta]
    if missing:
        raise _fail(path, f"is missing metadata {missing}")
    tokens = _json_field(path, meta, "tokens", list)
    if not all(isinstance(t, str) and TOKEN_PATTERN.match(t) for t in tokens):
        raise _fail(path, f"metadata 'tokens' holds invalid trigger tokens: {tokens!r}")
    if meta["variant"] not in VARIANTS:
        raise _fail(path, f"metadata 'variant' is {meta['variant']!r}; expected one of {VARIANTS}")
    try:
        info = ConceptInfo(
            name=meta["name"],
            slot=_int_field(path, meta, "slot", 0),
            rank=_int_field(path, meta, "rank", 1),
            variant=meta["variant"],
            tokens=tokens,
            class_word=meta["class_word"],
        )
    except ValueError as error:
        raise _fail(path, str(error)) from None
    fields = {
        "targets": _json_field(path, meta, "targets", dict),
        "train_config": _json_field(path, meta, "train_config", dict),
    }
    return info, fields


def _group_tensors(path: Path, info: ConceptInfo, tensors: dict[str, torch.Tensor]):
    allowed = set(TRIPLET_KEYS) | set(TRAINABLE_KEYS[info.variant])
    layers: dict[str, dict[str, torch.Tensor]] = {}
    token_vectors: dict[str, torch.Tensor] = {}
    for full_key, tensor in tensors.items():
        key, _, part = full_key.rpartition(".")
        component = full_key.split(".", 1)[0]
        if component not in COMPONENTS:
            raise _fail(path, f"tensor {full_key!r} belongs to no known component {COMPONENTS}")
        if part == "token_embeddings" and key == component:
            token_vectors[component] = tensor
        elif part in allowed:
            layers.setdefault(key, {})[part] = tensor
        else:
            raise _fail(path, f"unexpected tensor {full_key!r} for the {info.variant} variant")
    return layers, token_vectors


def _check_shapes(path: Path, info: ConceptInfo, layers, token_vectors) -> None:
    r = info.rank
    needed = TRIPLET_KEYS + TRAINABLE_KEYS[info.variant]
    if not layers:
        raise _fail(path, "holds no adapted layers")
    for key, parts in layers.items():
        absent = [p for p in needed if p not in parts]
        if absent:
            raise _fail(path, f"layer {key} is missing tensors {absent}")
        m, n = parts["U"].shape[0], parts["V"].shape[0]
        expected = {
            "U": (m, r),
            "s": (r,),
            "V": (n, r),
            "A": (m, r),
            "B": (n, r),
            "c": (r,),
            "G_U": (r, r),
            "G_V": (r, r),
        }
        for part, tensor in parts.items():
            if tuple(tensor.shape) != expected[part]:
                raise _fail(
                    path, f"tensor {key}.{part} has shape {tuple(tensor.shape)}, expected {expected[part]} at rank {r}"
                )
    for component, vectors in token_vectors.items():
        if vectors.ndim != 2 or vectors.shape[0] != len(info.tokens):
            raise _fail(
                path, f"{component}.token_embeddings has shape {tuple(vectors.shape)} for {len(info.tokens)} tokens"
            )
    if info.tokens and not token_vectors:
        raise _fail(path, "declares trigger tokens but holds no token embeddings")
    for name, tensor in [(f"{k}.{p}", t) for k, ps in layers.items() for p, t in ps.items()] + list(
        token_vectors.items()
    ):
        if not torch.isfinite(tensor).all():
            raise _fail(path, f"tensor {name} holds NaN or infinite values")


def read_adapter(path: str | os.PathLike) -> AdapterData:
    """Read and fully validate an adapter file. Raises ``AdapterFormatError`` naming the problem."""
    path = Path(path)
    header = _read_header(path)
    meta = header.get("__metadata__") or {}
    _parse_metadata(path, meta)  # metadata errors before any tensor is loaded
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors' own checks (overlaps, alignment) after ours
        raise _fail(path, f"is corrupt ({error})") from None
    return adapter_data_from_tensors(meta, tensors, path)


# ----- public validation helpers, for containers that hold several concepts (studio bundles) ------


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The bound-checked safetensors header of ``path`` (parsed by hand, nothing loaded yet)."""
    return _read_header(Path(path))


def check_adapter_metadata(meta: dict[str, str], source: str) -> ConceptInfo:
    """Validate one concept's v1 metadata; errors start with ``source`` (the file and concept)."""
    return _parse_metadata(source, meta)[0]


def adapter_data_from_tensors(meta: dict[str, str], tensors: dict[str, torch.Tensor], source: str) -> AdapterData:
    """Validate one concept's v1 metadata and tensors, read from some container, as ``read_adapter`` does."""
    info, fields = _parse_metadata(source, meta)
    layers, token_vectors = _group_tensors(source, info, tensors)
    _check_shapes(source, info, layers, token_vectors)
    known = set(REQUIRED_METADATA) | {TRIPLET_DTYPE_KEY}
    stored = {tensor.dtype for parts in layers.values() for part, tensor in parts.items() if part in TRIPLET_KEYS}
    return AdapterData(
        info=info,
        layers={k: {p: t.float() for p, t in v.items()} for k, v in layers.items()},
        token_vectors={k: v.float() for k, v in token_vectors.items()},
        base_model=meta["base_model"],
        base_fingerprint=meta["base_fingerprint"],
        targets=fields["targets"],
        train_config=fields["train_config"],
        created_at=meta["created_at"],
        package_version=meta["package_version"],
        extra_metadata={k: v for k, v in meta.items() if k not in known},
        triplet_dtype="float32" if stored <= {torch.float32, torch.float64} else "float16",
    )


def _check_loadable_name(name: str) -> None:
    """A file may carry any name (the library imports it under another one), but a loaded concept's name
    keys torch modules: empty or dotted names cannot be loaded."""
    if not name or "." in name:
        raise AdapterFormatError(
            f"concept name {name!r} cannot be loaded (empty or with a '.'); load it under another name"
        )


def install_adapter(
    adapters: SpectralAdapters, data: AdapterData, name: str | None = None, model_name: str = "this base model"
) -> ConceptInfo:
    """Load an adapter's concept into a patched model, optionally under another name."""
    concept = (data if name is None else data.renamed(name)).stored()
    _check_loadable_name(concept.info.name)
    adapters.load_concepts([concept], model_name)
    return concept.info


def install_adapters(
    adapters: SpectralAdapters, datas: list[AdapterData], model_name: str = "this base model"
) -> list[ConceptInfo]:
    """Install several adapters (a fusion) with one pass over the base weights for all their checks;
    on any error none of them stays installed."""
    for data in datas:
        _check_loadable_name(data.info.name)
    adapters.load_concepts([data.stored() for data in datas], model_name)
    return [data.info for data in datas]


def load_adapter(
    adapters: SpectralAdapters, path: str | os.PathLike, name: str | None = None, model_name: str = "this base model"
) -> ConceptInfo:
    """``read_adapter`` then ``install_adapter``; on any error the model is unchanged."""
    return install_adapter(adapters, read_adapter(path), name, model_name)
