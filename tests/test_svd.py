import time

import pytest
import torch

from spectral_diffusion.core.svd import (
    SvdCache,
    compute_spectrum,
    fix_signs,
    top_k_svd,
    top_k_svd_checked,
    top_k_svd_many,
    weights_fingerprint,
)


def _subspace_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal-angle sine between the column spaces of orthonormal a and b."""
    return float(torch.linalg.matrix_norm(a @ a.T - b @ b.T, ord=2))


@pytest.mark.parametrize("shape", [(48, 48), (64, 32), (24, 80)])
def test_top_k_matches_full_svd(shape):
    torch.manual_seed(0)
    weight = torch.randn(*shape)
    k = 12
    trip = top_k_svd(weight, k)
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    torch.testing.assert_close(trip.s.double(), S[:k], rtol=1e-4, atol=0)
    assert _subspace_distance(trip.U[:, :k].double(), U[:, :k]) < 1e-3
    assert _subspace_distance(trip.V[:, :k].double(), Vh[:k].T) < 1e-3
    # each triplet is a true singular triplet: W v = s u
    torch.testing.assert_close(weight @ trip.V, trip.U * trip.s, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(trip.U.T @ trip.U, torch.eye(k), atol=1e-4, rtol=0)


def test_half_precision_weight_is_decomposed_in_float32():
    torch.manual_seed(0)
    weight = torch.randn(32, 32).to(torch.bfloat16)
    trip = top_k_svd(weight, 8)
    assert trip.U.dtype == trip.s.dtype == trip.V.dtype == torch.float32
    S = torch.linalg.svdvals(weight.float())
    torch.testing.assert_close(trip.s, S[:8], rtol=1e-4, atol=0)


def test_sign_convention_is_deterministic():
    torch.manual_seed(0)
    weight = torch.randn(20, 30)
    trip = top_k_svd(weight, 5)
    idx = trip.U.abs().argmax(dim=0)
    assert (trip.U.gather(0, idx[None]) > 0).all()
    flipped_U, flipped_V = fix_signs(-trip.U, -trip.V)
    torch.testing.assert_close(flipped_U, trip.U)
    torch.testing.assert_close(flipped_V, trip.V)


def test_fingerprint_changes_with_weights_and_ignores_dtype():
    torch.manual_seed(0)
    weights = {"a": torch.randn(16, 16), "b": torch.randn(8, 16)}
    base = weights_fingerprint(weights.items())
    assert base == weights_fingerprint(reversed(list(weights.items())))
    assert base == weights_fingerprint((k, v.to(torch.bfloat16)) for k, v in weights.items())
    changed = dict(weights, a=weights["a"] + 0.1)
    assert weights_fingerprint(changed.items()) != base


def test_cache_hit_skips_recomputation(tmp_path, monkeypatch):
    torch.manual_seed(0)
    weights = {f"layer{i}": torch.randn(40, 40) for i in range(3)}
    cache = SvdCache(tmp_path)
    first = compute_spectrum(weights, 8, "fp", cache)
    calls = []
    from spectral_diffusion.core import svd

    monkeypatch.setattr(svd, "top_k_svd_many", lambda *a, **k: calls.append(1))
    second = compute_spectrum(weights, 8, "fp", cache)
    smaller = compute_spectrum(weights, 4, "fp", cache)
    assert calls == []
    for name in weights:
        torch.testing.assert_close(second[name].U, first[name].U)
        assert smaller[name].k == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_top_k_is_faster_than_full_svd():
    """Ratio in one run, same machine: top-k eigh path vs torch.linalg.svd on mid-size weights.

    One thread and the best of several repeats: robust to other work on the machine (two OpenMP
    threads competing with another process make both timings meaningless).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weights = [torch.randn(448, 448) for _ in range(2)]

    def best_time(fn, repeats=5):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for w in weights:
                fn(w)
            times.append(time.perf_counter() - start)
        return min(times)

    try:
        full = best_time(lambda w: torch.linalg.svd(w, full_matrices=False))
        ours = best_time(lambda w: top_k_svd(w, 64))
    finally:
        torch.set_num_threads(threads)
    assert ours < full


def test_svd_leaves_torch_thread_settings_alone(monkeypatch):
    """The app generates in one thread while a concept's SVD runs in another: no process-wide changes."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("svd changed torch's thread count"))
    torch.manual_seed(0)
    weights = {f"w{i}": torch.randn(24, 16) for i in range(3)}
    out = top_k_svd_many(weights, 4)
    assert list(out) == list(weights) and all(t.k == 4 for t in out.values())


def _power_law_weight(m: int, n: int, alpha: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W = U diag(s) V^T with s_j = j^-alpha: the decaying spectrum of trained weights."""
    generator = torch.Generator().manual_seed(seed)
    q = min(m, n)
    U = torch.linalg.qr(torch.randn(m, q, generator=generator)).Q
    V = torch.linalg.qr(torch.randn(n, q, generator=generator)).Q
    s = torch.arange(1, q + 1, dtype=torch.float32) ** (-alpha)
    return (U * s) @ V.T, s


@pytest.mark.parametrize("shape", [(640, 640), (720, 560)])
def test_fast_path_is_taken_and_exact_on_a_decaying_spectrum(shape):
    weight, s_true = _power_law_weight(*shape, alpha=1.0)
    k = 32
    trip, path = top_k_svd_checked(weight, k)
    assert path == "fast"
    torch.testing.assert_close(trip.s, s_true[:k], rtol=1e-4, atol=0)
    torch.testing.assert_close(weight @ trip.V, trip.U * trip.s, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(trip.U.T @ trip.U, torch.eye(k), atol=1e-4, rtol=0)
    exact = top_k_svd(weight, k, method="exact")
    # the load-time compatibility measure of the fast triplets against W, and agreement with the exact path
    projected = trip.U.T @ weight @ trip.V
    assert float(torch.linalg.norm(projected - torch.diag(trip.s)) / torch.linalg.norm(trip.s)) < 1e-4
    assert _subspace_distance(trip.U[:, :8].double(), exact.U[:, :8].double()) < 1e-3
    idx = trip.U.abs().argmax(dim=0)
    assert (trip.U.gather(0, idx[None]) > 0).all()  # same sign convention as the exact path


def test_flat_random_weights_fall_back_to_the_exact_path():
    torch.manual_seed(0)
    weight = torch.randn(640, 640)
    trip, path = top_k_svd_checked(weight, 32)
    assert path == "fallback"
    S = torch.linalg.svdvals(weight.double())
    torch.testing.assert_close(trip.s.double(), S[:32], rtol=1e-4, atol=0)
    torch.testing.assert_close(weight @ trip.V, trip.U * trip.s, rtol=1e-4, atol=1e-4)


def test_small_layers_take_the_exact_path_and_results_are_deterministic():
    weight, _ = _power_law_weight(64, 64, alpha=1.0)
    assert top_k_svd_checked(weight, 32)[1] == "exact"
    big, _ = _power_law_weight(640, 640, alpha=1.0, seed=3)
    first, second = top_k_svd(big, 32), top_k_svd(big, 32)
    assert torch.equal(first.U, second.U) and torch.equal(first.V, second.V)
    with pytest.raises(ValueError, match="unknown top-K method"):
        top_k_svd(big, 4, method="lanczos")


def test_many_stops_trying_the_fast_path_on_a_flat_model(monkeypatch):
    from spectral_diffusion.core import svd

    seen = []
    real = svd.top_k_svd_checked

    def spy(weight, k, method="auto"):
        trip, path = real(weight, k, method)
        seen.append(path)
        return trip, path

    monkeypatch.setattr(svd, "top_k_svd_checked", spy)
    torch.manual_seed(0)
    weights = {f"w{i}": torch.randn(520, 520) for i in range(5)}
    top_k_svd_many(weights, 8)
    assert seen == ["fallback"] * svd.GIVE_UP_AFTER_FALLBACKS + ["exact"] * 2


def _weight_with_spectrum(s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    n = s.numel()
    U = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64)).Q
    return ((U * s) @ V.T).to(torch.float32)


def test_small_singular_values_are_resolved_and_degenerate_ones_counted_out():
    """builtin:toy's text encoder has a singular value 5e-5 of the largest: float32's Gram matrix lost
    it (s = 0, U = W V / s ~ 2.6e33) and a concept in the last slot could never be loaded. The exact
    path resolves it (float64 where float32 cannot); a truly rank-deficient weight gives finite vectors
    and ``usable`` counts only the non-degenerate columns."""
    s = torch.logspace(0, -1, 64, dtype=torch.float64)
    s[-1] = 5e-5  # the float32 Gram path gave s = 0 and |U| = 1.2e33 here
    weight = _weight_with_spectrum(s)
    trip = top_k_svd(weight, 64)
    exact = torch.linalg.svdvals(weight.double())
    torch.testing.assert_close(trip.s.double(), exact, rtol=1e-3, atol=0)
    torch.testing.assert_close(trip.U.T @ trip.U, torch.eye(64), atol=1e-4, rtol=0)
    last = trip.block(56, 64)  # the last slot of rank 8: the base-model check must pass
    projected = last.U.T @ weight @ last.V
    assert float(torch.linalg.norm(projected - torch.diag(last.s)) / torch.linalg.norm(last.s)) < 1e-4
    assert trip.usable == 64

    s[60:] = 0.0  # rank 60
    deficient = top_k_svd(_weight_with_spectrum(s, seed=1), 64)
    assert torch.isfinite(deficient.U).all() and float(deficient.U.abs().max()) <= 1.0 + 1e-4
    assert deficient.usable == 60
    assert top_k_svd(torch.zeros(16, 8), 8).usable == 0
