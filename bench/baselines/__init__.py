"""What the benchmarks compare against: the dense reference layer and a PEFT LoRA concept."""
