"""Models made from seeds, for tests, CI and benchmarks: nothing here is needed to use a real model.

``tiny``: the pipelines behind ``builtin:tiny`` and ``builtin:tiny-sdxl`` (real Stable Diffusion
architectures, random weights); ``bpe``: the small CLIP-format tokenizer they and ``python -m
toy.pretrain`` use instead of downloading CLIP's. The registry (``models.registry``) builds them on
first use, so this package sits below ``models`` in the layering (tests/test_packaging.py).
"""
