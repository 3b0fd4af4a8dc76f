"""`crate interpret --validity` end to end on a tiny model and the embedded corpus: the validity summary's parts
recomputed from the files it was made from, the planted run reused on a rerun, the report's section, the CLI."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from crate.eval.autointerp.config import InterpretConfig
from crate.eval.autointerp.interpret import run_interpret
from crate.eval.autointerp.records import load_token_strings
from crate.eval.autointerp.prompts import normalise
from crate.eval.validity.run import validate
from crate.model import build_model
from crate.train.data import open_split

N_TOKENS, T, VOCAB = 8192, 128, 320


def _cfg(**kw):
    return InterpretConfig(**{**dict(protocol="tar", explainer="stats", simulator="stats", layers=[0],
                                     neurons=list(range(24)), n_tokens=N_TOKENS, seq_len=T, n_boot=200,
                                     device="cpu"), **kw})


def _random_share(line):
    """By hand: the share of the random records' tokens at or above a tenth of the explanation records' maximum."""
    acts = [a for rid, r in zip(line["record_ids"], line["true_activations"]) if rid.startswith("random:") for a in r]
    return float(np.mean(np.asarray(acts) >= line["max_activation"] / 10))


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("crate", "micro", vocab_size=VOCAB, block_size=T)
    stream, strings = open_split(data_dir, "val"), load_token_strings(data_dir, VOCAB)
    out = tmp_path_factory.mktemp("validity")
    summary = run_interpret(None, None, out, _cfg(), model=model, stream=stream, token_strings=strings,
                            validate=validate)
    yield dict(model=model, stream=stream, strings=strings, out=out, summary=summary)
    torch.set_num_threads(threads)


def test_the_summary_holds_every_part_and_the_planted_known_answers(run):
    out = run["out"]
    v = json.loads((out / "validity" / "tar" / "validity.json").read_text())
    assert v == json.loads((out / "summary.json").read_text())["validity"]  # summary.json carries the same
    fam = v["planted"]["families"]
    assert fam["indicator-1"]["score"]["mean"] == pytest.approx(1.0, abs=1e-9)
    assert abs(fam["noise-dense"]["score"]["mean"]) < 0.25 and abs(fam["noise-sparse"]["score"]["mean"]) < 0.25
    # the lookup at the model's own density: planted at the median share of the random records' tokens on which
    # the 24 scored units are active as the scorer labels them (a tenth of the explanation records' maximum)
    lines = [json.loads(x) for x in (out / "scores" / "tar" / "0.jsonl").read_text().splitlines()]
    median = float(np.median([_random_share(x) for x in lines if x["max_activation"] > 0]))
    assert v["planted"]["own_density"] == pytest.approx(median)
    own = [u for u in v["planted"]["units"] if u["family"] == "lookup-own"]
    assert len(own) == 4 and all(0.8 * median <= u["density"] <= median + 1e-9 for u in own)
    layer = v["layers"]["0"]
    assert layer["counts"]["n_units"] == 128 and layer["counts"]["n_lines"] == 24
    assert set(v["sanity"]["label"]) >= {"correlation", "random_correlation", "auprc"}
    md = (out / "validity" / "tar" / "validity.md").read_text()
    assert "## Planted units" in md and "indicator-1" in md and "## Sanity checks" in md


def test_auprc_and_density_bins_recomputed_from_the_score_files(run):
    """AUPRC by sklearn and the density table by hand, from the JSONL lines and the records cache alone."""
    out = run["out"]
    lines = [json.loads(x) for x in (out / "scores" / "tar" / "0.jsonl").read_text().splitlines()]
    checked = 0
    for x in lines:
        y = np.concatenate([np.asarray(normalise(a, x["max_activation"])) >= 1 for a in x["true_activations"]])
        e = np.concatenate([np.asarray(a, dtype=np.float64) for a in x["expected_activations"]])
        if y.any() and x["auprc"] is not None:
            assert x["auprc"] == pytest.approx(average_precision_score(y, e), abs=1e-12)
            checked += 1
    assert checked >= 10
    v = json.loads((out / "validity" / "tar" / "validity.json").read_text())
    freq = {x["neuron"]: _random_share(x) for x in lines}
    for b in v["layers"]["0"]["density_bins"]:
        lo, hi = b["bin"]
        inside = [x["score"] for x in lines if x["score"] is not None
                  and (lo <= freq[x["neuron"]] < hi or (hi == 1.0 and freq[x["neuron"]] == 1.0))]
        assert b["n"] == len(inside)
        if inside:
            assert b["mean"] == pytest.approx(np.mean(inside))


def test_a_rerun_reuses_the_planted_run_and_gives_the_same_summary(run, capsys):
    out = run["out"]
    before = (out / "validity" / "tar" / "validity.json").read_text()
    capsys.readouterr()
    run_interpret(None, None, out, _cfg(), model=run["model"], stream=run["stream"], token_strings=run["strings"],
                  validate=validate)
    said = capsys.readouterr().out + capsys.readouterr().err
    assert f"records {out / 'validity' / 'tar' / 'planted' / 'records'}: reused" in said
    assert (out / "validity" / "tar" / "validity.json").read_text() == before


def test_another_seed_plants_and_records_again(run, tmp_path, capsys):
    """One option changed (the seed): the planted units are drawn again, so their records are recorded again."""
    out = run["out"]
    old = json.loads((out / "validity" / "tar" / "validity.json").read_text())["planted"]["key"]
    capsys.readouterr()
    run_interpret(None, None, out, _cfg(seed=1), model=run["model"], stream=run["stream"],
                  token_strings=run["strings"], validate=validate, overwrite=True)
    said = capsys.readouterr().out
    assert f"records {out / 'validity' / 'tar' / 'planted' / 'records'}: recording again" in said
    assert json.loads((out / "validity" / "tar" / "validity.json").read_text())["planted"]["key"] != old


def test_the_report_leads_with_the_section_and_does_not_count_the_planted_run(run, tmp_path):
    from crate.eval.report.reproduction import write_report

    index = write_report([run["out"]], tmp_path / "report").read_text()
    assert index.index("## Is the scorer valid?") < index.index("## Interpretability scores")
    assert "indicator-1" in index and "Inputs: 1 interpretability result(s)" in index
    # the metrics that pass lead the paper's table; one layer scored: the aggregate is that layer's mean
    assert index.index("## Scores by the metrics that pass") < index.index("## Interpretability scores")
    import csv

    lines = [json.loads(x) for x in (run["out"] / "scores" / "tar" / "0.jsonl").read_text().splitlines()]
    with open(tmp_path / "report" / "sound_metrics.csv") as f:
        rows = {r["metric"]: r for r in csv.DictReader(f)}
    for metric, label in (("random_score", "correlation on random records"), ("auprc_lift", "AUPRC above chance")):
        values = [x[metric] for x in lines if x[metric] is not None]
        assert float(rows[label]["CRATE"]) == pytest.approx(100 * np.mean(values), abs=0.01)  # the CSV rounds
        assert int(rows[label]["CRATE neurons"]) == len(values)
    # checks made from other scores (their key) are not shown beside these
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run["out"], copy)
    path = copy / "validity" / "tar" / "validity.json"
    path.write_text(path.read_text().replace(json.loads(path.read_text())["provenance"]["key"], "0" * 64))
    index = write_report([copy], tmp_path / "report2").read_text()
    assert "No result was scored with `--validity`" in index and "| indicator-1 |" not in index


def test_a_failed_control_is_flagged_in_the_files(run, monkeypatch):
    """The flag rules wired end to end: with a density threshold above any score, the model is flagged."""
    from crate.eval.validity import flags

    monkeypatch.setattr(flags, "DENSITY_MIN", 1.01)
    run_interpret(None, None, run["out"], _cfg(), model=run["model"], stream=run["stream"],
                  token_strings=run["strings"], validate=validate, overwrite=True)  # after the seed-1 test
    v = json.loads((run["out"] / "validity" / "tar" / "validity.json").read_text())
    assert [f["flag"] for f in v["flags"]] == ["density"] and v["not_evaluated"] == []
    assert "- density: token-determined units planted at this model's median" in (
        run["out"] / "validity" / "tar" / "validity.md").read_text()


def test_compare_and_cli_flag_verdicts_and_reweight_by_density(data_dir, tmp_path, capsys, one_thread):
    """`crate interpret -c crate=... gpt=... --validity`: each trained model validated (not the controls), each
    comparison with its flags and its density-reweighted difference, which is recomputed here by hand."""
    import crate
    from crate.cli import main

    ckpts = {}
    for arch in ("crate", "gpt"):
        torch.manual_seed(0)
        crate.save(build_model(arch, "micro", vocab_size=VOCAB, block_size=T), tmp_path / arch)
        ckpts[arch] = tmp_path / arch
    out = tmp_path / "cmp"
    assert main(["interpret", "-c", f"crate={ckpts['crate']}", f"gpt={ckpts['gpt']}", "-d", str(data_dir), "-o",
                 str(out), "--layers", "0", "--neurons", "0-23", "--tokens", str(N_TOKENS), "--seq-len", str(T),
                 "--controls", "--validity", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "at one activation-density mix" in printed and "validity/" in printed
    assert (out / "crate" / "validity" / "tar" / "validity.json").exists() and not (out / "crate-control" / "validity").exists()
    c = json.loads((out / "summary.json").read_text())["comparison"]["crate - gpt"]
    assert isinstance(c["flags"], list) and all({"flag", "reason"} == set(f) for f in c["flags"])
    # the reweighted difference by hand: per density bin both populate, the pooled share times the mean difference
    edges = [0, 0.01, 0.05, 0.2, 0.5, 1.0]
    units = {}
    for arch in ("crate", "gpt"):
        lines = [json.loads(x) for x in (out / arch / "scores" / "tar" / "0.jsonl").read_text().splitlines()]
        units[arch] = [(_random_share(x), x["score"]) for x in lines if x["score"] is not None]
    binned = {a: [[s for f, s in u if lo <= f < hi or (hi == 1.0 and f == 1.0)] for lo, hi in zip(edges, edges[1:])]
              for a, u in units.items()}
    used = [k for k in range(5) if binned["crate"][k] and binned["gpt"][k]]
    w = np.array([len(binned["crate"][k]) + len(binned["gpt"][k]) for k in used], dtype=float)
    want = sum(wk / w.sum() * (np.mean(binned["crate"][k]) - np.mean(binned["gpt"][k])) for wk, k in zip(w, used))
    assert c["density_reweighted"]["difference"] == pytest.approx(want, abs=1e-12)


def test_an_option_of_the_scores_only_recomputes_the_scores(run, capsys):
    """Detection and fuzzing turned off: the model's and the planted units' records are reused, their scores are
    computed again (the option is in the scores' identity), and the checks follow the new scores."""
    out = run["out"]
    run_interpret(None, None, out, _cfg(), model=run["model"], stream=run["stream"], token_strings=run["strings"],
                  validate=validate, overwrite=True)  # back to the fixture's settings (other tests change them)
    capsys.readouterr()
    run_interpret(None, None, out, _cfg(extra_scores=False), model=run["model"], stream=run["stream"],
                  token_strings=run["strings"], validate=validate, overwrite=True)
    said = capsys.readouterr().out
    planted = out / "validity" / "tar" / "planted"
    assert f"records {out / 'records'}: reused" in said and f"records {planted / 'records'}: reused" in said
    assert "0 of 24 neurons reused" in said and "0 of 44 neurons reused" in said
    v = json.loads((out / "validity" / "tar" / "validity.json").read_text())
    assert v["planted"]["families"]["indicator-1"]["detection"]["n"] == 0  # not run: no value
    assert v["provenance"]["key"] == json.loads((out / "provenance.json").read_text())["key"]
