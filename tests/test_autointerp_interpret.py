"""The whole interpret pipeline on tiny models with the LLM-free backend: layout, provenance, resume, controls, CLI."""

import json
import math

import numpy as np
import pytest
import torch

import crate
from crate import build_model
from crate.eval.autointerp.compare import run_compare
from crate.eval.autointerp.config import InterpretConfig
from crate.eval.autointerp.interpret import run_interpret
from crate.eval.record.neuron_record import load_neuron_record
from crate.eval.autointerp.scoring import pooled_correlation
from conftest import prepare_tiny
from test_autointerp_scoring import (
    aggregate_interval_reference, as_layers, difference_interval_reference, mean_of_layer_means,
)

T = 32


def _stream(n=24 * T, vocab=128):
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab, size=n).astype(np.uint16)


def _cfg(**kw):
    base = dict(protocol="tar", seq_len=T, n_tokens=24 * T, batch_size=8, device="cpu", top_k=12, n_random=10,
                per_bin=2, neurons=[0, 1, 2, 5], n_boot=200)
    return InterpretConfig(**{**base, **kw})


def test_run_interpret_layout_scores_and_resume(tmp_path):
    torch.manual_seed(0)
    model = build_model("crate", "micro")
    strings = [f"w{i}" for i in range(128)]
    s = run_interpret(None, None, tmp_path, _cfg(), model=model, stream=_stream(), token_strings=strings)
    rec = load_neuron_record(tmp_path / "records" / "0" / "5.json")
    assert rec.neuron_id.neuron_index == 5 and len(rec.most_positive_activation_records) == 12
    assert not (tmp_path / "records" / "0" / "3.json").exists()  # only the chosen neurons
    assert (tmp_path / "records" / "0" / "cache.npz").exists()
    lines = [json.loads(x) for x in (tmp_path / "scores" / "tar" / "0.jsonl").read_text().splitlines()]
    assert [x["neuron"] for x in lines] == [0, 1, 2, 5]
    for x in lines:
        assert {"layer", "neuron", "explanation", "true_activations", "expected_activations", "score", "rsquared",
                "absolute_dev_explained", "detection", "fuzzing", "provenance"} <= set(x)
        assert len(x["true_activations"]) == len(x["expected_activations"]) == 10
        r, _ = pooled_correlation(x["true_activations"], x["expected_activations"])
        assert (r == pytest.approx(x["score"])) if x["score"] is not None else math.isnan(r)
        assert x["provenance"]["protocol"] == "tar" and x["provenance"]["seed"] == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    layer0 = summary["layers"]["0"]
    scores = [x["score"] for x in lines if x["score"] is not None]
    assert layer0["mean"] == pytest.approx(np.mean(scores)) and layer0["n_total"] == 128
    assert layer0["measures"]["dead"] >= 0 and "top_random_ratio_median" in layer0["measures"]
    assert summary["aggregate"]["layers_used"] == ["0"]
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["model"]["arch"] == "crate" and prov["prompt_version"]
    # an interrupted run resumes: drop the last line, run again, the same result
    path = tmp_path / "scores" / "tar" / "0.jsonl"
    path.write_text("\n".join(path.read_text().splitlines()[:2]) + "\n{\"cut")
    s2 = run_interpret(None, None, tmp_path, _cfg(), model=model, stream=_stream(), token_strings=strings)
    assert s2["layers"]["0"]["mean"] == pytest.approx(s["layers"]["0"]["mean"])
    assert len(path.read_text().splitlines()) == 4  # 2 kept, the cut line dropped, 2 redone


def test_short_protocol_and_random_init_control(tmp_path):
    torch.manual_seed(0)
    model = build_model("gpt", "micro")
    w0 = model.transformer.h[0].mlp.c_fc.weight.clone() if hasattr(model.transformer.h[0], "mlp") else None
    s = run_interpret(None, None, tmp_path / "short", _cfg(protocol="short", top_k=35), model=model, stream=_stream(),
                      token_strings=[str(i) for i in range(128)])
    rec = load_neuron_record(tmp_path / "short" / "records-short" / "0" / "1.json")
    assert max(len(r.tokens) for r in rec.most_positive_activation_records) == 8
    line = json.loads((tmp_path / "short" / "scores" / "short" / "0.jsonl").read_text().splitlines()[0])
    assert any(i.startswith("top3:") for i in line["record_ids"])
    assert all(len(t) <= 3 for t, i in zip(line["tokens"], line["record_ids"]) if i.startswith("top3:"))
    c = run_interpret(None, None, tmp_path / "ctl", _cfg(control=True, seed=1), model=model, stream=_stream(),
                      token_strings=[str(i) for i in range(128)])
    assert c["provenance"]["model"]["control_random_init"] is True
    assert c["provenance"]["model"]["weights_fingerprint"] != s["provenance"]["model"]["weights_fingerprint"]
    if w0 is not None:
        assert not torch.equal(w0, model.transformer.h[0].mlp.c_fc.weight)


def _layer_scores(result) -> dict[str, dict[int, float]]:
    """{layer: {neuron: score (NaN when unscored)}} from a result's TaR score files."""
    out = {}
    for f in (result / "scores" / "tar").glob("*.jsonl"):
        lines = [json.loads(x) for x in f.read_text().splitlines()]
        out[f.stem] = {x["neuron"]: math.nan if x["score"] is None else x["score"] for x in lines}
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp")
    data = prepare_tiny(root)
    ckpts = {}
    for arch in ("crate", "gpt"):
        torch.manual_seed(0)
        ckpts[arch] = root / arch
        crate.save(build_model(arch, "micro", vocab_size=320), ckpts[arch])
    return data, ckpts


def test_run_compare_pairs_crate_and_gpt(prepared, tmp_path):
    data, ckpts = prepared
    s = run_compare({"crate": ckpts["crate"], "gpt": ckpts["gpt"]}, data, tmp_path, _cfg(n_tokens=20 * T),
                    controls=True)
    c = s["comparison"]["crate - gpt"]
    assert set(s["controls"]) == {"crate", "gpt"} and (tmp_path / "gpt-control" / "summary.json").exists()
    # the summary's numbers, recomputed from the score files with independent bootstraps (n_boot 200, seed 0)
    layers = {arch: as_layers(_layer_scores(tmp_path / arch)) for arch in ("crate", "gpt")}
    agg = s["models"]["crate"]["aggregate"]
    assert agg["mean"] == pytest.approx(mean_of_layer_means(layers["crate"]), rel=1e-12)
    assert agg["ci95"] == pytest.approx(aggregate_interval_reference(layers["crate"], 200, 0), rel=1e-12)
    assert c["paired"] and c["difference"] == pytest.approx(
        mean_of_layer_means(layers["crate"]) - mean_of_layer_means(layers["gpt"]), rel=1e-12)
    want = difference_interval_reference(layers["crate"], layers["gpt"], 200, 0, paired=True)
    assert c["ci95"] == pytest.approx(want, rel=1e-12)
    assert (tmp_path / "crate" / "scores" / "tar" / "0.jsonl").exists()
    rc = np.load(tmp_path / "crate" / "records" / "0" / "cache.npz")["rand_pos"]
    rg = np.load(tmp_path / "gpt" / "records" / "0" / "cache.npz")["rand_pos"]
    np.testing.assert_array_equal(rc, rg)  # the same random positions for both models
    tokens = load_neuron_record(tmp_path / "crate" / "records" / "0" / "0.json").random_sample[0].tokens
    assert any(t.strip() in {"cat", "the", "dog", "mat"} for t in tokens)  # real token strings


def test_cli_interpret(prepared, tmp_path, capsys):
    from crate.cli import main

    data, ckpts = prepared
    rc = main(["interpret", "-c", str(ckpts["crate"]), "-d", str(data), "-o", str(tmp_path), "--seq-len", "32",
               "--tokens", "640", "--neurons", "0-3", "--layers", "0", "--protocol", "random"])
    assert rc == 0
    assert "mean x100" in capsys.readouterr().out
    assert len((tmp_path / "scores" / "random" / "0.jsonl").read_text().splitlines()) == 4
    rc = main(["interpret", "-c", str(ckpts["crate"]), "-d", str(data), "-o", str(tmp_path / "x"), "--protocol",
               "nonsense"])
    assert rc == 2 and "unknown protocol" in capsys.readouterr().err


def test_a_token_offset_records_the_split_from_there(prepared, tmp_path, capsys):
    """--token-offset k reads the split from token k: the same records and scores as the sliced split given as a
    stream, its tokens in the provenance, other records than from the start; an offset past the split is refused
    before anything is written."""
    import hashlib

    from crate.cli import main
    from crate.eval.autointerp.records import load_token_strings
    from crate.train.data import open_split

    data, ckpts = prepared
    split, k = open_split(data, "val"), 5 * T
    cfg = _cfg(n_tokens=8 * T, neurons=[0, 1, 2], token_offset=k)
    got = run_interpret(ckpts["crate"], data, tmp_path / "offset", cfg)
    model = crate.load(ckpts["crate"])
    sliced = run_interpret(None, None, tmp_path / "sliced", cfg, model=model, stream=np.asarray(split[k:]),
                           token_strings=load_token_strings(data, model.config.vocab_size))
    start = run_interpret(ckpts["crate"], data, tmp_path / "start", _cfg(n_tokens=8 * T, neurons=[0, 1, 2]))
    data_id = got["provenance"]["data"]
    want = np.asarray(split[k : k + 8 * T]).astype(np.int64)
    assert data_id["offset"] == k and data_id["tokens_sha256"] == hashlib.sha256(want.tobytes()).hexdigest()
    assert "offset" not in start["provenance"]["data"]  # records made before offsets existed keep their identity
    lines = {name: (tmp_path / name / "scores" / "tar" / "0.jsonl").read_text().splitlines()
             for name in ("offset", "sliced", "start")}
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "provenance"} for r in rows]  # noqa: E731
    assert strip(lines["offset"]) == strip(lines["sliced"]) != strip(lines["start"])
    records = {name: np.load(tmp_path / name / "records" / "0" / "cache.npz") for name in ("offset", "start")}
    assert not np.array_equal(records["offset"]["top_win"], records["start"]["top_win"])
    rc = main(["interpret", "-c", str(ckpts["crate"]), "-d", str(data), "-o", str(tmp_path / "past"), "--seq-len",
               "32", "--token-offset", str(len(split) - 31)])
    err = capsys.readouterr().err
    assert rc == 2 and f"token offset {len(split) - 31:,} leaves 31 tokens" in err
    assert f"at most {len(split) - 32:,}" in err and not (tmp_path / "past").exists()


@pytest.mark.parametrize("flags,names", [
    (["--quantize", "4bit"], ["--quantize 4bit", "--explainer stats", "--simulator stats"]),
    (["--quantize", "4bit", "--explainer", "http://127.0.0.1:1/v1#m"], ["--quantize 4bit", "--explainer http://"]),
    (["--no-api-key", "--api-key-env", "MY_KEY"], ["--no-api-key", "--api-key-env"]),
    (["--api-key-env", "OPENAI_API_KEY", "--no-api-key"], ["--no-api-key", "--api-key-env"]),
])
def test_cli_interpret_refuses_conflicting_flags(flags, names, tmp_path, monkeypatch, capsys):
    """--quantize with no in-process LLM, and --no-api-key with --api-key-env, were silently ignored."""
    from crate.cli import main
    from crate.eval.autointerp import interpret

    monkeypatch.setattr(interpret, "plan_interpret", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(["interpret", "-c", "x", "-d", "y", "-o", "z", *flags])
    except SystemExit as e:  # argparse's usage error
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and all(n in err for n in names) and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())


def test_cli_interpret_passes_compatible_llm_flags(monkeypatch):
    """The flags the conflict checks let through reach the config as before."""
    from crate.cli import main
    from crate.eval.autointerp import interpret

    seen = []

    from crate.eval.validity.run import validate

    seen, validates = [], []

    def fake_run(checkpoint, data, out, cfg, overwrite=False, validate=None):
        seen.append(cfg.llm_options)
        validates.append(validate)
        raise KeyboardInterrupt  # stop before the summary

    monkeypatch.setattr(interpret, "run_interpret", fake_run)
    base = ["interpret", "-c", "x", "-d", "y", "-o", "z"]
    for flags in ([], ["--api-key-env", "OPENAI_API_KEY"], ["--api-key-env", "MY_KEY"], ["--no-api-key"],
                  ["--quantize", "4bit", "--simulator", "hf:some/model"], ["--quantize", "4bit", "--explainer", "smollm2"]):
        assert main(base + flags) == 130
    assert seen == [{}, {}, {"api_key_env": "MY_KEY"}, {"api_key_env": None, "require_key": False},
                    {"quantize": "4bit"}, {"quantize": "4bit"}]
    assert validates == [None] * 6 and main(base + ["--validity"]) == 130 and validates[-1] is validate


def test_a_short_stream_says_how_many_tokens_it_records(tmp_path, capsys):
    """--tokens beyond the split recorded fewer tokens than asked without a word."""
    torch.manual_seed(0)
    model = build_model("crate", "micro")
    strings = [f"w{i}" for i in range(128)]
    cfg = _cfg(n_tokens=100 * T, layers=[0], neurons=[0])
    s = run_interpret(None, None, tmp_path / "short", cfg, model=model, stream=_stream(24 * T + 5), token_strings=strings)
    out = capsys.readouterr().out
    want = (f"tokens: 768 recorded of the 3,200 asked (--tokens): the token stream has only 773 tokens, recorded in "
            f"whole sequences of {T} (--seq-len)")
    assert out.count("tokens: ") == 1 and want in out, out
    assert s["provenance"]["data"]["n_tokens"] == 768 and s["layers"]["0"]["measures"]["n_tokens"] == 768
    # whole sequences only: a stream long enough, a count that is not a multiple of the sequence length
    run_interpret(None, None, tmp_path / "cut", _cfg(n_tokens=20 * T + 7, layers=[0], neurons=[0]), model=model,
                  stream=_stream(), token_strings=strings)
    assert "tokens: 640 recorded of the 647 asked (--tokens): only whole sequences of 32 tokens are recorded" \
        in capsys.readouterr().out
    # the protocol's default budget, and a stream that holds what was asked: nothing said
    run_interpret(None, None, tmp_path / "default", _cfg(n_tokens=None, layers=[0], neurons=[0]), model=model,
                  stream=_stream(), token_strings=strings)
    assert "tokens: 768 recorded of the 8,192,000 asked (the tar protocol's default; --tokens)" in capsys.readouterr().out
    run_interpret(None, None, tmp_path / "enough", _cfg(layers=[0], neurons=[0]), model=model, stream=_stream(),
                  token_strings=strings)
    assert "tokens: " not in capsys.readouterr().out


def test_a_short_split_is_said_once_for_every_model_compared(prepared, tmp_path, capsys, monkeypatch):
    from crate.eval.autointerp import compare

    class Planned(Exception):
        pass

    def executed(plan, validate=None):
        raise Planned  # every model is planned (and the tokens said) before the first is recorded: stop there

    monkeypatch.setattr(compare, "execute_plan", executed)
    data, ckpts = prepared
    with pytest.raises(Planned):
        run_compare({"crate": ckpts["crate"], "gpt": ckpts["gpt"]}, data, tmp_path,
                    _cfg(n_tokens=400 * T, layers=[0], neurons=[0]), controls=True)
    out = capsys.readouterr().out
    assert out.count("tokens: ") == 1 and "of the 12,800 asked (--tokens): the val split has only 5,861 tokens" in out


def test_sigterm_while_scoring_keeps_the_scored_neurons_and_says_how_to_resume(prepared, tmp_path, capsys,
                                                                             monkeypatch):
    """A SIGTERM (a scheduler's stop) in the middle of scoring: the neurons scored so far stay in the score file, the
    command says it was stopped and how to resume (exit 143), and the rerun reuses them. Without a handler SIGTERM
    ends the process silently (here: a stand-in handler that raises something else)."""
    import os
    import signal

    from crate.cli import main
    from crate.eval.progress import Progress

    class Killed(Exception):
        pass

    def killed(signum, frame):
        raise Killed

    update = Progress.update

    def terminate_after_three(self, desc, done, total, unit, note=""):
        update(self, desc, done, total, unit, note)
        if desc.startswith("scoring") and done == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    data, ckpts = prepared
    args = ["interpret", "-c", str(ckpts["crate"]), "-d", str(data), "-o", str(tmp_path), "--seq-len", "32",
            "--tokens", "640", "--neurons", "0-7", "--layers", "0"]
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        with monkeypatch.context() as m:
            m.setattr(Progress, "update", terminate_after_three)
            assert main(args) == 143
        assert signal.getsignal(signal.SIGTERM) is killed  # main put back the handler it found
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "crate interpret: stopped by SIGTERM; run the same command again" in capsys.readouterr().err
    lines = (tmp_path / "scores" / "tar" / "0.jsonl").read_text().splitlines()
    assert [json.loads(line)["neuron"] for line in lines] == [0, 1, 2]
    assert main(args) == 0
    assert "3 of 8 neurons reused" in capsys.readouterr().out
