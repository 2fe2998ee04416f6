"""Item 4 (+ item 7's second plot): one denoising step (one UNet forward, no grad) with concepts.

"live N": N additive rank-8 concepts active in their slots, computed in factored form at every call
(additive is the costlier variant: its update has rank 2r). "baked N": the same N concepts merged into
the base weights. Batch 1, 32 x 32 latents, 77 text states; with classifier-free guidance a step is two
such evaluations (or one of batch 2) for base and adapters alike, so the ratios carry over.
"""

from __future__ import annotations

import torch

from bench.common import Timings, run_rounds, set_modules


def run(unet, plain, adapters, layers, lives=(1, 2, 4, 8), baked=(1, 4, 8), rounds=5, warmup=1, seed=0, log=print):
    names = sorted(adapters.concepts, key=lambda n: adapters.concept(n).slot)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 32, 32, generator=generator)
    text = torch.randn(1, 77, 768, generator=generator)
    timesteps = torch.tensor([500])

    def forward():
        with torch.inference_mode():
            unet(latents, timesteps, encoder_hidden_states=text)

    def use(count: int, merge: bool):
        def hook():
            adapters.unmerge()
            set_modules(unet, layers)
            for index, name in enumerate(names):
                adapters.set_enabled(name, index < count)
            if merge:
                adapters.merge(names[:count])

        return hook

    def base_hook():
        adapters.unmerge()
        set_modules(unet, plain)

    variants, before = {"base": forward}, {"base": base_hook}
    for count in lives:
        variants[f"live {count}"] = forward
        before[f"live {count}"] = use(count, merge=False)
    for count in baked:
        variants[f"baked {count}"] = forward
        before[f"baked {count}"] = use(count, merge=True)
    timings: Timings = run_rounds(
        variants, rounds=rounds, warmup=warmup, before=before, seed=seed, progress=lambda msg: log(f"    {msg}")
    )
    adapters.unmerge()
    set_modules(unet, plain)
    return timings


def profile(unet, plain, adapters, layers, live: int = 4, seed: int = 0, log=print) -> dict[str, str]:
    """Operator profiles of one base step and one step with ``live`` concepts live."""
    from bench.profiling.profiles import inference_profiles

    names = sorted(adapters.concepts, key=lambda n: adapters.concept(n).slot)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 32, 32, generator=generator)
    text = torch.randn(1, 77, 768, generator=generator)

    def forward():
        with torch.inference_mode():
            unet(latents, torch.tensor([500]), encoder_hidden_states=text)

    def base():
        adapters.unmerge()
        set_modules(unet, plain)

    def live_hook():
        adapters.unmerge()
        set_modules(unet, layers)
        for index, name in enumerate(names):
            adapters.set_enabled(name, index < live)

    out = inference_profiles(forward, {"base": base, f"live {live}": live_hook}, log=log)
    base()
    return out
