"""`crate eval --tasks`: lm-evaluation-harness on our checkpoints, offline, on task YAMLs of our own.

The harness's log-likelihoods are compared with ones computed here from our model's logits."""

import json
import re
from pathlib import Path

import pytest
import torch

import crate
from crate.cli import main as cli

pytest.importorskip("lm_eval", reason="pip install -e '.[eval]' installs lm-evaluation-harness")
from crate.eval.evaluate.harness import HarnessError, run_harness  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lm_eval"
DOCS = [json.loads(line)["text"] for line in (TASKS / "crate_tiny.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from crate.tokenizer import tokenizer_identity, train_bpe

    tok = train_bpe(DOCS * 4, 300)
    model = crate.build_model("crate", "micro", vocab_size=320, block_size=128).eval()
    path = tmp_path_factory.mktemp("harness") / "ck"
    crate.save(model, path, tokenizer=tokenizer_identity(tok, "bpe"))
    (path / "tokenizer.json").write_text(tok.to_str())
    return path, model, tok


@torch.no_grad()
def our_loglikelihood(model, context, target):
    """(sum log p(target | context), whether target is the greedy continuation) from our logits."""
    logp = torch.log_softmax(model(torch.tensor([context + target]))[0].double(), -1)
    rows = logp[len(context) - 1:len(context) + len(target) - 1]
    tgt = torch.tensor(target)
    return float(rows.gather(1, tgt[:, None]).sum()), bool((rows.argmax(-1) == tgt).all())


def test_harness_loglikelihoods_equal_ours(checkpoint, tmp_path):
    path, model, tok = checkpoint
    eot = tok.token_to_id("<|endoftext|>")
    out = tmp_path / "results.json"
    res = run_harness(path, ["crate_tiny_cloze", "crate_tiny_rolling"], out, include_path=TASKS, batch_size=3,
                      device="cpu", log_samples=True, builtin=False)
    cloze = sorted(res["samples"]["crate_tiny_cloze"], key=lambda s: s["doc_id"])
    lls, greedy = [], []
    for doc, sample in zip(DOCS, cloze):
        context, word = doc.rsplit(" ", 1)
        ctx, tgt = tok.encode(context).ids, tok.encode(" " + word).ids
        assert ctx + tgt == tok.encode(doc).ids  # the split the harness makes (whole minus context) is this one
        ll, is_greedy = our_loglikelihood(model, ctx, tgt)
        got_ll, got_greedy = sample["filtered_resps"][0]
        assert got_ll == pytest.approx(ll, abs=1e-4) and got_greedy == is_greedy
        lls.append(ll), greedy.append(is_greedy)
    rolling = sorted(res["samples"]["crate_tiny_rolling"], key=lambda s: s["doc_id"])
    doc_lls = []
    for doc, sample in zip(DOCS, rolling):  # the whole document, its first token predicted from <|endoftext|>
        ll, _ = our_loglikelihood(model, [eot], tok.encode(doc).ids)
        assert sample["filtered_resps"][0] == pytest.approx(ll, abs=1e-4)
        doc_lls.append(ll)
    # the aggregates in the results JSON follow from the same numbers
    written = json.loads(out.read_text())["results"]
    ppl = torch.tensor(lls).mean().neg().exp().item()
    assert written["crate_tiny_cloze"]["perplexity,none"] == pytest.approx(ppl, rel=1e-4)
    assert written["crate_tiny_cloze"]["acc,none"] == pytest.approx(sum(greedy) / len(greedy))
    words = sum(len(re.split(r"\s+", d)) for d in DOCS)
    assert written["crate_tiny_rolling"]["word_perplexity,none"] == pytest.approx(
        torch.tensor(sum(doc_lls) / words).neg().exp().item(), rel=1e-4)


def test_results_file_has_the_fields_lm_eval_writes(checkpoint, tmp_path):
    """`lm_eval --output_path`'s file: simple_evaluate's dict without the samples, `task_hashes` (per task, the
    hash of its samples' doc, prompt and target hashes) and every GeneralConfigTracker field; samples files beside."""
    from dataclasses import fields

    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker
    from lm_eval.utils import hash_string

    path, _, _ = checkpoint
    out = tmp_path / "res" / "results.json"
    res = run_harness(path, ["crate_tiny_cloze"], out, include_path=TASKS, device="cpu", limit=4, log_samples=True,
                      builtin=False)
    full = json.loads(out.read_text())
    assert set(full) == (set(res) - {"samples"}) | {"task_hashes"} | {f.name for f in fields(GeneralConfigTracker)}
    assert (full["model_source"], full["model_name"]) == ("hf", str(path))
    assert float(full["total_evaluation_time_seconds"]) > 0
    rows = res["samples"]["crate_tiny_cloze"]
    assert full["task_hashes"] == {"crate_tiny_cloze": hash_string(
        "".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in rows))}
    [samples] = (tmp_path / "res").glob("samples_crate_tiny_cloze_*.jsonl")
    saved = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [s["doc_id"] for s in saved] == [s["doc_id"] for s in rows] and len(rows) == 4
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == sorted(["results.json", samples.name])


def test_cli_runs_the_harness_and_prints_its_table(checkpoint, tmp_path, capsys):
    path, _, _ = checkpoint
    out = tmp_path / "r.json"
    assert cli(["eval", "--checkpoint", str(path), "--tasks", "crate_tiny_cloze", "--include-path", str(TASKS),
                "--out", str(out), "--limit", "3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "|crate_tiny_cloze" in printed and "perplexity" in printed
    written = json.loads(out.read_text())
    assert written["results"]["crate_tiny_cloze"]["sample_len"] == 3 and "configs" in written


def test_unknown_tasks_and_missing_tokenizer_fail_before_loading(checkpoint, tmp_path, capsys):
    path, model, _ = checkpoint
    with pytest.raises(HarnessError, match=r"unknown lm-eval tasks \['crate_tiny_cloz'\].*crate_tiny_cloze"):
        run_harness(tmp_path / "not-even-a-checkpoint", ["crate_tiny_cloz"], include_path=TASKS, builtin=False)
    bare = crate.save(model, tmp_path / "bare")  # no tokenizer anywhere
    assert cli(["eval", "--checkpoint", str(bare), "--tasks", "crate_tiny_cloze", "--include-path", str(TASKS)]) == 2
    assert "pass --data DIR" in capsys.readouterr().err
    assert cli(["eval", "--checkpoint", str(path), "--tasks", "crate_tiny_cloze", "--log-samples"]) == 2
    assert "give --out FILE.json" in capsys.readouterr().err
