"""Turn one run's measurements into the console table, docs/benchmarks.md and the plot."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

MB = 1024**2
GB = 1024**3

TRAIN_GOAL = 1.03  # issue 18: training step vs PEFT LoRA at the same rank
BAKED_GOAL = 1.02
LIVE4_GOAL = 1.08  # issue 18: 4 live concepts vs base per denoising step
SVD_GOAL = 10.0
RELOAD_GOAL = 1.0
FUSE_GOAL = 1.0
MEMORY_GOAL = 1.05  # issue 18: peak RSS of a training run, ours / PEFT LoRA (OS accounting, one process each)
FILE_GOAL = 1.5  # issue 18: additive adapter file (fp16 triplets) / LoRA file
# Hand-written sections of docs/benchmarks.md that a benchmark run keeps (they come from separate
# runs with their own command and date: bench/profiling/why_missed.py, bench/speed/regional_time.py).
KEPT_SECTIONS = ("Why the missed goals are missed", "Two concepts in a layout: time per image")
WHY_ANCHOR = "#why-the-missed-goals-are-missed"
# Other processes' load (os.getloadavg, 1 min) per core above which a run's timings say little: the
# table then says so at the top instead of reporting goals as "missed".
HEAVY_LOAD_PER_CORE = 0.5

TRAIN_LABELS = {
    "base": "frozen base (fwd + bwd to the latents)",
    "lora": "PEFT LoRA",
    "additive": "ours, additive slot",
    "rotational": "ours, rotational slot",
    "reference": "reference (dense U diag(s) V^T per call)",
}


CLOCKS = {
    "wall": "wall-clock time",
    "cpu": "this process's CPU time (other processes were using the cores, so wall-clock time would mostly "
    "measure waiting for a core; CPU time of a single-threaded run is the work done)",
}


@dataclass
class Goal:
    item: str
    goal: str
    measured: str
    met: bool | None  # None: not measured in this run

    heavy_load: bool = False  # a miss under heavy background load is not a finding
    load_sensitive: bool = True  # timings are; memory and file sizes are not

    @property
    def verdict(self) -> str:
        if self.met is False and self.heavy_load and self.load_sensitive:
            return "not judged (heavy background load)"
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


def heavy_load(meta: dict) -> bool:
    """Whether *other* processes loaded the machine too much for the timings to judge goals: the load
    average before the run, and the other processes' CPU measured during it (the load average after
    the run counts the benchmark itself, so it is reported but not used)."""
    cores = int(meta.get("machine", {}).get("cores", "1") or 1)
    loads = [v for v in (meta.get("loadavg_before"), _cores(meta.get("background_during"))) if v is not None]
    return bool(loads) and max(loads) / cores > HEAVY_LOAD_PER_CORE


def _cores(text) -> float | None:
    """``"0.02 cores"`` -> 0.02; None when unknown."""
    try:
        return float(str(text).split()[0])
    except (ValueError, IndexError):
        return None


def baked_ratio(infer) -> float:
    """Median over every round of every baked configuration: they all run the identical base computation."""
    values = [v for n in infer.samples if n.startswith("baked") for v in infer.ratios(n, "base")]
    return statistics.median(values)


def goals(r: dict) -> list[Goal]:
    out = []
    train = r.get("train")
    if train is not None:
        for variant in ("additive", "rotational"):
            value = train.timings.ratio(variant, "lora")
            out.append(
                Goal(
                    f"1. training step, {variant} / LoRA (r=8)",
                    f"<= {TRAIN_GOAL:.2f}x",
                    f"{value:.2f}x",
                    value <= TRAIN_GOAL,
                )
            )
    svd = r.get("svd")
    if svd is not None:
        for comp in getattr(svd, "comparisons", []):
            falls = comp.paths.get("fallback", 0)
            out.append(
                Goal(
                    f"3. SVD prep, full SVD / ours, {comp.label}",
                    f">= {SVD_GOAL:.0f}x",
                    f"{comp.speedup:.1f}x ({falls} of {comp.layers} layers fell back)",
                    comp.speedup >= SVD_GOAL if "power-law" in comp.label else None,
                )
            )
        out.append(
            Goal(
                "3. SVD prep, full SVD / ours (product path, random weights)",
                f">= {SVD_GOAL:.0f}x",
                f"{svd.speedup:.1f}x",
                None,
            )
        )
        out.append(
            Goal(
                "3. SVD prep, cached reload",
                f"< {RELOAD_GOAL:.0f} s",
                f"{svd.reload_s:.2f} s",
                svd.reload_s < RELOAD_GOAL,
            )
        )
    infer = r.get("infer")
    if infer is not None:
        value = baked_ratio(infer)
        out.append(
            Goal("4. inference, baked / base", f"<= {BAKED_GOAL:.2f}x", f"{value:.3f}x (pooled)", value <= BAKED_GOAL)
        )
        if "live 4" in infer.samples:
            value = infer.ratio("live 4", "base")
            out.append(
                Goal(
                    "4. inference, 4 live concepts / base",
                    f"<= {LIVE4_GOAL:.2f}x",
                    f"{value:.3f}x",
                    value <= LIVE4_GOAL,
                )
            )
    memory = r.get("memory")
    if memory is not None and "lora" in memory.runs:
        ours = [v for v in ("additive", "rotational") if v in memory.runs]
        if ours:
            values = {v: memory.ratio(v, "lora") for v in ours}
            out.append(
                Goal(
                    "4. peak RSS of a training run, ours / LoRA",
                    f"<= {MEMORY_GOAL:.2f}x",
                    ", ".join(f"{v} {x:.3f}x" for v, x in values.items()),
                    max(values.values()) <= MEMORY_GOAL,
                    load_sensitive=False,
                )
            )
    sizes = r.get("sizes")
    if sizes is not None and "ours, additive, fp16 triplets" in sizes.bytes and "PEFT LoRA" in sizes.bytes:
        value = sizes.bytes["ours, additive, fp16 triplets"] / sizes.bytes["PEFT LoRA"]
        out.append(
            Goal(
                "5. adapter file, additive with fp16 triplets / LoRA file",
                f"<= {FILE_GOAL:.1f}x",
                f"{value:.3f}x",
                value <= FILE_GOAL,
                load_sensitive=False,
            )
        )
    fusion = r.get("fusion")
    if fusion is not None:
        out.append(
            Goal(
                f"6. fusion of {fusion.concepts} concepts (files -> baked model)",
                f"< {FUSE_GOAL:.0f} s",
                f"{fusion.fuse_s:.2f} s (bake alone {fusion.median('merge_s'):.2f} s)",
                fusion.fuse_s < FUSE_GOAL,
            )
        )
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _spread(timings, num, den) -> str:
    low, high = timings.spread(num, den)
    return f"{timings.ratio(num, den):.2f}x ({low:.2f}-{high:.2f})"


# ----- console -----------------------------------------------------------------------------------


def console(r: dict) -> str:
    lines = ["", "=" * 78, "Spectral Diffusion benchmarks" + (" (--quick)" if r["meta"]["quick"] else ""), "=" * 78]
    train = r.get("train")
    if train is not None:
        lines.append(f"1. training step, SD1.5 UNet, rank {train.rank} (median s, ratio to LoRA):")
        for name in train.timings.samples:
            lines.append(
                f"   {TRAIN_LABELS[name]:<45} {train.timings.median(name):7.2f} s  "
                f"{train.timings.ratio(name, 'lora'):5.2f}x"
            )
    if r.get("layers"):
        lines.append("2. per-layer fwd+bwd (ratio to the frozen layer):")
        for row in r["layers"]:
            lines.append(
                f"   {row.label:<20} lora {row.ratio('lora'):.2f}x  additive {row.ratio('additive'):.2f}x  "
                f"rotational {row.ratio('rotational'):.2f}x  reference {row.ratio('reference'):.2f}x"
            )
    svd = r.get("svd")
    if svd is not None:
        lines.append(
            f"3. SVD prep: ours {svd.ours_s:.1f} s, full SVD {svd.full_s:.1f} s on {svd.layers_full} layers "
            f"(speed-up {svd.speedup:.1f}x), reload {svd.reload_s:.2f} s"
        )
    infer = r.get("infer")
    if infer is not None:
        lines.append(
            "4. inference step (ratio to base): "
            + ", ".join(f"{n} {infer.ratio(n, 'base'):.3f}x" for n in infer.samples if n != "base")
        )
    sizes = r.get("sizes")
    if sizes is not None:
        lines.append("5. adapter files: " + ", ".join(f"{k} {v / MB:.1f} MB" for k, v in sizes.bytes.items()))
    memory = r.get("memory")
    if memory is not None:
        lines.append(
            "5. peak RSS of a training run (one process each, OS accounting): "
            + ", ".join(f"{v} {memory.peak_bytes(v) / GB:.2f} GB" for v in memory.runs)
        )
    fusion = r.get("fusion")
    if fusion is not None:
        lines.append(
            f"6. fusion of {fusion.concepts}: {fusion.fuse_s:.2f} s (install {fusion.median('install_s'):.2f} s"
            f" + merge {fusion.median('merge_s'):.2f} s)"
        )
    lines.append("goals:")
    for g in goals(r):
        lines.append(f"   {g.item:<55} {g.goal:>9}  {g.measured:<28} {g.verdict.strip('*')}")
    return "\n".join(lines)


# ----- plot --------------------------------------------------------------------------------------


def plot(r: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = r.get("sweep") or {}
    infer = r.get("infer")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.2))
    ranks = sorted(sweep)
    if ranks:
        for variant, marker in (("additive", "o"), ("rotational", "s")):
            left.plot(
                ranks,
                [sweep[k].timings.ratio(variant, "lora") for k in ranks],
                marker=marker,
                label=f"ours, {variant} / PEFT LoRA",
            )
        with_base = [k for k in ranks if "base" in sweep[k].timings.samples]
        if with_base:
            left.plot(
                with_base,
                [sweep[k].timings.ratio("lora", "base") for k in with_base],
                marker="^",
                linestyle=":",
                label="PEFT LoRA / frozen base",
            )
        left.axhline(TRAIN_GOAL, color="red", linestyle="--", linewidth=1, label=f"goal {TRAIN_GOAL:.2f}x")
        left.axhline(1.0, color="grey", linewidth=0.8)
        left.set_xscale("log", base=2)
        left.set_xticks(ranks, [str(k) for k in ranks])
    left.set_xlabel("rank r")
    left.set_ylabel("training-step time ratio")
    left.set_title("SD1.5 UNet training step vs rank")
    if left.get_legend_handles_labels()[0]:  # below the axes, where it hides no point
        left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    if infer is not None:
        lives = sorted(int(n.split()[1]) for n in infer.samples if n.startswith("live"))
        right.plot(
            [0] + lives, [1.0] + [infer.ratio(f"live {n}", "base") for n in lives], marker="o", label="live (factored)"
        )
        right.set_xticks(sorted({0, *lives}))
        baked = sorted(int(n.split()[1]) for n in infer.samples if n.startswith("baked"))
        right.plot(
            baked, [infer.ratio(f"baked {n}", "base") for n in baked], marker="s", linestyle="", label="baked (merged)"
        )
        right.axhline(LIVE4_GOAL, color="red", linestyle="--", linewidth=1, label=f"goal live 4: {LIVE4_GOAL:.2f}x")
        right.axhline(BAKED_GOAL, color="orange", linestyle="--", linewidth=1, label=f"goal baked: {BAKED_GOAL:.2f}x")
        right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_xlabel("concepts (additive, rank 8)")
    right.set_ylabel("denoising-step time / base")
    right.set_title("SD1.5 UNet inference step vs concepts")
    if right.get_legend_handles_labels()[0]:  # below the axes, where it hides no point
        right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----- markdown ----------------------------------------------------------------------------------


def _load(value) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def kept_sections(text: str) -> dict[str, str]:
    """The ``KEPT_SECTIONS`` of an existing report (title -> the section's markdown, heading included)."""
    out, current, lines = {}, None, []
    for line in text.splitlines():
        if line.startswith("## "):
            if current is not None:
                out[current] = "\n".join(lines).rstrip() + "\n"
            title = line[3:].strip()
            current, lines = (title, [line]) if title in KEPT_SECTIONS else (None, [])
        elif current is not None:
            lines.append(line)
    if current is not None:
        out[current] = "\n".join(lines).rstrip() + "\n"
    return out


def markdown(r: dict, plot_name: str | None, kept: dict[str, str] | None = None) -> str:
    kept = kept or {}
    meta = r["meta"]
    out = ["# Benchmarks", ""]
    out += [
        "Spectral slots vs PEFT LoRA vs the dense reference approach, at Stable Diffusion 1.5 size (random",
        "weights built from configs; nothing downloaded). Every figure is a ratio of medians measured in the same",
        "run on the same machine; variants are interleaved in shuffled order every round and a ratio is the median",
        "of the per-round ratios, so drifts of the machine cancel. Warm-up rounds are excluded.",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}` ({meta['total_s'] / 60:.1f} min)",
        f"- machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, {meta['machine']['memory']} RAM; "
        f"GPU: {meta['gpu_note']}",
        f"- software: Python {meta['machine']['python']}, torch {meta['machine']['torch']}, "
        f"diffusers {meta['machine']['diffusers']}, transformers {meta['machine']['transformers']}, "
        f"peft {meta['machine']['peft']}",
        f"- torch threads: {meta['threads']} ({meta['threads_note']})",
        f"- clock for all ratios: {CLOCKS[meta['metric']]}",
        f"- background load from other processes: {meta['background_before']} before the run, "
        f"{meta['background_during']} on average during it; load average (1 min, os.getloadavg) "
        f"{_load(meta.get('loadavg_before'))} before, {_load(meta.get('loadavg_after'))} after",
        "",
        "## Goals",
        "",
    ]
    heavy = heavy_load(meta)
    if heavy:
        out += [
            f"**This run was under heavy background load** (load average above {HEAVY_LOAD_PER_CORE} per core): its",
            "timings are not judged against the goals; rerun on a quiet machine.",
            "",
        ]
    rows = []
    for g in goals(r):
        g.heavy_load = heavy
        verdict = g.verdict
        if g.met is False and KEPT_SECTIONS[0] in kept:
            verdict += f" ([why]({WHY_ANCHOR}))"
        rows.append([g.item, g.goal, g.measured, verdict])
    out += _table(["item", "goal", "measured", "verdict"], rows)
    out.append("")
    if plot_name:
        out += [f"![training-step ratio vs rank, inference ratio vs live concepts]({plot_name})", ""]

    train = r.get("train")
    if train is not None:
        out += [
            f"## 1. Training step (SD1.5 UNet, rank {train.rank})",
            "",
            "`UNet2DConditionModel` with SD1.5's config (859.5M parameters), 32x32 latents, batch 1, 77 text states;",
            "adapters on the 128 attention linears (`to_q`, `to_k`, `to_v`, `to_out.0`). A step is forward, MSE loss,",
            "backward, AdamW step and `zero_grad`. All variants share one UNet (their wrappers hold the same frozen",
            "`nn.Linear`s and are swapped in before each step). Ratios: median (min-max over rounds).",
            "",
        ]
        rows = []
        for name in train.timings.samples:
            rows.append(
                [
                    TRAIN_LABELS[name],
                    f"{train.timings.median(name):.2f}",
                    _spread(train.timings, name, "lora"),
                    _spread(train.timings, name, "base"),
                    f"{train.trainable.get(name, 0):,}" if name != "base" else "0",
                    f"{train.work_bytes.get(name, 0) / GB:.2f}",
                    f"{train.peak_bytes.get(name, 0) / GB:.2f}",
                ]
            )
        out += _table(
            ["variant", "median s", "/ LoRA", "/ frozen base", "trainable params", "step memory GB", "peak RSS GB"],
            rows,
        )
        out += [
            "",
            f"{len(train.timings.samples['lora'])} timed round(s). *Step memory* is the peak resident set during",
            "the step minus the resident set right before it (activations, gradients, optimizer state, temporaries);",
            "*peak RSS* is the whole process (it also holds every other variant's layers and the benchmark's data).",
            "",
        ]

    if r.get("layers"):
        out += [
            "## 2. Per-layer forward + backward (SD1.5 layer shapes, rank 8)",
            "",
            "One layer, input requiring grad (so every variant also computes the input gradient), token counts as in",
            "item 1. Base: the frozen `nn.Linear`; other columns: ratio to it (median over rounds).",
            "",
        ]
        rows = []
        for row in r["layers"]:
            rows.append(
                [
                    row.label,
                    f"{row.n_in} -> {row.n_out}",
                    row.tokens,
                    f"{row.base_ms:.2f}",
                    f"{row.ratio('lora'):.2f}x",
                    f"{row.ratio('additive'):.2f}x",
                    f"{row.ratio('rotational'):.2f}x",
                    f"{row.ratio('reference'):.2f}x",
                    f"{row.ratio('additive', 'lora'):.2f}x",
                ]
            )
        out += _table(
            ["layer", "in -> out", "tokens", "base ms", "LoRA", "ours add.", "ours rot.", "reference", "add. / LoRA"],
            rows,
        )
        out.append("")

    svd = r.get("svd")
    if svd is not None:
        subset = (
            ""
            if svd.layers_full == svd.layers
            else (
                f" (--quick: the full SVD ran on every 8th layer, {svd.layers_full} layers, and is compared with our "
                f"top-K on the same layers, {svd.ours_subset_s:.2f} s)"
            )
        )
        out += [
            "## 3. SVD preparation (SD1.5 UNet + CLIP ViT-L text encoder, default targets)",
            "",
            f"{svd.layers} layers: the UNet's 128 attention linears and the text encoder's 48; K = 64 triplets (8 slots",
            "of rank 8). Ours: `SpectralAdapters(...).spectrum(64)` from a cold cache (block Krylov with an",
            "a-posteriori check, else the eigen-decomposition of the smaller Gram matrix; one layer after the other,",
            "each with all of torch's threads; written to the SVD cache). Full: `torch.linalg.svd` of",
            f"every weight{subset}.",
            "",
        ]
        out += _table(
            ["step", "seconds"],
            [
                ["ours, top-K, cold cache (all layers)", f"{svd.ours_s:.2f}"],
                [f"full SVD ({svd.layers_full} layers)", f"{svd.full_s:.2f}"],
                ["speed-up", f"{svd.speedup:.1f}x"],
                ["reload: new `SpectralAdapters` + `spectrum()` from the cache", f"{svd.reload_s:.2f}"],
                ["of which `spectrum()` (cache read)", f"{svd.reload_spectrum_s:.2f}"],
            ],
        )
        out += [
            "",
            f"Accuracy of our top-K triplets: max |s - s_full| / s_max = {svd.max_sv_error:.1e}; max "
            f"||U^T W V - diag(s)|| / ||s|| = {svd.max_compat_error:.1e} (the load-time compatibility check allows "
            "1e-2).",
            "",
        ]
        comps = getattr(svd, "comparisons", [])
        if comps:
            out += [
                "",
                "Per method, this process's CPU time over a sample of the layers (same layers, one run): ours is",
                "block Krylov with the a-posteriori residual/gap check and the exact Gram-eigh fallback.",
                "",
            ]
            out += _table(
                ["weights", "layers", "ours s", "exact Gram s", "full SVD s", "full / ours", "paths", "max |ds| / s1"],
                [
                    [
                        c.label,
                        str(c.layers),
                        f"{c.ours_s:.2f}",
                        f"{c.exact_s:.2f}",
                        f"{c.full_s:.2f}",
                        f"{c.speedup:.1f}x",
                        ", ".join(f"{k} {v}" for k, v in sorted(c.paths.items())),
                        f"{c.max_sv_error:.1e}",
                    ]
                    for c in comps
                ],
            )
        if r.get("svd_profile"):
            out += r["svd_profile"]

    infer = r.get("infer")
    if infer is not None:
        out += [
            "## 4. Inference per denoising step",
            "",
            "One UNet evaluation without grad (batch 1, 32x32 latents, 77 text states). Live: N additive rank-8",
            "concepts active in slots 0..N-1, computed in factored form; baked: the same concepts merged into the",
            "weights. Ratios to the plain UNet, median (min-max over rounds). Every baked configuration runs exactly",
            "the base computation (the wrapper finds no live concept), so the baked goal uses the median over all of",
            "their rounds together.",
            "",
        ]
        rows = [
            [name, f"{infer.median(name):.3f}", _spread(infer, name, "base") if name != "base" else "1"]
            for name in infer.samples
        ]
        out += _table(["configuration", "median s", "/ base"], rows)
        out.append("")

    sizes = r.get("sizes")
    if sizes is not None and train is not None:
        lora = sizes.bytes["PEFT LoRA"]
        out += [
            "## 5. Size and memory",
            "",
            f"Trainable parameters and files for one concept at rank {train.rank} on the 128 UNet attention linears,",
            "float32 safetensors. Our file also stores the slot's base triplets (U_k, s_k, V_k), which makes it",
            "independent of the loading machine's SVD and lets loading check the base model (docs/design.md section 2).",
            "",
        ]
        rows = []
        params = {
            "ours, additive": "additive",
            "ours, rotational": "rotational",
            "PEFT LoRA": "lora",
            "reference (full U, S, V)": "reference",
        }
        for label, size in sizes.bytes.items():
            trainable = train.trainable.get(params.get(label.replace(", fp16 triplets", ""), ""))
            rows.append([label, f"{trainable:,}" if trainable else "-", f"{size / MB:.2f}", f"{size / lora:.2f}x"])
        out += _table(["file", "trainable params", "MB", "/ LoRA file"], rows)
        if sizes.reference_computed:
            out += ["", "(--quick: the reference checkpoint size is computed from the shapes, not written.)"]
        out += [
            "",
            "Peak memory of a training step: see item 1 (step memory and peak RSS columns); of a whole "
            "training run: the next section.",
            "",
        ]

    memory = r.get("memory")
    if memory is not None:
        out += memory_section(memory)

    fusion = r.get("fusion")
    if fusion is not None:
        out += [
            f"## 6. Fusion of {fusion.concepts} concepts",
            "",
            f"{fusion.concepts} additive rank-8 concepts in slots 0-{fusion.concepts - 1}, one adapter file each "
            f"({fusion.files_bytes / fusion.concepts / MB:.1f} MB). Fusing needs no optimisation: read, validate,",
            "check the base model and install each file (the model then generates with all of them live), then bake.",
            f"Median of {len(fusion.install_s)} repeats.",
            "",
        ]
        out += _table(
            ["step", "seconds"],
            [
                [f"read + validate + check + install {fusion.concepts} files", f"{fusion.median('install_s'):.2f}"],
                ["  of which reading + validating the files", f"{fusion.median('read_s'):.2f}"],
                ["  of which the base-model check (U^T W V per layer)", f"{fusion.median('check_s'):.2f}"],
                ["bake (merge all into the weights)", f"{fusion.median('merge_s'):.2f}"],
                ["**files -> baked model**", f"**{fusion.fuse_s:.2f}**"],
                ["unbake (unmerge)", f"{fusion.median('unmerge_s'):.2f}"],
                ["exact fused LoRA export (state dict)", f"{fusion.median('export_s'):.2f}"],
            ],
        )
        out.append("")

    sweep = r.get("sweep") or {}
    if len(sweep) > 1:
        out += [
            "## 7. Training-step ratio vs rank",
            "",
            "Same step as item 1 at each rank (LoRA at the same rank). Fewer rounds than item 1 at ranks other than 8.",
            "",
        ]
        rows = []
        for rank in sorted(sweep):
            t = sweep[rank].timings
            rows.append(
                [
                    rank,
                    f"{t.median('lora'):.2f}",
                    _spread(t, "additive", "lora"),
                    _spread(t, "rotational", "lora"),
                    _spread(t, "lora", "base") if "base" in t.samples else "-",
                    len(t.samples["lora"]),
                ]
            )
        out += _table(["rank", "LoRA s", "additive / LoRA", "rotational / LoRA", "LoRA / base", "rounds"], rows)
        out.append("")

    if r.get("notes"):
        out += ["## Notes", ""] + r["notes"] + [""]
    for title in KEPT_SECTIONS:
        if title in kept:
            out += [kept[title].rstrip(), ""]
    for title, text in (r.get("profiles") or {}).items():
        out += [f"### Profile: {title}", "", "```", text.rstrip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


def memory_section(memory) -> list[str]:
    """The "Memory of a training run" section (bench/speed/memory.py)."""
    from bench.speed.memory import TABLE_HEADER, table

    out = [
        "## Memory of a training run",
        "",
        "One fresh process per variant (`bench/speed/memory.py`): build the SD1.5-size UNet from its config (random",
        "weights), adapt the 128 attention linears at rank 8 (PEFT LoRA; ours through `SpectralAdapters` +",
        "`new_concept`, so the top-K SVD of every target runs in the process, from a cold SVD cache), then "
        f"{memory.steps} training",
        f"steps (forward, MSE loss, backward, AdamW, `zero_grad`; 32x32 latents, batch 1) with {memory.threads} "
        "torch thread(s), and exit.",
        "*Peak RSS* is the OS's accounting of the finished process (`ru_maxrss` from `os.wait4`); the workers are",
        "spawned by a small launcher, never by the benchmark process itself, whose peak Linux would fold into",
        "theirs. The other columns are the worker's own `/proc/self/status` (VmRSS / VmHWM) at phase ends.",
        "",
    ]
    out += _table(TABLE_HEADER, table(memory))
    out.append("")
    if "lora" in memory.runs:
        lora_setup, lora_peak = memory.setup_peak_bytes("lora"), memory.peak_bytes("lora")
        parts = []
        for variant in ("additive", "rotational"):
            if variant in memory.runs:
                setup, peak = memory.setup_peak_bytes(variant), memory.peak_bytes(variant)
                parts.append(
                    f"{variant}: {(setup - lora_setup) / GB:+.3f} GB against LoRA before step 1 (the top-K "
                    f"SVD, the kept spectrum, the slot), then {(peak - setup) / GB:.3f} GB more during the "
                    f"steps (LoRA {(lora_peak - lora_setup) / GB:.3f} GB)"
                )
        if parts:
            out += ["Where the difference is: " + "; ".join(parts) + ".", ""]
    return out
