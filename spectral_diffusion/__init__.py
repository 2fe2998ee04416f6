"""Spectral Diffusion: multi-concept personalisation of Stable Diffusion with Spectral Adapters.

Each concept is trained into its own slot, a disjoint block of top singular-vector columns of every
adapted weight, so several concepts fuse by switching their slots on together.
"""

__version__ = "0.1.0"
