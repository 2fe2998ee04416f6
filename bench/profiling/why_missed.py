"""Profiles of the missed goals, as shares of the total (meaningful on a shared core, unlike seconds).

    python -m bench.profiling.why_missed svd     # SVD prep: where the top-K time goes, which layers fall back and why
    python -m bench.profiling.why_missed live    # 4 live concepts: thin products vs base linears vs the rest

``svd`` rebuilds item 3's comparison sample (every 2nd of the 176 default targets of the SD1.5 UNet and
the CLIP ViT-L text encoder, by sorted name; shapes from the configs on the meta device) with the same
power-law weights (``bench_svd.power_law_copy``, same seeds) and, for the flat case, nn.Linear's own
random init. Per layer it runs ``top_k_svd_checked`` under ``torch.profiler`` and classifies every
operator by what it is in the algorithm (from its name and input shapes); for each layer that fell back
it tells which a-posteriori check failed and how far off it was (the package's own ``_krylov_top_k``,
rerun with the residual tolerance lifted), and the spectral gap at k from a full SVD.

``live`` builds the SD1.5-size UNet (random weights), installs 4 additive rank-8 concepts through the
package, and profiles UNet forwards without grad, base and live, every ``SpectralLayer.forward`` wrapped
in a ``record_function`` so its children (the base linear, the thin products, the glue) and its own
Python time can be told apart.

Run it with one thread (the default here): the shares are per-operator CPU time of one thread.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

K = 64


# ----- SVD ----------------------------------------------------------------------------------------


def sample_shapes() -> dict[str, tuple[int, int]]:
    """The layers of item 3's comparison sample: names[::2] of the sorted 176 default targets."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.common import CLIP_L_TEXT, SD15_UNET_OVERRIDES, TEXT_TARGETS, UNET_TARGETS, target_paths

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_OVERRIDES)
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
    shapes = {f"unet.{p}": tuple(unet.get_submodule(p).weight.shape) for p in target_paths(unet, UNET_TARGETS)}
    shapes.update(
        {f"text_encoder.{p}": tuple(clip.get_submodule(p).weight.shape) for p in target_paths(clip, TEXT_TARGETS)}
    )
    names = sorted(shapes)
    return {n: shapes[n] for n in names[::2]}


def _shapes_of(row) -> list[list[int]]:
    return [s for s in (row.input_shapes or []) if isinstance(s, list | tuple) and len(s) > 0]


def classify_svd(name: str, shapes: list, m: int, n: int, path: str) -> str:
    """What an operator of the top-K computation is, for a tall m x n weight (m >= n)."""
    dims = [tuple(s) for s in shapes if s]
    if "eigh" in name or "syevd" in name:
        size = dims[0][0] if dims else 0
        return (
            "exact path: eigh of the n x n Gram matrix"
            if size == n and path != "fast"
            else "Krylov: Rayleigh-Ritz eigh (small, float64)"
        )
    if any(part in name for part in ("qr", "geqrf", "householder", "orgqr")):
        return "Krylov: QR of the blocks and of the basis"
    if name in ("aten::mm", "aten::matmul", "aten::addmm"):
        if len(dims) >= 2:
            a, b = dims[0], dims[1]
            if sorted(a) == sorted((m, n)) and sorted(b) == sorted((m, n)):
                return "exact path: Gram matrix W^T W"
            touches_w = sorted(a) == sorted((m, n)) or sorted(b) == sorted((m, n))
            if touches_w and b[-1] == K and path != "fast" and a == (m, n):
                return "exact path: U = W V"  # W (m x n) @ V (n x K)
            if touches_w and b[-1] == K + 1:
                return "Krylov: residual check W V"
            if touches_w:
                return "Krylov: products with W (W X, W^T Q, B = Q^T W)"
        return "Krylov: small products (U = Q Y, V = B^T Y, B B^T)"
    if name in ("aten::linalg_vector_norm", "aten::sub", "aten::mul", "aten::isfinite", "aten::all", "aten::max"):
        return "checks and scaling (norms, element-wise)"
    if name in ("aten::randn", "aten::normal_"):
        return "Krylov: Gaussian start block"
    return "other (copies, casts, signs, indexing)"


def flat_weight(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """nn.Linear's default init (what the random-weight UNet and text encoder hold): a flat spectrum."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def krylov_check(W: torch.Tensor, k: int, block: int, depth: int) -> tuple[float, float]:
    """The two a-posteriori quantities of ``svd._krylov_top_k``, from the package's own
    ``svd.krylov_ritz`` (its check returns only pass/fail): max residual of the top k+1 Ritz triplets relative to
    s_1 (accepted at most ``RESIDUAL_TOLERANCE``), and the gap s_k - s_k+1 over twice the residuals
    from k on (accepted above 1)."""
    from spectral_diffusion.core import svd

    _, s, _, residual = svd.krylov_ritz(W, k, block, depth)
    return float(residual.max() / s[0]), float((s[k - 1] - s[k]) / (2 * residual[k - 1 :].max()))


def svd_profile(kind: str, log=print) -> dict:
    from bench.speed.svd import power_law_copy
    from spectral_diffusion.core import svd

    shapes = sample_shapes()
    by_category = defaultdict(float)  # self CPU us, path-qualified
    per_path_time = defaultdict(float)
    path_counts = defaultdict(int)
    per_shape = defaultdict(
        lambda: {
            "paths": defaultdict(int),
            "why": [],
            "gap": [],
            "ratio": [],
            "res": [],
            "margin": [],
            "depth": None,
            "auto_s": 0.0,
            "exact_s": 0.0,
        }
    )
    for index, shape in enumerate(shapes.values()):
        W = power_law_copy(torch.empty(shape), seed=index) if kind == "power-law" else flat_weight(shape, seed=index)
        t0 = time.process_time()
        _, path = svd.top_k_svd_checked(W, K)
        t1 = time.process_time()
        svd.top_k_svd_checked(W, K, method="exact")
        t2 = time.process_time()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            svd.top_k_svd_checked(W, K)
        tall = W if W.shape[0] >= W.shape[1] else W.T
        m, n = tall.shape
        for row in prof.key_averages(group_by_input_shape=True):
            if row.self_cpu_time_total <= 0:
                continue
            by_category[(path, classify_svd(row.key, _shapes_of(row), m, n, path))] += row.self_cpu_time_total
        per_path_time[path] += t1 - t0
        path_counts[path] += 1
        entry = per_shape[tuple(shape)]
        entry["paths"][path] += 1
        entry["auto_s"] += t1 - t0
        entry["exact_s"] += t2 - t1
        plan = svd._krylov_plan(K, n)
        entry["depth"] = None if plan is None else plan[1]
        if path != "exact":
            S = torch.linalg.svdvals(tall)
            entry["gap"].append(float((S[K - 1] - S[K]) / S[0]))
            entry["ratio"].append(float(S[K] / S[K - 1]))
        if plan is not None:
            residual, gap_margin = krylov_check(tall, K, *plan)
            entry["res"].append(residual)
            entry["margin"].append(gap_margin)
            if path == "fallback":
                failed = [
                    name
                    for name, bad in (("residual", residual > svd.RESIDUAL_TOLERANCE), ("gap", gap_margin <= 1.0))
                    if bad
                ]
                entry["why"].append("+".join(failed) or "non-finite")
    total_us = sum(by_category.values())
    total_s = sum(per_path_time.values())
    log(
        f"\n== SVD prep, {kind} weights: {len(shapes)} layers, paths {dict(path_counts)}, K={K}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    log("time of our top-K by the path each layer took (share of ours' CPU time):")
    for path, seconds in sorted(per_path_time.items(), key=lambda kv: -kv[1]):
        log(f"  {path:<9} {path_counts[path]:>3} layers  {100 * seconds / total_s:5.1f}%")
    log("operators (self CPU time under torch.profiler, share of the total), by path and role:")
    for (path, category), us in sorted(by_category.items(), key=lambda kv: -kv[1]):
        log(f"  {100 * us / total_us:5.1f}%  [{path}] {category}")
    log("per shape (depth = extra Krylov blocks allowed by KRYLOV_MAX_SHARE):")
    log(
        "  shape (out x in) | layers | paths | depth | gap (s_k - s_k+1)/s_1 | s_k+1/s_k | failed check | "
        "max residual/s_1 (accepted <= 1e-5) | gap / (2 residual) (accepted > 1) | auto/exact time"
    )
    for shape, e in sorted(per_shape.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
        gap = f"{statistics.median(e['gap']):.1e}" if e["gap"] else "-"
        ratio = f"{statistics.median(e['ratio']):.4f}" if e["ratio"] else "-"
        why = ", ".join(f"{w} {e['why'].count(w)}" for w in sorted(set(e["why"]))) or "-"
        res = f"{min(e['res']):.1e}-{max(e['res']):.1e}" if e["res"] else "-"
        margin = f"{min(e['margin']):.2g}-{max(e['margin']):.2g}" if e["margin"] else "-"
        log(
            f"  {shape[0]} x {shape[1]} | {sum(e['paths'].values())} | {dict(e['paths'])} | {e['depth']} | {gap} | "
            f"{ratio} | {why} | {res} | {margin} | {e['auto_s'] / e['exact_s']:.2f}"
        )
    return {"categories": dict(by_category), "per_path": dict(per_path_time), "per_shape": dict(per_shape)}


# ----- live concepts ------------------------------------------------------------------------------

THIN_IN = "thin input product x R (x @ [n x 2rN])"
THIN_OUT = "thin output product, fused addmm(base, h, L^T)"
BASE_LIN = "base linear of the adapted layer"
GLUE = "glue ops in SpectralLayer (to, reshape, view, t)"
PY = "SpectralLayer Python (live-concept scan, factor-cache key, dispatch)"
REST = "rest of the UNet (convs, attention, norms, ...)"


def live_profile(reps: int = 3, live: int = 4, log=print) -> dict:
    from bench.common import UNET_TARGETS, build_unet, randomize, set_modules
    from spectral_diffusion.core import layers as layers_mod
    from spectral_diffusion.core.config import ConceptInfo, TargetConfig
    from spectral_diffusion.core.model import SpectralAdapters

    log("building the SD1.5-size UNet and 4 concepts (top-K SVD included) ...")
    unet = build_unet()
    adapters = SpectralAdapters({"unet": unet}, targets=TargetConfig(unet=UNET_TARGETS, text_encoder=()))
    for slot in range(live):
        name = f"c{slot}"
        adapters.new_concept(ConceptInfo(name, slot, 8, "additive"))
        randomize([p for g in adapters.trainable_parameters(name).values() for p in g], seed=slot)
        adapters.set_enabled(name, True)
    for p in unet.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=generator)
    text = torch.randn(1, 77, 768, generator=generator)

    original = layers_mod.SpectralLayer.forward

    def wrapped(self, x, *args, **kwargs):
        with record_function("SpectralLayer.forward"):
            return original(self, x, *args, **kwargs)

    layers_mod.SpectralLayer.forward = wrapped

    wrappers = {key.removeprefix("unet."): layer for key, layer in adapters.layers.items()}
    plain = {path: layer.base_layer for path, layer in wrappers.items()}

    def set_config(config: str):
        set_modules(unet, plain if config == "plain" else wrappers)
        for slot in range(live):
            adapters.set_enabled(f"c{slot}", config.startswith("live"))

    def forward():
        with torch.inference_mode():
            unet(latents, torch.tensor([500]), encoder_hidden_states=text)

    # plain: the nn.Linear layers themselves (bench_infer's base); wrapped: our layers with no live concept
    # (what a baked model runs); live: 4 concepts computed in factored form
    results = {"plain": [], "wrapped, no live concept": [], f"live {live}": []}
    try:
        for config in results:
            set_config(config)
            forward()  # warm (fills the factor cache, as in a generation's later steps)
        for _ in range(reps):
            for config in results:
                set_config(config)
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof, record_function("step"):
                    forward()
                results[config].append(_live_shares(prof.events()))
    finally:
        layers_mod.SpectralLayer.forward = original
    log(
        f"\n== inference step, SD1.5 UNet, {torch.get_num_threads()} thread(s), {reps} profiled forwards each "
        "(median shares of each configuration's own total CPU time)"
    )
    base_total = statistics.median(r["total"] for r in results["plain"])
    for config, runs in results.items():
        total = statistics.median(r["total"] for r in runs)
        paired = statistics.median(r["total"] / b["total"] for r, b in zip(runs, results["plain"], strict=True))
        log(
            f"  {config}: total {total / base_total:.3f}x plain (median of per-round ratios {paired:.3f}x; "
            "profiled CPU time)"
        )
        for category in (REST, BASE_LIN, THIN_IN, THIN_OUT, GLUE, PY):
            share = statistics.median(100 * r.get(category, 0.0) / r["total"] for r in runs)
            vs_base = statistics.median(r.get(category, 0.0) for r in runs) / base_total * 100
            log(f"    {share:5.1f}% ({vs_base:5.1f}% of plain)  {category}")
    return results


def _live_shares(events) -> dict:
    out = defaultdict(float)
    total = sum(event.cpu_time_total for event in events if event.name == "step")  # the whole forward
    for event in events:
        if event.name != "SpectralLayer.forward":
            continue
        spent = 0.0
        for child in event.cpu_children:
            spent += child.cpu_time_total
            name = child.name
            if name == "aten::linear":
                out[BASE_LIN] += child.cpu_time_total
            elif name in ("aten::matmul", "aten::mm"):
                out[THIN_IN] += child.cpu_time_total
            elif name == "aten::addmm":
                out[THIN_OUT] += child.cpu_time_total
            else:  # to, reshape, view, numpy_T, ...
                out[GLUE] += child.cpu_time_total
        out[PY] += event.cpu_time_total - spent
    out[REST] = total - sum(out.values())
    out["total"] = total
    return dict(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("svd", "live"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--weights", default="power-law,flat", help="svd: power-law, flat or both")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.what == "svd":
        for kind in args.weights.split(","):
            svd_profile(kind)
    else:
        live_profile(reps=args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
