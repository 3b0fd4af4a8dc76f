"""`crate demo` end to end with a reduced step count: data, two trainings, interpretation, report, browser; and
resumption (a second run skips every finished step)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from crate.cli import main
from crate.eval.workflows.steps import matched_overrides
from test_autointerp_scoring import (
    aggregate_interval_reference, difference_interval_reference, mean_of_layer_means, pearson,
)


def test_matched_parameter_counts() -> None:
    crate_over, gpt_over, n_crate, n_gpt = matched_overrides("tiny", 512, 128)
    assert abs(n_crate - n_gpt) / n_gpt < 0.03
    assert crate_over["n_hidden"] % 64 == 0 and "n_hidden" not in gpt_over


def read_scores(result: Path) -> dict[str, list[dict]]:
    """{layer: score lines sorted by neuron} of one model's TaR scores."""
    files = sorted((result / "scores" / "tar").glob("*.jsonl"), key=lambda f: int(f.stem))
    lines = {f.stem: [json.loads(x) for x in f.read_text().splitlines() if x.strip()] for f in files}
    return {k: sorted(v, key=lambda r: r["neuron"]) for k, v in lines.items()}


def model_scores(result: Path) -> list[np.ndarray]:
    """Each layer's neuron scores (x100, NaN for unscored) recomputed from the lines' activations, layers in order."""
    layers = []
    for lines in read_scores(result).values():
        got = np.array([pearson(r["true_activations"], r["expected_activations"]) for r in lines])
        written = np.array([math.nan if r["score"] is None else r["score"] for r in lines])
        np.testing.assert_allclose(written, got, rtol=1e-9, atol=1e-12)  # NaN where NaN
        assert all(r["score_note"] for r, s in zip(lines, got) if math.isnan(s))
        layers.append(100 * got)
    return layers


def check_tables_against_score_files(out: Path, log: str, n_boot: int = 2000, seed: int = 0) -> None:
    """The printed table, main_table.csv and controls.csv say what the score files say: each neuron's pooled r
    recomputed from its activations; per model the mean of layer means, its population variance and percentile-
    bootstrap 95% intervals (2000 resamples, seed 0, the report's settings; CRATE-GPT resamples each model's own
    neurons, since CRATE and GPT have different widths and so different neuron samples)."""
    res = {name: model_scores(out / "interpret" / name) for name in ("crate", "gpt", "crate-control", "gpt-control")}
    assert [r["neuron"] for r in read_scores(out / "interpret" / "crate")["0"]] != \
        [r["neuron"] for r in read_scores(out / "interpret" / "gpt")["0"]]  # different widths: not paired
    c, g = res["crate"], res["gpt"]
    ci = {"CRATE": aggregate_interval_reference(c, n_boot, seed), "GPT": aggregate_interval_reference(g, n_boot, seed),
          "CRATE-GPT": difference_interval_reference(c, g, n_boot, seed, paired=False)}
    lm = {k: [x[np.isfinite(x)].mean() for x in v] for k, v in res.items()}
    want = {"CRATE": mean_of_layer_means(c), "GPT": mean_of_layer_means(g),
            "CRATE-GPT": mean_of_layer_means(c) - mean_of_layer_means(g),
            "CRATE var": float(np.var(lm["crate"])), "GPT var": float(np.var(lm["gpt"]))}
    neurons = " / ".join(str(sum(int(np.isfinite(x).sum()) for x in v)) for v in (c, g))

    lines = log.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("| size | protocol |"))
    header, _, row = [[x.strip() for x in line.strip().strip("|").split("|")] for line in lines[top:top + 3]]
    printed = dict(zip(header, row))
    with open(out / "main_table.csv") as f:
        (written,) = list(csv.DictReader(f))
    for table, digits in ((printed, 2), (written, 6)):
        assert (table["size"], table["protocol"], table["scorer"], table["layers"]) == ("tiny", "TaR", "stats", "0,1")
        assert table["neurons"] == neurons
        for col, v in want.items():
            assert float(table[col]) == pytest.approx(v, abs=0.5 * 10 ** -digits + 1e-9), col
        for col, (lo, hi) in ci.items():
            got = [float(x) for x in table[f"{col} 95% CI"].strip("[]").split(",")]
            assert got == pytest.approx([lo, hi], abs=0.005 + 1e-9), col
    with open(out / "controls.csv") as f:
        controls = {r["model"]: float(r["mean x100"]) for r in csv.DictReader(f)}
    assert {k: v for k, v in controls.items() if k in res} == pytest.approx(
        {k: mean_of_layer_means(v) for k, v in res.items()}, abs=1e-6)
    # the controls are other models on the same tokens: the random records are shared, their activations are not
    for arch in ("crate", "gpt"):
        trained, control = read_scores(out / "interpret" / arch), read_scores(out / "interpret" / f"{arch}-control")
        differ = []
        for layer in trained:
            for a, b in zip(trained[layer], control[layer], strict=True):
                ra, rb = (random_records(x) for x in (a, b))
                assert a["neuron"] == b["neuron"] and [t for t, _ in ra] == [t for t, _ in rb] and ra
                differ.append([v for _, v in ra] != [v for _, v in rb])
        assert all(differ), arch


def random_records(line: dict) -> list[tuple[list[str], list[float]]]:
    """(tokens, true activations) of a score line's random records."""
    return [(t, v) for rid, t, v in zip(line["record_ids"], line["tokens"], line["true_activations"])
            if rid.startswith("random:")]


@pytest.mark.timeout(400)
def test_demo_end_to_end_and_resume(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "30", "--neurons", "6", "--tokens", "8192", "--documents", "4"]
    assert main(argv) == 0
    log = capsys.readouterr().out
    m = re.search(r"parameters: CRATE ([\d,]+) .* vs GPT ([\d,]+)", log)
    assert m, log
    n_crate, n_gpt = (int(x.replace(",", "")) for x in m.groups())
    assert abs(n_crate - n_gpt) / n_gpt < 0.03
    assert (out / "index.md").is_file() and (out / "browser" / "index.html").is_file()
    assert f"report:         {(out / 'index.md').resolve()}" in log
    assert "| tiny | TaR | stats |" in log  # the printed table
    assert log.count("The scorer's checks on these verdicts") == 1 and "tiny TaR (stats) crate - gpt" in log

    check_tables_against_score_files(out, log)
    with open(out / "val_loss.csv") as f:
        val = {r["run"]: r for r in csv.DictReader(f)}
    assert set(val) == {"crate-tiny", "gpt-tiny"}
    for r in val.values():
        assert float(r["final val loss"]) < 6.0  # below ln(512) = 6.24: it trained
    with open(out / "controls.csv") as f:
        inits = {(r["arch"], r["init"]) for r in csv.DictReader(f)}
    assert inits == {(a, i) for a in ("crate", "gpt", "gpt-sae") for i in ("trained", "random")}
    with open(out / "gpt_sae.csv") as f:
        (sae_row,) = list(csv.DictReader(f))  # the tiny GPT-SAE row, as the score files say
    assert float(sae_row["GPT-SAE"]) == pytest.approx(mean_of_layer_means(model_scores(out / "interpret" / "gpt-sae")), abs=1e-6)
    assert (out / "steer-sweep" / "steer_sweep.json").is_file() and "## Steering, measured" in (out / "index.md").read_text()
    assert list((out / "browser" / "data" / "crate").glob("*/*.js"))  # neuron pages' data
    index = (out / "index.md").read_text()
    assert index.index("## Is the scorer valid?") < index.index("## Interpretability scores")
    assert index.count("| indicator-1 |") == 3 and "Verdicts:" in index  # crate, gpt, gpt-sae were validated
    assert "crate - gpt at one activation-density mix" in index

    # steering the demo's CRATE with a text prompt: the tokenizer comes from the checkpoint
    rc = main(["steer", "--checkpoint", str(out / "runs" / "crate-tiny" / "final"), "--layer", "1", "--neuron", "3",
               "--value", "10", "--prompt", "To be, or not to be", "-k", "5"])
    steer_log = capsys.readouterr().out
    assert rc == 0, steer_log
    assert "Top next tokens before and after steering" in steer_log and "'" in steer_log  # decoded tokens, not ids

    assert main(argv) == 0  # a rerun with the same settings reuses every step and recomputes nothing
    again = capsys.readouterr().out
    assert "data: " in again and "reused (prepared with the same arguments)" in again
    assert again.count("reused (same recipe and data)") == 2 and "30 steps into" not in again
    # six systems (three trained, three controls) and the planted units of each trained one
    assert again.count("0 scored") == 9 and "recording again" not in again
    assert again.count("reused (same model, data and settings)") == 2  # the two SAEs
