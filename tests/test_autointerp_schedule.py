"""LLM work scheduled across neurons: shared-prefix KV reuse in the in-process backend, batched scoring with the
same answers as one neuron at a time, an interrupted batched run that resumes, and many HTTP requests in flight."""

import json
import math
import os
import threading
from http.server import ThreadingHTTPServer

import numpy as np
import pytest
import torch

from crate import build_model
from crate.errors import CrateError
from crate.eval.llm.batching import prefix_groups, token_batches
from crate.eval.llm.cache import CachedLLM
from crate.eval.llm.hf import HFLLM
from crate.eval.llm.http import HTTPLLM
from crate.eval.autointerp.config import InterpretConfig
from crate.eval.autointerp.interpret import plan_interpret, run_interpret
from crate.eval.autointerp.prompts import DIGITS, detection_prompt, explain_prompt, simulate_pieces
from crate.eval.record.windows import Window
from crate.eval.autointerp.explainers import LLMExplainer, StatsExplainer
from crate.eval.autointerp.simulators import LLMSimulator, StatsSimulator
from test_llm import JSONHandler, tiny_hf  # noqa: F401 - the fixture

T = 32


# --------------------------------------------------------------------------------------------------------
# prefix groups and KV reuse


def test_prefix_groups_share_a_prefix_only_where_it_saves_tokens():
    a, b, c, d = [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 10], [1, 2, 3, 4, 5, 6, 7, 11, 12], [20, 21]
    # one group at the 7 shared tokens: 7 + 2 + 2 + 2 = 13 tokens; d shares nothing
    assert prefix_groups([a, b, c, d], [100] * 4) == [(7, [0, 1, 2]), (0, [3])]
    # two explanations (10 tokens of their own) after a 2-token preamble: one group each (2 x (12 + 3) = 30
    # tokens) beats one group at the preamble (2 + 6 x 11 = 68)
    p = [1, 2]
    g1, g2 = [p + [3] * 10 + [50 + i] for i in range(3)], [p + [4] * 10 + [60 + i] for i in range(3)]
    assert prefix_groups([g2[0], *g1, *g2[1:]], [100] * 6) == [(12, [1, 2, 3]), (12, [0, 4, 5])]
    # a prefix stops at the first slot: a's at token 1, b's at 5 (b and c then share 5 tokens)
    assert prefix_groups([a, b, c, d], [1, 5, 100, 100]) == [(5, [1, 2]), (0, [0, 3])]
    assert prefix_groups([], []) == []


def _all_runs(n):
    """Every split of rows 0..n-1 into consecutive runs."""
    if n == 0:
        yield []
        return
    for k in range(1, n + 1):
        for rest in _all_runs(n - k):
            yield [list(range(k))] + [[i + k for i in r] for r in rest]


def test_token_batches_compute_the_fewest_padded_tokens_of_any_split():
    def cost(runs, lengths, pass_cost):
        return sum(len(r) * lengths[r[-1]] + pass_cost for r in runs)

    rng = np.random.default_rng(0)
    for trial in range(60):
        lengths = sorted(int(x) for x in rng.integers(1, 60, size=int(rng.integers(1, 9))))
        max_tokens, pass_cost = int(rng.integers(40, 200)), int(rng.integers(0, 40))
        runs = token_batches(lengths, max_tokens, pass_cost)
        assert [i for r in runs for i in r] == list(range(len(lengths)))
        assert all(len(r) == 1 or len(r) * lengths[r[-1]] <= max_tokens for r in runs)
        feasible = [s for s in _all_runs(len(lengths))
                    if all(len(r) == 1 or len(r) * lengths[r[-1]] <= max_tokens for r in s)]
        assert cost(runs, lengths, pass_cost) == min(cost(s, lengths, pass_cost) for s in feasible), (lengths, runs)
    # a long tail is split off where the padding it saves is worth a pass: 4 x 10 + 1 x 100 (+ 2 passes of 20)
    # instead of 5 x 100 (+ 1 pass)
    assert token_batches([10, 10, 10, 10, 100], 1000, 20) == [[0, 1, 2, 3], [4]]
    assert token_batches([10, 10, 12], 1000, 20) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="sorted"):
        token_batches([3, 2], 100)


def _brute_force(llm, pieces):
    """Slot probabilities from one plain forward of the whole prompt (char-level tokenizer: a token per char)."""
    ids, slots = [], []
    for i, piece in enumerate(pieces):
        ids += llm.tok.encode(piece, add_special_tokens=False)
        if i < len(pieces) - 1:
            slots.append(len(ids) - 1)
    with torch.no_grad():
        return torch.softmax(llm.model(torch.tensor([ids])).logits[0, slots].double(), -1)


def test_prefix_cache_gives_the_full_forward_with_fewer_tokens(tiny_hf):  # noqa: F811
    records = [["the", " cat"], ["a", " dog", " ran"], ["x"], ["sat", " on"]]
    prompts = [simulate_pieces(e, r) for e in ("cats and dogs", "verbs") for r in records]
    prompts += [detection_prompt("cats", r) for r in records]  # another prefix, one slot at the end
    new = HFLLM(model=tiny_hf.model, tokenizer=tiny_hf.tok, device="cpu", batch_tokens=2000)
    old = HFLLM(model=tiny_hf.model, tokenizer=tiny_hf.tok, device="cpu", prefix_cache=False, batch_tokens=None,
                batch_size=1)
    got, ref = new.slot_probs(prompts, DIGITS), old.slot_probs(prompts, DIGITS)
    digit_ids = [tiny_hf.tok.convert_tokens_to_ids(d) for d in DIGITS[:10]]
    for pieces, g, r in zip(prompts, got, ref):
        probs = _brute_force(tiny_hf, pieces)
        np.testing.assert_allclose(g[:, :10], probs[:, digit_ids].numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(r[:, :10], probs[:, digit_ids].numpy(), rtol=1e-4, atol=1e-7)
    texts = ["".join(p) for p in prompts]
    # one token per character, each prompt run up to its last slot (the simulation prompts' closing
    # "unknown\n<end>\n" is never run: a causal model's predictions at the slots do not depend on it)
    assert old.tokens["prompt"] == old.tokens["padded"] == sum(len("".join(p[:-1])) for p in prompts)
    assert sum(map(len, texts)) - old.tokens["prompt"] == 8 * len("unknown\n<end>\n")
    # the 8 simulation prompts share at least the few-shot preamble (the 4 of each explanation also the
    # explanation), the 4 detection prompts their question: each is computed once, not 8 or 4 times
    preamble, question = len(os.path.commonprefix(texts[:8])), len(os.path.commonprefix(texts[8:]))
    assert preamble > 500 and question > 100
    assert new.tokens["prompt"] <= sum(map(len, texts)) - 7 * preamble - 3 * question


def test_explanations_run_their_shared_preamble_once_and_keep_their_seeds(tiny_hf):  # noqa: F811
    prompts = [explain_prompt([([" the", w, " sat"], [0, 10, 0])]) for w in (" cat", " dog", " owl")]
    new = HFLLM(model=tiny_hf.model, tokenizer=tiny_hf.tok, device="cpu")
    old = HFLLM(model=tiny_hf.model, tokenizer=tiny_hf.tok, device="cpu", prefix_cache=False)
    got = new.generate_many(prompts, [1, 2, 3], max_new_tokens=12)
    ref = old.generate_many(prompts, [1, 2, 3], max_new_tokens=12)
    shared = len(os.path.commonprefix(prompts))  # one token per character
    assert shared > 400 and old.tokens["prompt"] == sum(map(len, prompts))
    assert new.tokens["prompt"] == old.tokens["prompt"] - 2 * shared
    # the same text as each prompt alone with its seed (temperature 1: the seed decides the sample)
    assert got == ref == [old.generate(p, max_new_tokens=12, seed=s) for p, s in zip(prompts, [1, 2, 3])]
    assert len(set(got)) == 3


# --------------------------------------------------------------------------------------------------------
# batched schedule: the same answers


def _stream(n=24 * T, vocab=128):
    return np.random.default_rng(0).integers(0, vocab, size=n).astype(np.uint16)


def _cfg(**kw):
    base = dict(protocol="tar", seq_len=T, n_tokens=24 * T, batch_size=8, device="cpu", top_k=12, n_random=10,
                per_bin=2, neurons=[0, 1, 2, 5, 7, 9], n_boot=50)
    return InterpretConfig(**{**base, **kw})


def _lines(out):
    rows = [json.loads(x) for f in sorted((out / "scores" / "tar").glob("*.jsonl")) for x in f.read_text().splitlines()]
    for r in rows:  # the provenance names the folder and the schedule that ran; its key depends on neither
        r["provenance"] = r["provenance"]["key"]
    return rows


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return build_model("crate", "micro", n_layer=2), [f"w{i}" for i in range(128)]


def test_batched_schedule_is_bit_identical_with_the_stats_backend(micro, tmp_path):
    model, strings = micro
    outs = {}
    for schedule, in_flight in (("neuron", 1), ("batched", 4), ("batched", 64)):
        out = tmp_path / f"{schedule}-{in_flight}"
        run_interpret(None, None, out, _cfg(schedule=schedule, neurons_in_flight=in_flight), model=model,
                      stream=_stream(), token_strings=strings)
        outs[(schedule, in_flight)] = _lines(out)
    ref = outs[("neuron", 1)]
    assert [(r["layer"], r["neuron"]) for r in ref] == [(l, n) for l in ("0", "1") for n in (0, 1, 2, 5, 7, 9)]
    assert any(r["fuzzing"] is not None for r in ref)  # detection and fuzzing ran
    for key, rows in outs.items():
        assert json.dumps(rows) == json.dumps(ref), key  # same text: every float bit for bit, same order


class _Counting:
    """Counts each role's calls, and stops the run (as Ctrl-C would) at the `stop_at`-th simulator round."""

    def __init__(self, inner, stop_at=None):
        self.inner, self.identity, self.stop_at, self.calls = inner, inner.identity, stop_at, []

    def call_many(self, requests):
        self.calls.append([m for m, _ in requests])
        if self.stop_at is not None and len(self.calls) >= self.stop_at:
            raise KeyboardInterrupt
        return [getattr(self.inner, m)(*a) for m, a in requests]


def test_batched_run_writes_each_neuron_when_done_and_resumes(micro, tmp_path):
    model, strings = micro
    ref_dir = tmp_path / "ref"
    run_interpret(None, None, ref_dir, _cfg(schedule="neuron"), model=model, stream=_stream(), token_strings=strings)
    sim = _Counting(StatsSimulator(), stop_at=3)
    expl = _Counting(StatsExplainer())
    cfg = _cfg(neurons_in_flight=2)
    with pytest.raises(KeyboardInterrupt):
        run_interpret(None, None, tmp_path / "run", cfg, model=model, stream=_stream(), token_strings=strings,
                      explainer=expl, simulator=sim)
    # 2 neurons in flight: explain both, then simulate + detect + fuzz both (they are written), then the next 2;
    # the third simulator round is interrupted: the 4 neurons done are on disk, the 2 in flight are not
    assert expl.calls[0] == ["explain", "explain"] and sim.calls[0][:2] == ["simulate", "detect"]
    on_disk = [json.loads(x)["neuron"] for x in (tmp_path / "run" / "scores" / "tar" / "0.jsonl").read_text().splitlines()]
    assert on_disk == [0, 1, 2, 5]
    again = run_interpret(None, None, tmp_path / "run", cfg, model=model, stream=_stream(), token_strings=strings)
    assert _lines(tmp_path / "run") == _lines(ref_dir)
    assert again["scores"] == json.loads((ref_dir / "summary.json").read_text())["scores"]


def test_batched_schedule_gives_the_same_scores_with_a_tiny_llm(micro, tiny_hf, tmp_path):  # noqa: F811
    """Temperature 1 explanations keep their per-neuron seed (the same text); simulation, detection and fuzzing
    batched across neurons with the prefix cache equal one neuron at a time without it to float rounding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model, strings = micro
    torch.manual_seed(0)  # tiny_hf's tokenizer, a context long enough for the explainer's prompt
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_hf.tok), n_positions=4096, n_embd=32, n_layer=1, n_head=2))
    old = HFLLM(model=lm, tokenizer=tiny_hf.tok, device="cpu", prefix_cache=False, batch_tokens=None, batch_size=8)
    new = HFLLM(model=lm, tokenizer=tiny_hf.tok, device="cpu")
    kw = dict(model=model, stream=_stream(), token_strings=strings)
    cfg = dict(neurons=[0, 5, 9], layers=[0])
    run_interpret(None, None, tmp_path / "old", _cfg(schedule="neuron", **cfg), **kw,
                  explainer=LLMExplainer(old, max_new_tokens=6), simulator=LLMSimulator(old))
    run_interpret(None, None, tmp_path / "new", _cfg(neurons_in_flight=3, **cfg), **kw,
                  explainer=LLMExplainer(new, max_new_tokens=6), simulator=LLMSimulator(new))
    a, b = _lines(tmp_path / "old"), _lines(tmp_path / "new")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x["explanation"] == y["explanation"] and x["neuron"] == y["neuron"]
        np.testing.assert_allclose(np.concatenate(y["expected_activations"]),
                                   np.concatenate(x["expected_activations"]), rtol=1e-5, atol=1e-6)
        assert y["score"] == pytest.approx(x["score"], rel=1e-5, abs=1e-7)
        assert (x["detection"], x["fuzzing"]) == (y["detection"], y["fuzzing"])
    assert old.tokens["generated"] == new.tokens["generated"]  # the same explanations, generated once each
    assert new.tokens["prompt"] < 0.8 * old.tokens["prompt"]


def test_bad_schedule_options_fail_before_any_work(micro, tmp_path):
    model, strings = micro
    for kw, msg in (({"schedule": "fast"}, "--schedule"), ({"neurons_in_flight": 0}, "--neurons-in-flight")):
        with pytest.raises(CrateError, match=msg):
            plan_interpret(None, None, tmp_path, _cfg(**kw), model=model, stream=_stream(), token_strings=strings)
    assert not (tmp_path / "records").exists()


# --------------------------------------------------------------------------------------------------------
# HTTP: many requests in flight, across neurons


class _Server(JSONHandler):
    """Echoes prompt log-probabilities (p(7) = 1/2, p(3) = 1/4); each echo request waits at a barrier of `width`
    requests, so a client that keeps fewer in flight breaks it (and gets HTTP 500)."""

    width = 8
    barrier: threading.Barrier
    lock = threading.Lock()
    active = peak = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.peak = max(cls.peak, cls.active)
        try:
            if body.get("echo") and len(body["prompt"]) > 60:  # not the start-up check
                cls.barrier.wait()
            prompt = body["prompt"]
            tops = [None] + [{"7": math.log(0.5), "3": math.log(0.25), "x": math.log(0.25)}] * (len(prompt) - 1)
            lp = {"tokens": list(prompt), "text_offset": list(range(len(prompt))), "top_logprobs": tops}
            self._send(200, {"id": "1", "object": "text_completion", "created": 0, "model": "m",
                             "choices": [{"index": 0, "text": prompt, "finish_reason": "length", "logprobs": lp}]})
        except threading.BrokenBarrierError:
            self._send(500, {"error": "too few requests in flight"})
        finally:
            with cls.lock:
                cls.active -= 1



def test_http_keeps_the_requests_of_many_neurons_in_flight(tmp_path):
    _Server.barrier, _Server.active, _Server.peak = threading.Barrier(_Server.width, timeout=20), 0, 0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        llm = HTTPLLM(f"http://127.0.0.1:{srv.server_address[1]}/v1", "m", require_key=False, api_key_env=None,
                      concurrency=_Server.width, max_retries=0)
        sim = LLMSimulator(CachedLLM(llm, tmp_path / "c.sqlite"))
        # 4 neurons x 4 records = 16 prompts: two full waves of 8 requests, whichever neuron they belong to
        requests = [("simulate", (f"explanation {k}", [["a", "b", "c"]] * 3 + [["d"]])) for k in range(4)]
        got = sim.call_many(requests)  # with fewer in flight, a barrier times out: HTTP 500, BackendError
        assert got == [[[pytest.approx(17 / 3)] * 3] * 3 + [[pytest.approx(17 / 3)]]] * 4  # p(7) = 2/3, p(3) = 1/3
        assert _Server.peak == _Server.width  # exactly `concurrency` in flight, never more
    finally:
        srv.shutdown()



class _EchoLLM:
    identity = {"backend": "echo"}

    def generate(self, prompt, **_):
        return " the letter a."


def test_progress_note_counts_cache_hits_of_the_shared_cache_once(tmp_path):
    from types import SimpleNamespace

    from crate.eval.autointerp.schedule import cache_note

    cached = CachedLLM(_EchoLLM(), tmp_path / "c.sqlite")
    plan = SimpleNamespace(explainer=LLMExplainer(cached), simulator=LLMSimulator(cached))
    assert cache_note(plan) == ""  # no call yet
    for prompt in ("a", "b", "a"):
        cached.generate(prompt)
    assert cache_note(plan) == "cache hits 1/3"  # explainer and simulator share one cache: counted once
    assert cache_note(SimpleNamespace(explainer=StatsExplainer(), simulator=StatsSimulator())) == ""


def test_an_explanation_stops_where_its_parse_is_fixed():
    """Every prefix that `explanation_complete` calls complete parses like every continuation of it (random texts
    rich in the markers), and generation stopped there gives the explanation of the full completion."""
    import random

    from crate.eval.autointerp.prompts import explanation_complete, parse_explanation

    rng = random.Random(0)
    parts = ["a", "b", " ", ".", "\n", "<end>", "Neuron ", "Neuro", "<en", ". ", "\t"]
    n_complete = 0
    for _ in range(400):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(1, 12)))
        for k in range(len(text) + 1):
            if explanation_complete(text[:k]):
                n_complete += 1
                assert parse_explanation(text[:k]) == parse_explanation(text), (text, k)
    assert n_complete > 1000
    assert not explanation_complete("\n  cats and") and explanation_complete(" cats and\n")


def test_stopping_early_keeps_the_explanation_and_saves_tokens(tiny_hf):  # noqa: F811
    llm = HFLLM(model=tiny_hf.model, tokenizer=tiny_hf.tok, device="cpu")
    records = [Window(list("the cat sat"), [0.0, 5.0] + [0.0] * 9, 1, "top:0")]
    full, short = LLMExplainer(llm, max_new_tokens=40, stop_early=False), LLMExplainer(llm, max_new_tokens=40)
    generated = {}
    for name, expl in (("full", full), ("short", short)):
        llm.tokens["generated"] = 0
        generated[name] = ([expl.explain(records, seed=s) for s in range(12)], llm.tokens["generated"])
    assert generated["short"][0] == generated["full"][0]  # the same explanation for every seed
    assert generated["short"][1] < generated["full"][1]


# --------------------------------------------------------------------------------------------------------
# progress: the rate, elapsed time and ETA, and plain lines in logs


class _Clock:
    """A fake time.perf_counter: a microsecond per reading, plus what `advance` adds (an LLM batch's seconds)."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        self.t += 1e-6
        return self.t

    def advance(self, seconds):
        self.t += seconds


class _SlowBatches(_Counting):
    """Each batch of LLM calls takes `seconds` on the fake clock."""

    def __init__(self, inner, clock, seconds):
        super().__init__(inner)
        self.clock, self.seconds = clock, seconds

    def call_many(self, requests):
        self.clock.advance(self.seconds)
        return super().call_many(requests)


def test_scoring_rate_counts_the_burst_from_the_start(micro, tmp_path, monkeypatch, capsys):
    """Four SmolLM2 neurons, batched, complete together after 12 s of LLM calls: the bar said "4/4 660.9
    neurons/s" (its clock started when the first of them was written)."""
    import time

    model, strings = micro
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    expl = _SlowBatches(StatsExplainer(), clock, 12.0)
    run_interpret(None, None, tmp_path, _cfg(neurons=[0, 1, 2, 5], layers=[0], progress=True), model=model,
                  stream=_stream(), token_strings=strings, explainer=expl, simulator=StatsSimulator())
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("scoring tar:")]
    assert len(expl.calls) == 1 and len(expl.calls[0]) == 4  # one burst: the four explanations in one batch
    assert lines == ["scoring tar: 0/4 neurons, elapsed 0:00:00, ETA -:--:--",
                     "scoring tar: 1/4 neurons, 300 neurons/h, elapsed 0:00:12, ETA 0:00:36",
                     "scoring tar: 4/4 neurons, 1,200 neurons/h, elapsed 0:00:12, ETA 0:00:00"]


def test_progress_rate_and_eta_on_a_fake_clock(monkeypatch, capsys):
    import time

    from crate.eval.progress import Progress

    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    p = Progress(True, interval=10.0)  # stdout is captured, not a terminal: plain lines
    assert p.bar is None and p.plain
    p.begin("scoring tar", 6, 10, "neurons")  # 6 of 10 reused from disk
    clock.advance(12.0)
    for done in (7, 8, 9):  # a burst of three
        p.update("scoring tar", done, 10, "neurons", note="cache hits 0/12")
    clock.advance(4.0)
    p.update("scoring tar", 10, 10, "neurons")
    assert capsys.readouterr().out.splitlines() == [
        "scoring tar: 6/10 neurons, elapsed 0:00:00, ETA -:--:--",
        # the first of the burst: 1 in 12 s, 3 left
        "scoring tar: 7/10 neurons, 300 neurons/h, elapsed 0:00:12, ETA 0:00:36, cache hits 0/12",
        # the rest of the burst within 10 s of that line: not printed; the end always is
        "scoring tar: 10/10 neurons, 900 neurons/h, elapsed 0:00:16, ETA 0:00:00",
    ]


def test_progress_in_a_log_prints_a_line_every_interval(monkeypatch, capsys):
    """Where stdout is not a terminal, rich cut the bar's columns to 80 characters ("0:00…"): plain lines instead,
    whole, at most one per interval."""
    import time

    from crate.eval.progress import Progress

    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    p = Progress(True, interval=10.0)
    p.begin("recording pass 1/2", 0, 3_000_000, "tokens", at=clock.t - 2.0)  # the pass began 2 s before its report
    for _ in range(30):
        clock.advance(3.0)
        p.update("recording pass 1/2", 100_000 * (_ + 1), 3_000_000, "tokens")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "recording pass 1/2: 0/3,000,000 tokens, elapsed 0:00:00, ETA -:--:--"
    # 3 s a report: a line when 10 s have passed since the last one (the start counts from when the pass began)
    assert lines[1] == "recording pass 1/2: 300,000/3,000,000 tokens, 27,272.7 tokens/s, elapsed 0:00:11, ETA 0:01:39"
    assert lines[2].startswith("recording pass 1/2: 700,000/3,000,000 tokens, 30,434.8 tokens/s, elapsed 0:00:23")
    assert lines[-1] == "recording pass 1/2: 3,000,000/3,000,000 tokens, 32,608.7 tokens/s, elapsed 0:01:32, ETA 0:00:00"
    assert len(lines) == 9 and not any("…" in x for x in lines)  # the start, one per 12 s (4 reports), the end
