"""Benchmarks, grouped by purpose, each run from the repository root as a module (``python -m bench.X``):

- ``bench.speed``: training, inference, SVD preparation, files and memory at SD1.5 size against PEFT
  LoRA and the dense reference (``python -m bench.speed.run [--quick]``, writes docs/benchmarks.md);
- ``bench.quality``: what concepts draw on ``builtin:toy``, alone, fused and in layouts;
- ``bench.baselines``: what they are compared with (the dense reference layer, a PEFT LoRA concept);
- ``bench.profiling``: where the time and the bytes go;
- ``bench.reliability``: fuzzed files, hostile uploads and the app soak.

``bench.common`` holds the timing machinery, ``bench.support`` what the benchmarks share with the tests.
Every figure is a ratio measured in one run on one machine (docs/design.md section 9).
"""

import os

# Benchmarks never download: set before any of them imports huggingface_hub, which reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
