"""Top-K singular triplets of pretrained weights, reproducible and cached.

Only the top ``K = slots * rank`` triplets are ever used, so instead of a full SVD we first try a
randomised block-Krylov method (fixed seed) and verify its result a posteriori (residuals and the gap at
the k-th value); a layer that fails the check, or is too small for the method to pay off, takes the
exact path: the eigen-decomposition of the Gram matrix of the smaller side. Everything is computed in
float32 whatever the model dtype (the exact path in float64 where float32 cannot resolve the requested
values), and signs are fixed so two machines get the same vectors.

Degenerate singular values: a layer's singular value is usable by a slot only if it is at least
``degenerate_floor`` of its largest, 10x the float32 rounding level of that layer's arithmetic. Below it
the direction is noise of a (numerically) rank-deficient weight, and the float32 base-model check of a
slot made of such columns could not verify it. ``Triplets.usable`` counts the usable leading columns.
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

from spectral_diffusion.atomic import atomic_path, storage_error

logger = logging.getLogger(__name__)

FINGERPRINT_SAMPLES = 4096
# Block-Krylov attempt: block = k + oversampling, up to KRYLOV_DEPTH extra blocks, and only while the
# Krylov basis stays under KRYLOV_MAX_SHARE of the smaller side (beyond that the exact path is cheaper).
KRYLOV_OVERSAMPLE = 8
KRYLOV_DEPTH = 5
KRYLOV_MIN_DEPTH = 2
KRYLOV_MAX_SHARE = 0.5
KRYLOV_SEED = 0
# Below this side the exact path takes milliseconds and a failed attempt would cost as much again.
KRYLOV_MIN_SIDE = 512
# A model whose first layers all fail the check has a flat spectrum: stop paying for attempts.
GIVE_UP_AFTER_FALLBACKS = 3
# Accepted residual ||W v - s u|| relative to s_1: a backward error 10x below the tested 1e-4.
RESIDUAL_TOLERANCE = 1e-5
# The Gram matrix squares the condition number: in float32 its eigenvalues resolve s_k only to about
# eps32 * s_1^2 / s_k, so where the requested s_k is below this share of s_1 the exact path is redone
# in float64 (float32 lost toy's last singular values: s = 0 and U = W V / s ~ 1e33).
GRAM_FLOAT32_SHARE = 1e-2
# A singular value below DEGENERATE_FACTOR x eps32 x sqrt(max(m, n)) x s_1 is degenerate (see above).
DEGENERATE_FACTOR = 10.0


def degenerate_floor(m: int, n: int) -> float:
    """The share of s_1 below which a singular value of an m x n weight is degenerate.

    float32 arithmetic on the layer (the weight itself, ``W V`` in the base-model check) is accurate to
    about eps32 * sqrt(max(m, n)) * s_1; a singular value within 10x of that is indistinguishable from
    zero, and a slot of such columns would fail (or pass by luck) the check. 64-wide layers: 9.5e-6;
    1280-wide: 4.3e-5.
    """
    return DEGENERATE_FACTOR * torch.finfo(torch.float32).eps * max(m, n) ** 0.5


@dataclass(frozen=True)
class Triplets:
    """Top singular triplets ``W ~= U diag(s) V^T`` (U: m x K, s: K descending, V: n x K), float32."""

    U: torch.Tensor
    s: torch.Tensor
    V: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.s.numel())

    @property
    def usable(self) -> int:
        """How many leading columns have a non-degenerate singular value (``degenerate_floor``)."""
        if self.k == 0 or not float(self.s[0]) > 0:
            return 0
        floor = degenerate_floor(self.U.shape[0], self.V.shape[0]) * float(self.s[0])
        return int((self.s >= floor).sum())

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


def _exact_top_k(W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``eigh`` of the Gram matrix of the smaller side of a float32 ``W`` (m >= n): the exact path.

    In float32 first; if the k-th value is below ``GRAM_FLOAT32_SHARE`` of the first (float32 cannot
    resolve it), again in float64. ``U = W V / s`` divides by at least the degenerate floor, so a
    degenerate column gets a short, finite U (never a slot's: ``Triplets.usable`` excludes it).
    """
    evals, evecs = torch.linalg.eigh(W.T @ W)
    top = torch.flip(torch.arange(evals.numel() - k, evals.numel()), dims=[0])
    if k and float(evals[top[-1]]) < GRAM_FLOAT32_SHARE**2 * float(evals[top[0]].clamp_min(0)):
        W64 = W.double()
        evals, evecs = torch.linalg.eigh(W64.T @ W64)
    s = evals[top].clamp_min(0).sqrt()
    V = evecs[:, top]
    floor = degenerate_floor(*W.shape) * float(s[0]) if k else 0.0
    U = (W.to(V.dtype) @ V) / s.clamp_min(max(floor, torch.finfo(torch.float32).tiny))
    return U.to(torch.float32), s.to(torch.float32), V.to(torch.float32)


def _krylov_plan(k: int, n: int) -> tuple[int, int] | None:
    """(block width, depth) of the block-Krylov attempt, or None where it cannot beat the exact path."""
    if n < KRYLOV_MIN_SIDE:
        return None
    block = k + KRYLOV_OVERSAMPLE
    depth = min(KRYLOV_DEPTH, int(KRYLOV_MAX_SHARE * n) // block - 1)
    return (block, depth) if depth >= KRYLOV_MIN_DEPTH else None


def _krylov_top_k(W: torch.Tensor, k: int, block: int, depth: int):
    """Randomised block-Krylov top-``k`` of a float32 ``W`` (m >= n) with its own a-posteriori check.

    Returns ``(U, s, V)`` when the check passes, else None. The Krylov basis Q spans
    ``[W O, (W W^T) W O, ...]`` for a fixed-seed Gaussian ``O`` (so every machine gets the same
    result); Rayleigh-Ritz on ``B = Q^T W`` gives triplets with ``W^T u = s v`` exactly, so the only
    residual is ``r_i = ||W v_i - s_i u_i||``: they are the exact top triplets of a matrix within
    ``max r`` of W. Accepted when every residual of the top ``k + 1`` is at most
    ``RESIDUAL_TOLERANCE * s_1`` and the gap from ``s_k`` to the next Ritz value exceeds twice the
    residuals there (so the residuals cannot have swapped which direction is the k-th).
    """
    U, s, V, residual = krylov_ritz(W, k, block, depth)
    limit = RESIDUAL_TOLERANCE * float(s[0])
    gap = float(s[k - 1] - s[k])
    if not torch.isfinite(residual).all() or float(residual.max()) > limit:
        return None
    if gap <= 2 * float(residual[k - 1 :].max()):
        return None
    return U[:, :k], s[:k], V[:, :k]


def krylov_ritz(W: torch.Tensor, k: int, block: int, depth: int):
    """The top ``k + 1`` Ritz triplets ``(U, s, V)`` of the block-Krylov basis and their residuals
    ``||W v_i - s_i u_i||``, unchecked (``_krylov_top_k`` checks them; benchmarks report them)."""
    generator = torch.Generator().manual_seed(KRYLOV_SEED)
    start = torch.randn(W.shape[1], block, generator=generator).to(W.device)
    Q = torch.linalg.qr(W @ start).Q
    blocks = [Q]
    for _ in range(depth):
        Q = torch.linalg.qr(W @ (W.T @ Q)).Q  # each block normalised; orthogonalised all at once below
        blocks.append(Q)
    Q = torch.linalg.qr(torch.cat(blocks, dim=1)).Q
    B = (W.T @ Q).T.double()  # the small problem in float64: small singular values keep their digits
    evals, small_U = torch.linalg.eigh(B @ B.T)
    top = torch.flip(torch.arange(evals.numel() - k - 1, evals.numel()), dims=[0])
    s = evals[top].clamp_min(0).sqrt()
    V = (B.T @ small_U[:, top] / s.clamp_min(1e-300)).to(torch.float32)
    U = Q @ small_U[:, top].to(torch.float32)
    s = s.to(torch.float32)
    residual = torch.linalg.vector_norm(W @ V - U * s, dim=0)
    return U, s, V, residual


def top_k_svd_checked(weight: torch.Tensor, k: int, method: str = "auto") -> tuple[Triplets, str]:
    """``top_k_svd`` plus the path taken: ``"fast"`` (block Krylov, check passed), ``"fallback"``
    (the check failed, exact path used) or ``"exact"`` (exact path chosen up front)."""
    if weight.ndim != 2:
        raise ValueError(f"top_k_svd expects a 2-D weight, got shape {tuple(weight.shape)}")
    if method not in ("auto", "exact"):
        raise ValueError(f"unknown top-K method {method!r}; expected 'auto' or 'exact'")
    W = weight.detach().to(torch.float32)
    m, n = W.shape
    k = min(k, m, n)
    transpose = m < n
    if transpose:  # work on the tall orientation: the Gram / Krylov side is the smaller one
        W = W.T
    plan = _krylov_plan(k, min(m, n)) if method == "auto" else None
    found = _krylov_top_k(W, k, *plan) if plan is not None else None
    path = "exact" if plan is None else ("fast" if found is not None else "fallback")
    U, s, V = found if found is not None else _exact_top_k(W, k)
    if transpose:
        U, V = V, U
    U, V = fix_signs(U, V)
    return Triplets(U.contiguous(), s.contiguous(), V.contiguous()), path


def top_k_svd(weight: torch.Tensor, k: int, method: str = "auto") -> Triplets:
    """Top-``k`` singular triplets of a 2-D weight, in float32 with the sign convention applied.

    ``auto`` first tries a randomised block-Krylov method (fast on the decaying spectra of trained
    weights) and keeps its result only if its a-posteriori residual and gap check pass; otherwise, and
    with ``exact``, it takes ``eigh`` of the Gram matrix of the smaller side. Either way the top
    singular values come out within ~1e-5 relative of a full SVD; small singular values would lose
    accuracy in the Gram path (it squares the condition number) but are never used.
    """
    return top_k_svd_checked(weight, k, method)[0]


def top_k_svd_many(
    weights: Mapping[str, torch.Tensor],
    k: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Triplets]:
    """``top_k_svd`` of many weights, one after the other, each using torch's own threads.

    Running two single-threaded eighs side by side was ~20% faster, but it needs
    ``torch.set_num_threads(1)``, which is process-wide: a generation running in another thread of
    the app would drop to one thread too. Library code leaves torch's thread settings alone.
    Once ``GIVE_UP_AFTER_FALLBACKS`` layers failed the fast path's check and none passed it, the
    spectrum is taken to be flat and the remaining layers go straight to the exact path.
    """
    results: dict[str, Triplets] = {}
    paths: dict[str, int] = {}
    for done, name in enumerate(weights, start=1):
        flat = paths.get("fallback", 0) >= GIVE_UP_AFTER_FALLBACKS and not paths.get("fast")
        results[name], path = top_k_svd_checked(weights[name], k, "exact" if flat else "auto")
        paths[path] = paths.get(path, 0) + 1
        if progress is not None:
            progress(done, len(weights))
    logger.info("top-%d SVD paths: %s", k, paths)
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


# Version 2: the exact path resolves small singular values (version 1 cached s = 0, U ~ 1e33 for them).
CACHE_VERSION = 2


class SvdCache:
    """Top-K triplets per base model on disk, keyed by the base fingerprint, as safetensors."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder is not None else None

    def _path(self, fingerprint: str) -> Path:
        assert self.folder is not None
        return self.folder / f"svd-v{CACHE_VERSION}-{fingerprint}.safetensors"

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
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self._path(fingerprint)) as tmp:
                save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint})
        except OSError as error:  # the cache only saves time: a full or read-only disk must not stop the work
            logger.warning("not caching the SVD: %s", storage_error(error, self._path(fingerprint)) or error)


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
