"""Item 2: one layer's forward + backward at the SD1.5 layer shapes, ours vs PEFT LoRA vs dense.

Each shape is timed with the token count it sees in the item-1 training step (32 x 32 latents:
1024 tokens at width 320, 256 at 640, 64 at 1280, 77 text tokens for cross-attention keys/values).
The input requires grad (as inside a network), so every variant computes the input gradient too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.baselines.reference import ReferenceSpectralLinear
from bench.common import Timings, peft_lora_modules, randomize, run_rounds
from spectral_diffusion.core.layers import SpectralLayer
from spectral_diffusion.core.svd import top_k_svd

# (label, in features, out features, tokens)
SD15_SHAPES = [
    ("attn 320", 320, 320, 1024),
    ("x-attn k/v 320", 768, 320, 77),
    ("ff in 320 (GEGLU)", 320, 2560, 1024),
    ("ff out 320", 1280, 320, 1024),
    ("attn 640", 640, 640, 256),
    ("x-attn k/v 640", 768, 640, 77),
    ("ff in 640 (GEGLU)", 640, 5120, 256),
    ("ff out 640", 2560, 640, 256),
    ("attn 1280", 1280, 1280, 64),
    ("x-attn k/v 1280", 768, 1280, 77),
    ("ff in 1280 (GEGLU)", 1280, 10240, 64),
    ("ff out 1280", 5120, 1280, 64),
]
QUICK_SHAPES = [SD15_SHAPES[i] for i in (0, 8)]
VARIANTS = ("base", "lora", "additive", "rotational", "reference")


class _Holder(nn.Module):
    """A one-layer model for PEFT to inject into (PEFT matches modules by name)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.to_q = layer


@dataclass
class LayerRow:
    label: str
    n_in: int
    n_out: int
    tokens: int
    base_ms: float
    timings: Timings

    def ratio(self, num: str, den: str = "base") -> float:
        return self.timings.ratio(num, den)


def build_variants(n_in: int, n_out: int, rank: int, seed: int = 0) -> dict[str, nn.Module]:
    """The five variants of one layer, all over the same frozen base weight."""
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out)
    base.requires_grad_(False)
    holder = _Holder(base)
    lora, _ = peft_lora_modules(holder, ["to_q"], rank, suffixes=("to_q",), seed=seed)
    spectrum = top_k_svd(base.weight, 2 * rank)
    layers = {"base": base, "lora": lora["to_q"]}
    for slot, variant in enumerate(("additive", "rotational")):
        layer = SpectralLayer(base)
        adapter = layer.add_concept(variant, spectrum.block(slot * rank, (slot + 1) * rank), variant, slot)
        randomize([getattr(adapter, p) for p in adapter.trainable_names()], seed=seed + slot)
        adapter.requires_grad_(True)
        layers[variant] = layer
    reference = ReferenceSpectralLinear.from_linear(base, rank)
    randomize(reference.trainable(), seed=seed + 7)
    layers["reference"] = reference
    return layers


def _step(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    params = [p for p in layer.parameters() if p.requires_grad]

    def run():
        out = layer(x)
        torch.autograd.grad(out, [x, *params], grad_out)

    return run


def bench_shape(label, n_in, n_out, tokens, rank=8, rounds=10, warmup=1, target_s=0.03, variants=VARIANTS) -> LayerRow:
    layers = build_variants(n_in, n_out, rank)
    x = torch.randn(1, tokens, n_in, requires_grad=True)
    grad_out = torch.randn(1, tokens, n_out)
    steps = {name: _step(layers[name], x, grad_out) for name in variants}
    inner = {}
    for name, fn in steps.items():  # calibrate: enough calls per sample to reach ~target_s
        fn()
        timing = run_rounds({name: fn}, rounds=1, warmup=0)
        inner[name] = max(1, min(200, int(target_s / max(timing.samples[name][0].wall, 1e-6))))
    timings = run_rounds(steps, rounds=rounds, warmup=warmup, inner=inner, seed=n_in * 7 + n_out)
    return LayerRow(label, n_in, n_out, tokens, timings.median("base") * 1e3, timings)


def run(quick: bool = False, shapes=None, rank: int = 8, rounds: int | None = None, warmup: int = 1, log=print):
    shapes = shapes if shapes is not None else (QUICK_SHAPES if quick else SD15_SHAPES)
    rounds = rounds if rounds is not None else (4 if quick else 11)
    rows = []
    for label, n_in, n_out, tokens in shapes:
        row = bench_shape(label, n_in, n_out, tokens, rank=rank, rounds=rounds, warmup=warmup)
        log(
            f"  {label:<20} {n_in:>5}->{n_out:<5} T={tokens:<5} base {row.base_ms:8.2f} ms | "
            + " ".join(f"{v} {row.ratio(v):.2f}x" for v in VARIANTS[1:])
        )
        rows.append(row)
    return rows
