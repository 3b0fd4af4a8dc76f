"""Where a study's runs and scored folders lie under its output folder: the pipeline (crate.eval.workflows.study)
writes there and the study's report reads there, so the layout is written once, here."""

from __future__ import annotations

from pathlib import Path


def interpret_dir(out: Path, seed: int, size: str, system: str, llm: bool = False) -> Path:
    return out / ("interpret-smollm2" if llm else "interpret") / f"seed{seed}" / size / system


def run_dir(out: Path, seed: int, size: str, arch: str) -> Path:
    return out / "runs" / f"seed{seed}" / f"{arch}-{size}"
