"""`crate demo` end to end with a reduced step count: data, two trainings, interpretation, report, browser; and
resumption (a second run skips every finished step)."""

from __future__ import annotations

import csv
import re
import time
from pathlib import Path

import pytest

from crate.cli import main
from crate.eval.pipeline import matched_overrides


def test_matched_parameter_counts() -> None:
    crate_over, gpt_over, n_crate, n_gpt = matched_overrides("tiny", 512, 128)
    assert abs(n_crate - n_gpt) / n_gpt < 0.03
    assert crate_over["n_hidden"] % 64 == 0 and "n_hidden" not in gpt_over


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

    with open(out / "main_table.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["size"], row["protocol"], row["scorer"]) == ("tiny", "TaR", "stats")
    for arch in ("CRATE", "GPT"):
        assert -100 <= float(row[arch]) <= 100
    assert row["neurons"] == "12 / 12" or all(0 < int(n) <= 12 for n in row["neurons"].split(" / "))
    with open(out / "val_loss.csv") as f:
        val = {r["run"]: r for r in csv.DictReader(f)}
    assert set(val) == {"crate-tiny", "gpt-tiny"}
    for r in val.values():
        assert float(r["final val loss"]) < 6.0  # below ln(512) = 6.24: it trained
    with open(out / "controls.csv") as f:
        inits = {(r["arch"], r["init"]) for r in csv.DictReader(f)}
    assert inits == {("crate", "trained"), ("crate", "random"), ("gpt", "trained"), ("gpt", "random")}
    assert list((out / "browser" / "data" / "crate").glob("*/*.js"))  # neuron pages' data

    # steering the demo's CRATE with a text prompt: the tokenizer comes from the checkpoint
    rc = main(["steer", "--checkpoint", str(out / "runs" / "crate-tiny" / "final"), "--layer", "1", "--neuron", "3",
               "--value", "10", "--prompt", "To be, or not to be", "-k", "5"])
    steer_log = capsys.readouterr().out
    assert rc == 0, steer_log
    assert "Top next tokens before and after steering" in steer_log and "'" in steer_log  # decoded tokens, not ids

    t = time.perf_counter()
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("(skipped)") >= 3 and "train crate-tiny: 30 steps" not in again
    assert time.perf_counter() - t < 60
