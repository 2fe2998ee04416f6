"""Reservations: a slot and a name held by a training in progress, one JSON file each.

``.reservations/<name>.json`` records the slot, the pid, host and start time of the process that
made it. A file whose process is gone is stale and ignored, so a killed training never holds a slot
for ever; the pid's start time tells a recycled pid apart.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from spectral_diffusion.atomic import atomic_write_text
from spectral_diffusion.core.config import VARIANTS, ConceptInfo, ConceptInfoView

logger = logging.getLogger(__name__)

RESERVATIONS_DIR = ".reservations"
# A reservation made on another host cannot be checked for a live process; trust it this long.
FOREIGN_RESERVATION_MAX_AGE = 3 * 24 * 3600.0
# A reservation file never recorded the variant (slots do not depend on it): its ConceptInfo gets this.
_UNRECORDED_VARIANT = VARIANTS[0]
# The keys of a reservation file besides the concept's, in the order they are written.
_PROCESS_KEYS = ("pid", "pid_start", "host", "created", "id")

_HOST = socket.gethostname()


@dataclass
class Reservation(ConceptInfoView):
    """A slot (and a name) held by a training in progress."""

    info: ConceptInfo  # name, slot, rank and trigger tokens of the concept being trained
    base_fingerprint: str
    pid: int
    pid_start: str | None
    host: str
    created: float  # epoch seconds
    id: str

    @classmethod
    def for_this_process(
        cls, name: str, base_fingerprint: str, rank: int, slot: int, tokens: Sequence[str]
    ) -> Reservation:
        """A new reservation held by the calling process."""
        pid = os.getpid()
        return cls(
            info=ConceptInfo(name, slot, rank, _UNRECORDED_VARIANT, list(tokens)),
            base_fingerprint=base_fingerprint,
            pid=pid,
            pid_start=_process_start(pid),
            host=_HOST,
            created=time.time(),
            id=uuid.uuid4().hex,
        )

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
        """The reservation file's content (its format predates ``info``: flat keys, no variant)."""
        return {
            "name": self.name,
            "base_fingerprint": self.base_fingerprint,
            "rank": self.rank,
            "slot": self.slot,
            "tokens": list(self.tokens),
            **{key: getattr(self, key) for key in _PROCESS_KEYS},
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: dict) -> Reservation:
        """Read a reservation file's content; KeyError, TypeError or ValueError if it is not one."""
        info = ConceptInfo(data["name"], data["slot"], data["rank"], _UNRECORDED_VARIANT, list(data["tokens"]))
        return cls(info=info, base_fingerprint=data["base_fingerprint"], **{key: data[key] for key in _PROCESS_KEYS})


def read_reservations(folder: Path) -> Iterator[tuple[Path, Reservation | None]]:
    """Every reservation file of ``folder``, with None for unreadable ones."""
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.json")):
        try:
            yield path, Reservation.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, TypeError, KeyError):
            yield path, None


def write_reservation(folder: Path, reservation: Reservation) -> None:
    atomic_write_text(_path(folder, reservation.name), json.dumps(reservation.to_json(), indent=2) + "\n")


def drop_reservation(folder: Path, reservation: Reservation) -> None:
    """Remove our reservation file; no lock needed, nobody else writes a live reservation's file."""
    path = _path(folder, reservation.name)
    try:
        current = json.loads(path.read_text(encoding="utf-8"))
        if current.get("id") == reservation.id:
            path.unlink()
    except (OSError, ValueError):
        logger.debug("reservation %s already gone", path)


def _path(folder: Path, name: str) -> Path:
    return folder / f"{name}.json"


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
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None
