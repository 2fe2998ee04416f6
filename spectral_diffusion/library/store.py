"""The on-disk concept library (DESIGN.md section 5): one folder per concept, slots per base model.

Layout of a library root (``concepts/`` by default)::

    <name>/adapter.safetensors       the concept (adapter file format v1)
    <name>/concept.json              its metadata, decoded, plus image count, image and thumbnail lists
    <name>/preview.png               optional
    <name>/images/image-000.png      the training images, re-encoded as PNG (no EXIF)
    <name>/thumbnails/image-000.png  small copies for the UI
    .library.lock                    inter-process lock held by every mutating operation
    .reservations/<name>.json        a training in progress: its slot, pid, host and start time
    .tmp-* / .trash-* / .old-*       work folders of add / delete / overwrite; removed by ``cleanup``

Concept folders are the truth: there is no index to get out of step, ``list`` scans them. A concept
is built in a ``.tmp-`` folder and renamed into place only once complete, so a reader or a crash never
sees half of one. A slot belongs to at most one concept (or live reservation) per base fingerprint;
with mixed ranks, slots are compared by the singular-vector columns they cover.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout
from PIL import Image, ImageOps

from spectral_diffusion.atomic import atomic_path, atomic_write_text, fsync_path, storage_error
from spectral_diffusion.core import slots
from spectral_diffusion.core.tokens import TokenError
from spectral_diffusion.errors import ConceptNotFoundError, SlotConflictError, SpectralDiffusionError
from spectral_diffusion.formats.adapter_file import FORMAT, FORMAT_VERSION, AdapterData, read_adapter, save_adapter
from spectral_diffusion.images import to_8bit

logger = logging.getLogger(__name__)

NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"
NAME_MAX_LENGTH = 64
LIBRARY_FORMAT = 1
DEFAULT_ROOT = "concepts"
CONCEPT_FILE = "concept.json"
ADAPTER_FILE = "adapter.safetensors"
PREVIEW_FILE = "preview.png"
IMAGES_DIR = "images"
THUMBNAILS_DIR = "thumbnails"
THUMBNAIL_SIZE = 256
LOCK_FILE = ".library.lock"
RESERVATIONS_DIR = ".reservations"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
OLD_PREFIX = ".old-"  # a concept moved aside by an overwrite; restored by cleanup if the swap died
DEFAULT_LOCK_TIMEOUT = 30.0
# A reservation made on another host cannot be checked for a live process; trust it this long.
FOREIGN_RESERVATION_MAX_AGE = 3 * 24 * 3600.0

_NAME_RE = re.compile(NAME_PATTERN)
# Folder names Windows refuses whatever the extension; a library may be shared with Windows users.
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul"} | {f"{d}{i}" for d in ("com", "lpt") for i in range(1, 10)}
_HOST = socket.gethostname()


class LibraryError(SpectralDiffusionError, ValueError):
    """A library operation is refused: bad name, name taken, library busy, broken concept folder."""


# ----- records ------------------------------------------------------------------------------------


@dataclass
class ConceptRecord:
    """One concept of the library as described by its folder."""

    name: str
    tokens: list[str]
    slot: int
    rank: int
    variant: str
    class_word: str
    base_model: str
    base_fingerprint: str
    created_at: str
    image_count: int
    folder: Path
    adapter_path: Path
    preview_path: Path | None
    thumbnails: list[Path] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # the whole concept.json

    @property
    def token(self) -> str:
        """The first trigger token (concepts normally have exactly one)."""
        return self.tokens[0] if self.tokens else ""

    @property
    def columns(self) -> range:
        return slots.columns(self.slot, self.rank)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("folder", "adapter_path", "preview_path"):
            out[key] = None if out[key] is None else str(out[key])
        out["thumbnails"] = [str(p) for p in self.thumbnails]
        out["images"] = [str(p) for p in self.images]
        out["token"] = self.token
        return out

    @classmethod
    def from_folder(cls, folder: Path) -> ConceptRecord:
        """Read ``folder/concept.json``; ``LibraryError`` says what is broken."""
        meta = _read_json(folder / CONCEPT_FILE)
        try:
            record = cls(
                name=str(meta["name"]), tokens=[str(t) for t in meta["tokens"]], slot=int(meta["slot"]),
                rank=int(meta["rank"]), variant=str(meta["variant"]), class_word=str(meta["class_word"]),
                base_model=str(meta["base_model"]), base_fingerprint=str(meta["base_fingerprint"]),
                created_at=str(meta["created_at"]), image_count=int(meta.get("image_count", 0)),
                folder=folder, adapter_path=_inside(folder, meta.get("adapter", ADAPTER_FILE)),
                preview_path=_inside(folder, meta["preview"]) if meta.get("preview") else None,
                thumbnails=[_inside(folder, p) for p in meta.get("thumbnails", [])],
                images=[_inside(folder, p) for p in meta.get("images", [])],
                metadata=meta,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise LibraryError(f"{CONCEPT_FILE} is incomplete or malformed ({error!r})") from None
        record._check(folder)
        return record

    def _check(self, folder: Path) -> None:
        if self.name != folder.name:
            raise LibraryError(f"{CONCEPT_FILE} names the concept {self.name!r}, not {folder.name!r}")
        if self.slot < 0 or self.rank < 1:
            raise LibraryError(f"{CONCEPT_FILE} has an impossible slot {self.slot} or rank {self.rank}")
        if not self.adapter_path.is_file():
            raise LibraryError(f"{self.adapter_path.name} is missing")


@dataclass
class Reservation:
    """A slot (and a name) held by a training in progress."""

    name: str
    base_fingerprint: str
    rank: int
    slot: int
    tokens: list[str]
    pid: int
    pid_start: str | None
    host: str
    created: float  # epoch seconds
    id: str

    @property
    def columns(self) -> range:
        return slots.columns(self.slot, self.rank)

    @property
    def created_at(self) -> str:
        return datetime.fromtimestamp(self.created, timezone.utc).isoformat(timespec="seconds")

    def describe(self) -> str:
        return f"a training of {self.name!r} in progress (pid {self.pid} on {self.host}, since {self.created_at})"

    def is_ours(self) -> bool:
        return self.host == _HOST and self.pid == os.getpid()

    def is_live(self) -> bool:
        """Whether the process that made it may still be running (stale ones are ignored)."""
        if self.host != _HOST or os.name == "nt":  # no pid to check: trust it for a while
            return time.time() - self.created < FOREIGN_RESERVATION_MAX_AGE
        if not _pid_alive(self.pid):
            return False
        start = _process_start(self.pid)  # a recycled pid has another start time
        return self.pid_start is None or start is None or start == self.pid_start

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "created_at": self.created_at}

    @classmethod
    def from_json(cls, data: dict) -> Reservation:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass
class SlotReport:
    """The slot map of one base model at one rank, with its capacity when known."""

    base_fingerprint: str
    rank: int
    capacity: int | None  # slots of this rank in the model; None if no concept told us the layer sizes
    taken: dict[int, str]  # slot -> concept covering (some of) its columns
    reserved: dict[int, str]  # slot -> name of a training in progress holding it

    @property
    def free(self) -> list[int] | None:
        if self.capacity is None:
            return None
        return [k for k in range(self.capacity) if k not in self.taken and k not in self.reserved]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "free": self.free}


@dataclass(frozen=True)
class _Owner:
    name: str
    columns: range
    label: str


# ----- the library --------------------------------------------------------------------------------


class Library:
    """A folder of concepts. Every mutating operation holds ``root/.library.lock``."""

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT, lock_timeout: float = DEFAULT_LOCK_TIMEOUT):
        self.root = Path(root).expanduser().absolute()
        if self.root.exists() and not self.root.is_dir():
            raise LibraryError(f"the concept library {self.root} is a file, not a folder")
        self.lock_timeout = lock_timeout
        self._lock = FileLock(str(self.root / LOCK_FILE), timeout=lock_timeout)
        self._cleanup_on_open()

    def __repr__(self) -> str:
        return f"Library({str(self.root)!r})"

    # ----- names ----------------------------------------------------------------------------------

    @staticmethod
    def validate_name(name: str) -> str:
        """Return ``name`` if it is a valid concept name, else raise ``LibraryError`` saying why."""
        return validate_name(name)

    # ----- reading --------------------------------------------------------------------------------

    def list(self, base_fingerprint: str | None = None) -> list[ConceptRecord]:
        """Concepts sorted by (base fingerprint, first column, name); broken folders are skipped."""
        records = [r for r in self._scan() if base_fingerprint is None or r.base_fingerprint == base_fingerprint]
        return sorted(records, key=lambda r: (r.base_fingerprint, r.columns.start, r.name))

    def get(self, name: str) -> ConceptRecord:
        name = self.validate_name(name)
        folder = self.root / name
        if not folder.is_dir():
            raise self._not_found(name)
        try:
            return ConceptRecord.from_folder(folder)
        except FileNotFoundError:  # deleted between the check and the read
            raise self._not_found(name) from None
        except LibraryError as error:
            raise LibraryError(f"the concept folder {folder} is broken ({error}); delete {name} and add it again") from None

    def exists(self, name: str) -> bool:
        """Whether a concept of that name is in the library (False for invalid names)."""
        try:
            self.get(name)
        except (LibraryError, ConceptNotFoundError):
            return False
        return True

    def adapter(self, name: str) -> AdapterData:
        """The concept's adapter, fully validated."""
        return read_adapter(self.get(name).adapter_path)

    def base_models(self) -> dict[str, str]:
        """Base fingerprint -> base model id or path, for every base model with concepts."""
        return {r.base_fingerprint: r.base_model for r in self.list()}

    def reservations(self, base_fingerprint: str | None = None) -> list[Reservation]:
        """Live reservations (trainings in progress), optionally of one base model."""
        live = self._live_reservations().values()
        return sorted(
            (v for v in live if base_fingerprint is None or v.base_fingerprint == base_fingerprint),
            key=lambda v: (v.base_fingerprint, v.columns.start),
        )

    # ----- slots ----------------------------------------------------------------------------------

    @staticmethod
    def capacity(rank: int, smallest_dim: int) -> int:
        """Slots of ``rank`` in a model whose smallest adapted layer dimension is ``smallest_dim``."""
        if rank < 1:
            raise LibraryError(f"rank must be at least 1, got {rank}")
        return slots.capacity(smallest_dim, rank)

    def known_smallest_dim(self, base_fingerprint: str) -> int | None:
        """The smallest adapted layer dimension of a base model, as recorded by its concepts."""
        dims = [r.metadata.get("smallest_dim") for r in self.list(base_fingerprint)]
        dims = [d for d in dims if isinstance(d, int) and d > 0]
        return min(dims) if dims else None

    def slot_map(self, base_fingerprint: str, rank: int | None = None) -> dict[int, str]:
        """Slot -> concept name, slots counted in units of ``rank``.

        A concept of rank r in slot k covers columns [k r, (k+1) r); it appears under every slot of
        the unit rank whose columns it touches. Default unit: the smallest rank among the concepts, so
        mixed ranks never collide on one key.
        """
        records = self.list(base_fingerprint)
        unit = rank or min((r.rank for r in records), default=1)
        out: dict[int, str] = {}
        for record in records:
            for slot in slots.slots_covered(record.columns, unit):
                out.setdefault(slot, record.name)
        return dict(sorted(out.items()))

    def slot_report(self, base_fingerprint: str, rank: int, capacity: int | None = None) -> SlotReport:
        """Slot map, live reservations and capacity of one base model at ``rank``.

        Without ``capacity`` (``SpectralAdapters.capacity(rank)`` gives it for a loaded model), it is
        derived from the layer sizes recorded by the model's concepts, or None if it has none.
        """
        if capacity is None:
            dim = self.known_smallest_dim(base_fingerprint)
            capacity = None if dim is None else self.capacity(rank, dim)
        reserved: dict[int, str] = {}
        for reservation in self.reservations(base_fingerprint):
            for slot in slots.slots_covered(reservation.columns, rank):
                reserved.setdefault(slot, reservation.name)
        return SlotReport(base_fingerprint, rank, capacity, self.slot_map(base_fingerprint, rank), reserved)

    def allocate_slot(
        self, base_fingerprint: str, rank: int, capacity: int, requested: int | None = None
    ) -> int:
        """The slot a new concept would get now: ``requested`` if free, else the lowest free one.

        Advisory only (nothing is held); training should use ``reserve``, which allocates and holds.
        """
        with self._locked():
            return self._pick_slot(base_fingerprint, rank, capacity, requested, exclude=None)

    @contextmanager
    def reserve(
        self,
        name: str,
        base_fingerprint: str,
        rank: int,
        capacity: int,
        requested: int | None = None,
        tokens: Sequence[str] = (),
        overwrite: bool = False,
    ) -> Iterator[int]:
        """Hold a slot and a name while a concept trains; yields the slot.

        Other allocators skip the slot until the block exits (normally or not). ``add`` the finished
        concept inside the block. A killed process leaves a reservation file that counts as stale as
        soon as its pid is gone. ``overwrite`` lets a retraining reuse the existing concept's slot.
        """
        reservation = self._take_reservation(name, base_fingerprint, rank, capacity, requested, tokens, overwrite)
        try:
            yield reservation.slot
        finally:
            self._drop_reservation(reservation)

    # ----- writing --------------------------------------------------------------------------------

    def add(
        self,
        data: AdapterData,
        images: Sequence[str | os.PathLike | Image.Image] = (),
        preview: str | os.PathLike | Image.Image | None = None,
        overwrite: bool = False,
    ) -> ConceptRecord:
        """Store a concept under ``data.info.name``; refuses a taken name (unless ``overwrite``),
        a taken slot or a trigger token used by another concept of the same base model."""
        return self._add(data, images, preview, overwrite, slot_hint="")

    def import_file(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        base_fingerprint: str | None = None,
        overwrite: bool = False,
    ) -> ConceptRecord:
        """Import an adapter file, optionally under another name.

        The file is fully validated before the library is touched; a bad file, one made for another
        base model than ``base_fingerprint`` (when given), a taken name or a taken slot leave the
        library exactly as it was. The slot cannot be changed: it is baked into the stored vectors.
        """
        path = Path(path)
        data = read_adapter(path)
        if base_fingerprint is not None and data.base_fingerprint != base_fingerprint:
            raise LibraryError(
                f"{path.name} was trained on another base model ({data.base_model!r}, fingerprint "
                f"{data.base_fingerprint}), not on this one (fingerprint {base_fingerprint}); import it with "
                "the model it was trained on"
            )
        data = _renamed(data, self._import_name(data, name))
        hint = (
            f"; an adapter's slot is baked into its stored singular vectors and cannot be moved: delete the "
            f"other concept first to import {path.name}"
        )
        return self._add(data, (), None, overwrite, slot_hint=hint)

    def export_file(self, name: str, out_path: str | os.PathLike) -> Path:
        """Copy the concept's adapter file to ``out_path`` (a file, or a folder to put NAME.safetensors in)."""
        record = self.get(name)
        out = Path(out_path)
        if out.is_dir():
            out = out / f"{record.name}.safetensors"
        try:
            with atomic_path(out) as tmp:
                shutil.copyfile(record.adapter_path, tmp)
        except FileNotFoundError:
            if not record.adapter_path.exists():  # deleted meanwhile
                raise self._not_found(record.name) from None
            raise
        return out

    def delete(self, name: str) -> None:
        """Remove a concept (even a broken folder of that name) and free its slot."""
        name = self.validate_name(name)
        with self._locked():
            folder = self.root / name
            if not (folder.exists() or folder.is_symlink()):
                raise self._not_found(name)
            trash = self._make_workdir(TRASH_PREFIX, name)
            os.replace(folder, trash / name)  # the concept vanishes in one step
            fsync_path(self.root)
            shutil.rmtree(trash, ignore_errors=True)
        logger.info("deleted concept %s from %s", name, self.root)

    def cleanup(self) -> list[str]:
        """Remove what crashed operations left: work folders and stale reservations. Returns their names."""
        if not self.root.is_dir():
            return []
        with self._locked():
            return self._cleanup()

    # ----- internals: locking and scanning --------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise LibraryError(
                f"the concept library {self.root} is busy: another process held its lock for more than "
                f"{self.lock_timeout:g} s; try again when it has finished"
            ) from None
        try:
            yield
        finally:
            self._lock.release()

    def _cleanup_on_open(self) -> None:
        """Best effort: a busy library is cleaned by its next opener instead of blocking this one."""
        if not self.root.is_dir():
            return
        try:
            self._lock.acquire(timeout=0)
        except (Timeout, OSError):
            logger.debug("library %s is busy; skipping cleanup on open", self.root)
            return
        try:
            self._cleanup()
        finally:
            self._lock.release()

    def _scan(self) -> list[ConceptRecord]:
        if not self.root.is_dir():
            return []
        records = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue  # work folders, the lock, .gitkeep
            if not _NAME_RE.fullmatch(entry.name):
                logger.warning("ignoring %s: not a valid concept name", entry)
                continue
            try:
                records.append(ConceptRecord.from_folder(entry))
            except FileNotFoundError:
                continue  # deleted while we looked
            except LibraryError as error:
                logger.warning("ignoring broken concept folder %s: %s", entry, error)
        return records

    def _not_found(self, name: str) -> ConceptNotFoundError:
        known = ", ".join(r.name for r in self.list()) or "none"
        return ConceptNotFoundError(f"no concept named {name!r} in the library {self.root}; known concepts: {known}")

    def _name_taken(self, name: str) -> LibraryError:
        what = "a concept" if self.exists(name) else "a broken concept folder"
        return LibraryError(f"{what} named {name!r} is already in the library; pick another name or delete it first")

    def _import_name(self, data: AdapterData, name: str | None) -> str:
        if name is not None:
            return self.validate_name(name)
        try:
            return self.validate_name(data.info.name)
        except LibraryError as error:
            raise LibraryError(f"{error}; import the file under another name (import FILE --name NAME)") from None

    # ----- internals: slots and reservations ------------------------------------------------------

    def _owners(self, base_fingerprint: str, exclude: str | None) -> list[_Owner]:
        """Everything holding columns of this base model: concepts and live reservations."""
        owners = [
            _Owner(r.name, r.columns, f"concept {r.name!r} (slot {r.slot}, rank {r.rank})")
            for r in self.list(base_fingerprint)
            if r.name != exclude
        ]
        owners += [
            _Owner(v.name, v.columns, v.describe())
            for v in self._live_reservations().values()
            if v.base_fingerprint == base_fingerprint and v.name != exclude
        ]
        return owners

    def _pick_slot(
        self, base_fingerprint: str, rank: int, capacity: int, requested: int | None, exclude: str | None
    ) -> int:
        if rank < 1:
            raise LibraryError(f"rank must be at least 1, got {rank}")
        if capacity < 1:
            raise SlotConflictError(slots.slot_problem(0, rank, capacity, "this base model"))
        owners = self._owners(base_fingerprint, exclude)
        free = [k for k in range(capacity) if slots.first_overlap(owners, slots.columns(k, rank)) is None]
        if requested is not None:
            return _check_requested(owners, free, rank, capacity, requested)
        if not free:
            raise SlotConflictError(
                f"all {capacity} slots of this base model are taken; delete a concept or use a smaller rank "
                f"(slots here are of rank {rank})"
            )
        return free[0]

    def _check_tokens(self, base_fingerprint: str, tokens: Iterable[str], exclude: str | None) -> None:
        """Two concepts of one base model sharing a trigger token could never be used together."""
        users = {t: r.name for r in self.list(base_fingerprint) if r.name != exclude for t in r.tokens}
        for v in self._live_reservations().values():
            if v.base_fingerprint == base_fingerprint and v.name != exclude:
                users.update({t: f"{v.name} (training in progress)" for t in v.tokens})
        for token in tokens:
            if token in users:
                raise TokenError(
                    f"trigger token {token} is already used by concept {users[token]!r} of this base model; "
                    "pick another token"
                )

    def _reservations_dir(self) -> Path:
        return self.root / RESERVATIONS_DIR

    def _read_reservations(self) -> Iterator[tuple[Path, Reservation | None]]:
        """Every reservation file, with None for unreadable ones."""
        folder = self._reservations_dir()
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.json")):
            try:
                yield path, Reservation.from_json(json.loads(path.read_text(encoding="utf-8")))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, TypeError):
                yield path, None

    def _live_reservations(self) -> dict[str, Reservation]:
        return {v.name: v for _, v in self._read_reservations() if v is not None and v.is_live()}

    def _take_reservation(self, name, base_fingerprint, rank, capacity, requested, tokens, overwrite) -> Reservation:
        name = self.validate_name(name)
        with self._locked():
            if (self.root / name).exists() and not overwrite:
                raise self._name_taken(name)
            held = self._live_reservations().get(name)
            if held is not None:
                raise LibraryError(f"concept {name!r} is already being trained: {held.describe()}")
            exclude = name if overwrite else None
            slot = self._pick_slot(base_fingerprint, rank, capacity, requested, exclude)
            self._check_tokens(base_fingerprint, tokens, exclude)
            reservation = Reservation(
                name=name, base_fingerprint=base_fingerprint, rank=rank, slot=slot, tokens=list(tokens),
                pid=os.getpid(), pid_start=_process_start(os.getpid()), host=_HOST, created=time.time(),
                id=uuid.uuid4().hex,
            )
            path = self._reservations_dir() / f"{name}.json"
            atomic_write_text(path, json.dumps(reservation.to_json(), indent=2) + "\n")
        logger.info("reserved slot %d (rank %d) for %s", slot, rank, name)
        return reservation

    def _drop_reservation(self, reservation: Reservation) -> None:
        """Remove our reservation file; no lock needed, nobody else writes a live reservation's file."""
        path = self._reservations_dir() / f"{reservation.name}.json"
        try:
            current = json.loads(path.read_text(encoding="utf-8"))
            if current.get("id") == reservation.id:
                path.unlink()
        except (OSError, ValueError):
            logger.debug("reservation %s already gone", path)

    # ----- internals: writing ---------------------------------------------------------------------

    def _add(self, data, images, preview, overwrite, slot_hint: str) -> ConceptRecord:
        name = self.validate_name(data.info.name)
        if not data.created_at:  # fix it now so the file and concept.json agree
            data = dataclasses.replace(data, created_at=_now())
        with self._locked():
            self._check_can_add(data, overwrite, slot_hint)
            try:
                work = self._make_workdir(TMP_PREFIX, name)
                try:
                    _write_concept(work, data, images, preview)
                    self._move_into_place(work, name)
                finally:
                    shutil.rmtree(work, ignore_errors=True)  # gone already after a successful rename
            except Exception as error:  # a full disk gets one clear message; the library is unchanged
                clear = storage_error(error, self.root / name)
                if clear is None:
                    raise
                raise clear from error
            record = ConceptRecord.from_folder(self.root / name)
        logger.info("added concept %s (slot %d, rank %d) to %s", name, record.slot, record.rank, self.root)
        return record

    def _check_can_add(self, data: AdapterData, overwrite: bool, slot_hint: str) -> None:
        info = data.info
        if (self.root / info.name).exists() and not overwrite:
            raise self._name_taken(info.name)
        held = self._live_reservations().get(info.name)
        if held is not None and not held.is_ours():
            raise LibraryError(f"the name {info.name!r} is reserved by {held.describe()}; pick another name")
        clash = slots.first_overlap(self._owners(data.base_fingerprint, exclude=info.name), info.columns)
        if clash is not None:
            raise SlotConflictError(
                f"slot {info.slot} (rank {info.rank}) of base model {data.base_model!r} is taken by "
                f"{clash.label}{slot_hint}"
            )
        self._check_tokens(data.base_fingerprint, info.tokens, exclude=info.name)

    def _make_workdir(self, prefix: str, name: str) -> Path:
        work = Path(tempfile.mkdtemp(prefix=f"{prefix}{name}-", dir=self.root))
        work.chmod(0o755)  # mkdtemp makes it private; a concept folder is ordinary data
        return work

    def _move_into_place(self, work: Path, name: str) -> None:
        target = self.root / name
        if not (target.exists() or target.is_symlink()):
            os.replace(work, target)
            fsync_path(self.root)
            return
        # A directory cannot be replaced by rename: move the old one aside, then swap in the new one.
        old = self._make_workdir(OLD_PREFIX, name)
        os.replace(target, old / name)
        try:
            os.replace(work, target)
        except OSError:
            os.replace(old / name, target)
            raise
        fsync_path(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def _cleanup(self) -> list[str]:
        removed = self._restore_displaced()
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith((TMP_PREFIX, TRASH_PREFIX, OLD_PREFIX)):
                _remove(entry)
                removed.append(entry.name)
        for path, reservation in self._read_reservations():
            if reservation is None or not reservation.is_live():
                path.unlink(missing_ok=True)
                removed.append(f"{RESERVATIONS_DIR}/{path.name}")
        if self._reservations_dir().is_dir():
            for stray in self._reservations_dir().glob(f"{TMP_PREFIX}*"):
                _remove(stray)
                removed.append(f"{RESERVATIONS_DIR}/{stray.name}")
        if removed:
            logger.info("library %s: cleaned up %s", self.root, removed)
        return removed

    def _restore_displaced(self) -> list[str]:
        """An overwrite killed between its two renames left the old concept aside: put it back."""
        restored = []
        for old in sorted(self.root.glob(f"{OLD_PREFIX}*")):
            for child in old.iterdir() if old.is_dir() else ():
                target = self.root / child.name
                if _NAME_RE.fullmatch(child.name) and not target.exists():
                    os.replace(child, target)
                    logger.warning("restored concept %s left aside by an interrupted overwrite", child.name)
                    restored.append(child.name)
        return restored


# ----- helpers ------------------------------------------------------------------------------------


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid concept name, else raise ``LibraryError`` saying why."""
    if not isinstance(name, str):
        raise LibraryError(f"a concept name must be text, got {type(name).__name__}")
    if _NAME_RE.fullmatch(name) and name not in _WINDOWS_DEVICES:
        return name
    raise LibraryError(_name_problem(name))


def _check_requested(owners: Sequence[_Owner], free: list[int], rank: int, capacity: int, requested: int) -> int:
    problem = slots.slot_problem(requested, rank, capacity, "this base model")
    if problem:
        raise SlotConflictError(problem)
    clash = slots.first_overlap(owners, slots.columns(requested, rank))
    if clash is not None:
        options = f"free slots: {free}" if free else "no slot is free"
        raise SlotConflictError(f"slot {requested} is taken by {clash.label}; {options} (or let the library choose)")
    return requested


def _name_problem(name: str) -> str:
    if not name:
        return "a concept name cannot be empty"
    if len(name) > NAME_MAX_LENGTH:
        return f"concept name is {len(name)} characters long; {NAME_MAX_LENGTH} at most"
    if "/" in name or "\\" in name or ".." in name or name.startswith("."):
        return f"concept name {name!r} looks like a path; use a plain name such as 'my-dog'"
    if name != name.lower() and _NAME_RE.fullmatch(name.lower()):
        return f"concept names are lowercase: use {name.lower()!r}"
    if name in _WINDOWS_DEVICES:
        return f"{name!r} is a reserved device name on Windows; pick another name"
    return (
        f"concept name {name!r} is not valid: use lowercase letters, digits, '-' and '_', starting with a "
        "letter or digit (e.g. 'my-dog')"
    )


def _renamed(data: AdapterData, name: str) -> AdapterData:
    if name == data.info.name:
        return data
    return dataclasses.replace(data, info=dataclasses.replace(data.info, name=name))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _inside(folder: Path, relative: str) -> Path:
    """A path named by concept.json, refused if it points outside the concept folder."""
    path = folder / str(relative)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise LibraryError(f"{CONCEPT_FILE} names a file outside the concept folder: {relative!r}")
    return path


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not path.parent.exists():
            raise
        raise LibraryError(f"{path.name} is missing") from None
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: absurdly deep nesting
        raise LibraryError(f"{path.name} cannot be read ({error})") from None
    if not isinstance(data, dict):
        raise LibraryError(f"{path.name} is not a JSON object")
    return data




def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True


def _process_start(pid: int) -> str | None:
    """The process start time in clock ticks since boot (Linux), to tell a recycled pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


# ----- writing a concept folder -------------------------------------------------------------------


def _write_concept(folder: Path, data: AdapterData, images, preview) -> None:
    """Fill a work folder; concept.json goes last, so a complete folder is one that has it."""
    adapter = save_adapter(data, folder / ADAPTER_FILE)
    image_names, thumbnail_names = _write_images(folder, images)
    preview_name = _write_preview(folder, preview)
    meta = _concept_json(data, adapter, image_names, thumbnail_names, preview_name)
    path = folder / CONCEPT_FILE
    path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    fsync_path(path)
    fsync_path(folder)


def _concept_json(data: AdapterData, adapter: Path, images: list[str], thumbnails: list[str], preview) -> dict:
    info = data.info
    return {
        "library_format": LIBRARY_FORMAT,
        "name": info.name,
        "tokens": list(info.tokens),
        "slot": info.slot,
        "rank": info.rank,
        "variant": info.variant,
        "class_word": info.class_word,
        "base_model": data.base_model,
        "base_fingerprint": data.base_fingerprint,
        "created_at": data.created_at,
        "package_version": data.package_version,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "targets": data.targets,
        "train_config": data.train_config,
        "extra_metadata": data.extra_metadata,
        "smallest_dim": _smallest_dim(data),
        "adapter": ADAPTER_FILE,
        "adapter_sha256": _sha256(adapter),
        "adapter_bytes": adapter.stat().st_size,
        "preview": preview,
        "image_count": len(images),
        "images": images,
        "thumbnails": thumbnails,
        "added_at": _now(),
    }


def _smallest_dim(data: AdapterData) -> int | None:
    """min(m, n) over the adapted layers: with the rank it gives the model's slot capacity."""
    dims = [min(t["U"].shape[0], t["V"].shape[0]) for t in data.layers.values() if "U" in t and "V" in t]
    return min(dims) if dims else None


def _load_image(source) -> Image.Image:
    if isinstance(source, Image.Image):
        image = source.copy()
    else:
        path = Path(source)
        try:
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)  # phone photos store their rotation in EXIF
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise LibraryError(f"image {path.name} cannot be read ({error})") from None
    image = to_8bit(image)  # 16-bit and float images: convert() alone would clip them
    if image.mode in ("RGB", "RGBA", "L", "LA"):
        return image
    return image.convert("RGBA" if image.has_transparency_data else "RGB")


def _save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG")  # re-encoding drops EXIF (location, camera) from user photos
    fsync_path(path)


def _write_images(folder: Path, images) -> tuple[list[str], list[str]]:
    names, thumbnails = [], []
    for index, source in enumerate(images):
        image = _load_image(source)
        name, thumb_name = f"{IMAGES_DIR}/image-{index:03d}.png", f"{THUMBNAILS_DIR}/image-{index:03d}.png"
        (folder / IMAGES_DIR).mkdir(exist_ok=True)
        (folder / THUMBNAILS_DIR).mkdir(exist_ok=True)
        _save_png(image, folder / name)
        thumb = image.copy()
        thumb.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        _save_png(thumb, folder / thumb_name)
        names.append(name)
        thumbnails.append(thumb_name)
    return names, thumbnails


def _write_preview(folder: Path, preview) -> str | None:
    if preview is None:
        return None
    _save_png(_load_image(preview), folder / PREVIEW_FILE)
    return PREVIEW_FILE
