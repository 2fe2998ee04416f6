"""Slot rules, in one place: which columns a slot owns, how many slots a model has, when two clash.

A concept of rank r in slot k owns singular-vector columns [k r, (k+1) r) of every adapted layer.
Concepts of different ranks can share a model; two concepts clash when their column ranges overlap
(they could never be active together) or when they share a trigger token.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import Protocol


class HasSlot(Protocol):
    slot: int
    rank: int


def columns(slot: int, rank: int) -> range:
    """The singular-vector columns owned by ``slot`` at ``rank``."""
    return range(slot * rank, (slot + 1) * rank)


def capacity(smallest_dim: int, rank: int) -> int:
    """Slots of ``rank`` in a model whose smallest adapted layer dimension (min(m, n)) is ``smallest_dim``."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    return smallest_dim // rank


def slots_covered(cols: range, unit: int) -> range:
    """The slots of rank ``unit`` whose columns ``cols`` touches (for slot maps over mixed ranks)."""
    return range(cols.start // unit, (cols.stop - 1) // unit + 1)


def overlap(a: range, b: range) -> bool:
    return a.start < b.stop and b.start < a.stop


def slot_problem(slot: int, rank: int, slot_capacity: int, where: str = "this model") -> str | None:
    """Why ``slot`` cannot exist at ``rank`` in a model of ``slot_capacity`` slots, or None."""
    if slot_capacity < 1:
        return f"{where} has no slot of rank {rank}; use a smaller rank"
    if not 0 <= slot < slot_capacity:
        return f"slot {slot} does not exist at rank {rank}: {where} has {slot_capacity} slots (0-{slot_capacity - 1})"
    return None


def clash(a: HasSlot, b: HasSlot) -> str | None:
    """Why two concepts cannot be active together (a phrase after "they"), or None."""
    if overlap(columns(a.slot, a.rank), columns(b.slot, b.rank)):
        where = f"slot {a.slot}" if (a.slot, a.rank) == (b.slot, b.rank) else "overlapping slot columns"
        return f"both use {where} (rank {a.rank} slot {a.slot}, rank {b.rank} slot {b.slot})"
    shared = token_clash(sorted(getattr(a, "tokens", ())), {"": getattr(b, "tokens", ())})
    if shared:
        return f"share the trigger token {shared[0]}"
    return None


def token_clashes(tokens: Iterable[Hashable], owners: Mapping[str, Iterable[Hashable]]) -> Iterator[tuple]:
    """Every (token, owner) where one of ``tokens`` is already one of ``owners``' (owner -> its tokens or
    token ids): two concepts sharing a trigger token could never be used together, as one prompt word
    would call both."""
    for token in tokens:
        for owner, theirs in owners.items():
            if token in theirs:
                yield token, owner


def token_clash(tokens: Iterable[Hashable], owners: Mapping[str, Iterable[Hashable]]) -> tuple | None:
    """The first of ``token_clashes`` as (token, owner), or None."""
    return next(token_clashes(tokens, owners), None)


def first_overlap(owners: Iterable, cols: range):
    """The first of ``owners`` (anything with a ``columns`` range) whose columns overlap ``cols``, or None."""
    for owner in owners:
        if overlap(owner.columns, cols):
            return owner
    return None
