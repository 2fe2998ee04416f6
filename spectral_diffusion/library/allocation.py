"""Slot allocation over what a library holds: pure functions of the owners of a base model's columns.

The slot rules themselves (columns, capacity, overlap) live in ``core.slots``; this module applies
them to concepts and reservations: which slots are free, which one a new concept gets, and the slot
map shown to users.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from spectral_diffusion.core import slots
from spectral_diffusion.errors import LibraryError, SlotConflictError


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
class SlotOwner:
    """Something holding columns of a base model (a concept or a live reservation), for messages."""

    name: str
    columns: range
    label: str


def check_rank(rank: int) -> None:
    if rank < 1:
        raise LibraryError(f"rank must be at least 1, got {rank}")


def slots_held(holders: Iterable, unit: int) -> dict[int, str]:
    """Slot of rank ``unit`` -> name of the first of ``holders`` (with ``name`` and ``columns``) touching it.

    A holder of a larger rank appears under every unit slot its columns touch, so mixed ranks never
    collide on one key.
    """
    out: dict[int, str] = {}
    for holder in holders:
        for slot in slots.slots_covered(holder.columns, unit):
            out.setdefault(slot, holder.name)
    return dict(sorted(out.items()))


def pick_slot(owners: Sequence[SlotOwner], rank: int, capacity: int, requested: int | None) -> int:
    """``requested`` if it exists and is free, else the lowest free slot; ``SlotConflictError`` if none."""
    check_rank(rank)
    if capacity < 1:
        raise SlotConflictError(slots.slot_problem(0, rank, capacity, "this base model"))
    free = [k for k in range(capacity) if slots.first_overlap(owners, slots.columns(k, rank)) is None]
    if requested is not None:
        return _check_requested(owners, free, rank, capacity, requested)
    if not free:
        raise SlotConflictError(_full_message(owners, rank, capacity))
    return free[0]


def _full_message(owners: Sequence[SlotOwner], rank: int, capacity: int) -> str:
    """What helps when every slot of ``rank`` is taken: deleting a concept, another library, and a
    smaller rank only where columns for one are actually free (mixed ranks can leave some)."""
    message = (
        f"all {capacity} slots of rank {rank} of this base model are taken; delete a concept you no longer "
        "need (list shows them), or keep further concepts in another library (--library DIR)"
    )
    for smaller in range(rank - 1, 0, -1):
        fits = (k for k in range(capacity * rank // smaller))
        if any(slots.first_overlap(owners, slots.columns(k, smaller)) is None for k in fits):
            return f"{message}; a concept of rank {smaller} or less still fits (--rank {smaller})"
    return message


def _check_requested(owners: Sequence[SlotOwner], free: list[int], rank: int, capacity: int, requested: int) -> int:
    problem = slots.slot_problem(requested, rank, capacity, "this base model")
    if problem:
        raise SlotConflictError(problem)
    clash = slots.first_overlap(owners, slots.columns(requested, rank))
    if clash is not None:
        options = f"free slots: {free}" if free else "no slot is free"
        raise SlotConflictError(f"slot {requested} is taken by {clash.label}; {options} (or let the library choose)")
    return requested
