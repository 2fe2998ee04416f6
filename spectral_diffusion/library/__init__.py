"""The on-disk concept library: ``Library`` and the records it hands out."""

from spectral_diffusion.library.allocation import SlotReport
from spectral_diffusion.library.names import validate_name
from spectral_diffusion.library.records import ConceptRecord
from spectral_diffusion.library.reservations import Reservation
from spectral_diffusion.library.store import Library

__all__ = ["ConceptRecord", "Library", "Reservation", "SlotReport", "validate_name"]
