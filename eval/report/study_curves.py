"""The study's training paths: every grid checkpoint of every CRATE and GPT run (crate.train.export.GridExport) with
its validation loss and the score of its neuron sample, the two systems read at matched validation loss
(crate.eval.stats.matched), the table of each seed's matched reading and the score-against-loss plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from crate.errors import PipelineError
from crate.eval.report.paper import SYSTEM_LABELS
from crate.eval.report.results import load_model_result
from crate.eval.report.study_layout import curve_dir, run_dir
from crate.eval.report.study_scores import model_runs
from crate.eval.report.tables import Table
from crate.eval.stats.matched import matched_pair
from crate.eval.stats.seeds import clean_runs, model_statistic
from crate.train.grid import grid_point

Point = tuple[int, float, float]  # (step, validation loss, score x100 of the neuron sample)
ARCHS = ("crate", "gpt")


def _val_loss(point: Path) -> float:
    from crate.loading import read_info

    loss = (read_info(point).get("metadata") or {}).get("val_loss")
    return float(loss) if loss is not None else math.nan


def read_curves(out: Path, units: list[Any], steps: list[int],
                protocols: list[str]) -> dict[tuple[str, str, str], list[list[Point]]]:
    """{(size, arch, protocol): per training seed (in unit order), its grid points in step order}; empty without a
    grid. A point's score is its model score (the mean of its per-layer means) over the sample's finite scores."""
    curves: dict[tuple[str, str, str], list[list[Point]]] = {}
    for unit in units if steps else []:
        for arch in ARCHS:
            paths: dict[str, list[Point]] = {p: [] for p in protocols}
            for step in steps:
                folder = curve_dir(out, unit.seed, unit.size, arch, step)
                if not (folder / "scores").is_dir():
                    raise PipelineError(f"{folder} has no scores: run `crate study` with the same options to finish it")
                result = load_model_result(folder)
                loss = _val_loss(grid_point(run_dir(out, unit.seed, unit.size, arch), step))
                for protocol in protocols:
                    clean = clean_runs([model_runs(result, protocol, "correlation")], "mean")
                    paths[protocol].append((step, loss, model_statistic(clean[0], "mean") if clean else math.nan))
            for protocol, path in paths.items():
                curves.setdefault((unit.size, arch, protocol), []).append(path)
    return curves


def matched_values(curves: dict[tuple[str, str, str], list[list[Point]]], size: str, a: str, b: str,
                   protocol: str) -> list[dict[str, Any]] | None:
    """Per training seed (its index as "seed"), `a` and `b` at their matched validation loss
    (crate.eval.stats.matched.matched_pair); None when either has no curve."""
    ca, cb = curves.get((size, a, protocol)), curves.get((size, b, protocol))
    if not ca or not cb:
        return None
    return [{"seed": k, **matched_pair([(loss, s) for _, loss, s in pa], [(loss, s) for _, loss, s in pb])}
            for k, (pa, pb) in enumerate(zip(ca, cb))]


def matched_table(curves: dict[tuple[str, str, str], list[list[Point]]], sizes: list[str],
                  protocols: list[str]) -> Table:
    """Each seed's matched reading of CRATE against GPT, with both runs' losses at their last grid point."""
    rows = []
    for protocol in protocols:
        for size in sizes:
            for k, m in enumerate(matched_values(curves, size, "crate", "gpt", protocol) or []):
                ends = {arch: curves[(size, arch, protocol)][k][-1] for arch in ARCHS}
                rows.append({"size": size, "protocol": protocol, "seed": k, "matched val loss": m["loss"],
                             "CRATE final val loss": ends["crate"][1], "GPT final val loss": ends["gpt"][1],
                             "CRATE at matched loss": m["a"], "GPT at matched loss": m["b"],
                             "CRATE - GPT": m["a"] - m["b"]})
    return Table("Scores at matched validation loss",
                 ["size", "protocol", "seed", "matched val loss", "CRATE final val loss", "GPT final val loss",
                  "CRATE at matched loss", "GPT at matched loss", "CRATE - GPT"], rows,
                 "Per training seed: the matched loss is the higher of the two runs' validation losses at their last "
                 "grid checkpoint (the loss both reach); each system's score is read where its loss first falls "
                 "to it, linear in the loss between the two grid checkpoints around it, never extrapolated (blank "
                 "when a run's first checkpoint is already below it). Scores (x100) are over the grid's neuron "
                 "sample, the same neurons at every checkpoint; validation losses over the periodic validation's "
                 "windows, the same at every checkpoint.")


def plot_curves(curves: dict[tuple[str, str, str], list[list[Point]]], sizes: list[str], protocol: str,
                path: Path) -> Path:
    """plots.plot_score_vs_loss of one protocol's paths, with each seed's matched loss."""
    from crate.eval.report.plots import plot_score_vs_loss

    paths = {(size, arch): [[(loss, score) for _, loss, score in seed]
                            for seed in curves.get((size, arch, protocol)) or []] for size in sizes for arch in ARCHS}
    matched = {size: [m["loss"] for m in matched_values(curves, size, "crate", "gpt", protocol) or []]
               for size in sizes}
    return plot_score_vs_loss(paths, matched, sizes, protocol, path)


__all__ = ["read_curves", "matched_values", "matched_table", "plot_curves"]
