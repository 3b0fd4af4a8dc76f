"""Where a run's grid of weights-only checkpoints lies (<run>/grid/step-<N>/, crate.train.export.GridExport writes
them): light, so that the study reads the layout without importing Lightning."""

from __future__ import annotations

import re
from pathlib import Path

GRID = "grid"
_POINT = re.compile(r"^step-(\d+)$")


def numbered(folder: Path, pattern: re.Pattern[str]) -> dict[int, Path]:
    """{N: path} of the entries of `folder` whose name `pattern` matches with N as its first group, in N order."""
    found = (pattern.match(p.name) for p in folder.iterdir()) if folder.is_dir() else ()
    return dict(sorted((int(m.group(1)), folder / m.group(0)) for m in found if m))


def grid_point(run_dir: str | Path, step: int) -> Path:
    """The grid checkpoint of `step` in a run folder."""
    return Path(run_dir) / GRID / f"step-{step:07d}"


def grid_points(run_dir: str | Path) -> dict[int, Path]:
    """{step: checkpoint directory} of a run's grid, in step order."""
    return numbered(Path(run_dir) / GRID, _POINT)


__all__ = ["GRID", "numbered", "grid_point", "grid_points"]
