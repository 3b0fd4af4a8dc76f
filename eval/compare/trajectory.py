"""Across training: CKA of each layer at each grid checkpoint of a run against the same layer of the run's final
state, on the comparison's held-out tokens. Which layers settle first (CKA near 1 early) and which keep changing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from crate.eval.compare.similarity import KINDS, cka_pairs


def trajectory_cka(points: dict[int, Path], final: Path, batches: list[Tensor], device: str,
                   tick: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """{"final", "steps", "resid"|"neurons": {"unbiased"|"biased": [[CKA of layer l at step s] for s] }}; one grid
    checkpoint in memory at a time."""
    from crate.eval.models import load_model

    last, _ = load_model(final)
    last = last.to(device)
    out: dict[str, Any] = {"final": str(final), "steps": list(points),
                           **{kind: {"unbiased": [], "biased": []} for kind in KINDS}}
    for ckpt in points.values():
        model, _ = load_model(ckpt)
        res = cka_pairs({"step": model.to(device), "final": last}, [("step", "final")], batches, tick)
        for kind in KINDS:
            for est, matrix in res["step", "final"][kind].items():
                out[kind][est].append(matrix.diagonal().tolist())
    return out


__all__ = ["trajectory_cka"]
