"""Errors a user can cause. Each message says what is wrong and what to do about it.

Everything the package raises on bad input derives from ``SpectralDiffusionError`` so the CLI and the
app can show one line instead of a traceback.
"""


class SpectralDiffusionError(Exception):
    """Base class of every user-facing error of the package."""


class AdapterFormatError(SpectralDiffusionError, ValueError):
    """An adapter file is not a valid spectral adapter (wrong format, corrupt, inconsistent)."""


class BaseModelMismatchError(SpectralDiffusionError, ValueError):
    """An adapter was trained on another base model than the one it is being loaded into."""


class SlotConflictError(SpectralDiffusionError, ValueError):
    """Two concepts would share a slot, or a slot is outside the model's capacity."""


class ConceptNotFoundError(SpectralDiffusionError, KeyError):
    """A concept name is unknown (to a layer, a pipeline or the library)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class StorageError(SpectralDiffusionError, OSError):
    """The disk refused a write (full, over quota, file too large); nothing was changed."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return self.strerror if self.strerror else super().__str__()


class ConfigError(SpectralDiffusionError, ValueError):
    """A setting is out of range or unknown (training settings, adapter targets, a concept's slot or rank,
    an export format)."""


class ImageDataError(SpectralDiffusionError, ValueError):
    """The training images cannot be used: none found, unreadable, too small or too many."""


class TrainingCancelled(SpectralDiffusionError):
    """``should_stop()`` asked the run to stop; the pipeline is restored and no concept was made."""


class CheckpointError(SpectralDiffusionError, ValueError):
    """A checkpoint cannot be resumed: damaged, or made by a different configuration or base model."""


class FusionError(SpectralDiffusionError, ValueError):
    """A set of concepts cannot be fused (same slot, shared token, different adapter targets)."""


class RequestError(SpectralDiffusionError, ValueError):
    """A generation request is malformed, or its prompt uses a concept that is not selected."""


class ModelNotFoundError(SpectralDiffusionError, ValueError):
    """A ``--model`` value names nothing loadable; the message says what to do."""


class LibraryError(SpectralDiffusionError, ValueError):
    """A library operation is refused: bad name, name taken, library busy, broken concept folder."""


class LayoutError(SpectralDiffusionError, ValueError):
    """A regional layout is malformed: bad box, too many regions, a concept named twice, bad JSON."""


class RoutingError(SpectralDiffusionError, ValueError):
    """Regional routing cannot be applied: masks of another size, a layer whose tokens fit no grid."""
