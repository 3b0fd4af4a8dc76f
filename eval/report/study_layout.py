"""Where a study's runs and scored folders lie under its output folder: the pipeline (crate.eval.workflows.study)
writes there and the study's report reads there, so the layout is written once, here."""

from __future__ import annotations

from pathlib import Path


def interpret_dir(out: Path, seed: int, size: str, system: str, llm: bool = False) -> Path:
    return out / ("interpret-smollm2" if llm else "interpret") / f"seed{seed}" / size / system


def run_dir(out: Path, seed: int, size: str, arch: str) -> Path:
    return out / "runs" / f"seed{seed}" / f"{arch}-{size}"


def curve_dir(out: Path, seed: int, size: str, arch: str, step: int) -> Path:
    """The neuron sample of one grid checkpoint (crate.train.export.GridExport) of a run, scored."""
    return out / "curves" / f"seed{seed}" / size / arch / f"step-{step:07d}"


DEFAULT_GRID = 8


def grid_size(steps: int, grid: int | None) -> int:
    """Grid checkpoints per run: `grid`, or when None the largest number up to DEFAULT_GRID that divides `steps`."""
    return grid if grid is not None else max(k for k in range(1, min(DEFAULT_GRID, max(steps, 1)) + 1) if steps % k == 0)


def grid_steps(steps: int, grid: int | None) -> list[int]:
    """The steps of a run's grid checkpoints: every steps / grid steps, the last at `steps` (none when grid is 0)."""
    n = grid_size(steps, grid)
    return [steps // n * i for i in range(1, n + 1)] if n else []


def eval_slices(n_tokens: int, split_tokens: int) -> int:
    """How many disjoint slices of `n_tokens` evaluation tokens the validation split holds (at least 1)."""
    return max(1, split_tokens // n_tokens)


def eval_offset(seed: int, n_tokens: int, split_tokens: int) -> int:
    """Where training seed `seed`'s evaluation tokens start in the validation split: each seed its own slice of
    `n_tokens` (seed k from k * n_tokens) while the split holds them; beyond that the slices repeat in order."""
    return seed % eval_slices(n_tokens, split_tokens) * n_tokens
