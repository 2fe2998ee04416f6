"""Where the bytes of an adapter file go, next to a PEFT LoRA file of the same targets and rank.

Sizes depend on shapes only, so this builds the SD1.5 UNet on the meta device (its layer shapes, no
weights), fills the 128 attention-linear adapters with random values and writes the files the way
item 5 does (``save_adapter``; the LoRA file as bench_files writes it, and as diffusers'
``save_lora_weights`` writes it, with its ``{"format": "pt"}`` metadata). Every file is split into:
the 8-byte length prefix, the JSON header's tensor entries, its ``__metadata__``, its padding, and the
data of each kind of tensor. The parts add up to the file size exactly.

    python -m bench.profiling.file_bytes [--rank 8]
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.common import SD15_UNET_OVERRIDES, UNET_TARGETS, target_paths
from spectral_diffusion.core.config import ConceptInfo, TargetConfig
from spectral_diffusion.formats.adapter_file import AdapterData, save_adapter


def _compact(obj) -> int:
    return len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())


def byte_breakdown(path: Path) -> dict[str, int]:
    """Bytes of one safetensors file by part; the values sum to the file's size."""
    raw = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    out: dict[str, int] = defaultdict(int)
    out["length prefix"] = 8
    out["header: tensor entries"] = used = 2  # the header's braces
    for index, (key, entry) in enumerate(header.items()):
        size = _compact(key) + 1 + _compact(entry) + (1 if index else 0)  # "key":{...} and its comma
        used += size
        if key == "__metadata__":
            out["header: __metadata__"] += size
        else:
            out["header: tensor entries"] += size
            part = key.split(".")[-1] if not key.endswith(".weight") else ".".join(key.split(".")[-2:])
            start, stop = entry["data_offsets"]
            out[f"data: {part} ({entry['dtype']})"] += stop - start
    out["header: padding"] = header_len - used
    assert sum(out.values()) == len(raw), (sum(out.values()), len(raw))
    return dict(out)


def sd15_shapes() -> dict[str, tuple[int, int]]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_OVERRIDES)
    return {p: tuple(unet.get_submodule(p).weight.shape) for p in target_paths(unet, UNET_TARGETS)}


def write_files(out_dir: Path, rank: int = 8) -> dict[str, Path]:
    shapes = sd15_shapes()
    gen = torch.Generator().manual_seed(0)
    layers, lora = {}, {}
    for path, (m, n) in shapes.items():
        layers[f"unet.{path}"] = {
            "U": torch.randn(m, rank, generator=gen),
            "s": torch.rand(rank, generator=gen),
            "V": torch.randn(n, rank, generator=gen),
            "A": torch.randn(m, rank, generator=gen),
            "B": torch.randn(n, rank, generator=gen),
            "c": torch.randn(rank, generator=gen),
        }
        lora[f"unet.{path}.lora_A.weight"] = torch.randn(rank, n, generator=gen)
        lora[f"unet.{path}.lora_B.weight"] = torch.randn(m, rank, generator=gen)
    data = AdapterData(
        info=ConceptInfo(f"additive-r{rank}", 0, rank, "additive"),
        layers=layers,
        token_vectors={},
        base_model="bench:sd15-size-random",
        base_fingerprint="0123456789abcdef",
        targets=TargetConfig(unet=UNET_TARGETS, text_encoder=()).to_json(),
    )
    files = {
        "ours, additive": save_adapter(data, out_dir / "ours.safetensors"),
        "ours, additive, fp16 triplets": save_adapter(data, out_dir / "ours-fp16.safetensors", triplet_dtype="float16"),
    }
    save_file(lora, str(out_dir / "lora.safetensors"))
    files["PEFT LoRA (bench_files: no metadata)"] = out_dir / "lora.safetensors"
    save_file(lora, str(out_dir / "lora-diffusers.safetensors"), metadata={"format": "pt"})
    files["PEFT LoRA (diffusers save_lora_weights)"] = out_dir / "lora-diffusers.safetensors"
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_files(Path(tmp), args.rank)
        parts = {label: byte_breakdown(path) for label, path in files.items()}
    lora = sum(parts["PEFT LoRA (bench_files: no metadata)"].values())
    for label, bd in parts.items():
        total = sum(bd.values())
        print(f"\n{label}: {total:,} bytes = {total / lora:.4f}x the LoRA file")
        for part, size in sorted(bd.items(), key=lambda item: -item[1]):
            print(f"  {part:<32} {size:>10,}")
    half = sum(parts["ours, additive, fp16 triplets"].values())
    print(f"\nfp16-triplet file - 1.5 x LoRA file = {half - 1.5 * lora:,.0f} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
