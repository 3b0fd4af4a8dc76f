"""The steering measurement on cases whose answer is known: a unit the model's head ignores costs nothing and does
nothing; a unit rigged to write one token's direction raises that token, more with a larger clamp."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

import crate
from crate import build_model
from crate.cli import main
from crate.eval.steer.sweep import SweepConfig, measure_unit, renormalised_kl, sweep
from test_steer import NEURON, TOKEN, rigged

T = 16


def _stream(n=16 * T, vocab=128):
    return np.random.default_rng(0).integers(0, vocab, size=n).astype(np.uint16)


def test_renormalised_kl_by_hand():
    p = torch.log(torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64))
    q = torch.log(torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64))
    keep = torch.tensor([True, True, False])  # over tokens 0 and 1: p' = (.5, .5), q' = (.4, .6)
    want = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)
    assert float(renormalised_kl(p, q, keep)[0]) == pytest.approx(want, abs=1e-12)
    assert float(renormalised_kl(p, p, keep)[0]) == 0.0


def _ignored(arch: str) -> torch.nn.Module:
    """A micro model whose unit NEURON writes nothing: its decoder column (GPT) or atom (CRATE) is zero."""
    torch.manual_seed(0)
    model = build_model(arch, "micro", ista_impl="torch") if arch == "crate" else build_model(arch, "micro")
    with torch.no_grad():
        blk = model.transformer.h[0]
        if arch == "crate":
            blk.ista.weight[NEURON] = 0.0
        else:
            blk.mlp.c_proj.weight[:, NEURON] = 0.0
            blk.mlp.c_fc.weight[NEURON] = model.transformer.wte.weight[:8].mean(0) * 50  # active: it gets swept
    return model.eval()


@pytest.mark.parametrize("arch", ["crate", "gpt"])
@torch.no_grad()
def test_clamping_a_unit_the_head_ignores_costs_nothing(arch):
    model = _ignored(arch)
    cfg = SweepConfig(sequences=8, seq_len=T, multiples=(0.0, 1.0, 8.0))
    calib, test = (torch.from_numpy(_stream()[: 8 * T].astype(np.int64)).view(8, T)[s] for s in (slice(0, 4), slice(4, 8)))
    lc, lt = (torch.log_softmax(model(x).double(), -1) for x in (calib, test))
    r = measure_unit(model, 0, NEURON, 3.0, calib, test, lc, lt, cfg)
    for row in r["by_multiple"]:
        assert row["effect"] == 0.0 and row["kl"] == 0.0 and row["loss_increase"] == 0.0


@torch.no_grad()
def test_a_latent_with_no_decoder_direction_costs_nothing():
    from crate.eval.sae.attach import SAEModel
    from test_sae import _identity_sae

    torch.manual_seed(0)
    model = build_model("gpt", "micro").eval()
    sae = _identity_sae(model.n_neurons)
    with torch.no_grad():
        sae.W_dec[NEURON] = 0.0
    m = SAEModel(model, {0: sae}, {0: []})
    cfg = SweepConfig(sequences=8, seq_len=T, multiples=(1.0, 8.0))
    calib, test = (torch.from_numpy(_stream()[: 8 * T].astype(np.int64)).view(8, T)[s] for s in (slice(0, 4), slice(4, 8)))
    lc, lt = (torch.log_softmax(m(x).double(), -1) for x in (calib, test))
    for row in measure_unit(m, 0, NEURON, 5.0, calib, test, lc, lt, cfg)["by_multiple"]:
        assert row["effect"] == 0.0 and row["kl"] == 0.0 and row["loss_increase"] == 0.0
    # the same latent with its decoder row back (the identity's e_i) writes neuron NEURON: it is GPT's unit
    with torch.no_grad():
        sae.W_dec[NEURON, NEURON] = 1.0
    gpt = measure_unit(model, 0, NEURON, 5.0, calib, test, lc, lt, cfg)
    via_sae = measure_unit(m, 0, NEURON, 5.0, calib, test, lc, lt, cfg)
    for a, b in zip(gpt["by_multiple"], via_sae["by_multiple"]):
        assert b["kl"] == pytest.approx(a["kl"], abs=1e-9) and b["effect"] == pytest.approx(a["effect"], abs=1e-9)


@pytest.mark.parametrize("arch", ["crate", "gpt"])
@torch.no_grad()
def test_a_rigged_unit_raises_its_token_more_with_a_larger_clamp(arch):
    model = rigged(arch)
    cfg = SweepConfig(sequences=8, seq_len=T, multiples=(1.0, 4.0, 16.0), top_tokens=1)
    calib, test = (torch.from_numpy(_stream()[: 8 * T].astype(np.int64)).view(8, T)[s] for s in (slice(0, 4), slice(4, 8)))
    lc, lt = (torch.log_softmax(model(x).double(), -1) for x in (calib, test))
    r = measure_unit(model, 0, NEURON, 2.0, calib, test, lc, lt, cfg)
    assert r["tokens"] == [TOKEN]  # the one token its direction writes
    effects = [row["effect"] for row in r["by_multiple"]]
    assert effects[0] < effects[1] < effects[2] and effects[2] > 1.0
    # the reference: the mean log-prob rise of the chosen tokens at 16 x 2.0, recomputed by hand
    with model.steer(0, NEURON, 32.0):
        lp = torch.log_softmax(model(test).double(), -1)
    assert effects[2] == pytest.approx(float((lp - lt)[..., r["tokens"]].mean()), abs=1e-12)


def test_sweep_summarises_over_units_and_skips_silent_ones():
    model = _ignored("gpt")
    res = sweep({"gpt": model}, _stream(), SweepConfig(units=6, sequences=8, seq_len=T, multiples=(1.0, 2.0), n_boot=100))
    s = res["systems"]["gpt"]
    assert s["summary"][0]["n_units"] == len(s["units"]) <= 6
    for u in s["units"]:
        assert u["max_activation"] > 0  # silent units are left out
    kl = [u["by_multiple"][1]["kl"] for u in s["units"]]
    assert s["summary"][1]["kl"] == pytest.approx(float(np.mean(kl)), rel=1e-12)
    lo, hi = s["summary"][1]["kl_ci95"]
    assert lo <= s["summary"][1]["kl"] <= hi


def test_cli_steer_sweep_writes_json_table_and_plot(tmp_path, capsys):
    from crate.train.prepare import prepare

    rng = random.Random(0)
    words = "the cat sat on a mat and the dog ran to the red house".split()
    (tmp_path / "a.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(60)))
    data = prepare(str(tmp_path / "a.txt"), tmp_path / "data", tokenizer="bpe", vocab_size=300, val_fraction=0.3,
                   piece_chars=600, progress=False)
    for arch in ("crate", "gpt"):
        torch.manual_seed(0)
        crate.save(build_model(arch, "micro", vocab_size=320, init_std=0.2), tmp_path / arch)
    rc = main(["steer", "--sweep", "-c", f"crate={tmp_path / 'crate'}", f"gpt={tmp_path / 'gpt'}", "--data", str(data),
               "--out", str(tmp_path / "sw"), "--units", "3", "--sequences", "4", "--seq-len", str(T),
               "--multiples", "0,2"])
    assert rc == 0
    res = json.loads((tmp_path / "sw" / "steer_sweep.json").read_text())
    assert set(res["systems"]) == {"crate", "gpt"} and (tmp_path / "sw" / "steer_sweep.png").stat().st_size > 0
    assert [r["multiple"] for r in res["systems"]["gpt"]["summary"]] == [0.0, 2.0]
    assert "| gpt | 2 |" in (tmp_path / "sw" / "steer_sweep.md").read_text()
    assert main(["steer", "-c", str(tmp_path / "gpt"), "--layer", "0"]) != 0  # no unit and no --sweep: refused
    assert "--neuron" in capsys.readouterr().err


def test_tables_keep_small_values_and_json_keeps_names(tmp_path):
    """Hand-made sweep: a KL of 2e-05 is printed, not rounded to 0; NaN becomes null value by value, so a system
    whose name contains "NaN" keeps it."""
    from crate.eval.steer.sweep import sweep_markdown, write_sweep

    nan = float("nan")
    row = {"multiple": 2.0, "n_units": 3, "effect": 0.5, "effect_ci95": [0.25, 0.75], "kl": 2e-5,
           "kl_ci95": [1e-5, 3e-5], "loss_increase": nan, "loss_increase_ci95": [nan, nan]}
    unit = {"layer": 0, "unit": 1, "max_activation": np.float32(1.5), "by_multiple": [{"effect": nan}]}
    result = {"config": {"multiples": (2.0,)}, "systems": {"NaNo-GPT": {"units": [unit], "summary": [row]}}}
    md = sweep_markdown(result)
    assert "| NaNo-GPT | 2 | 3 | 0.5 | [0.25, 0.75] | 2e-05 | [1e-05, 3e-05] | n/a | [n/a, n/a] |" in md
    saved = json.loads(write_sweep(result, tmp_path).read_text())
    assert list(saved["systems"]) == ["NaNo-GPT"]
    (s,) = saved["systems"].values()
    assert s["summary"][0]["loss_increase"] is None and s["summary"][0]["loss_increase_ci95"] == [None, None]
    assert s["units"][0] == {"layer": 0, "unit": 1, "max_activation": 1.5, "by_multiple": [{"effect": None}]}
    assert saved["config"]["multiples"] == [2.0] and "2e-05" in (tmp_path / "steer_sweep.md").read_text()


def test_sweep_never_writes_into_a_folder_of_other_files(tmp_path):
    """Refused before any checkpoint or data is read (none of these exist), nothing written."""
    from crate.eval.steer.sweep import sweep_files
    from crate.provenance import ProvenanceError

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(ProvenanceError, match=r"has not marked it as its own \(no .crate-lm among notes.txt\)"):
        sweep_files({"crate": str(tmp_path / "no-ckpt")}, tmp_path / "no-data", theirs, SweepConfig())
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
