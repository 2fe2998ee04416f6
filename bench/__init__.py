"""Benchmarks: spectral slots vs PEFT LoRA vs the dense reference approach, at SD1.5 size.

Entry point: ``python bench/run.py [--quick]``. Every figure is a ratio measured in one run on one
machine (docs/design.md section 9); results go to ``docs/benchmarks.md``.
"""
