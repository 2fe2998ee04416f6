"""File formats: single adapters, fused bundles, LoRA exports."""

# what a fused set can be written as: one spectral bundle, or a LoRA with peft / kohya keys
EXPORT_FORMATS = ("spectral", "lora", "kohya")
