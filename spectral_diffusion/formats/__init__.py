"""File formats: single adapters, fused bundles, LoRA exports."""

from spectral_diffusion.errors import ConfigError

# what a concept or a fused set can be written as: spectral (its adapter file / one bundle), or a LoRA
# with peft / kohya keys
EXPORT_FORMATS = ("spectral", "lora", "kohya")


def check_export_format(format: str) -> str:
    """Return ``format`` if files can be exported in it, else raise ``ConfigError`` naming the choices."""
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}")
    return format
