"""Spectral Diffusion: multi-concept personalisation of Stable Diffusion with Spectral Adapters.

Each concept is trained into its own slot, a disjoint block of top singular-vector columns of every
adapted weight, so several concepts fuse by switching their slots on together.

The public API is importable from here (``from spectral_diffusion import Studio``); names are
imported on first use, so ``import spectral_diffusion`` stays cheap. See docs/architecture.md for
the subpackages and docs/design.md for the maths, file formats and contracts.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "SpectralAdapters": "spectral_diffusion.core.model",
    "TargetConfig": "spectral_diffusion.core.config",
    "ConceptInfo": "spectral_diffusion.core.config",
    "SpectralLayer": "spectral_diffusion.core.layers",
    "AdapterData": "spectral_diffusion.formats.adapter_file",
    "load_adapter": "spectral_diffusion.formats.adapter_file",
    "read_adapter": "spectral_diffusion.formats.adapter_file",
    "save_adapter": "spectral_diffusion.formats.adapter_file",
    "export_lora": "spectral_diffusion.formats.lora",
    "read_bundle": "spectral_diffusion.formats.bundle",
    "write_bundle": "spectral_diffusion.formats.bundle",
    "Library": "spectral_diffusion.library.store",
    "ConceptRecord": "spectral_diffusion.library.records",
    "Studio": "spectral_diffusion.generation.fusion",
    "GenerationRequest": "spectral_diffusion.generation.request",
    "TrainConfig": "spectral_diffusion.training.config",
    "train_concept": "spectral_diffusion.training.trainer",
    "load_pipeline": "spectral_diffusion.models.registry",
    "TrainRequest": "spectral_diffusion.frontends.workflows",
    "Service": "spectral_diffusion.frontends.service",
    "SpectralDiffusionError": "spectral_diffusion.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spectral_diffusion' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
