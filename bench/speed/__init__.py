"""Speed and memory at SD1.5 size: spectral slots vs PEFT LoRA vs the dense reference (``python -m bench.speed.run``)."""
