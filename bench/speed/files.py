"""Items 5 (file sizes) and 6 (fusion of 8 concepts) at SD1.5 size.

File sizes: one concept at rank 8 on the 128 UNet attention linears, float32 safetensors in every
case: our adapter file (slot triplets U_k, s_k, V_k plus the trainable tensors, docs/design.md section 4),
a PEFT LoRA file of the same targets and rank (diffusers' ``unet.<path>.lora_A/B.weight`` keys), and
the reference implementation's checkpoint (the full U, S, V of every adapted layer).

Fusion: from 8 adapter files on disk (8 additive concepts of rank 8 in slots 0-7) to a model that
generates with all of them: read + validate + compatibility-check + install (live fusion), then bake
(merge), plus unmerge and the exact fused LoRA export. Mix-of-Show's gradient fusion, for contrast,
runs an optimisation (~15 min per fused set).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.common import UNET_TARGETS, randomize, set_modules
from spectral_diffusion.core import compatibility
from spectral_diffusion.core.config import ConceptInfo, TargetConfig
from spectral_diffusion.core.model import SpectralAdapters
from spectral_diffusion.core.svd import SvdCache
from spectral_diffusion.formats.adapter_file import adapter_from_model, install_adapters, read_adapter, save_adapter
from spectral_diffusion.formats.lora import lora_state_dict

BASE_MODEL = "bench:sd15-size-random"


@dataclass
class FileSizes:
    bytes: dict = field(default_factory=dict)  # label -> bytes on disk
    reference_computed: bool = False  # reference size computed from shapes (no full SVD in --quick)
    parts: dict = field(default_factory=dict)  # label -> bytes by part (bench.profiling.file_bytes.byte_breakdown)


def _reference_bytes(ctx) -> int:
    total = 0
    for path in ctx.paths:
        m, n = ctx.plain[path].weight.shape
        q = min(m, n)
        total += 4 * (m * q + q + n * q)
    return total


def file_sizes(ctx, out_dir: Path, rank: int = 8) -> FileSizes:
    """Sizes on disk; ``ctx`` holds rank-``rank`` spectral concepts (bench_train.install_rank)."""
    from bench.profiling.file_bytes import byte_breakdown
    from bench.speed.train import SPECTRAL, concept_name, ensure_peft

    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = FileSizes()
    for variant in SPECTRAL:
        data = adapter_from_model(ctx.adapters, concept_name(variant, rank), BASE_MODEL)
        path = save_adapter(data, out_dir / f"spectral-{variant}-r{rank}.safetensors")
        sizes.bytes[f"ours, {variant}"] = path.stat().st_size
        half = save_adapter(data, out_dir / f"spectral-{variant}-r{rank}-fp16.safetensors", triplet_dtype="float16")
        sizes.bytes[f"ours, {variant}, fp16 triplets"] = half.stat().st_size
        sizes.parts[f"ours, {variant}, fp16 triplets"] = byte_breakdown(half)
    modules, _ = ensure_peft(ctx, rank)
    lora = {}
    for path, module in modules.items():
        lora[f"unet.{path}.lora_A.weight"] = module.lora_A["default"].weight.detach().contiguous()
        lora[f"unet.{path}.lora_B.weight"] = module.lora_B["default"].weight.detach().contiguous()
    save_file(lora, str(out_dir / f"peft-lora-r{rank}.safetensors"))
    sizes.bytes["PEFT LoRA"] = (out_dir / f"peft-lora-r{rank}.safetensors").stat().st_size
    sizes.parts["PEFT LoRA"] = byte_breakdown(out_dir / f"peft-lora-r{rank}.safetensors")
    if ctx.reference is not None:
        tensors = {}
        for path, layer in ctx.reference.items():
            for key, tensor in layer.stored_tensors().items():
                tensors[f"unet.{path}.{key}"] = tensor.contiguous()
        save_file(tensors, str(out_dir / "reference-full-usv.safetensors"))
        sizes.bytes["reference (full U, S, V)"] = (out_dir / "reference-full-usv.safetensors").stat().st_size
        del tensors
    else:
        sizes.bytes["reference (full U, S, V)"] = _reference_bytes(ctx)
        sizes.reference_computed = True
    return sizes


@dataclass
class FusionResult:
    concepts: int
    install_s: list = field(default_factory=list)  # read + validate + check + install, all concepts
    read_s: list = field(default_factory=list)  # of which: reading + validating the files
    check_s: list = field(default_factory=list)  # of which: the base-model compatibility check
    merge_s: list = field(default_factory=list)
    unmerge_s: list = field(default_factory=list)
    export_s: list = field(default_factory=list)  # fused exact LoRA state dict
    files_bytes: int = 0

    def median(self, name: str) -> float:
        return statistics.median(getattr(self, name))

    @property
    def fuse_s(self) -> float:
        """Files on disk -> baked model: install + merge."""
        return statistics.median(a + b for a, b in zip(self.install_s, self.merge_s, strict=True))


def make_concept_files(adapters: SpectralAdapters, out_dir: Path, n: int = 8, rank: int = 8) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for slot in range(n):
        name = f"concept-{slot}"
        adapters.new_concept(ConceptInfo(name, slot, rank, "additive"))
        params = [p for group in adapters.trainable_parameters(name).values() for p in group]
        randomize(params, seed=100 + slot)
        files.append(save_adapter(adapter_from_model(adapters, name, BASE_MODEL), out_dir / f"{name}.safetensors"))
        adapters.remove_concept(name)
    return files


def fusion(unet, plain: dict, cache_dir, out_dir: Path, n: int = 8, repeats: int = 3, log=print):
    """Returns (FusionResult, adapters holding the n concepts, live and unmerged, its layers by path)."""
    set_modules(unet, plain)
    adapters = SpectralAdapters(
        {"unet": unet}, targets=TargetConfig(unet=UNET_TARGETS, text_encoder=()), svd_cache=SvdCache(cache_dir)
    )
    layers = {key.removeprefix("unet."): layer for key, layer in adapters.layers.items()}
    files = make_concept_files(adapters, out_dir, n)
    result = FusionResult(n, files_bytes=sum(f.stat().st_size for f in files))
    names = [f"concept-{i}" for i in range(n)]
    check_s = [0.0]
    check = compatibility.compatible_triplets

    def timed_check(*args, **kwargs):  # how much of installing is the base-model check
        start = time.perf_counter()
        try:
            return check(*args, **kwargs)
        finally:
            check_s[0] += time.perf_counter() - start

    compatibility.compatible_triplets = timed_check
    for index in range(repeats):
        if index:
            for name in names:
                adapters.remove_concept(name)
        check_s[0], read_s = 0.0, 0.0
        t0 = time.perf_counter()
        datas = [read_adapter(path) for path in files]
        read_s = time.perf_counter() - t0
        install_adapters(adapters, datas, model_name=BASE_MODEL)  # one pass over the weights for all checks
        t1 = time.perf_counter()
        adapters.merge(names)
        t2 = time.perf_counter()
        adapters.unmerge(names)
        t3 = time.perf_counter()
        with torch.no_grad():
            lora_state_dict(adapters, names)
        t4 = time.perf_counter()
        result.install_s.append(t1 - t0)
        result.read_s.append(read_s)
        result.check_s.append(check_s[0])
        result.merge_s.append(t2 - t1)
        result.unmerge_s.append(t3 - t2)
        result.export_s.append(t4 - t3)
        log(
            f"  fuse {n}: install {t1 - t0:.2f} s (read {read_s:.2f} s, check {check_s[0]:.2f} s), merge {t2 - t1:.2f} s, unmerge {t3 - t2:.2f} s, "
            f"LoRA export {t4 - t3:.2f} s"
        )
    compatibility.compatible_triplets = check
    set_modules(unet, plain)
    return result, adapters, layers
