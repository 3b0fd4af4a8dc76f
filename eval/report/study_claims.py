"""The paper's claims that a study's sizes can test, and the verdict on each: the direction comes from the paper's
numbers (crate.eval.report.paper), the verdict from Welch's and the equivalence tests over the per-seed values, all
claims of the table Holm-corrected as one family (crate.eval.stats.claims), with the uncorrected verdict a one-model
study would reach beside it (crate.eval.stats.seeds.verdict)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from crate.eval.report.paper import PAPER_SAE_LAYERS, PAPER_SCORES, PAPER_VARIANCE, SYSTEM_LABELS, paper_row
from crate.eval.report.study_curves import matched_values
from crate.eval.report.study_scores import Collected
from crate.eval.report.tables import Table, fmt_ci
from crate.eval.stats import claims as claim_stats
from crate.eval.stats import seeds as seed_stats
from crate.eval.validity.flags import comparison_flags

TOST_CI = f"{100 * (1 - 2 * claim_stats.ALPHA):g}% CI (TOST)"
RANDOM_DIFFERENCE = "random-record correlation: 95% CI of the difference"
SEED0_VERDICT = "verdict from seed 0 alone (uncorrected)"


def claims(sizes: list[str], protocols: list[str], sae: bool, n_layers: dict[str, int]) -> list[dict[str, Any]]:
    """The paper's claims that these sizes can test, each with its direction, from its numbers (SPEC.md 6 and 6a):
    CRATE against GPT at every size and protocol; CRATE's layer variance below GPT's (the paper's 6L and 12L claim,
    tested at the depths here that have two layers or more); GPT-SAE against CRATE, and above GPT on short-context."""
    out = []
    for protocol in protocols:
        for size in sizes:
            row = paper_row(size)
            if (row, protocol) not in PAPER_SCORES:
                continue
            c, g = PAPER_SCORES[(row, protocol)]
            out.append({"claim": f"CRATE {'>' if c > g else '<'} GPT at {size}", "protocol": protocol, "size": size,
                        "a": "crate", "b": "gpt", "direction": 1 if c > g else -1, "statistic": "mean",
                        "paper": f"{c:g} vs {g:g}"})
            if sae and (row, protocol) in PAPER_SAE_LAYERS:
                s = float(np.mean(PAPER_SAE_LAYERS[(row, protocol)]))
                out.append({"claim": f"CRATE {'>' if c > s else '<'} GPT-SAE at {size}", "protocol": protocol,
                            "size": size, "a": "crate", "b": "gpt-sae", "direction": 1 if c > s else -1,
                            "statistic": "mean", "paper": f"{c:g} vs {s:.2f}"})
                if protocol == "short-context":
                    out.append({"claim": f"GPT-SAE > GPT at {size}", "protocol": protocol, "size": size,
                                "a": "gpt-sae", "b": "gpt", "direction": 1 if s > g else -1, "statistic": "mean",
                                "paper": f"{s:.2f} vs {g:g}"})
        paper_var = "; ".join(f"{r}: {a:g} vs {b:g}" for (r, p), (a, b) in PAPER_VARIANCE.items() if p == protocol)
        for size in sizes:
            if n_layers.get(size, 0) >= 2 and paper_var:
                out.append({"claim": f"CRATE's layer variance < GPT's at {size}", "protocol": protocol, "size": size,
                            "a": "crate", "b": "gpt", "direction": -1, "statistic": "var_corrected",
                            "paper": f"at 6L/12L only ({paper_var})"})
    return out


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if math.isfinite(p) else "-"


def checks(collected: Collected, c: dict[str, Any], per_seed_differences: list[float]) -> str:
    """What the scorer's own controls say of one equal-step claim, counted over the training seeds: each seed's
    comparison flags (crate.eval.validity.flags.comparison_flags: density-confounded, populations) from both
    systems' validity summaries and that seed's difference, and the seeds on which the verdict's metric
    (correlation) failed NeuronEval's sanity checks on either system; "none" when the controls raise nothing,
    "not validated" without validity summaries."""
    va, vb = (collected.validity.get(("trained", c["size"], c[side], c["protocol"])) or [] for side in ("a", "b"))
    if not va or not vb:
        return "not validated"
    counts: dict[str, int] = {}
    n = min(len(va), len(vb), len(per_seed_differences))
    for a, b, d in zip(va, vb, per_seed_differences):
        names = (SYSTEM_LABELS[c["a"]], SYSTEM_LABELS[c["b"]])
        found = {f["flag"] for f in comparison_flags(a, b, d / 100, names)}
        if any(((v.get("sanity") or {}).get("passes") or {}).get("correlation") is False for v in (a, b)):
            found.add("correlation fails the sanity checks")
        for flag in found:
            counts[flag] = counts.get(flag, 0) + 1
    return ", ".join(f"{flag} ({k}/{n} seeds)" for flag, k in sorted(counts.items())) or "none"


def _row(c: dict[str, Any], reading: str, t: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"claim": c["claim"], "reading": reading, "protocol": c["protocol"], "paper": c["paper"], **fields,
            "p": _fmt_p(t["p"]), "p Holm": _fmt_p(t["p_holm"]), "margin": t["margin"], TOST_CI: fmt_ci(*t["ci_tost"]),
            "p equivalent Holm": _fmt_p(t["p_tost_holm"]), "verdict": t["verdict"]}


def verdict_rows(collected: Collected, claim_list: list[dict[str, Any]], n_boot: int, seed: int,
                 curves: dict | None = None, margin: float | None = None) -> tuple[list[dict[str, Any]], int]:
    """One row per claim and reading with scores on both sides, all read as one family
    (crate.eval.stats.claims.read_family): first the mean claims between CRATE and GPT at matched validation loss
    (`curves`: crate.eval.report.study_curves.read_curves), then every claim at equal steps. `margin`: the mean
    claims' equivalence margin (default claims.MARGINS). Also returns the family's size (its number of p-values)."""
    margins = {**claim_stats.MARGINS, **({"mean": margin} if margin is not None else {})}
    found: list[tuple[dict[str, Any], str, dict[str, Any], dict[str, Any]]] = []  # claim, reading, numbers, tests
    for c in claim_list:
        values = matched_values(curves or {}, c["size"], c["a"], c["b"], c["protocol"]) \
            if c["statistic"] == "mean" else None
        if values:  # the seeds with a reading on both sides
            values = [m for m in values if math.isfinite(m["a"]) and math.isfinite(m["b"])]
            a, b = [m["a"] for m in values], [m["b"] for m in values]
            found.append((c, "matched loss", {"per_seed": values, "ci95_seeds": seed_stats.welch_interval(a, b)},
                          claim_stats.welch_tests(a, b, margins["mean"])))
    for c in claim_list:
        a, b = (("trained", c["size"], c[side], c["protocol"], "correlation") for side in ("a", "b"))
        d = collected.compare(a, b, c["statistic"], n_boot, seed)
        if d is not None:
            found.append((c, "equal steps", d, claim_stats.welch_tests(d["a"]["per_seed"], d["b"]["per_seed"],
                                                                       margins[c["statistic"]])))
    read, family = claim_stats.read_family([t for *_, t in found], [c["direction"] for c, *_ in found])
    rows = []
    for (c, reading, d, _), t in zip(found, read):
        if reading == "matched loss":
            a, b = (np.asarray([m[side] for m in d["per_seed"]], dtype=float) for side in ("a", "b"))
            first = d["per_seed"][0] if d["per_seed"] else {}
            rows.append(_row(c, reading, t, here=f"{a.mean():.2f} vs {b.mean():.2f}" if len(a) else "-",
                             difference=t["difference"], **{"seed-aware 95% CI": fmt_ci(*d["ci95_seeds"])},
                             **{"scorer's checks": "-", RANDOM_DIFFERENCE: "-"},
                             **{"seed 0 alone": first["a"] - first["b"] if first.get("seed") == 0 else math.nan,
                                "seed 0 95% CI (neurons)": "-", SEED0_VERDICT: "-", "seeds": len(a),
                                "_numbers": {**d, "tests": t}}))
            continue
        sound = collected.compare(*(("trained", c["size"], c[side], c["protocol"], "random_score") for side in "ab"),
                                  c["statistic"], n_boot, seed) if c["statistic"] == "mean" else None
        differences = [x - y for x, y in zip(d["a"]["per_seed"], d["b"]["per_seed"])]
        rows.append(_row(c, reading, t, here=f"{d['a']['estimate']:.2f} vs {d['b']['estimate']:.2f}",
                         difference=d["estimate"], **{"seed-aware 95% CI": fmt_ci(*d["ci95_seeds"])},
                         **{"scorer's checks": checks(collected, c, differences),
                            RANDOM_DIFFERENCE: fmt_ci(*sound["ci95_seeds"]) if sound else "-"},
                         **{"seed 0 alone": d["estimate_seed0"], "seed 0 95% CI (neurons)": fmt_ci(*d["ci95_seed0"]),
                            SEED0_VERDICT: seed_stats.verdict(*d["ci95_seed0"], c["direction"]),
                            "seeds": min(d["a"]["n_seeds"], d["b"]["n_seeds"]), "_numbers": {**d, "tests": t}}))
    return rows, family


def verdicts_table(collected: Collected, sizes: list[str], sae: bool, match: str, n_boot: int, seed: int,
                   curves: dict | None = None, margin: float | None = None) -> Table:
    """One row per claim and reading these sizes can test (`match`: the study's --match, named in the note;
    `curves` and `margin` as verdict_rows); the note states the family, alpha, the margins and the rule."""
    n_layers = {s: collected.n_layers(s, collected.protocols[0]) for s in sizes}
    rows, family = verdict_rows(collected, claims(sizes, collected.protocols, sae, n_layers), n_boot, seed, curves,
                                margin)
    alpha = claim_stats.ALPHA
    mean_margin = claim_stats.MARGINS["mean"] if margin is None else margin
    return Table("Verdicts", ["claim", "reading", "protocol", "paper", "here", "difference", "seed-aware 95% CI", "p",
                              "p Holm", "margin", TOST_CI, "p equivalent Holm", "verdict", "scorer's checks",
                              RANDOM_DIFFERENCE, "seed 0 alone",
                              "seed 0 95% CI (neurons)", SEED0_VERDICT, "seeds"], rows,
                 "One row per claim of the paper these sizes can test and per reading, its direction from the paper's "
                 "numbers (x100; for the variance (x100)^2, noise-corrected). Readings: at matched loss (first; CRATE "
                 "against GPT on the grid's neuron sample, each seed's two runs read at the validation loss both "
                 "reach: 'Scores at matched validation loss') and at equal steps (every claim, every neuron). Each "
                 "claim is tested on the per-seed values. p: Welch's two-sided t test of 'the difference is not 0'. "
                 "With a margin, TOST of 'it lies within [-margin, margin]': "
                 f"{TOST_CI} is the Welch interval it reads (equivalent when inside), its p the larger one-sided "
                 f"p-value. The family is every row of this table: its {family} p-values (a difference test per row, "
                 f"a TOST per mean claim) are Holm-corrected together at alpha {alpha:g} (p Holm, p equivalent Holm: "
                 "the adjusted p-values). holds / reversed: Holm rejects 'no difference' and the difference is on the "
                 "claimed / the other side of 0; else equivalent: Holm rejects 'a difference of at least the margin'; "
                 f"else not resolved. Margin: {mean_margin:g} points for the mean scores (--margin); none for the "
                 "variance claims (no equivalence reading). The seed-aware 95% interval is shown uncorrected. The last "
                 "columns read the claim as a one-model study would, uncorrected: seed 0 alone, a 95% interval over its "
                 "neurons (at equal steps). Every verdict reads the protocol's correlation (the paper's metric) of "
                 "the scored units (dead units, never active on the recorded tokens, left out; the validity tables "
                 "count them); the scorer's checks say, over the seeds, where the scorer's own controls question it "
                 "(density-confounded: the planted token-determined units at the two systems' densities differ by at "
                 "least half the gap; populations: the shares of dead units differ by more than 5 points; the "
                 "correlation failing NeuronEval's sanity checks on a system), and beside it the same difference in "
                 "correlation over the uniformly sampled records alone, a metric that passes them (NeuronEval): a "
                 "verdict it does not share is the top-and-random correlation's alone. "
                 + ("CRATE's dictionary is widened to GPT's parameter count (--match params); the paper compares at "
                    "equal width (h = 4d)." if match == "params" else "Equal width (h = 4d for both), as the paper."))


__all__ = ["claims", "checks", "verdict_rows", "verdicts_table"]
