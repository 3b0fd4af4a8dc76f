"""`crate report`: the reproduction report, the paper's tables and figures from interpretability results and
training logs, linked from one index.md.

    write_report(paths, out)   ->  <out>/index.md linking everything below

    <out>/sound_metrics.{md,csv,tex}  each system by the metrics that pass the sanity checks (random-record
                                      correlation, AUPRC lift, intruder), before the paper's table
    <out>/main_table.{md,csv,tex}     per size and protocol: mean over layers x100 and the variance of the
                                      per-layer means (in x100 units), CRATE vs GPT, bootstrap 95% CIs,
                                      CRATE - GPT with its CI, and the paper's numbers (SPEC.md section 6)
    <out>/layers.{md,csv,tex}         every model's per-layer mean x100 with its CI (the paper's figure, as numbers)
    <out>/scores_<size>_<protocol>.png  per-layer scores with intervals, CRATE vs GPT (the paper's figure)
    <out>/val_loss.{md,csv,tex,png}   final validation loss per run beside the paper's (SPEC.md section 4), curves
    <out>/measures.{md,csv,tex}       explanation-free measures per model and layer (sparsity, selectivity, ...)
    <out>/controls.{md,csv,tex}       random-initialisation controls beside the trained models

The inputs are read by crate.eval.report.results, the statistics are crate.eval.report.aggregate's, the tables
crate.eval.report.reproduction_tables' and the figures crate.eval.report.plots'.
"""

from __future__ import annotations

from pathlib import Path

from crate.eval.report.aggregate import N_BOOT
from crate.eval.report.plots import plot_layer_scores, plot_val_loss
from crate.eval.report.reproduction_tables import (
    controls_table, layers_table, main_table, measures_table, model_groups, sae_metrics_table, sae_table,
    sound_table, val_loss_table,
)
from crate.eval.report.scorer_validity import validity_section
from crate.eval.report.results import ModelResult, ReportError, discover, read_json
from crate.eval.report.tables import slug


def steering_section(paths: list[str | Path], out: Path) -> list[str]:
    """The steering measurement (`crate steer --sweep`): its table and plot, copied into the report."""
    import shutil

    from crate.eval.steer.sweep import RESULT, sweep_markdown

    lines: list[str] = []
    for i, f in enumerate(sorted({f for p in paths for f in Path(p).rglob(RESULT)})):
        result = read_json(f)
        png = f.parent / "steer_sweep.png"
        lines += [f"From `{f.parent}`:", "", sweep_markdown(result)]
        if png.is_file():
            shutil.copyfile(png, out / f"steer_sweep_{i}.png")
            lines += [f"![steering: effect against cost](steer_sweep_{i}.png)", ""]
    return lines


def _score_sections(results: list[ModelResult], out: Path, seed: int, n_boot: int) -> list[str]:
    """The index's sections read from interpretability results, their tables and plots written into `out`."""
    index: list[str] = validity_section(results)
    sound = sound_table(results, seed, n_boot)
    if sound.rows:
        sound.write(out, "sound_metrics")
        index += ["## Scores by the metrics that pass the sanity checks", "", sound.note, "", sound.to_markdown(),
                  "Files: [sound_metrics.md](sound_metrics.md), [sound_metrics.csv](sound_metrics.csv), "
                  "[sound_metrics.tex](sound_metrics.tex)", ""]
    main = main_table(results, seed, n_boot)
    main.write(out, "main_table")
    index += ["## Interpretability scores (the paper's main table)", "", main.note, "", main.to_markdown(),
              "Files: [main_table.md](main_table.md), [main_table.csv](main_table.csv), [main_table.tex](main_table.tex)", ""]
    index += ["## Per-layer scores (the paper's figure)", ""]
    for (size, protocol, scorer), by_arch in model_groups(results).items():
        tag = "" if scorer in ("-", "stats") else f"_{slug(scorer)}"
        name = f"scores_{slug(size)}_{slug(protocol)}{tag}.png"
        plot_layer_scores(by_arch, size, protocol, out / name, seed, scorer)
        index.append(f"![{size} {protocol} {scorer}]({name})")
        index.append("")
    layers = layers_table(results, seed, n_boot)
    layers.write(out, "layers")
    index += ["Per-layer numbers: [layers.md](layers.md), [layers.csv](layers.csv), [layers.tex](layers.tex)", ""]
    measures = measures_table(results)
    measures.write(out, "measures")
    index += ["## Explanation-free measures", "", measures.note, ""]
    index += [measures.to_markdown() if measures.rows else "No measures in the results' summary.json.", ""]
    index += ["Files: [measures.md](measures.md), [measures.csv](measures.csv), [measures.tex](measures.tex)", ""]
    controls = controls_table(results, seed, n_boot)
    controls.write(out, "controls")
    index += ["## Random-initialisation controls", "", controls.note, ""]
    if controls.rows:
        index += [controls.to_markdown()]
    index += ["Files: [controls.md](controls.md), [controls.csv](controls.csv), [controls.tex](controls.tex)", ""]
    sae = sae_table(results, seed, n_boot)
    if sae.rows:
        sae.write(out, "gpt_sae")
        index += ["## GPT-SAE (the paper's third system)", "", sae.note, "", sae.to_markdown(),
                  "Files: [gpt_sae.md](gpt_sae.md), [gpt_sae.csv](gpt_sae.csv), [gpt_sae.tex](gpt_sae.tex)", ""]
    return index


def write_report(paths: list[str | Path], out: str | Path, seed: int = 0, n_boot: int = N_BOOT) -> Path:
    """Write every table and plot for the results and runs found under `paths` into `out`; returns index.md.
    `out` must be new, empty or crate-lm's (crate.provenance.check_owned: an earlier report, a pipeline's folder)."""
    results, runs = discover(paths)
    if not results and not runs:
        raise ReportError(
            f"no interpretability results (folders with scores/<protocol>/<layer>.jsonl) and no training runs "
            f"(metrics CSV with a validation-loss column) under {', '.join(map(str, paths))}: "
            f"run `crate interpret` / `crate train` first, or point at their output folders"
        )
    from crate.provenance import check_owned, claim

    check_owned(out, "another --out")
    out = claim(out)
    index = ["# crate-lm reproduction report", ""]
    index.append(f"Inputs: {len(results)} interpretability result(s), {len(runs)} training run(s).")
    index.append("")
    if results:
        index += _score_sections(results, out, seed, n_boot)
    sae_m = sae_metrics_table(paths)
    if sae_m.rows:
        sae_m.write(out, "sae_metrics")
        index += ["## SAE metrics", "", sae_m.note, "", sae_m.to_markdown(), ""]
    steering = steering_section(paths, out)
    if steering:
        index += ["## Steering, measured", "", "Intended effect: the mean log-probability rise of each unit's top "
                  "output tokens (chosen on half the sequences, measured on the other half); collateral: KL of the "
                  "next-token distribution over the other tokens, and the loss rise where the next token is not one "
                  "of them; means over units with bootstrap 95% intervals (crate.eval.steer.sweep).", "", *steering]
    if runs:
        vt = val_loss_table(runs)
        vt.write(out, "val_loss")
        plot_val_loss(runs, out / "val_loss.png")
        index += ["## Validation loss", "", vt.note, "", vt.to_markdown(), "![validation loss](val_loss.png)", "",
                  "Files: [val_loss.md](val_loss.md), [val_loss.csv](val_loss.csv), [val_loss.tex](val_loss.tex)", ""]
    index += ["## Inputs", ""]
    index += [f"- interpretability: `{r.path}`: {r.label}, protocols {', '.join(r.scores)}" for r in results]
    index += [f"- training: `{run.path}`: {run.arch}, {run.size}, {len(run.steps)} validation points" for run in runs]
    (out / "index.md").write_text("\n".join(index) + "\n", encoding="utf-8")
    return out / "index.md"
