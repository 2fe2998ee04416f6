"""The samplers a generation can use, by name, built from the model's own scheduler config.

The names are what the CLI and the app offer. diffusers is imported only when a scheduler is built,
so front ends can list the names without loading it.
"""

from __future__ import annotations

from spectral_diffusion.errors import RequestError

# name -> (diffusers scheduler class name, forced config overrides); "default" keeps the model's own.
_KINDS: dict[str, tuple[str | None, dict]] = {
    "default": (None, {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
}
SCHEDULERS = tuple(_KINDS)


def make_scheduler(name: str, base_scheduler):
    """A scheduler of kind ``name`` built from the model's own scheduler config (no download)."""
    if name not in SCHEDULERS:
        raise RequestError(f"unknown scheduler {name!r}; use one of {sorted(SCHEDULERS)}")
    class_name, overrides = _KINDS[name]
    if class_name is None:
        return base_scheduler
    import diffusers

    kwargs = dict(overrides)
    if name == "ddim" and "clip_sample" not in base_scheduler.config:
        # DDIM defaults to clipping x0 to [-1, 1], which is wrong for latents (SDXL's Euler config is silent)
        kwargs["clip_sample"] = False
    return getattr(diffusers, class_name).from_config(base_scheduler.config, **kwargs)
