"""The reports' figures (matplotlib, drawn off-screen): per-layer scores against the paper's means, validation-loss
curves, and the study's score against depth over training seeds and against validation loss along training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from crate.eval.report.aggregate import aggregate
from crate.eval.report.paper import (
    ARCH_ORDER, PAPER_ARCHS, PAPER_SCORES, PAPER_VAL_LOSS, SYSTEM_LABELS, arch_key, paper_row, size_key,
)
from crate.eval.report.results import ModelResult, TrainRun, layer_sort_key

COLORS = {"crate": "tab:blue", "gpt": "tab:orange", "gpt-sae": "tab:green"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_scores(by_arch: dict[str, ModelResult], size: str, protocol: str, path: Path, seed: int = 0,
                      scorer: str = "-") -> Path:
    """Each system's per-layer means with intervals, on one axis of every layer any of them scored (a system
    scored on fewer layers is drawn at its own)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    aggs = {arch: aggregate(r, protocol, seed) for arch, r in sorted(by_arch.items(), key=lambda kv: arch_key(kv[0]))}
    layers = sorted({s.layer for agg in aggs.values() for s in agg.layers}, key=layer_sort_key)
    position = {layer: i for i, layer in enumerate(layers)}
    for i, (arch, agg) in enumerate(aggs.items()):
        x = np.array([position[s.layer] for s in agg.layers]) + (i - (len(aggs) - 1) / 2) * 0.12
        m = np.array([s.mean for s in agg.layers])
        err = np.array([[s.mean - s.lo for s in agg.layers], [s.hi - s.mean for s in agg.layers]])
        ax.errorbar(x, m, yerr=np.nan_to_num(err), marker="o", capsize=3, color=COLORS.get(arch),
                    label=f"{arch.upper()} (mean {agg.mean:.2f})")
        key = (paper_row(size) or "", protocol)
        if key in PAPER_SCORES and arch in PAPER_ARCHS:
            ax.axhline(PAPER_SCORES[key][PAPER_ARCHS.index(arch)], color=COLORS.get(arch), ls="--", lw=1,
                       label=f"paper {arch.upper()} mean")
    ax.set_xticks(np.arange(len(layers)), layers)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("score (correlation x100)")
    ax.set_title(f"{size}, {protocol}{'' if scorer == '-' else ', ' + scorer}: per-layer scores, 95% CI")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_val_loss(runs: list[TrainRun], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run in sorted(runs, key=lambda r: (size_key(r.size), arch_key(r.arch), r.name)):
        ax.plot(run.steps, run.val_loss, marker="." if len(run.steps) < 50 else None,
                color=COLORS.get(run.arch), alpha=0.9, label=f"{run.name} ({run.arch}, {run.size})")
        paper = PAPER_VAL_LOSS.get(run.size)
        if paper and run.arch in ARCH_ORDER:
            ax.axhline(paper[PAPER_ARCHS.index(run.arch)], color=COLORS.get(run.arch), ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss (dashed: the paper's final values)")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_depth(systems_rows: list[dict[str, Any]], protocol: str, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    rows = [r for r in systems_rows if r["protocol"] == protocol and r["metric"] == "correlation"]
    labels = list(dict.fromkeys(r["system"] for r in rows))
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    for i, label in enumerate(labels):
        mine = [r for r in rows if r["system"] == label]
        x = np.array([sizes.index(r["size"]) for r in mine]) + (i - (len(labels) - 1) / 2) * 0.12
        d = [r["_numbers"] for r in mine]
        m = np.array([v["estimate"] for v in d])
        color = COLORS.get({v: k for k, v in SYSTEM_LABELS.items()}[label])

        def err(c: np.ndarray, key: str, d: list[dict[str, Any]] = d) -> np.ndarray:
            return np.array([[e - v[key][0] for e, v in zip(c, d)], [v[key][1] - e for e, v in zip(c, d)]])

        ax.errorbar(x, m, yerr=np.nan_to_num(err(m, "ci95_seeds")), fmt="o-", color=color, elinewidth=1.2, capsize=3,
                    label=f"{label} (seed-aware)")
        m0 = np.array([v["estimate_seed0"] for v in d])
        ax.errorbar(x + 0.05, m0, yerr=np.nan_to_num(err(m0, "ci95_seed0")), fmt="s", ms=3, color=color, elinewidth=4,
                    alpha=0.45)
        for xi, v in zip(x, d):
            ax.scatter([xi - 0.04] * len(v["per_seed"]), v["per_seed"], s=8, color=color, alpha=0.5, marker="x")
    ax.set_xticks(range(len(sizes)), sizes)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("depth")
    ax.set_ylabel("score (correlation x100)")
    ax.set_title(f"{protocol}: mean over seeds, seed-aware 95% CI (t); seed 0 alone with its neurons' CI (thick); "
                 f"each seed (x)", fontsize=8)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)



def plot_score_vs_loss(paths: dict[tuple[str, str], list[list[tuple[float, float]]]], matched: dict[str, list[float]],
                       sizes: list[str], protocol: str, path: Path) -> Path:
    """Score against validation loss along training: one panel per size, each (size, arch)'s paths (one per seed,
    (loss, score) points in step order; loss falling to the right), each seed's matched loss (`matched[size]`)
    dotted."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.6), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for (where, arch), seeds in paths.items():
            for k, points in enumerate(seeds if where == size else []):
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, lw=1, color=COLORS.get(arch),
                        alpha=0.8, label=SYSTEM_LABELS[arch] if k == 0 else None)
        for loss in matched.get(size, []):
            if np.isfinite(loss):
                ax.axvline(loss, color="grey", lw=0.6, ls=":")
        ax.invert_xaxis()
        ax.set_title(f"{size}, {protocol}: each seed; matched loss dotted", fontsize=8)
        ax.set_xlabel("validation loss (falling with training)")
        ax.set_ylabel("score (correlation x100, neuron sample)")
        ax.legend(fontsize=8)
    return _save(plt, fig, path)
