"""The reproduction report's tables (`crate report`), each built from the results and runs read by
crate.eval.report.results: the paper's main table, GPT-SAE, per-layer scores, explanation-free measures,
random-initialisation controls, validation loss and SAE metrics."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from crate.eval.report.aggregate import N_BOOT, aggregate, difference
from crate.eval.report.paper import (
    PAPER_ARCHS, PAPER_SAE_LAYERS, PAPER_SCORES, PAPER_VAL_LOSS, PAPER_VARIANCE, SYSTEM_LABELS, arch_key,
    canonical_protocol, paper_row, protocol_key, size_key,
)
from crate.eval.report.results import ModelResult, ReportError, TrainRun, guess_arch, layer_sort_key, read_json
from crate.eval.report.tables import Table, fmt_ci


def model_groups(results: list[ModelResult]) -> dict[tuple[str, str, str], dict[str, ModelResult]]:
    """(size, protocol, scorer) -> arch -> the trained model's result. Two of one arch are refused: the tables
    compare one model per system, and picking one of them would change the headline without saying so."""
    groups: dict[tuple[str, str, str], dict[str, ModelResult]] = {}
    for r in results:
        if r.random_init:
            continue
        for protocol in r.scores:
            other = groups.setdefault((r.size, protocol, r.scorer), {}).setdefault(r.arch, r)
            if other is not r:
                raise ReportError(
                    f"two trained {r.arch} results for {r.size}, {protocol}, scorer {r.scorer}: {other.path} and "
                    f"{r.path}. The report compares one model per system: point `crate report` at the result "
                    f"folders to use (e.g. one of these two and the other systems'), or move the other away; "
                    f"several training seeds are `crate study`'s (intervals over seeds)")
    return dict(sorted(groups.items(), key=lambda kv: (size_key(kv[0][0]), protocol_key(kv[0][1]), kv[0][2])))


MAIN_COLUMNS = [
    "size", "protocol", "scorer", "CRATE", "CRATE 95% CI", "GPT", "GPT 95% CI", "CRATE-GPT", "CRATE-GPT 95% CI",
    "CRATE var", "GPT var", "paper CRATE", "paper GPT", "paper CRATE var", "paper GPT var", "layers", "neurons",
]


def main_table(results: list[ModelResult], seed: int = 0, n_boot: int = N_BOOT) -> Table:
    rows = []
    for (size, protocol, scorer), by_arch in model_groups(results).items():
        aggs = {arch: aggregate(r, protocol, seed, n_boot) for arch, r in by_arch.items() if arch != "gpt-sae"}
        if not aggs:
            continue
        c, g = aggs.get("crate"), aggs.get("gpt")
        row: dict[str, Any] = {"size": size, "protocol": protocol, "scorer": scorer}
        if c:
            row.update({"CRATE": c.mean, "CRATE 95% CI": fmt_ci(c.lo, c.hi), "CRATE var": c.var})
        if g:
            row.update({"GPT": g.mean, "GPT 95% CI": fmt_ci(g.lo, g.hi), "GPT var": g.var})
        if c and g:
            d = (difference(by_arch["crate"], by_arch["gpt"], protocol, seed, n_boot)
                 if c.layers_used and g.layers_used else {"difference": math.nan, "ci95": [math.nan, math.nan]})
            row.update({"CRATE-GPT": d["difference"], "CRATE-GPT 95% CI": fmt_ci(*d["ci95"])})
        key = (paper_row(size) or "", protocol)
        if key in PAPER_SCORES:
            row["paper CRATE"], row["paper GPT"] = PAPER_SCORES[key]
        if key in PAPER_VARIANCE:
            row["paper CRATE var"], row["paper GPT var"] = PAPER_VARIANCE[key]
        ordered = [a for _, a in sorted(aggs.items(), key=lambda kv: arch_key(kv[0]))]  # CRATE / GPT, as the columns
        row["layers"] = " / ".join(dict.fromkeys(",".join(a.layers_used) for a in ordered))  # once when equal
        row["neurons"] = " / ".join(f"{a.n_neurons}" for a in ordered)
        rows.append(row)
    note = (
        "Scores are Pearson correlations x100: the mean over layers of the per-layer mean over neurons; `var` is "
        "the population variance of the x100 per-layer means, in (x100)^2 units as in the paper (layer means 7.8 "
        "and 8.3 give 0.06). 95% CIs: percentile bootstrap over neurons "
        f"({n_boot} resamples, seed {seed}); CRATE-GPT resamples the same neurons in both models when both scored "
        "the same neuron indices (paired), else each independently. The last layer of 6- and 12-layer models (only "
        "those) is excluded, as in the paper. The means are over scored units: a dead unit (NaN: nothing to "
        "correlate) is left out; \"Is the scorer valid?\" gives each layer's mean with dead units as 0 beside it. "
        "`paper` columns: Bai & Ma (arXiv 2410.16443), "
        "SPEC.md section 6 (its S and B are the paper's 6L and 12L); `-` where the paper has no number or the "
        "size is not one of the paper's."
    )
    return Table("Neuron interpretability scores: ours beside the paper's", MAIN_COLUMNS, rows, note)


SOUND_METRICS = {"random_score": "correlation on random records", "auprc_lift": "AUPRC above chance",
                 "intruder": "intruder (chance 20)"}


def sound_table(results: list[ModelResult], seed: int = 0, n_boot: int = N_BOOT) -> Table:
    """Each system's score by the metrics that pass NeuronEval's sanity checks (or take the explainer out of the
    loop), aggregated as the main table does, with the neurons that have a value: they lead; TaR stays beside."""
    rows = []
    for (size, protocol, scorer), by_arch in model_groups(results).items():
        for metric, label in SOUND_METRICS.items():
            row: dict[str, Any] = {"size": size, "protocol": protocol, "scorer": scorer, "metric": label}
            aggs = {arch: aggregate(r, protocol, seed, n_boot, metric) for arch, r in by_arch.items()}
            if not any(a.layers_used for a in aggs.values()):
                continue  # score files written before this metric existed
            for arch, a in sorted(aggs.items(), key=lambda kv: arch_key(kv[0])):
                name = SYSTEM_LABELS.get(arch, arch)
                row.update({name: a.mean, f"{name} 95% CI": fmt_ci(a.lo, a.hi), f"{name} neurons": a.n_neurons})
            if aggs.get("crate") and aggs.get("gpt") and aggs["crate"].layers_used and aggs["gpt"].layers_used:
                d = difference(by_arch["crate"], by_arch["gpt"], protocol, seed, n_boot, metric)
                row.update({"CRATE-GPT": d["difference"], "CRATE-GPT 95% CI": fmt_ci(*d["ci95"])})
            rows.append(row)
    cols = ["size", "protocol", "scorer", "metric"] + [c for a in ("CRATE", "GPT", "GPT-SAE")
                                                       for c in (a, f"{a} 95% CI", f"{a} neurons")]
    note = ("x100, aggregated as the main table (mean over layers of the per-layer means, bootstrap 95% CIs over "
            "neurons). The correlation over the uniformly sampled records and AUPRC's lift over its chance level "
            "(the unit's active share) pass NeuronEval's sanity checks where TaR correlation can fail them; the "
            "intruder score (EleutherAI delphi) has no explanation in the loop and is defined only for units with "
            "an inactive random record: `neurons` says how many have a value.")
    return Table("Scores by the metrics that pass the sanity checks", cols + ["CRATE-GPT", "CRATE-GPT 95% CI"], rows,
                 note)


SAE_COLUMNS = ["size", "protocol", "scorer", "GPT-SAE", "GPT-SAE 95% CI", "GPT-SAE var", "GPT-SAE layers",
               "paper GPT-SAE", "paper GPT-SAE layers", "GPT-SAE-GPT", "GPT-SAE-GPT 95% CI", "CRATE-GPT-SAE",
               "CRATE-GPT-SAE 95% CI", "control GPT-SAE", "neurons"]


def sae_table(results: list[ModelResult], seed: int = 0, n_boot: int = N_BOOT) -> Table:
    """The paper's third system: GPT-SAE latents scored as neurons, beside the paper's numbers, GPT and CRATE
    (paired differences as in the main table) and its random-init control."""
    controls = {(r.size, p, r.scorer): r for r in results if r.random_init and r.arch == "gpt-sae" for p in r.scores}
    rows = []
    for (size, protocol, scorer), by_arch in model_groups(results).items():
        if "gpt-sae" not in by_arch:
            continue
        sae = by_arch["gpt-sae"]
        a = aggregate(sae, protocol, seed, n_boot)
        row: dict[str, Any] = {"size": size, "protocol": protocol, "scorer": scorer, "GPT-SAE": a.mean,
                               "GPT-SAE 95% CI": fmt_ci(a.lo, a.hi), "GPT-SAE var": a.var, "neurons": a.n_neurons,
                               "GPT-SAE layers": ", ".join(f"{s.mean:.2f}" for s in a.layers)}
        paper = PAPER_SAE_LAYERS.get((paper_row(size) or "", protocol))
        if paper:
            row["paper GPT-SAE"], row["paper GPT-SAE layers"] = float(np.mean(paper)), ", ".join(f"{v:g}" for v in paper)
        for other, col in (("gpt", "GPT-SAE-GPT"), ("crate", "CRATE-GPT-SAE")):
            if other in by_arch and a.layers_used:
                pair = (sae, by_arch[other]) if other == "gpt" else (by_arch[other], sae)
                d = difference(*pair, protocol, seed, n_boot)
                row.update({col: d["difference"], f"{col} 95% CI": fmt_ci(*d["ci95"])})
        if (size, protocol, scorer) in controls:
            row["control GPT-SAE"] = aggregate(controls[(size, protocol, scorer)], protocol, seed, n_boot).mean
        rows.append(row)
    note = ("GPT-SAE: a sparse autoencoder on the GPT's MLP neurons (`crate sae train`), its latents scored as "
            "neurons (dead latents left out); means x100 over layers as in the main table. `paper GPT-SAE`: the "
            "per-layer scores the paper plots (SPEC.md 6a; Random-only and some others read off a figure, +-0.1) "
            "and their mean. Differences: paired bootstrap over neurons when both scored the same indices.")
    return Table("GPT-SAE, the paper's third system", SAE_COLUMNS, rows, note)


def sae_metrics_table(paths: list[str | Path]) -> Table:
    """Every SAE folder (SAELens's cfg.json beside our metrics.json) under `paths`, with its metrics."""
    rows = []
    folders = sorted({f.parent for p in paths for f in Path(p).rglob("metrics.json") if (f.parent / "cfg.json").is_file()
                      and not f.parent.name.startswith(".")})  # not an interrupted save's leftovers (.NAME.tmp-*)
    for folder in folders:
        m = read_json(folder / "metrics.json")
        ce = m.get("ce_loss") or {}
        rows.append({"SAE": str(folder), "hook": m.get("hook"), "kind": m.get("architecture"), "d_sae": m.get("d_sae"),
                     "L0": m.get("l0"), "dead": m.get("dead_fraction"), "dense": m.get("dense_fraction"),
                     "explained var": m.get("explained_variance"), "cosine": m.get("cosine_similarity"),
                     "CE clean": ce.get("clean"), "CE SAE": ce.get("sae"),
                     "CE recovered vs zero": m.get("ce_recovered_vs_zero"),
                     "CE recovered vs mean": m.get("ce_recovered_vs_mean"), "tokens": m.get("n_tokens")})
    cols = ["SAE", "hook", "kind", "d_sae", "L0", "dead", "dense", "explained var", "cosine", "CE clean", "CE SAE",
            "CE recovered vs zero", "CE recovered vs mean", "tokens"]
    rule = next((read_json(f / "metrics.json").get("dead_rule") for f in folders), "")
    return Table("SAE metrics", cols, rows,
                 "On validation tokens. L0: active latents per token; dead: " + (rule or "15 per 2M tokens, scaled")
                 + "; dense: active on more than 10% of tokens; explained variance about the mean; CE recovered: "
                 "(CE ablated - CE with the reconstruction spliced in) / (CE ablated - CE clean), zero- and "
                 "mean-ablation.")


def layers_table(results: list[ModelResult], seed: int = 0, n_boot: int = N_BOOT) -> Table:
    rows = []
    for r in sorted(results, key=lambda r: (size_key(r.size), r.random_init, arch_key(r.arch), r.name)):
        for protocol in sorted(r.scores, key=protocol_key):
            agg = aggregate(r, protocol, seed, n_boot)
            for s in agg.layers:
                rows.append({
                    "model": r.name, "arch": r.arch, "size": r.size, "random init": "yes" if r.random_init else "no",
                    "protocol": protocol, "scorer": r.scorer, "layer": s.layer, "mean x100": s.mean, "95% CI": fmt_ci(s.lo, s.hi),
                    "neurons": s.n, "NaN scores": s.n_nan, "used": "yes" if s.layer in agg.layers_used else "no",
                })
    cols = ["model", "arch", "size", "random init", "protocol", "scorer", "layer", "mean x100", "95% CI", "neurons", "NaN scores", "used"]
    return Table("Per-layer scores", cols, rows, "Mean over the scored neurons of each layer, x100, with bootstrap 95% CIs.")


def measures_table(results: list[ModelResult]) -> Table:
    names: list[str] = []
    for r in results:
        for m in r.measures.values():
            names += [k for k in m if k not in names]
    rows = []
    for r in sorted(results, key=lambda r: (size_key(r.size), r.random_init, arch_key(r.arch), r.name)):
        for layer in sorted(r.measures, key=layer_sort_key):
            rows.append({"model": r.name, "arch": r.arch, "size": r.size,
                         "random init": "yes" if r.random_init else "no", "layer": layer, **r.measures[layer]})
    return Table(
        "Explanation-free measures", ["model", "arch", "size", "random init", "layer", *names], rows,
        "Per-layer measures computed from the activations alone (no explainer, no simulator), as written by "
        "`crate interpret` into summary.json.",
    )


def controls_table(results: list[ModelResult], seed: int = 0, n_boot: int = N_BOOT) -> Table:
    """Trained models beside random-initialised ones of the same size and arch (from result folders flagged as
    random-init, and from the `controls` section of summary.json files)."""
    rows = []
    for r in sorted(results, key=lambda r: (size_key(r.size), arch_key(r.arch), r.random_init, r.name)):
        for protocol in sorted(r.scores, key=protocol_key):
            a = aggregate(r, protocol, seed, n_boot)
            rows.append({"size": r.size, "arch": r.arch, "model": r.name, "init": "random" if r.random_init else "trained",
                         "protocol": protocol, "scorer": r.scorer, "mean x100": a.mean, "95% CI": fmt_ci(a.lo, a.hi),
                         "source": "scores"})
    scored = {r.path.resolve() for r in results if r.random_init}
    seen: set[Path] = set()
    for r in results:
        controls = r.summary.get("controls") or {}
        if not isinstance(controls, dict) or r.summary_path is None or r.summary_path in seen:
            continue
        seen.add(r.summary_path)  # one summary.json is read by every result of its folder (run_compare's)
        for name, c in controls.items():
            if not isinstance(c, dict) or r.summary_path.parent / f"{name}-control" in scored:
                continue  # run_compare scored this control into <folder>/<name>-control: its row is above
            agg = c.get("aggregate") if isinstance(c.get("aggregate"), dict) else c
            mean = agg.get("mean")
            ci = agg.get("ci95") or [None, None]
            if mean is None:
                continue
            scale = 100 if abs(float(mean)) <= 1 and not c.get("x100") else 1
            lo, hi = ((float(ci[0]) * scale, float(ci[1]) * scale) if ci[0] is not None else (math.nan, math.nan))
            rows.append({"size": c.get("size", r.size), "arch": c.get("arch", guess_arch(name)), "model": name,
                         "init": "random", "protocol": canonical_protocol(str(c.get("protocol", ""))) or "-",
                         "mean x100": float(mean) * scale, "95% CI": fmt_ci(lo, hi), "source": "summary.json"})
    cols = ["size", "arch", "model", "init", "protocol", "scorer", "mean x100", "95% CI", "source"]
    has_control = any(row["init"] == "random" for row in rows)
    return Table(
        "Random-initialisation controls", cols, rows if has_control else [],
        "Scores of untrained (randomly initialised) models measure what the protocol finds without learning: a "
        "trained model's score is only meaningful above its control's." + ("" if has_control else
        " No random-init results were found (run `crate interpret --random-init` to add them)."),
    )


def val_loss_table(runs: list[TrainRun]) -> Table:
    rows = []
    for run in sorted(runs, key=lambda r: (size_key(r.size), arch_key(r.arch), r.name)):
        paper = PAPER_VAL_LOSS.get(run.size)
        paper_value = (paper[0] if run.arch == "crate" else paper[1]) if paper and run.arch in PAPER_ARCHS else None
        rows.append({"run": run.name, "arch": run.arch, "size": run.size, "steps": int(run.steps[-1]),
                     "final val loss": run.final, "best val loss": min(run.val_loss), "paper val loss": paper_value})
    return Table("Validation loss", ["run", "arch", "size", "steps", "final val loss", "best val loss", "paper val loss"],
                 rows, "Paper: validation loss on the Pile read off the paper's figure (+-0.01), SPEC.md section 4.")
