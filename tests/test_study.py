"""`crate study`: the seed-aware interval against hand-computed cases and the two-level bootstrap's variance, the
verdicts, the claims taken from SPEC.md's numbers, and a reduced study end to end (recomputed from its score
files, resumed, refused with other inputs)."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from crate.errors import CrateError
from crate.train.data import open_split
from crate.eval.stats import claims as claim_stats
from crate.eval.stats import neurons as neuron_stats
from crate.eval.stats import seeds as seed_stats
from crate.eval.validity.flags import comparison_flags
from crate.eval.report.study_claims import claims
from crate.eval.report.tables import fmt_ci


def test_seed_aware_interval_of_a_hand_computed_case():
    # three seeds whose neurons all score the same within a seed: resampling neurons changes nothing, so the
    # neurons-only interval is the point; the mean of 3 seeds drawn with replacement from {0, 0.3, 0.6} is 0 with
    # probability 1/27 = 3.7% and 0.6 with 1/27 (both > 2.5%), so the seed-aware 95% interval is [0, 0.6]
    runs = [{"0": [v] * 5, "1": [v] * 7} for v in (0.0, 0.3, 0.6)]
    seeds = seed_stats.seed_bootstrap(runs, n_boot=4000, seed=1)
    fixed = seed_stats.seed_bootstrap(runs, n_boot=4000, seed=1, resample_seeds=False)
    assert seeds["estimate"] == pytest.approx(0.3) and fixed["estimate"] == pytest.approx(0.3)
    assert seeds["ci95"] == pytest.approx([0.0, 0.6], abs=1e-12)
    assert fixed["ci95"] == pytest.approx([0.3, 0.3], abs=1e-12)
    # one seed with neurons {0, 1}: a resampled mean is 0, 0.5 or 1 (1/4, 1/2, 1/4): the interval is [0, 1]
    one = seed_stats.seed_bootstrap([{"0": [0.0, 1.0]}], n_boot=4000, seed=2)
    assert one["ci95"] == pytest.approx([0.0, 1.0]) and one["n_seeds"] == 1
    # NaN scores (dead neurons) and layers without a finite score are left out
    assert seed_stats.seed_bootstrap([{"0": [0.2, math.nan], "1": [math.nan]}], n_boot=50)["estimate"] == pytest.approx(0.2)


def test_two_level_bootstrap_variance_matches_its_formula():
    # a replicate averages S draws; each draw is a seed J (uniform) and a resampled mean of its neurons, so
    # Var = [Var_pop(model means) + mean_s(sum_l sigma_sl^2 / n_sl / L^2)] / S (sigma^2: population variance)
    rng = np.random.default_rng(3)
    runs = [{"0": rng.normal(m, 1.0, 40), "1": rng.normal(m + 1, 2.0, 90)} for m in (0.0, 0.8, 2.0)]
    model_means = [np.mean([v.mean() for v in r.values()]) for r in runs]
    within = [sum(v.var() / len(v) for v in r.values()) / 4 for r in runs]
    expected = (np.var(model_means) + np.mean(within)) / 3
    boots = seed_stats.seed_bootstrap(runs, n_boot=20000, seed=4)["boots"]
    assert boots.var() == pytest.approx(expected, rel=0.05)
    fixed = seed_stats.seed_bootstrap(runs, n_boot=20000, seed=4, resample_seeds=False)["boots"]
    assert fixed.var() == pytest.approx(np.sum(within) / 9, rel=0.05)  # seeds fixed: only the neurons' part
    # the "var" statistic: the mean over seeds of each model's population variance of its layer means
    var = seed_stats.seed_bootstrap(runs, n_boot=10, statistic="var")["estimate"]
    assert var == pytest.approx(np.mean([np.var([v.mean() for v in r.values()]) for r in runs]))


def test_t_intervals_of_hand_computed_cases():
    from scipy.stats import t

    # per-seed values 0, 0.3, 0.6: mean 0.3, sd 0.3, so 0.3 -+ t(0.975, 2) * 0.3 / sqrt(3) = 0.3 -+ 4.302653 * 0.1732051
    assert seed_stats.t_interval([0.0, 0.3, 0.6]) == pytest.approx([0.3 - 0.7452413, 0.3 + 0.7452413], abs=1e-6)
    assert all(math.isnan(x) for x in seed_stats.t_interval([0.4]))  # one seed: no seed noise can be measured
    # Welch: a = 1, 2, 3 (s^2/n = 1/3), b = 0, 1 (0.5/2 = 0.25): se^2 = 7/12, df = (7/12)^2 / ((1/3)^2/2 + 0.25^2/1)
    se, df = math.sqrt(7 / 12), (7 / 12) ** 2 / ((1 / 3) ** 2 / 2 + 0.0625)
    assert df == pytest.approx(2.882353, abs=1e-6)
    half = t.ppf(0.975, df) * se
    assert seed_stats.welch_interval([1, 2, 3], [0, 1]) == pytest.approx([1.5 - half, 1.5 + half])


def test_t_interval_covers_95_percent_with_three_seeds_and_the_bootstrap_does_not():
    # seed noise only (sd 1 between seeds, 200 neurons of sd 0.5 within): over 400 simulated studies the t interval
    # holds the true mean (0) about 95% of the time; the percentile bootstrap over 3 seeds far less often
    rng = np.random.default_rng(8)
    t_hits = boot_hits = 0
    for _ in range(400):
        runs = [{"0": rng.normal(rng.normal(0, 1), 0.5, 200)} for _ in range(3)]
        per_seed = [seed_stats.model_statistic([np.asarray(r["0"])], "mean") for r in runs]
        lo, hi = seed_stats.t_interval(per_seed)
        t_hits += lo <= 0 <= hi
        lo, hi = seed_stats.seed_bootstrap(runs, n_boot=300, seed=1)["ci95"]
        boot_hits += lo <= 0 <= hi
    assert 0.92 <= t_hits / 400 <= 0.98
    assert boot_hits / 400 < 0.85


def test_corrected_layer_variance_removes_what_neuron_sampling_adds():
    # true layer means 0 and 1 (population variance 0.25); 30 neurons of sd 3 per layer add (L - 1) / L^2 * 2 * 9 / 30
    # = 0.15 to the expected variance of the measured layer means
    rng = np.random.default_rng(9)
    raw, corrected = [], []
    for _ in range(3000):
        run = [rng.normal(0, 3, 30), rng.normal(1, 3, 30)]
        raw.append(seed_stats.model_statistic(run, "var"))
        corrected.append(seed_stats.model_statistic(run, "var_corrected"))
    assert np.mean(raw) == pytest.approx(0.40, abs=0.03)
    assert np.mean(corrected) == pytest.approx(0.25, abs=0.03)


def test_bootstrap_of_layer_variances_centres_on_the_estimate():
    # resampling neurons adds their sampling noise to each layer mean again: uncorrected, the replicates of either
    # variance would sit about one noise term (here (L - 1) / L^2 * 2 * 9 / 64 = 0.07) above the estimate
    rng = np.random.default_rng(12)
    runs = [{"0": rng.normal(0, 3, 64), "1": rng.normal(0.5, 3, 64)} for _ in range(3)]
    noise = np.mean([seed_stats._noise([np.asarray(v) for v in r.values()]) for r in runs])
    assert noise == pytest.approx(0.07, rel=0.25)
    for statistic in ("var", "var_corrected"):
        for resample_seeds in (True, False):
            b = seed_stats.seed_bootstrap(runs, n_boot=20000, seed=13, statistic=statistic, resample_seeds=resample_seeds)
            assert b["boots"].mean() == pytest.approx(b["estimate"], abs=0.15 * noise), (statistic, resample_seeds)


def test_seed_compare_resamples_the_systems_apart():
    rng = np.random.default_rng(5)
    a = [{"0": rng.normal(m, 1, 30), "1": rng.normal(m, 1, 20)} for m in (1.0, 1.5, 3.0)]
    d = seed_stats.seed_compare(a, a, n_boot=2000, seed=7)
    # the same data on both sides: the estimate is 0; had both sides shared one random stream every replicate of
    # the difference would be 0 too, but they are drawn apart, so the interval has the width of two systems' noise
    assert d["estimate"] == 0 and d["estimate_seed0"] == 0
    lo, hi = d["ci95_bootstrap"]
    alone = seed_stats.seed_bootstrap(a, n_boot=2000, seed=3)["boots"]
    assert lo < -0.5 < 0.5 < hi and (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(2) * alone.std(), rel=0.1)
    assert d["ci95_seeds"] == pytest.approx(seed_stats.welch_interval(d["a"]["per_seed"], d["a"]["per_seed"]))
    # seed 0 alone: its neurons only, narrower than the spread between seeds
    lo0, hi0 = d["ci95_seed0"]
    assert lo0 < 0 < hi0 and hi0 - lo0 < hi - lo


@pytest.mark.parametrize("lo, hi, direction, expected", [
    (0.5, 2.0, 1, "holds"), (0.5, 2.0, -1, "reversed"), (-2.0, -0.1, -1, "holds"), (-2.0, -0.1, 1, "reversed"),
    (-0.1, 2.0, 1, "not resolved"), (-1.0, 0.0, -1, "not resolved"), (math.nan, 1.0, 1, "not resolved"),
])
def test_seed0_verdict_reads_one_interval_uncorrected(lo, hi, direction, expected):
    # what a one-model study concludes (the verdict table's seed-0 columns); the seed-aware verdicts are read as a
    # family (tests/test_study_statistics.py)
    assert seed_stats.verdict(lo, hi, direction) == expected


def test_claims_take_their_direction_from_the_papers_numbers():
    rows = {(c["claim"], c["protocol"]): c for c in claims(["1L", "2L", "3L"], ["TaR", "short-context"], True,
                                                             {"1L": 1, "2L": 2, "3L": 3})}
    # SPEC.md 6: TaR 1L 3.9 / 8.8 (CRATE loses), 2L 8.05 / 4.2, 3L 9.1 / 3.57
    assert rows[("CRATE < GPT at 1L", "TaR")]["direction"] == -1
    assert rows[("CRATE > GPT at 2L", "TaR")]["direction"] == 1 and ("CRATE > GPT at 3L", "TaR") in rows
    # 6a: GPT-SAE TaR 1L 5.5 (above CRATE's 3.9), 2L (7.6 + 3.5) / 2 = 5.55 (below 8.05)
    assert rows[("CRATE < GPT-SAE at 1L", "TaR")]["paper"] == "3.9 vs 5.50"
    assert rows[("CRATE > GPT-SAE at 2L", "TaR")]["direction"] == 1
    # short-context: GPT-SAE above both (1L 15.4 vs GPT 14.2)
    assert rows[("GPT-SAE > GPT at 1L", "short-context")]["direction"] == 1
    assert ("GPT-SAE > GPT at 1L", "TaR") not in rows
    # the variance claim (the paper's 6L/12L TaR numbers) only where a model has two layers or more
    assert [k for k in rows if "variance" in k[0]] == [("CRATE's layer variance < GPT's at 2L", "TaR"),
                                                       ("CRATE's layer variance < GPT's at 3L", "TaR")]


# --------------------------------------------------------------------------------------------------------
# a reduced study end to end

REDUCED = dict(sizes=["1L", "2L"], seeds=2, steps=3, grid=3, curve_neurons=4, vocab_size=300, max_documents=1,
               sae=False, neurons=12, control_neurons=4, llm_neurons=0, n_tokens=2048, context=32, n_boot=300, jobs=1,
               overrides=["model.n_embd=16", "model.n_head=2", "train.val_batches=1", "train.final_val_batches=1"])


def _scores(out: Path, seed: int, size: str, arch: str, where: str | None = None,
            metric: str = "score") -> dict[str, list[float]]:
    """x100 values of `metric` by layer, read straight from the JSONL files (null = NaN left out) of a system's
    scored folder (or of the folder `where` under `out`)."""
    folder = out / (where or f"interpret/seed{seed}/{size}/{arch}") / "scores" / "tar"
    layers = {}
    for f in sorted(folder.glob("*.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        layers[f.stem] = [100 * r[metric] for r in rows if r[metric] is not None]
    return layers


def _model_score(layers: dict[str, list[float]]) -> float:
    return sum(sum(v) / len(v) for v in layers.values()) / len(layers)


def test_reduced_study_end_to_end_resumes_and_refuses_other_inputs(tmp_path, capsys, one_thread):
    from scipy.stats import t

    from crate.eval.workflows.study import StudyOptions, study

    out = tmp_path / "study"
    opts = StudyOptions(out=out, **REDUCED)
    index = study(opts)
    first = capsys.readouterr().out
    summary = json.loads((out / "study.json").read_text())
    systems = {(r["size"], r["system"], r["metric"]): r for r in summary["tables"]["systems"]}
    for size, n_layer in (("1L", 1), ("2L", 2)):
        for arch in ("crate", "gpt"):
            per_seed = [_model_score(_scores(out, s, size, arch)) for s in (0, 1)]
            assert all(len(_scores(out, s, size, arch)) == n_layer for s in (0, 1))
            row = systems[(size, arch.upper(), "correlation")]
            assert row["numbers"]["per_seed"] == pytest.approx(per_seed, abs=1e-9)
            assert row["estimate"] == pytest.approx(sum(per_seed) / 2, abs=1e-9)
            half = t.ppf(0.975, 1) * np.std(per_seed, ddof=1) / math.sqrt(2)  # Student's t, 1 degree of freedom
            assert row["numbers"]["ci95_seeds"] == pytest.approx([row["estimate"] - half, row["estimate"] + half])
    # the training seeds differ (1337 + k), and so do the trained weights
    configs = [(out / "runs" / f"seed{s}" / "crate-2L" / "config.yaml").read_text() for s in (0, 1)]
    assert "seed: 1337" in configs[0] and "seed: 1338" in configs[1]
    keys = {r["key"] for r in summary["inputs"] if r["kind"] == "trained" and r["size"] == "2L" and r["system"] == "crate"}
    assert len(keys) == 2
    # each training seed draws its own neuron samples and random records (interpretation seed + k)
    drawn = [json.loads((out / "interpret" / f"seed{s}" / "1L" / "crate" / "provenance.json").read_text())["seed"]
             for s in (0, 1)]
    assert drawn == [0, 1]
    # ... and its own evaluation tokens: seed k records the validation split from token k x n_tokens, every system,
    # control and grid checkpoint of a seed the same tokens (the hash of what each folder read, against the split)
    split, n = open_split(out / "data", "val"), REDUCED["n_tokens"]
    assert len(split) >= 2 * n
    for s in (0, 1):
        for where in (f"interpret/seed{s}/1L/crate", f"interpret/seed{s}/2L/gpt", f"interpret/seed{s}/1L/gpt-control",
                      f"curves/seed{s}/2L/crate/step-0000002"):
            data = json.loads((out / where / "provenance.json").read_text())["data"]
            read = np.asarray(split[s * n : s * n + data["n_tokens"]]).astype(np.int64)
            assert data.get("offset", 0) == s * n and data["n_tokens"] == n
            assert data["tokens_sha256"] == hashlib.sha256(read.tobytes()).hexdigest(), where
    assert summary["settings"]["token_offsets"] == {"seed0": 0, "seed1": n}
    # one random init per training seed for the controls
    weights = {json.loads((out / "interpret" / f"seed{s}" / "1L" / "gpt-control" / "provenance.json").read_text())
               ["model"]["weights_fingerprint"] for s in (0, 1)}
    assert len(weights) == 2
    # a verdict row per claim these sizes can test, all three read as one Holm family from the per-seed values: a
    # Welch test each and a TOST for the two mean claims (the variance claim has no margin)
    # the matched-loss reading, recomputed from the files: each grid checkpoint's validation loss (its config.json)
    # and its sample's scores (the JSONL files); both paths fall monotonically here, so numpy's interpolation
    # (over the reversed path) is the reference
    matched = {(r["size"], r["seed"]): r for r in summary["tables"]["matched_loss"]}
    for size in ("1L", "2L"):
        for s in (0, 1):
            path = {}
            for arch in ("crate", "gpt"):
                steps = [1, 2, 3]
                losses = [json.loads((out / "runs" / f"seed{s}" / f"{arch}-{size}" / "grid" / f"step-{k:07d}" /
                                      "config.json").read_text())["metadata"]["val_loss"] for k in steps]
                scores = [_model_score(_scores(out, s, size, arch, f"curves/seed{s}/{size}/{arch}/step-{k:07d}"))
                          for k in steps]
                assert all(a > b for a, b in zip(losses, losses[1:])) and all(
                    len(v) == 4 for v in _scores(out, s, size, arch, f"curves/seed{s}/{size}/{arch}/step-0000001").values())
                path[arch] = (losses, scores)
            target = max(path["crate"][0][-1], path["gpt"][0][-1])
            row = matched[(size, s)]
            assert row["matched val loss"] == pytest.approx(target)
            for arch, col in (("crate", "CRATE at matched loss"), ("gpt", "GPT at matched loss")):
                losses, scores = path[arch]
                expected = np.interp(target, losses[::-1], scores[::-1]) if losses[0] >= target else math.nan
                assert row[col] == pytest.approx(expected, nan_ok=True), (size, s, arch)
    # a verdict row per claim and reading, all read as one Holm family from the per-seed values: a Welch test each
    # and a TOST for every mean-claim row (the variance claim has no margin, and no matched-loss reading)
    rows = summary["tables"]["verdicts"]
    verdicts = {(r["claim"], r["reading"]): r for r in rows}
    assert [r["reading"] for r in rows] == ["matched loss"] * 2 + ["equal steps"] * 3  # matched loss first
    assert {c for c, _ in verdicts} == {"CRATE < GPT at 1L", "CRATE > GPT at 2L", "CRATE's layer variance < GPT's at 2L"}
    for size, claim in (("1L", "CRATE < GPT at 1L"), ("2L", "CRATE > GPT at 2L")):
        per_seed = verdicts[(claim, "matched loss")]["numbers"]["per_seed"]
        assert [m["a"] for m in per_seed] == pytest.approx([matched[(size, s)]["CRATE at matched loss"] for s in (0, 1)],
                                                           nan_ok=True)

    def sides(v):
        if v["reading"] == "matched loss":
            return [m["a"] for m in v["numbers"]["per_seed"]], [m["b"] for m in v["numbers"]["per_seed"]]
        return v["numbers"]["a"]["per_seed"], v["numbers"]["b"]["per_seed"]

    tests = [claim_stats.welch_tests(*sides(v), None if "variance" in v["claim"] else claim_stats.MARGINS["mean"])
             for v in rows]
    read, family = claim_stats.read_family(tests, [1 if ">" in v["claim"] else -1 for v in rows])
    assert family == sum(math.isfinite(t["p"]) + math.isfinite(t["p_tost"]) for t in tests) >= 5
    assert f"its {family} p-values" in index.read_text()
    for v, r in zip(rows, read):
        assert v["verdict"] == r["verdict"] and v["numbers"]["tests"]["p_holm"] == pytest.approx(r["p_holm"],
                                                                                                 nan_ok=True), v["claim"]
    assert (out / "plots" / "score_vs_loss_TaR.png").stat().st_size > 1000
    verdicts = {c: v for (c, reading), v in verdicts.items() if reading == "equal steps"}
    assert verdicts["CRATE's layer variance < GPT's at 2L"]["margin"] is None
    # beside each mean verdict: the scorer's checks over the seeds, from each seed's validity summaries, and the same
    # difference in random-record correlation (a metric that passes NeuronEval's checks), from the score files
    v = verdicts["CRATE > GPT at 2L"]
    flags: dict[str, int] = {}
    for s in (0, 1):
        va, vb = (json.loads((out / "interpret" / f"seed{s}" / "2L" / arch / "validity" / "tar" / "validity.json")
                             .read_text()) for arch in ("crate", "gpt"))
        d = v["numbers"]["a"]["per_seed"][s] - v["numbers"]["b"]["per_seed"][s]
        for f in {f["flag"] for f in comparison_flags(va, vb, d / 100)} | (
                {"correlation fails the sanity checks"} if False in (va["sanity"]["passes"]["correlation"],
                                                                     vb["sanity"]["passes"]["correlation"]) else set()):
            flags[f] = flags.get(f, 0) + 1
    assert v["scorer's checks"] == (", ".join(f"{f} ({k}/2 seeds)" for f, k in sorted(flags.items())) or "none")
    random = {arch: [_model_score(_scores(out, s, "2L", arch, metric="random_score")) for s in (0, 1)]
              for arch in ("crate", "gpt")}
    lo, hi = seed_stats.welch_interval(random["crate"], random["gpt"])
    assert v["random-record correlation: 95% CI of the difference"] == fmt_ci(lo, hi)
    v = verdicts["CRATE > GPT at 2L"]
    assert v["verdict from seed 0 alone (uncorrected)"] == seed_stats.verdict(*v["numbers"]["ci95_seed0"], 1)
    assert v["difference"] == pytest.approx(systems[("2L", "CRATE", "correlation")]["estimate"]
                                            - systems[("2L", "GPT", "correlation")]["estimate"])
    assert all(f"| CRATE > GPT at 2L | {reading} | TaR |" in first for reading in ("matched loss", "equal steps"))
    assert (out / "plots" / "score_vs_depth_TaR.png").stat().st_size > 1000
    assert "## Verdicts" in index.read_text() and "Random-initialisation controls" in index.read_text()
    # the scorer's own controls, validated on every trained model: a one-key indicator scores 100 with stats
    validity = {(r["size"], r["system"], r["planted family"]): r for r in summary["tables"]["validity"]}
    for size in ("1L", "2L"):
        for system in ("CRATE", "GPT"):
            row = validity[(size, system, "indicator-1")]
            assert row["score x100"] == pytest.approx(100, abs=1e-6) and row["seeds"] == 2
    assert "Is the scorer valid?" in index.read_text()
    # a rerun reuses every run and every score, and reports the same numbers
    timings = (out / "timings.json").read_text()
    study(opts)
    again = capsys.readouterr().out
    assert again.count(": reused;") == 4 and "0 scored" in again and " 12 scored" not in again
    assert (out / "timings.json").read_text() == timings
    assert json.loads((out / "study.json").read_text())["tables"] == summary["tables"]
    assert json.loads((out / "study.json").read_text())["inputs"] == summary["inputs"]  # the same tokens, keys
    # the same with two runs at once, in worker processes
    study(StudyOptions(out=out, **{**REDUCED, "jobs": 2}))
    assert capsys.readouterr().out.count(": reused;") == 4
    assert json.loads((out / "study.json").read_text())["tables"] == summary["tables"]
    # another number of control neurons: the controls are rescored, and the runs say they were not reused
    study(StudyOptions(out=out, **{**REDUCED, "control_neurons": 3}))
    changed = capsys.readouterr().out
    assert ": reused;" not in changed and changed.count("done in") >= 4
    # the control folders of 2 seeds x 2 archs: 3 neurons a layer, 1L and 2L
    assert changed.count("of 3 neurons reused (same provenance)") == changed.count("of 6 neurons reused (same") == 4
    assert json.loads((out / "timings.json").read_text())["runs"] != json.loads(timings)["runs"]
    # other inputs are refused, naming the difference; nothing is discarded without --overwrite
    with pytest.raises(CrateError, match="max_steps"):
        study(StudyOptions(out=out, **{**REDUCED, "steps": 6}))
    assert (out / "runs" / "seed0" / "crate-1L" / "final" / "config.json").is_file()


def test_bad_study_options_fail_before_anything_is_written(tmp_path):
    from crate.eval.workflows.study import StudyOptions, study

    cases = [({"sizes": ["4L"]}, "unknown size"), ({"overrides": ["train.lr=fast"]}, "train.lr"),
             ({"overrides": ["model.n_hidden=64"]}, "n_hidden"), ({"seeds": 0}, "--seeds"),
             ({"protocols": ["tar", "nope"]}, "nope"), ({"overrides": ["data.path=x"]}, "model.\\* and train.\\*"),
             ({"grid": 2}, "--grid 2: .* must divide --steps 3"), ({"margin": 0.0}, "--margin")]
    for change, message in cases:
        out = tmp_path / "s"
        with pytest.raises(CrateError, match=message):
            study(StudyOptions(out=out, **{**REDUCED, **change}))
        assert not out.exists()


def test_the_default_grid_divides_the_steps():
    """Without --grid, the largest number of checkpoints up to 8 that divides --steps: the README's --steps 50 gets 5."""
    from crate.eval.report.study_layout import grid_size, grid_steps

    assert [grid_size(n, None) for n in (200, 50, 3, 7, 11, 1)] == [8, 5, 3, 7, 1, 1]
    assert grid_steps(50, None) == [10, 20, 30, 40, 50] and grid_steps(200, 0) == [] and grid_steps(6, 2) == [3, 6]


def test_each_training_seed_reads_its_own_slice_of_the_validation_split():
    """The default study's split (139,803 tokens, 16,384 a seed) holds 8 disjoint slices: seeds 0-7 read their own,
    seed 8 the first again; a split shorter than one slice gives every seed the same tokens."""
    from crate.eval.report.study_layout import eval_offset

    assert [eval_offset(k, 16384, 139_803) for k in range(10)] == [16384 * k for k in range(8)] + [0, 16384]
    assert [eval_offset(k, 2048, 1000) for k in range(3)] == [0, 0, 0]


def test_scorer_agreement_pairs_the_units_both_scorers_scored():
    """The agreement table pairs each unit SmolLM2 scored with its stats score (same size, system, layer and neuron),
    leaves out the units only one scorer has, and reads each system and both together."""
    from types import SimpleNamespace

    from crate.eval.report.study_agreement import agreement_table
    from crate.eval.stats.agreement import scorer_agreement

    by_unit = {("trained", "1L", "crate"): {("0", 1): 10.0, ("0", 2): 20.0, ("0", 3): 30.0},
               ("llm", "1L", "crate"): {("0", 2): 5.0, ("0", 3): 9.0, ("0", 1): 1.0},
               ("trained", "2L", "crate"): {("0", 0): 40.0, ("1", 0): 50.0},
               ("llm", "2L", "crate"): {("1", 0): 7.0, ("1", 9): 3.0},
               ("trained", "1L", "gpt"): {("0", 4): 60.0, ("0", 5): 10.0, ("0", 6): 35.0, ("0", 7): 5.0},
               ("llm", "1L", "gpt"): {("0", 4): 2.0, ("0", 5): 8.0, ("0", 6): 4.0, ("0", 7): 6.0}}
    rows = {r["system"]: r for r in agreement_table(SimpleNamespace(by_unit=by_unit), ["1L", "2L"]).rows}
    crate, gpt = ([10.0, 20.0, 30.0, 50.0], [1.0, 5.0, 9.0, 7.0]), ([60.0, 10.0, 35.0, 5.0], [2.0, 8.0, 4.0, 6.0])
    for name, (a, b) in (("CRATE", crate), ("GPT", gpt), ("both", (crate[0] + gpt[0], crate[1] + gpt[1]))):
        want = scorer_agreement(a, b)
        assert rows[name]["units"] == len(a) and rows[name]["Pearson r"] == pytest.approx(want["pearson"])
        assert rows[name]["Spearman rho"] == pytest.approx(want["spearman"])
    assert rows["CRATE"]["Pearson r"] > 0.7 > 0 > rows["GPT"]["Pearson r"]  # agreeing and disagreeing scorers
    assert agreement_table(SimpleNamespace(by_unit={}), ["1L"]).rows == []
