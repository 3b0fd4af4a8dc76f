"""`crate report` against hand-made result files (tests/test_report_helpers.py): the numbers, not only the files."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from crate.cli import main
from crate.eval.report.reproduction import write_report
from crate.eval.report.reproduction_tables import main_table
from crate.eval.report.results import ReportError, discover
from crate.eval.report.tables import latex_escape
from test_report_helpers import PAPER_2L, make_paper_like, make_result


def exact_bootstrap(layers: list[list[float]]) -> np.ndarray:
    """Every equally likely bootstrap resample of a model's score (mean of the layers' means over their finite
    resampled scores), by brute-force enumeration: the distribution the report's intervals estimate."""
    per_layer = []
    for v in layers:
        means = []
        for pick in itertools.product(v, repeat=len(v)):
            f = np.asarray(pick, dtype=float)
            f = f[np.isfinite(f)]
            means.append(f.mean() if len(f) else math.nan)
        per_layer.append(means)
    return np.asarray([np.nanmean(c) for c in itertools.product(*per_layer)])


def rows_by(path: Path, *keys: str) -> dict[tuple[str, ...], dict[str, str]]:
    with open(path, newline="") as f:
        return {tuple(r[k] for k in keys): r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = make_paper_like(tmp_path_factory.mktemp("results"))
    out = root / "report"
    assert main(["report", str(root), "--out", str(out), "--n-boot", "500"]) == 0
    return out


def test_main_table_numbers(report: Path) -> None:
    rows = rows_by(report / "main_table.csv", "size", "protocol")
    assert set(rows) == {("2L", "TaR"), ("S", "TaR"), ("S", "Random-only")}
    r = rows[("2L", "TaR")]
    # CRATE layer 0: [0.1, 0.2, 0.3, NaN] -> 20; layer 1: [0.0, 0.1] -> 5; mean 12.5, population variance 56.25.
    assert float(r["CRATE"]) == pytest.approx(12.5)
    assert float(r["CRATE var"]) == pytest.approx(56.25)
    # GPT layer 0: [0.05, 0.05] -> 5; layer 1: [0.1] * 3 -> 10; mean 7.5, variance 6.25, a degenerate CI.
    assert float(r["GPT"]) == pytest.approx(7.5)
    assert float(r["GPT var"]) == pytest.approx(6.25)
    assert r["GPT 95% CI"] == "[7.50, 7.50]"
    assert float(r["CRATE-GPT"]) == pytest.approx(5.0)
    lo, hi = (float(x) for x in r["CRATE 95% CI"].strip("[]").split(","))
    assert 5.0 <= lo < 12.5 < hi <= 20.0
    # The exact bootstrap distribution of CRATE's score, every resample of both layers enumerated (neurons are
    # resampled within a layer, a resample's NaNs dropped). 500 resamples put the 2.5% and 97.5% quantiles
    # between its 1% and 5%, and its 95% and 99%, quantiles; GPT's resamples are constant (7.5), so CRATE - GPT's
    # interval is CRATE's shifted by 7.5, up to resampling noise of the same size.
    exact = exact_bootstrap([[10, 20, 30, math.nan], [0, 10]])
    low, high = np.quantile(exact, [0.01, 0.05]), np.quantile(exact, [0.95, 0.99])
    dlo, dhi = (float(x) for x in r["CRATE-GPT 95% CI"].strip("[]").split(","))
    for a, b in ((lo, hi), (dlo + 7.5, dhi + 7.5)):
        assert low[0] <= a <= low[1] and high[0] <= b <= high[1], (a, b, low, high)
    assert (float(r["paper CRATE"]), float(r["paper GPT"])) == (8.05, 4.2)
    assert r["paper CRATE var"] == "" and r["neurons"] == "5 / 5" and r["layers"] == "0,1"
    # S is the paper's 6L: its last layer (5) is excluded; CRATE layers 0..4 score k -> mean 2, variance 2.
    s = rows[("S", "TaR")]
    assert s["layers"] == "0,1,2,3,4"
    assert float(s["CRATE"]) == pytest.approx(2.0) and float(s["CRATE var"]) == pytest.approx(2.0)
    assert float(s["GPT"]) == pytest.approx(6.0) and float(s["GPT var"]) == pytest.approx(0.0)
    assert (float(s["paper CRATE"]), float(s["paper GPT"])) == (7.96, 5.4)
    assert (float(s["paper CRATE var"]), float(s["paper GPT var"])) == (2.29, 20.85)
    # A protocol run for CRATE only: GPT columns empty, the paper's numbers still beside ours.
    ro = rows[("S", "Random-only")]
    assert float(ro["CRATE"]) == pytest.approx(2.0) and ro["GPT"] == "" and ro["CRATE-GPT"] == ""
    assert float(ro["paper GPT"]) == 3.14


def test_markdown_and_latex_agree_with_csv(report: Path) -> None:
    md = (report / "main_table.md").read_text()
    assert "| 2L | TaR | - | 12.50 | [" in md and "| 7.50 | [7.50, 7.50] | 5.00 |" in md
    tex = (report / "main_table.tex").read_text()
    assert tex.startswith("\\begin{tabular}") and "CRATE 95\\% CI" in tex and "2L & TaR & - & 12.50" in tex
    assert latex_escape("a_b 50% & #1") == "a\\_b 50\\% \\& \\#1"


def test_per_layer_measures_controls_and_val_loss(report: Path) -> None:
    layers = rows_by(report / "layers.csv", "model", "protocol", "layer")
    assert float(layers[("crate-2L", "TaR", "0")]["mean x100"]) == pytest.approx(20.0)
    assert layers[("crate-2L", "TaR", "0")]["NaN scores"] == "1"
    assert layers[("crate-S", "TaR", "5")]["used"] == "no" and layers[("crate-S", "TaR", "4")]["used"] == "yes"
    measures = rows_by(report / "measures.csv", "model", "layer")
    assert float(measures[("crate-2L", "1")]["sparsity"]) == pytest.approx(0.8)
    assert float(measures[("crate-2L", "0")]["selectivity.token"]) == pytest.approx(0.3)
    assert measures[("gpt-2L", "0")]["selectivity.token"] == ""
    controls = rows_by(report / "controls.csv", "model", "protocol")
    assert controls[("crate-2L-random-init", "TaR")]["init"] == "random"
    assert float(controls[("crate-2L-random-init", "TaR")]["mean x100"]) == pytest.approx(1.0)  # (2 + 0) / 2
    # The random-init model is a control, never a row of the main table.
    assert float(rows_by(report / "main_table.csv", "size", "protocol")[("2L", "TaR")]["CRATE"]) == pytest.approx(12.5)
    val = rows_by(report / "val_loss.csv", "run")
    assert float(val[("crate-2L",)]["final val loss"]) == pytest.approx(4.2)
    assert float(val[("crate-2L",)]["paper val loss"]) == pytest.approx(3.55)
    assert float(val[("gpt-2L",)]["paper val loss"]) == pytest.approx(3.23)
    assert val[("gpt-2L",)]["steps"] == "300" and val[("gpt-2L",)]["size"] == "2L"


def test_index_links_every_file_and_plots_are_pngs(report: Path) -> None:
    index = (report / "index.md").read_text()
    import re

    links = set(re.findall(r"\]\(([^)]+)\)", index))
    assert {"main_table.csv", "main_table.tex", "val_loss.png", "scores_2L_TaR.png", "scores_S_TaR.png"} <= links
    for link in links:
        f = report / link
        assert f.is_file(), link
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000


def test_subset_and_errors(tmp_path: Path) -> None:
    make_result(tmp_path / "only", "gpt-tiny", "gpt", dict(n_layer=2, n_head=2, n_embd=32), {"short": {0: [0.2], 1: [0.4]}})
    results, runs = discover([tmp_path / "only"])
    assert len(results) == 1 and not runs and results[0].size == "2-layer"  # never mistaken for the paper's 2L
    (row,) = main_table(results, n_boot=100).rows
    assert row["protocol"] == "short-context" and row["GPT"] == pytest.approx(30.0) and "paper GPT" not in row
    out = write_report([tmp_path / "only"], tmp_path / "rep")
    assert "Validation loss" not in out.read_text() and (tmp_path / "rep" / "main_table.md").is_file()
    with pytest.raises(ReportError, match="no interpretability results"):
        write_report([_empty(tmp_path)], tmp_path / "r2")
    bad = make_result(tmp_path / "bad", "crate-x", "crate", PAPER_2L, {"tar": {0: [0.1]}})
    (bad / "scores" / "tar" / "0.jsonl").write_text('{"neuron": 0, "score": 0.1}\n{not json\n')
    with pytest.raises(ReportError, match=r"0.jsonl:2"):
        write_report([bad], tmp_path / "r3")
    assert main(["report", str(_empty(tmp_path)), "--out", str(tmp_path / "r4")]) == 2  # a clear message, no traceback


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir(exist_ok=True)
    return d


def test_nan_only_layer_is_reported_not_crashing(tmp_path: Path) -> None:
    nan = math.nan
    make_result(tmp_path, "crate-2L", "crate", PAPER_2L, {"tar": {0: [nan, nan], 1: [0.1]}})
    (row,) = main_table(discover([tmp_path])[0], n_boot=50).rows
    assert row["CRATE"] == pytest.approx(10.0) and row["layers"] == "1"
    assert json.loads((tmp_path / "crate-2L" / "scores" / "tar" / "0.jsonl").read_text().splitlines()[0])["score"] is None


def test_crate_gpt_difference_is_paired_when_neurons_match(tmp_path: Path) -> None:
    cfg = dict(n_layer=2, n_head=2, n_embd=32)
    crate = {"tar": {0: [0.1, 0.2, 0.3], 1: [0.3, 0.1]}}
    # The same neuron indices, each GPT neuron 0.1 below its CRATE one: every paired resample differs by exactly 10.
    make_result(tmp_path / "paired", "crate-t", "crate", cfg, crate)
    make_result(tmp_path / "paired", "gpt-t", "gpt", cfg, {"tar": {0: [0.0, 0.1, 0.2], 1: [0.2, 0.0]}})
    (row,) = main_table(discover([tmp_path / "paired"])[0], n_boot=200).rows
    assert row["CRATE-GPT"] == pytest.approx(10.0) and row["CRATE-GPT 95% CI"] == "[10.00, 10.00]"
    assert row["CRATE 95% CI"] != "[20.00, 20.00]"  # each model alone varies
    # GPT scored another neuron set: resampled independently, the difference's interval is no longer a point.
    make_result(tmp_path / "unpaired", "crate-t", "crate", cfg, crate)
    make_result(tmp_path / "unpaired", "gpt-t", "gpt", cfg, {"tar": {0: [0.0, 0.1, 0.2, 0.1], 1: [0.2, 0.0]}})
    (row,) = main_table(discover([tmp_path / "unpaired"])[0], n_boot=200).rows
    lo, hi = (float(x) for x in row["CRATE-GPT 95% CI"].strip("[]").split(","))
    assert row["CRATE-GPT"] == pytest.approx(10.0) and lo < 9.0 and hi > 11.0


def test_last_layer_rule_is_the_papers(tmp_path: Path) -> None:
    """Only 6- and 12-layer models drop their last layer (crate.eval.stats.neurons.used_layers); an 8-layer one keeps it."""
    for n in (8, 12):
        make_result(tmp_path / str(n), f"crate-{n}", "crate", dict(n_layer=n, n_head=2, n_embd=32),
                    {"tar": {k: [k / 100] for k in range(n)}})
        (row,) = main_table(discover([tmp_path / str(n)])[0], n_boot=20).rows
        used = list(range(n - 1 if n == 12 else n))
        assert row["layers"] == ",".join(map(str, used)) and row["CRATE"] == pytest.approx(np.mean(used))


TINY = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=512)  # not one of the paper's shapes: only a run names it


def _point_at(result: Path, checkpoint: str, sae: bool = False) -> None:
    """Make `result`'s provenance name `checkpoint` as an older `crate interpret` did (no recorded size)."""
    prov = json.loads((result / "provenance.json").read_text())
    (entry,) = prov["models"].values()
    entry["path"] = checkpoint
    if sae:
        entry["sae"] = {"0": {"d_sae": 8}, "1": {"d_sae": 8}}
    (result / "provenance.json").write_text(json.dumps(prov))


def test_older_results_get_their_size_from_any_working_directory(tmp_path: Path, monkeypatch) -> None:
    """Relative checkpoint paths (relative to where interpret ran) are found from the result folder, not the cwd."""
    root = tmp_path / "demo"
    for run in ("crate-t", "gpt-t"):
        (root / "runs" / run / "final").mkdir(parents=True)
        (root / "runs" / run / "config.yaml").write_text("model:\n  preset: tiny\n")
    res = root / "interpret"
    _point_at(make_result(res, "crate", "crate", TINY, {"tar": {0: [0.2, 0.4], 1: [0.1, 0.3]}}), "runs/crate-t/final")
    _point_at(make_result(res, "gpt", "gpt", TINY, {"tar": {0: [0.1, 0.1], 1: [0.2, 0.0]}}),
              str(root / "runs" / "gpt-t" / "final"))  # interpret run from elsewhere: absolute
    _point_at(make_result(res, "gpt-sae", "gpt", TINY, {"tar": {0: [0.3], 1: [0.3]}}),
              "runs/gpt-t/final+runs/gpt-t/sae/relu-l0,runs/gpt-t/sae/relu-l1", sae=True)
    for cwd in (tmp_path, root, res / "crate"):
        monkeypatch.chdir(cwd)
        results, _ = discover([res])
        assert {r.name: r.size for r in results} == {"crate": "tiny", "gpt": "tiny", "gpt-sae": "tiny"}, cwd
        (row,) = main_table(results, n_boot=50).rows  # one row: CRATE (30, 20) -> 25 beside GPT (10, 10) -> 10
        assert (row["size"], row["CRATE"], row["GPT"]) == ("tiny", pytest.approx(25.0), pytest.approx(10.0))
        assert row["CRATE-GPT"] == pytest.approx(15.0)


def test_interpret_records_the_size_and_absolute_paths_outside_the_key(tmp_path: Path, monkeypatch, capsys) -> None:
    """The size is read at interpret time, so the report needs neither the checkpoint nor interpret's cwd; the
    new fields stay out of the scores' identity (the same inputs by another path reuse every score)."""
    import torch

    from crate import build_model, save
    from crate.eval.autointerp.config import InterpretConfig
    from crate.eval.autointerp.interpret import run_interpret

    torch.manual_seed(0)
    project = tmp_path / "project"
    save(build_model("crate", "micro"), project / "runs" / "crate-m" / "final")
    (project / "runs" / "crate-m" / "config.yaml").write_text("model:\n  arch: crate\n  preset: micro\n")
    stream = np.random.default_rng(0).integers(0, 128, size=16 * 32).astype(np.uint16)
    cfg = InterpretConfig(protocol="tar", seq_len=32, n_tokens=16 * 32, batch_size=8, device="cpu", top_k=6,
                          n_random=6, per_bin=1, neurons=[0, 1, 2], n_boot=50, progress=False)
    kw = dict(stream=stream, token_strings=[f"w{i}" for i in range(128)])
    monkeypatch.chdir(project)
    run_interpret("runs/crate-m/final", None, "interp/crate", cfg, **kw)
    out = project / "interp" / "crate"
    first = json.loads((out / "provenance.json").read_text())
    assert first["model"]["checkpoint"] == str((project / "runs" / "crate-m" / "final").resolve())
    assert first["model"]["size"] == "micro"
    monkeypatch.chdir(tmp_path)  # the same checkpoint by another path, from another directory: nothing rescored
    capsys.readouterr()
    run_interpret("project/runs/crate-m/final", None, out, cfg, **kw)
    assert "3 of 3 neurons reused (same provenance), 0 scored" in capsys.readouterr().out
    assert json.loads((out / "provenance.json").read_text())["key"] == first["key"]
    (project / "runs").rename(project / "moved")  # the report no longer finds the checkpoint: the label stays
    monkeypatch.chdir("/")
    (result,), _ = discover([out])
    assert result.size == "micro"  # by shape alone it would be "1-layer"


def test_two_results_of_one_system_are_refused_naming_both(tmp_path: Path) -> None:
    make_result(tmp_path, "crate-seed0", "crate", PAPER_2L, {"tar": {0: [0.10], 1: [0.10]}})
    make_result(tmp_path, "crate-seed1", "crate", PAPER_2L, {"tar": {0: [0.50], 1: [0.50]}})
    make_result(tmp_path, "gpt", "gpt", PAPER_2L, {"tar": {0: [0.05], 1: [0.05]}})
    with pytest.raises(ReportError, match=r"two trained crate results for 2L, TaR.*crate-seed0 and .*crate-seed1.*"
                                          r"point `crate report` at"):
        main_table(discover([tmp_path])[0], n_boot=20)
    with pytest.raises(ReportError, match="two trained crate results"):
        write_report([tmp_path], tmp_path / "rep", n_boot=20)
    (row,) = main_table(discover([tmp_path / "crate-seed1", tmp_path / "gpt"])[0], n_boot=20).rows  # the ones to use
    assert row["CRATE"] == pytest.approx(50.0) and row["CRATE-GPT"] == pytest.approx(45.0)


def test_a_control_is_listed_once(tmp_path: Path) -> None:
    """Every result of a run_compare folder reads its summary.json: its controls are listed once, and not at all
    when the control was scored into <folder>/<name>-control (that row comes from the scores)."""
    from crate.eval.report.reproduction_tables import controls_table

    root = tmp_path / "cmp"
    make_result(root, "crate", "crate", PAPER_2L, {"tar": {0: [0.1, 0.2], 1: [0.3]}})
    make_result(root, "gpt", "gpt", PAPER_2L, {"tar": {0: [0.1, 0.1], 1: [0.1]}})
    make_result(root, "crate-control", "crate", PAPER_2L, {"tar": {0: [0.01, 0.03], 1: [0.0]}}, random_init=True)
    for n in ("crate", "gpt", "crate-control"):
        (root / n / "summary.json").unlink()
    (root / "summary.json").write_text(json.dumps({"models": {}, "controls": {
        "crate": {"aggregate": {"mean": 0.01, "ci95": [0.0, 0.02]}, "layers": {}},
        "gpt": {"aggregate": {"mean": 0.02, "ci95": [0.01, 0.03]}, "layers": {}}}}))
    rows = [r for r in controls_table(discover([root])[0], n_boot=50).rows if r["init"] == "random"]
    assert [(r["model"], r["source"]) for r in rows] == [("crate-control", "scores"), ("gpt", "summary.json")]
    assert rows[0]["mean x100"] == pytest.approx(1.0) and rows[1]["mean x100"] == pytest.approx(2.0)


def test_layers_column_is_in_the_order_of_the_neurons_column(tmp_path: Path) -> None:
    make_result(tmp_path, "crate", "crate", PAPER_2L, {"tar": {1: [0.1, 0.2, 0.3, 0.3, 0.1, 0.2]}})
    make_result(tmp_path, "gpt", "gpt", PAPER_2L, {"tar": {0: [0.05], 1: [0.05]}})
    (row,) = main_table(discover([tmp_path])[0], n_boot=20).rows
    assert (row["layers"], row["neurons"]) == ("1 / 0,1", "6 / 2")  # CRATE / GPT in both


def test_layer_plot_draws_each_system_at_its_own_layers(tmp_path: Path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import crate.eval.report.plots as report

    make_result(tmp_path, "crate", "crate", PAPER_2L, {"tar": {0: [0.10, 0.10], 1: [0.30, 0.30]}})
    make_result(tmp_path, "gpt", "gpt", PAPER_2L, {"tar": {0: [0.05, 0.05], 1: [0.07, 0.07]}})
    make_result(tmp_path, "gpt-sae", "gpt-sae", PAPER_2L, {"tar": {1: [0.50, 0.50]}})  # an SAE on layer 1 only
    axes = []

    class Recording:
        def __getattr__(self, name: str):
            return getattr(plt, name)

        def subplots(self, *a, **k):
            fig, ax = plt.subplots(*a, **k)
            axes.append(ax)
            return fig, ax

    monkeypatch.setattr(report, "_plt", Recording)
    report.plot_layer_scores({r.arch: r for r in discover([tmp_path])[0]}, "2L", "TaR", tmp_path / "p.png")
    (ax,) = axes
    assert list(ax.get_xticks()) == [0, 1] and [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]
    drawn = {c.get_label().split()[0]: c.lines[0] for c in ax.containers}
    for arch, layers, means in (("CRATE", [0, 1], [10, 30]), ("GPT", [0, 1], [5, 7]), ("GPT-SAE", [1], [50])):
        assert [round(float(x)) for x in drawn[arch].get_xdata()] == layers, arch
        assert list(drawn[arch].get_ydata()) == pytest.approx(means), arch
    plt.close("all")
