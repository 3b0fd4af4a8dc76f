"""The comparison's figures (matplotlib, drawn off-screen): a CKA heatmap per pair of models, and CKA against the
final state along training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from crate.eval.compare.tables import KIND_LABELS


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cka_heatmap(pair: dict[str, Any], path: Path) -> Path:
    """2 x 2 panels: residual stream and neurons, unbiased and biased CKA; rows layers of A, columns layers of B,
    one colour scale [0, 1] for all (the unbiased estimate can dip below 0: drawn as 0)."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(8, 7), squeeze=False)
    for r, kind in enumerate(KIND_LABELS):
        for c, est in enumerate(("unbiased", "biased")):
            ax = axes[r][c]
            m = np.array(pair[kind][est], dtype=float)
            im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="magma", origin="lower")
            for (i, j), v in np.ndenumerate(m if m.size <= 144 else np.empty((0, 0))):  # numbers fit up to 12 x 12
                ax.text(j, i, "n/a" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if not np.isfinite(v) or v < 0.6 else "black")
            ax.set_title(f"{KIND_LABELS[kind]}: {est}", fontsize=9)
            ax.set_ylabel(f"{pair['a']} layer")
            ax.set_xlabel(f"{pair['b']} layer")
            ax.set_xticks(range(m.shape[1]))
            ax.set_yticks(range(m.shape[0]))
    fig.colorbar(im, ax=axes, shrink=0.8, label="linear CKA")
    fig.suptitle(f"CKA: {pair['a']} vs {pair['b']}" + (" (same architecture)" if pair["same_arch"] else ""))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trajectory_plot(traj: dict[str, Any], path: Path) -> Path:
    """Unbiased CKA of each layer against its final state, by training step; one panel per kind."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), squeeze=False)
    for ax, kind in zip(axes[0], KIND_LABELS):
        m = np.array(traj[kind]["unbiased"], dtype=float)  # (steps, layers)
        for layer in range(m.shape[1] if m.ndim == 2 else 0):
            ax.plot(traj["steps"], m[:, layer], marker="o", markersize=3, label=f"layer {layer}")
        ax.set_title(f"{KIND_LABELS[kind]}")
        ax.set_xlabel("training step")
        ax.set_ylabel("CKA with the final state (unbiased)")
        ax.set_ylim(min(0.0, float(np.nanmin(m)) if m.size else 0.0), 1.05)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["cka_heatmap", "trajectory_plot"]
