"""The on-disk concept library (docs/design.md section 5): one folder per concept, slots per base model.

Layout of a library root (``concepts/`` by default)::

    <name>/                          one concept folder (layout in ``library.records``)
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
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import combinations
from pathlib import Path

from filelock import FileLock, Timeout
from PIL import Image

from spectral_diffusion.atomic import TMP_PREFIX, atomic_dir, discard_dir, storage_error
from spectral_diffusion.core import slots
from spectral_diffusion.core.tokens import check_tokens_free
from spectral_diffusion.errors import AdapterFormatError, ConceptNotFoundError, LibraryError, SlotConflictError
from spectral_diffusion.formats.adapter_file import AdapterData, read_adapter, save_adapter
from spectral_diffusion.formats.bundle import read_bundle
from spectral_diffusion.library import allocation, workdirs
from spectral_diffusion.library.allocation import SlotOwner, SlotReport
from spectral_diffusion.library.names import matches_name_pattern, validate_name
from spectral_diffusion.library.records import (
    CONCEPT_FILE,
    ConceptRecord,
    card_metadata,
    preview_from_metadata,
    utc_timestamp,
    write_concept,
)
from spectral_diffusion.library.reservations import (
    RESERVATIONS_DIR,
    Reservation,
    drop_reservation,
    read_reservations,
    write_reservation,
)

logger = logging.getLogger(__name__)

LIBRARY_ENV = "SPECTRAL_DIFFUSION_LIBRARY"


def default_library() -> Path:
    """The library of the CLI, the app and the service unless one is named: ``$SPECTRAL_DIFFUSION_LIBRARY``,
    else ``spectral_diffusion/concepts`` in the user's data folder (``$XDG_DATA_HOME``, by default
    ``~/.local/share``): the same folder whatever the current folder is."""
    chosen = os.environ.get(LIBRARY_ENV)
    if chosen:
        return Path(chosen).expanduser().absolute()
    return user_data_folder() / "concepts"


def user_data_folder() -> Path:
    """``spectral_diffusion`` in the user's data folder (``$XDG_DATA_HOME``, by default ``~/.local/share``)."""
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data).expanduser().absolute() / "spectral_diffusion"


def stray_library_note(root: str | os.PathLike) -> str | None:
    """A note when ``./concepts`` holds concepts but ``root`` is elsewhere: ``concepts/`` in the current
    folder was the default library before it became ``default_library()``."""
    here = Path("concepts").absolute()
    if Path(root).expanduser().absolute() == here or not here.is_dir():
        return None
    try:
        count = sum(1 for child in here.iterdir() if (child / CONCEPT_FILE).is_file())
    except OSError:
        return None
    if not count:
        return None
    return (
        f"{here} holds {count} concept(s), but the library in use is {Path(root).expanduser().absolute()}; "
        f"pass --library {here} to use them (or set {LIBRARY_ENV})"
    )


LOCK_FILE = ".library.lock"
DEFAULT_LOCK_TIMEOUT = 30.0


class Library:
    """A folder of concepts. Every mutating operation holds ``root/.library.lock``."""

    def __init__(self, root: str | os.PathLike | None = None, lock_timeout: float = DEFAULT_LOCK_TIMEOUT):
        """``root`` None: ``default_library()``."""
        self.root = default_library() if root is None else Path(root).expanduser().absolute()
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
            raise LibraryError(
                f"the concept folder {folder} is broken ({error}); delete {name} and add it again"
            ) from None

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
        allocation.check_rank(rank)
        return slots.capacity(smallest_dim, rank)

    def known_smallest_dim(self, base_fingerprint: str) -> int | None:
        """The smallest adapted layer dimension of a base model, as recorded by its concepts."""
        dims = [r.metadata.get("smallest_dim") for r in self.list(base_fingerprint)]
        dims = [d for d in dims if isinstance(d, int) and d > 0]
        return min(dims) if dims else None

    def slot_map(self, base_fingerprint: str, rank: int | None = None) -> dict[int, str]:
        """Slot -> concept name, slots counted in units of ``rank``.

        A concept appears under every slot of the unit rank whose columns it touches. Default unit:
        the smallest rank among the concepts, so mixed ranks never collide on one key.
        """
        records = self.list(base_fingerprint)
        unit = rank or min((r.rank for r in records), default=1)
        return allocation.slots_held(records, unit)

    def slot_report(self, base_fingerprint: str, rank: int, capacity: int | None = None) -> SlotReport:
        """Slot map, live reservations and capacity of one base model at ``rank``.

        Without ``capacity`` (``SpectralAdapters.capacity(rank)`` gives it for a loaded model), it is
        derived from the layer sizes recorded by the model's concepts, or None if it has none.
        """
        if capacity is None:
            dim = self.known_smallest_dim(base_fingerprint)
            capacity = None if dim is None else self.capacity(rank, dim)
        reserved = allocation.slots_held(self.reservations(base_fingerprint), rank)
        return SlotReport(base_fingerprint, rank, capacity, self.slot_map(base_fingerprint, rank), reserved)

    def allocate_slot(self, base_fingerprint: str, rank: int, capacity: int, requested: int | None = None) -> int:
        """The slot a new concept would get now: ``requested`` if free, else the lowest free one.

        Advisory only (nothing is held); training should use ``reserve``, which allocates and holds.
        """
        with self._locked():
            return allocation.pick_slot(self._owners(base_fingerprint, exclude=None), rank, capacity, requested)

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
            drop_reservation(self._reservations_dir(), reservation)

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
        self._check_import_base(path, data, base_fingerprint)
        data = data.renamed(self._import_name(data, name))
        return self._add(data, (), preview_from_metadata(data), overwrite, slot_hint=_import_hint(path))

    def import_bundle(self, path: str | os.PathLike, base_fingerprint: str | None = None) -> list[ConceptRecord]:
        """Import every concept of a fused bundle (``formats.bundle``; a single adapter file is a bundle of
        one) under its own name: all of them, or, on any refusal, none."""
        path = Path(path)
        datas = read_bundle(path)
        for data in datas:
            self._check_import_base(path, data, base_fingerprint)
            self._import_name(data, None)
        for a, b in combinations(datas, 2):
            why = slots.clash(a.info, b.info)
            if why:
                raise LibraryError(f"{path.name}: its concepts {a.info.name!r} and {b.info.name!r} {why}")
        added: list[ConceptRecord] = []
        with self._locked():
            for data in datas:  # every refusal before the first write
                self._check_can_add(data, False, _import_hint(path))
            try:
                for data in datas:
                    added.append(self._add(data, (), preview_from_metadata(data), False, _import_hint(path)))
            except BaseException:
                for record in added:
                    discard_dir(self.root / record.name)
                raise
        return added

    def _check_import_base(self, path: Path, data: AdapterData, base_fingerprint: str | None) -> None:
        if base_fingerprint is not None and data.base_fingerprint != base_fingerprint:
            raise LibraryError(
                f"{path.name} was trained on another base model ({data.base_model!r}, fingerprint "
                f"{data.base_fingerprint}), not on this one (fingerprint {base_fingerprint}); import it with "
                "the model it was trained on"
            )

    def export_file(self, name: str, out_path: str | os.PathLike) -> Path:
        """Write the concept's adapter file to ``out_path`` (a file, or a folder to put NAME.safetensors in),
        with its preview and image count in the metadata."""
        record = self.get(name)
        out = Path(out_path)
        if out.is_dir():
            out = out / f"{record.name}.safetensors"
        try:
            data = read_adapter(record.adapter_path)
        except (AdapterFormatError, FileNotFoundError):
            if not record.adapter_path.exists():  # deleted meanwhile
                raise self._not_found(record.name) from None
            raise
        # the preview and image count travel inside the file, so an import shows the same card
        extra = {**data.extra_metadata, **card_metadata(record)}
        return save_adapter(dataclasses.replace(data, extra_metadata=extra), out)

    def delete(self, name: str) -> list[str]:
        """Remove a concept (even a broken folder of that name), free its slot and drop the resumable
        checkpoint of a training of that name (kept while that training runs). Returns what was removed:
        ``"concept"`` and / or ``"checkpoint"`` (an unfinished training's checkpoint alone is deletable too)."""
        name = self.validate_name(name)
        with self._locked():
            folder = self.root / name
            concept = folder.exists() or folder.is_symlink()
            saved = self.checkpoint_dir(name)
            checkpoint = saved.is_dir() and not saved.is_symlink() and name not in self._live_reservations()
            if not (concept or checkpoint):
                raise self._not_found(name)
            try:
                if concept:
                    discard_dir(folder)
                if checkpoint:
                    workdirs.remove_checkpoint(self.root, name)
            except OSError as error:  # a read-only or full library: the concept stays, whole
                raise (storage_error(error, folder) or error) from error
        removed = ["concept"] * concept + ["checkpoint"] * checkpoint
        logger.info("deleted %s of %s from %s", " and ".join(removed), name, self.root)
        return removed

    def checkpoint_dir(self, name: str) -> Path:
        """Where a training of ``name`` keeps its resumable checkpoint (``--checkpoint-every``, ``--resume``)."""
        return self.root / workdirs.CHECKPOINTS_DIR / self.validate_name(name)

    def discard_checkpoint(self, name: str) -> None:
        """Remove the checkpoint of a training of ``name``: called by that training once its concept is added
        (a later ``--resume`` of the name must not find a finished run's state)."""
        with self._locked():
            try:
                workdirs.remove_checkpoint(self.root, self.validate_name(name))
            except OSError as error:  # the concept is in the library; a stale checkpoint only costs space
                logger.warning("could not remove the checkpoint of %s: %s", name, error)

    def cleanup(self) -> list[str]:
        """Remove what crashed operations left: work folders and stale reservations. Returns their names."""
        if not self.root.is_dir():
            return []
        with self._locked():
            return self._cleanup()

    # ----- internals: locking and scanning --------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:  # the lock file is the first write: a read-only or full library refuses here
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except Timeout:  # before OSError: filelock's Timeout is one
            raise LibraryError(
                f"the concept library {self.root} is busy: another process held its lock for more than "
                f"{self.lock_timeout:g} s; try again when it has finished"
            ) from None
        except OSError as error:
            raise (storage_error(error, self.root / LOCK_FILE) or error) from error
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
            if not matches_name_pattern(entry.name):
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

    def _name_taken(self, name: str, data: AdapterData | None = None) -> LibraryError:
        """The name is taken. For an adapter being imported (``data``), whose slot and trigger tokens cannot
        change, say whether another name would help at all, and what would."""
        what = "a concept" if self.exists(name) else "a broken concept folder"
        taken = f"{what} named {name!r} is already in the library"
        if data is None:
            return LibraryError(f"{taken}; pick another name or delete it first")
        info, obstacles, culprits = data.info, [], []
        for owner in self._owners(data.base_fingerprint, exclude=None):
            if slots.overlap(owner.columns, info.columns):
                obstacles.append(
                    f"slot {info.slot} (rank {info.rank}), which it was trained into, is held by {owner.label}"
                )
                culprits.append(owner.name)
        users = {record.name: record.tokens for record in self.list(data.base_fingerprint)}
        for token, user in slots.token_clashes(sorted(info.tokens), users):
            obstacles.append(f"its trigger token {token} is used by concept {user!r}")
            culprits.append(user)
        if not obstacles:
            return LibraryError(
                f"{taken}; import the file under another name (import FILE --name NAME) or delete {name!r} first"
            )
        names = " and ".join(repr(n) for n in dict.fromkeys(culprits))
        return LibraryError(
            f"{taken}, and another name would not help: {'; '.join(obstacles)} (an imported adapter keeps its slot "
            f"and trigger tokens). Delete {names} first to import the file, or import it into another library"
        )

    def _import_name(self, data: AdapterData, name: str | None) -> str:
        if name is not None:
            return self.validate_name(name)
        try:
            return self.validate_name(data.info.name)
        except LibraryError as error:
            raise LibraryError(f"{error}; import the file under another name (import FILE --name NAME)") from None

    # ----- internals: slots and reservations ------------------------------------------------------

    def _owners(self, base_fingerprint: str, exclude: str | None) -> list[SlotOwner]:
        """Everything holding columns of this base model: concepts and live reservations."""
        owners = [
            SlotOwner(r.name, r.columns, f"concept {r.name!r} (slot {r.slot}, rank {r.rank})")
            for r in self.list(base_fingerprint)
            if r.name != exclude
        ]
        owners += [
            SlotOwner(v.name, v.columns, v.describe())
            for v in self._live_reservations().values()
            if v.base_fingerprint == base_fingerprint and v.name != exclude
        ]
        return owners

    def _check_tokens(self, base_fingerprint: str, tokens: Iterable[str], exclude: str | None) -> None:
        """Refuse a trigger token another concept (or training) of this base model uses."""
        owners = {
            f"concept {r.name!r} of this base model": r.tokens for r in self.list(base_fingerprint) if r.name != exclude
        }
        owners.update(
            {
                f"concept {v.name!r} of this base model (training in progress)": v.tokens
                for v in self._live_reservations().values()
                if v.base_fingerprint == base_fingerprint and v.name != exclude
            }
        )
        check_tokens_free(tokens, owners)

    def _reservations_dir(self) -> Path:
        return self.root / RESERVATIONS_DIR

    def _live_reservations(self) -> dict[str, Reservation]:
        found = read_reservations(self._reservations_dir())
        return {v.name: v for _, v in found if v is not None and v.is_live()}

    def _take_reservation(self, name, base_fingerprint, rank, capacity, requested, tokens, overwrite) -> Reservation:
        name = self.validate_name(name)
        with self._locked():
            if (self.root / name).exists() and not overwrite:
                raise self._name_taken(name)
            held = self._live_reservations().get(name)
            if held is not None:
                raise LibraryError(f"concept {name!r} is already being trained: {held.describe()}")
            exclude = name if overwrite else None
            slot = allocation.pick_slot(self._owners(base_fingerprint, exclude), rank, capacity, requested)
            self._check_tokens(base_fingerprint, tokens, exclude)
            reservation = Reservation.for_this_process(name, base_fingerprint, rank, slot, tokens)
            write_reservation(self._reservations_dir(), reservation)
        logger.info("reserved slot %d (rank %d) for %s", slot, rank, name)
        return reservation

    # ----- internals: writing ---------------------------------------------------------------------

    def _add(self, data, images, preview, overwrite, slot_hint: str) -> ConceptRecord:
        name = self.validate_name(data.info.name)
        if not data.created_at:  # fix it now so the file and concept.json agree
            data = dataclasses.replace(data, created_at=utc_timestamp())
        with self._locked():
            self._check_can_add(data, overwrite, slot_hint)
            with atomic_dir(self.root / name) as work:  # a full disk: one clear message, the library unchanged
                write_concept(work, data, images, preview)
            record = ConceptRecord.from_folder(self.root / name)
        logger.info("added concept %s (slot %d, rank %d) to %s", name, record.slot, record.rank, self.root)
        return record

    def _check_can_add(self, data: AdapterData, overwrite: bool, slot_hint: str) -> None:
        info = data.info
        if (self.root / info.name).exists() and not overwrite:
            raise self._name_taken(info.name, data if slot_hint else None)  # an import: its slot is fixed
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

    def _cleanup(self) -> list[str]:
        removed = workdirs.remove_leftovers(self.root)
        for path, reservation in read_reservations(self._reservations_dir()):
            if reservation is None or not reservation.is_live():
                path.unlink(missing_ok=True)
                removed.append(f"{RESERVATIONS_DIR}/{path.name}")
        if self._reservations_dir().is_dir():
            for stray in self._reservations_dir().glob(f"{TMP_PREFIX}*"):
                workdirs.remove_path(stray)  # an atomic write of a reservation file killed midway
                removed.append(f"{RESERVATIONS_DIR}/{stray.name}")
        removed += workdirs.remove_checkpoint_leftovers(self.root, self._live_reservations())
        if removed:
            logger.info("library %s: cleaned up %s", self.root, removed)
        return removed


def _import_hint(path: Path) -> str:
    return (
        f"; an adapter's slot is baked into its stored singular vectors and cannot be moved: delete the "
        f"other concept first to import {path.name}"
    )
