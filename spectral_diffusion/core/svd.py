"""Top-K singular triplets of pretrained weights, reproducible and cached.

Only the top ``K = slots * rank`` triplets are ever used, so instead of a full SVD we take the
eigen-decomposition of the Gram matrix of the smaller side: its top eigenpairs give the top singular
values and one side's vectors, the other side follows by one matrix product. Everything is computed in
float32 whatever the model dtype, and signs are fixed so two machines get the same vectors.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from spectral_diffusion.atomic import atomic_path

logger = logging.getLogger(__name__)

FINGERPRINT_SAMPLES = 4096


@dataclass(frozen=True)
class Triplets:
    """Top singular triplets ``W ~= U diag(s) V^T`` (U: m x K, s: K descending, V: n x K), float32."""

    U: torch.Tensor
    s: torch.Tensor
    V: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.s.numel())

    def block(self, start: int, stop: int) -> Triplets:
        """Columns ``[start, stop)``: a slot's triplets, as contiguous copies safe to store."""
        return Triplets(
            self.U[:, start:stop].contiguous(),
            self.s[start:stop].contiguous(),
            self.V[:, start:stop].contiguous(),
        )


def fix_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the largest-magnitude entry of every column of U positive (flipping V alongside)."""
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0))).squeeze(0)
    signs[signs == 0] = 1.0
    return U * signs, V * signs


def top_k_svd(weight: torch.Tensor, k: int) -> Triplets:
    """Top-``k`` singular triplets of a 2-D weight, in float32 with the sign convention applied.

    Uses ``eigh`` of the Gram matrix of the smaller side. The top singular values come out within
    ~1e-6 relative of a full SVD, at a fraction of its cost; small singular values would lose accuracy
    (the Gram squares the condition number) but are never used.
    """
    if weight.ndim != 2:
        raise ValueError(f"top_k_svd expects a 2-D weight, got shape {tuple(weight.shape)}")
    W = weight.detach().to(torch.float32)
    m, n = W.shape
    k = min(k, m, n)
    transpose = m < n
    if transpose:  # eigen-decompose the smaller Gram matrix
        W = W.T
    gram = W.T @ W
    evals, evecs = torch.linalg.eigh(gram)
    top = torch.flip(torch.arange(evals.numel() - k, evals.numel()), dims=[0])
    s = evals[top].clamp_min(0).sqrt()
    V = evecs[:, top]
    U = (W @ V) / s.clamp_min(torch.finfo(torch.float32).tiny)
    if transpose:
        U, V = V, U
    U, V = fix_signs(U, V)
    return Triplets(U.contiguous(), s.contiguous(), V.contiguous())


def top_k_svd_many(
    weights: Mapping[str, torch.Tensor],
    k: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Triplets]:
    """``top_k_svd`` of many weights, one after the other, each using torch's own threads.

    Running two single-threaded eighs side by side was ~20% faster, but it needs
    ``torch.set_num_threads(1)``, which is process-wide: a generation running in another thread of
    the app would drop to one thread too. Library code leaves torch's thread settings alone.
    """
    results: dict[str, Triplets] = {}
    for done, name in enumerate(weights, start=1):
        results[name] = top_k_svd(weights[name], k)
        if progress is not None:
            progress(done, len(weights))
    return results


def weights_fingerprint(named_weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A stable short hash of a set of weights: names, shapes and a fixed sample of values.

    Values are rounded to bfloat16 before hashing so the fp32, fp16 and bf16 copies of one base model
    (normally) share a fingerprint, and therefore a slot map.
    """
    digest = hashlib.sha256()
    for name, weight in sorted(named_weights, key=lambda item: item[0]):
        flat = weight.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        sample = flat[::step][:FINGERPRINT_SAMPLES].to(torch.float32).to(torch.bfloat16)
        digest.update(name.encode())
        digest.update(repr(tuple(weight.shape)).encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


class SvdCache:
    """Top-K triplets per base model on disk, keyed by the base fingerprint, as safetensors."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder is not None else None

    def _path(self, fingerprint: str) -> Path:
        assert self.folder is not None
        return self.folder / f"svd-{fingerprint}.safetensors"

    def load(self, fingerprint: str, names: Iterable[str], k: int) -> dict[str, Triplets] | None:
        """Cached triplets for these layers with at least ``k`` columns (sliced to ``k``), or None."""
        if self.folder is None or not self._path(fingerprint).exists():
            return None
        try:
            tensors = load_file(self._path(fingerprint))
        except Exception as error:  # a damaged cache is recomputed, never trusted
            logger.warning("ignoring unreadable SVD cache %s: %s", self._path(fingerprint), error)
            return None
        found: dict[str, Triplets] = {}
        for name in names:
            parts = [tensors.get(f"{name}.{key}") for key in ("U", "s", "V")]
            if any(part is None for part in parts):
                return None
            U, s, V = parts
            need = min(k, U.shape[0], V.shape[0])
            if s.numel() < need:
                return None
            found[name] = Triplets(U[:, :need], s[:need], V[:, :need])
        return found

    def save(self, fingerprint: str, triplets: Mapping[str, Triplets]) -> None:
        if self.folder is None:
            return
        tensors = {}
        for name, trip in triplets.items():
            tensors[f"{name}.U"] = trip.U.contiguous()
            tensors[f"{name}.s"] = trip.s.contiguous()
            tensors[f"{name}.V"] = trip.V.contiguous()
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._path(fingerprint)) as tmp:
            save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint})


def compute_spectrum(
    weights: Mapping[str, torch.Tensor],
    k: int,
    fingerprint: str,
    cache: SvdCache | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Triplets]:
    """Top-``k`` triplets of every weight, from the cache when it has them, else computed and cached."""
    cache = cache or SvdCache(None)
    cached = cache.load(fingerprint, weights.keys(), k)
    if cached is not None:
        logger.info("SVD cache hit for base %s (k=%d)", fingerprint, k)
        return cached
    logger.info("computing top-%d SVD of %d weights", k, len(weights))
    result = top_k_svd_many(weights, k, progress)
    cache.save(fingerprint, result)
    return result
