"""Provenance as the cache key: every rerun reuses exactly what matches its inputs, refuses what would mix or
destroy results of other inputs, and every input problem is found before any recording or training."""

import json
import re
import socket

import numpy as np
import pytest
import torch

import crate
from crate import build_model
from crate.eval.autointerp import interpret as interp
from crate.eval.autointerp import records as interp_records
from crate.eval.llm.base import BackendError
from crate.eval.autointerp.config import InterpretConfig
from crate.eval.autointerp.identity import model_identity
from crate.eval.autointerp.interpret import run_interpret
from crate.eval.report.results import ReportError, load_model_result
from crate.eval.autointerp.explainers import StatsExplainer
from crate.provenance import ProvenanceError, differences, digest, tensors_hash
from conftest import prepare_tiny
from test_llm import server  # noqa: F401  (the loopback OpenAI-compatible server fixture)

T = 32
STRINGS = [f"w{i}" for i in range(128)]


def _stream(n=24 * T):
    return np.random.default_rng(0).integers(0, 128, size=n).astype(np.uint16)


def _cfg(**kw):
    base = dict(protocol="tar", seq_len=T, n_tokens=24 * T, batch_size=8, device="cpu", top_k=12, n_random=10,
                per_bin=2, neurons=[0, 1, 2, 5], n_boot=200, extra_scores=False)
    return InterpretConfig(**{**base, **kw})


def _run(out, model, **kw):
    explainer = kw.pop("explainer", None)
    overwrite = kw.pop("overwrite", False)
    return run_interpret(None, None, out, _cfg(**kw), model=model, stream=_stream(kw.get("n_tokens", 24 * T)),
                         token_strings=STRINGS, explainer=explainer, overwrite=overwrite)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return build_model("crate", "micro")


def test_identity_helpers():
    assert differences({"a": 1, "b": {"c": 2, "d": [1]}}, {"a": 1, "b": {"c": 3, "d": [1]}}) == ["b.c: 2 -> 3"]
    assert differences({"a": 1}, {"a": 1, "e": "x"}) == ["e: <absent> -> x"]
    assert digest({"x": (1, 2.0)}) == digest({"x": [1, 2.0]}) != digest({"x": [1, 2.5]})
    t = torch.arange(100_000, dtype=torch.float32)
    u = t.clone()
    u[50_000] += 1  # the middle of a large tensor
    assert tensors_hash([("w", t)]) != tensors_hash([("w", u)])
    assert tensors_hash([("w", t)]) != tensors_hash([("v", t)])


def test_weights_fingerprint_covers_middle_layers():
    """The old fingerprint hashed 64 KB of the first and last three tensors: two models differing only in a middle
    layer shared cached records. Now any weight anywhere changes it, and the rerun is refused."""
    torch.manual_seed(0)
    a = build_model("gpt", "micro", n_layer=3)
    b = build_model("gpt", "micro", n_layer=3)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.transformer.h[1].mlp.c_fc.weight[7, 3] += 1e-3
    assert model_identity(a, False, 0)["weights_fingerprint"] != model_identity(b, False, 0)["weights_fingerprint"]
    c = build_model("gpt", "micro", n_layer=3)
    c.load_state_dict(a.state_dict())
    assert model_identity(a, False, 0) == model_identity(c, False, 0)


def test_rerun_with_another_explainer_is_refused_then_overwritten(tmp_path, model):
    first = _run(tmp_path, model)
    with pytest.raises(ProvenanceError, match=r"explainer\.top: 8 -> 3") as e:
        _run(tmp_path, model, explainer=StatsExplainer(top=3))
    assert "--overwrite" in str(e.value)
    assert len(_lines(tmp_path / "scores" / "tar" / "0.jsonl")) == 4  # nothing lost
    again = _run(tmp_path, model, explainer=StatsExplainer(top=3), overwrite=True)
    rows = _lines(tmp_path / "scores" / "tar" / "0.jsonl")
    assert [r["neuron"] for r in rows] == [0, 1, 2, 5]
    assert {r["provenance"]["key"] for r in rows} == {again["provenance"]["key"]} != {first["provenance"]["key"]}
    assert all(r["provenance"]["explainer"]["top"] == 3 for r in rows)


def test_another_neuron_sample_keeps_exactly_that_selection(tmp_path, model):
    """The reported bug: a rerun with another sample kept the old lines beside the new, and `crate report` averaged
    both. Lines of the same provenance are reused; the layer file holds exactly the new selection."""
    _run(tmp_path, model, neurons=[0, 1, 2, 5, 6, 7, 8, 9])
    s = _run(tmp_path, model, neurons=[1, 3, 5, 10, 11])
    rows = _lines(tmp_path / "scores" / "tar" / "0.jsonl")
    assert [r["neuron"] for r in rows] == [1, 3, 5, 10, 11]
    scores = [r["score"] for r in rows if r["score"] is not None]
    assert s["layers"]["0"]["mean"] == pytest.approx(np.mean(scores))
    result = load_model_result(tmp_path)
    reported = [r["score"] for r in result.scores["TaR"]["0"] if r["score"] is not None]
    assert reported == scores


def test_fewer_tokens_into_a_folder_refuses_its_scores(tmp_path, model, capsys):
    _run(tmp_path, model)
    with pytest.raises(ProvenanceError, match=r"records\.data\.n_tokens: 768 -> 384"):
        _run(tmp_path, model, n_tokens=12 * T)
    assert json.loads((tmp_path / "records" / "meta.json").read_text())["n_tokens"] == 24 * T  # untouched
    capsys.readouterr()
    _run(tmp_path, model, n_tokens=12 * T, overwrite=True)
    log = capsys.readouterr().out
    assert "recording again" in log and "0 of 4 neurons reused" in log
    assert json.loads((tmp_path / "records" / "meta.json").read_text())["n_tokens"] == 12 * T
    # the same inputs again: everything reused, nothing recorded
    _run(tmp_path, model, n_tokens=12 * T)
    log = capsys.readouterr().out
    assert "reused (same model, data and recording parameters)" in log and "4 of 4 neurons reused" in log


def test_report_refuses_a_folder_that_mixes_provenances(tmp_path, model):
    _run(tmp_path / "a", model)
    _run(tmp_path / "b", model, explainer=StatsExplainer(top=3))
    mixed = tmp_path / "a" / "scores" / "tar" / "0.jsonl"
    mixed.write_text(mixed.read_text() + (tmp_path / "b" / "scores" / "tar" / "0.jsonl").read_text())
    with pytest.raises(ReportError, match="mixes scores of 2 different provenances"):
        load_model_result(tmp_path / "a")


def test_out_folder_of_someone_else_is_refused(tmp_path, model):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ProvenanceError, match="has not marked it as its own"):
        _run(tmp_path, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.fixture()
def no_recording(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("recording started before the inputs were checked")

    monkeypatch.setattr(interp_records, "record_activations", fail)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("spec, options, message", [
    ("nonsense", {}, "unknown LLM 'nonsense'"),
    ("http://127.0.0.1:{port}/v1#m", {"api_key_env": "CRATE_TEST_NO_SUCH_KEY"}, r"\$CRATE_TEST_NO_SUCH_KEY"),
    ("http://127.0.0.1:{port}/v1#m", {"require_key": False, "api_key_env": None}, "nothing answers at 127.0.0.1"),
    ("hf:/no/such/llm.gguf", {}, "does not exist"),
])
def test_llm_problems_are_found_before_recording(tmp_path, model, no_recording, monkeypatch, spec, options, message):
    monkeypatch.delenv("CRATE_TEST_NO_SUCH_KEY", raising=False)
    cfg = _cfg(explainer=spec.format(port=_free_port()), simulator="stats", llm_options=options)
    with pytest.raises(BackendError, match=message):
        run_interpret(None, None, tmp_path / "o", cfg, model=model, stream=_stream(), token_strings=STRINGS)
    assert not (tmp_path / "o").exists()


def test_layer_and_neuron_ranges_are_checked_before_recording(tmp_path, model, no_recording):
    with pytest.raises(crate.CrateError, match=r"neurons \[5000, 5001.*layer 0 has 128 units"):
        _run(tmp_path, model, neurons=list(range(5000, 5011)))
    with pytest.raises(crate.CrateError, match="layer 5 out of range"):
        _run(tmp_path, model, layers=[5])


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    from crate.datadir import read_manifest

    root = tmp_path_factory.mktemp("tok")
    data = {v: prepare_tiny(root, f"bpe{v}", vocab_size=v, paragraphs=60) for v in (300, 280)}
    torch.manual_seed(0)
    ckpt = crate.save(build_model("crate", "micro", vocab_size=320), root / "model",
                      tokenizer=read_manifest(data[300])["tokenizer"])
    return data, ckpt


def test_interpret_refuses_data_of_another_tokenizer(tmp_path, two_tokenizers, no_recording):
    from crate.errors import DataError

    data, ckpt = two_tokenizers
    with pytest.raises(DataError, match=r"trained with tokenizer bpe-300 .* tokenized with bpe-280") as e:
        run_interpret(ckpt, data[280], tmp_path, _cfg(n_tokens=4 * T))
    # the fix is a command crate prepare accepts (its --tokenizer choices are gpt2 and bpe)
    assert "`crate prepare SOURCE --out DIR --tokenizer bpe --vocab-size 300`" in str(e.value)
    from crate.cli import build_parser

    parser = build_parser()  # crate prepare's own parser
    args = parser.parse_args(["prepare", "SOURCE", "--out", "DIR", "--tokenizer", "bpe", "--vocab-size", "300"])
    assert (args.tokenizer, args.vocab_size) == ("bpe", 300)


def test_crate_eval_refuses_data_of_another_tokenizer_naming_both_hashes(tmp_path, two_tokenizers, capsys):
    from crate.cli import main

    data, ckpt = two_tokenizers
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data[280])]) == 2
    err = capsys.readouterr().err
    assert re.search(r"bpe-300 \(sha256 [0-9a-f]{12}\) but .* bpe-280 \(sha256 [0-9a-f]{12}\)", err), err
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data[300]), "--context", "100000"]) == 2
    assert "--context 100000 exceeds the model's block_size" in capsys.readouterr().err


def test_interpret_names_a_run_model_like_the_report(tmp_path, two_tokenizers):
    from crate.eval.models import model_label

    assert model_label("runs/crate-tiny/final") == "crate-tiny" and model_label("x/ckpt-crate-12l.pt") == "ckpt-crate-12l"
    data, ckpt = two_tokenizers
    s = run_interpret(ckpt, data[300], tmp_path / "o", _cfg(n_tokens=4 * T, neurons=[0, 1]))
    assert s["provenance"]["model"]["name"] == "model" == load_model_result(tmp_path / "o").name


def test_reproduce_checks_the_whole_plan_before_step_1(tmp_path):
    from crate.eval.workflows.reproduce import ReproduceOptions, reproduce
    from crate.errors import PipelineError

    opts = ReproduceOptions(out=tmp_path / "r", sizes=["1L"], source="embedded", explainer="nonsense",
                            simulator="stats", protocols=["tar", "bogus"], train_overrides=["train.lr=fast"])
    for dry in (True, False):
        opts.dry_run = dry
        with pytest.raises(PipelineError) as e:
            reproduce(opts)
        msg = str(e.value)
        assert "unknown LLM 'nonsense'" in msg and "unknown protocol 'bogus'" in msg and "nothing was done" in msg
        assert not (tmp_path / "r").exists()


def test_a_pipeline_run_of_another_recipe_is_refused_not_skipped(tmp_path, two_tokenizers, capsys):
    """`crate demo --steps 50` into a 300-step output announced 50 steps, skipped them and printed the old table.
    A training step of the pipelines now compares its recipe with the run's stamp."""
    from crate.eval.workflows.steps import train_model

    data, _ = two_tokenizers
    model = {"arch": "crate", "preset": "micro", "vocab_size": None}
    recipe = {"path": str(data[300]), "source": None}
    train = {"max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "context": 16, "val_every": 0,
             "ckpt_every": 2, "final_val_batches": 1}
    system = {"devices": 1, "wandb": "off", "progress_bar": False}
    run = tmp_path / "run"
    final = train_model("m", model, recipe, train, run, 0.0, system)
    assert json.loads((final / "config.json").read_text())["metadata"]["step"] == 2
    capsys.readouterr()
    assert train_model("m", model, recipe, train, run, 0.0, system) == final
    assert "reused (same recipe and data)" in capsys.readouterr().out
    with pytest.raises(ProvenanceError, match=r"recipe\.train\.max_steps: 2 -> 3.*--overwrite"):
        train_model("m", model, recipe, {**train, "max_steps": 3}, run, 0.0, system)
    final = train_model("m", model, recipe, {**train, "max_steps": 3}, run, 0.0, system, overwrite=True)
    assert json.loads((final / "config.json").read_text())["metadata"]["step"] == 3


def test_interrupted_interpret_says_how_to_resume(monkeypatch, capsys):
    from crate.cli import main

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(interp, "run_interpret", interrupted)
    assert main(["interpret", "-c", "x", "-d", "y", "-o", "z"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; run the same command again: records and scored neurons are kept" in err
    assert "Traceback" not in err


def test_progress_rate_counts_only_this_runs_work(monkeypatch):
    """The bar once showed 1,108,647.4 neurons/s: neurons reused from disk were counted as scored in no time."""
    from crate.eval.progress import Progress, rate_text

    assert rate_text(3, 10.0, "neurons") == "1,080 neurons/h" and rate_text(30, 10.0, "neurons") == "3.0 neurons/s"
    clock = iter([100.0, 160.0])
    monkeypatch.setattr(interp.time, "perf_counter", lambda: next(clock))
    p = Progress(False)
    seen = {}

    class Bar:
        def add_task(self, desc, total, **fields):
            return 0

        def update(self, task, completed, rate, **fields):
            seen["rate"] = rate

    p.bar = Bar()
    p.update("scoring", 1000, 1010, "neurons")  # 999 reused from disk, then 1 scored
    p.update("scoring", 1002, 1010, "neurons")  # 2 more in 60 s since that first one
    assert seen["rate"] == "120 neurons/h"


def test_variance_is_printed_in_the_papers_units():
    """SPEC.md 6: the paper's variance is the population variance of the x100 layer means (7.8 and 8.3 give 0.0625).
    summary.md once printed the variance of the raw means x100 (100 times too small)."""
    from crate.eval.autointerp.summary import summary_markdown
    from crate.eval.stats.neurons import model_aggregate

    agg = model_aggregate({"0": 0.078, "1": 0.083}, n_layer=2)
    assert agg["var_pop"] == pytest.approx(0.0025 ** 2)  # raw correlations
    md = summary_markdown({"m": {"layers": {}, "aggregate": agg}})
    assert "variance of the x100 layer means 0.06 " in md


def test_steer_refuses_data_of_another_tokenizer(two_tokenizers):
    from crate.loading import find_tokenizer
    from crate.errors import DataError

    data, ckpt = two_tokenizers
    assert find_tokenizer(ckpt, data[300]) is not None
    with pytest.raises(DataError, match="bpe-300 .* bpe-280"):
        find_tokenizer(ckpt, data[280])


def test_an_endpoint_without_prompt_logprobs_is_refused_before_recording(tmp_path, model, no_recording, server):
    from test_llm import _Handler

    _Handler.mode = "nologprobs"
    cfg = _cfg(explainer=server + "#m", simulator="stats", llm_options={"api_key_env": "TEST_LLM_KEY"})
    with pytest.raises(BackendError, match="prompt log-probabilities"):
        run_interpret(None, None, tmp_path / "o", cfg, model=model, stream=_stream(), token_strings=STRINGS)
    assert not (tmp_path / "o").exists()


def test_a_stamp_names_the_cpu_capability_outside_the_key(tmp_path):
    """Floats depend on the instruction set torch runs with: every stamp records it, and an output made with
    another one is still reused (the inputs are the same; the stamp says where it came from)."""
    from crate.provenance import check_stamp, read_stamp, write_stamp

    identity = {"stage": "x", "n": 1}
    write_stamp(tmp_path, "x", identity)
    stamp = read_stamp(tmp_path)
    assert stamp["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and stamp["key"] == digest(identity)
    stamp["cpu_capability"] = "NO AVX"
    (tmp_path / ".provenance.json").write_text(json.dumps(stamp))
    assert check_stamp(tmp_path, identity) == ("reuse", [])


def test_a_folder_is_ours_by_the_mark_we_write_never_by_file_names(tmp_path, model):
    """A user's folder holding files named as ours (index.md, summary.md, study.json, steer_sweep.md) is refused by
    every command that writes a folder, before any work and whatever --overwrite says; a folder crate-lm wrote carries
    its mark (crate.provenance.claim) and is written again freely."""
    from crate.eval.report.reproduction import write_report
    from crate.eval.steer.sweep import SweepConfig, sweep_files
    from crate.eval.workflows.demo import DemoOptions, demo
    from crate.eval.workflows.reproduce import ReproduceOptions, reproduce
    from crate.eval.workflows.study import StudyOptions, study
    from crate.errors import PipelineError
    from crate.provenance import OWNER, check_owned, claim

    def users(name: str, *files: str):
        folder = tmp_path / name
        folder.mkdir()
        for f in files:
            (folder / f).write_text("mine")
        return folder

    ours = tmp_path / "ours"
    _run(ours, model)  # interpret marks its folder
    assert (ours / OWNER).is_file() and json.loads((ours / OWNER).read_text())["writer"] == "crate-lm"
    attempts = {
        "interpret": (users("i", "summary.md", "summary.json"), lambda out: _run(out, model, overwrite=True)),
        "report": (users("r", "index.md", "main_table.csv"), lambda out: write_report([ours], out)),
        "sweep": (users("s", "steer_sweep.md"), lambda out: sweep_files({"m": str(tmp_path / "none")}, tmp_path, out,
                                                                           SweepConfig())),
        "demo": (users("d", "index.md"), lambda out: demo(DemoOptions(out=out, steps=2))),
        "study": (users("st", "study.json", "index.md"), lambda out: study(StudyOptions(out=out, overwrite=True))),
    }
    for what, (folder, run) in attempts.items():
        before = sorted(p.name for p in folder.iterdir())
        with pytest.raises(ProvenanceError, match=f"crate-lm has not marked it as its own .no {OWNER} among"):
            run(folder)
        assert sorted(p.name for p in folder.iterdir()) == before, what
        assert all((folder / f).read_text() == "mine" for f in before), what
    with pytest.raises(PipelineError, match="--out: .* has not marked it as its own"):
        reproduce(ReproduceOptions(out=users("rp", "index.md"), source="embedded", dry_run=True))
    # the mark makes a folder ours: the report writes into one it marked, and again
    report = write_report([ours], tmp_path / "report")
    assert (tmp_path / "report" / OWNER).is_file() and write_report([ours], tmp_path / "report") == report
    check_owned(claim(tmp_path / "new" / "nested"))  # created and marked; an empty folder needs no mark
    check_owned(users("empty"))
    (ours / "records" / "0" / "notes.txt").write_text("x")  # inside a marked folder: ours
    check_owned(ours / "records" / "0")
    with pytest.raises(ProvenanceError, match="exists and is not a folder"):
        check_owned(tmp_path / "ours" / "summary.json")
