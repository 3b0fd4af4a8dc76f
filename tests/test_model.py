"""The models against SPEC.md: parameter counts, an independent float64 CRATE, causality, hooks, config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import crate
from crate.config import PAPER_SIZES, preset_config

# SPEC.md section 3, as the authors count them.
PAPER_COUNTS = {
    ("crate", "1L"): 6_538_112, ("crate", "2L"): 6_637_056, ("crate", "3L"): 6_736_000,
    ("crate", "S"): 59_891_712, ("crate", "B"): 81_148_416,
    ("gpt", "1L"): 6_635_904, ("gpt", "2L"): 6_832_768, ("gpt", "3L"): 7_029_632,
    ("gpt", "S"): 81_110_784, ("gpt", "B"): 123_587_328,
}


@pytest.mark.parametrize("arch,preset", sorted(PAPER_COUNTS))
def test_parameter_counts_match_the_paper(arch, preset):
    with torch.device("meta"):
        model = crate.build_model(arch, preset)
    assert model.num_params() == PAPER_COUNTS[arch, preset]
    assert set(PAPER_SIZES) == {p for _, p in PAPER_COUNTS}


Clamp = tuple[int, int, float]  # (layer, neuron, value): overwrite one neuron at every position, as steering does


def crate_forward_float64(sd: dict, idx: torch.Tensor, n_layer: int, n_head: int, eta=0.1, lmbda=0.1, steps=2,
                          clamp: Clamp | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SPEC.md section 1 written out independently, in float64, from the raw state dict: (logits, codes a2 of
    each layer)."""
    sd = {k: v.double() for k, v in sd.items()}
    B, T = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    d = x.shape[-1]
    p = d // n_head

    def ln(z, pre):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-5) * sd[pre + ".weight"] + sd[pre + ".bias"]

    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    codes = []
    for i in range(n_layer):
        pre = f"transformer.h.{i}."
        w = ln(x, pre + "prenorm_1") @ sd[pre + "attn.c_attn.weight"].T
        heads = []
        for k in range(n_head):
            wk = w[..., k * p:(k + 1) * p]
            scores = (wk @ wk.transpose(-1, -2)) / math.sqrt(p)
            scores = scores.masked_fill(~mask, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ wk)
        y = torch.cat(heads, dim=-1)
        x = x + y @ sd[pre + "attn.c_proj.weight"].T + sd[pre + "attn.c_proj.bias"]
        v = ln(x, pre + "prenorm_2")
        Dt = sd[pre + "ista.weight"]  # (h, d) = D^T
        D = Dt.T
        a = torch.zeros(B, T, Dt.shape[0], dtype=torch.float64)
        for _ in range(steps):  # a_{k+1} = relu(a_k - eta D^T (D a_k - v) - eta lambda), from a_0 = 0
            r = torch.einsum("dh,bth->btd", D, a) - v
            a = torch.relu(a - eta * torch.einsum("hd,btd->bth", Dt, r) - eta * lmbda)
        if clamp is not None and clamp[0] == i:
            a[..., clamp[1]] = clamp[2]
        codes.append(a)
        x = torch.einsum("dh,bth->btd", D, a)
    x = ln(x, "transformer.ln_f")
    return x @ sd["transformer.wte.weight"].T, codes


def gpt_forward_float64(sd: dict, idx: torch.Tensor, n_layer: int, n_head: int, activation: str = "relu",
                        clamp: Clamp | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SPEC.md section 2 from the raw state dict with torch.nn.functional, in float64: (logits, MLP hidden units
    after the activation per layer). Biases are used where the state dict has them (GPT-2), else none (the paper's)."""
    sd = {k: v.double() for k, v in sd.items()}
    B, T = idx.shape
    x = F.embedding(idx, sd["transformer.wte.weight"]) + sd["transformer.wpe.weight"][:T]
    d = x.shape[-1]
    p = d // n_head
    act = {"relu": F.relu, "gelu": lambda z: F.gelu(z, approximate="tanh"), "gelu_exact": F.gelu}[activation]

    def ln(z, pre):
        return F.layer_norm(z, (d,), sd[pre + ".weight"], sd.get(pre + ".bias"), eps=1e-5)

    def linear(z, pre):
        return F.linear(z, sd[pre + ".weight"], sd.get(pre + ".bias"))

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    neurons = []
    for i in range(n_layer):
        pre = f"transformer.h.{i}."
        qkv = linear(ln(x, pre + "ln_1"), pre + "attn.c_attn")
        q, k, v = (t.view(B, T, n_head, p).transpose(1, 2) for t in qkv.split(d, -1))
        att = F.softmax((q @ k.transpose(-1, -2) / math.sqrt(p)).masked_fill(~causal, float("-inf")), dim=-1)
        x = x + linear((att @ v).transpose(1, 2).reshape(B, T, d), pre + "attn.c_proj")
        h = act(linear(ln(x, pre + "ln_2"), pre + "mlp.c_fc"))
        if clamp is not None and clamp[0] == i:
            h[..., clamp[1]] = clamp[2]
        neurons.append(h)
        x = x + linear(h, pre + "mlp.c_proj")
    return F.linear(ln(x, "transformer.ln_f"), sd["transformer.wte.weight"]), neurons


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_crate_forward_matches_float64_spec(steps):
    model = crate.build_model("crate", "tiny", ista_steps=steps, n_layer=3).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 23))
    ref, _ = crate_forward_float64(model.state_dict(), idx, 3, model.config.n_head, steps=steps)
    out = model(idx).double()
    assert out.shape == (2, 23, model.config.vocab_size)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # The comparison is only meaningful if the codes are sparse but not empty.
    _, cache = model.run_with_cache(idx, [model.neuron_hook(0)])
    frac = (cache[model.neuron_hook(0)] > 0).float().mean().item()
    assert 0.01 < frac < 0.9


def test_init_follows_the_paper():
    model = crate.build_model("crate", "S")
    cfg = model.config
    blk = model.transformer.h[0]
    assert blk.ista.weight.shape == (cfg.n_hidden, cfg.n_embd)
    bound = math.sqrt(6 / cfg.n_embd)
    assert blk.ista.weight.abs().max() <= bound and blk.ista.weight.abs().max() > 0.95 * bound
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(blk.attn.c_proj.weight.std().item() - 0.02 / math.sqrt(2 * cfg.n_layer)) < 5e-4
    assert blk.attn.c_proj.bias.abs().max() == 0
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("arch,extra", [("crate", {}), ("crate", {"block": "alpha"}), ("gpt", {}),
                                        ("gpt", {"activation": "gelu", "bias": True})])
def test_causality(arch, extra):
    model = crate.build_model(arch, "tiny", **extra).eval()
    idx = torch.randint(0, model.config.vocab_size, (1, 30))
    base = model(idx)
    for t in (0, 11, 28):
        changed = idx.clone()
        changed[0, t + 1] = (changed[0, t + 1] + 7) % model.config.vocab_size
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4


def test_crate_alpha_has_a_residual_and_its_own_decoder():
    model = crate.build_model("crate", "tiny", block="alpha")
    blk = model.transformer.h[0]
    assert blk.decoder.weight.shape == (model.config.n_hidden, model.config.n_embd)[::-1]
    x = torch.randn(2, 5, model.config.n_embd)
    with torch.no_grad():
        blk.decoder.weight.zero_()
        mid = x + blk.attn(blk.prenorm_1(x))
        torch.testing.assert_close(blk(x), mid)  # zero decoder: the block is attention plus residual only


def test_learnable_eta_lambda_get_gradients():
    model = crate.build_model("crate", "micro", learn_eta_lambda=True)
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    model(idx).square().mean().backward()
    ista = model.transformer.h[0].ista
    assert ista.eta.grad is not None and ista.eta.grad.abs() > 0
    assert ista.lmbda.grad is not None and ista.lmbda.grad.abs() > 0


def test_hook_points_and_steering():
    model = crate.build_model("crate", "tiny").eval()
    idx = torch.randint(0, model.config.vocab_size, (1, 12))
    names = [model.neuron_hook(1), "transformer.h.1.hook_resid_post"]
    logits, cache = model.run_with_cache(idx, names)
    assert cache[names[0]].shape == (1, 12, model.config.n_hidden)
    assert cache[names[1]].shape == (1, 12, model.config.n_embd)
    # CRATE: the block output is the decoded code, D a2.
    torch.testing.assert_close(cache[names[1]], cache[names[0]] @ model.transformer.h[1].ista.weight)
    with model.steer(1, 5, 3.0):
        steered, cache2 = model.run_with_cache(idx, names)
    assert torch.all(cache2[names[0]][..., 5] == 3.0)
    assert not torch.allclose(steered, logits)
    torch.testing.assert_close(model(idx), logits)  # hooks removed on exit


@pytest.mark.parametrize("extra", [{}, {"activation": "gelu", "bias": True}, {"activation": "gelu_exact", "bias": True}])
def test_gpt_matches_float64_spec_and_its_neurons_are_the_hidden_units(extra):
    model = crate.build_model("gpt", "tiny", **extra).eval()
    if extra:  # GPT-2's biases are zero at init: make them count; pre-activations of order 1, where the two GELUs
        with torch.no_grad():  # differ by up to 5e-4 (at init they are small, where the two nearly agree)
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.1)
                if name.endswith("mlp.c_fc.weight"):
                    p.mul_(30.0)
    idx = torch.randint(0, model.config.vocab_size, (2, 19))
    hooks = [model.neuron_hook(i) for i in range(model.config.n_layer)]
    logits, cache = model.run_with_cache(idx, hooks)
    ref, neurons = gpt_forward_float64(model.state_dict(), idx, model.config.n_layer, model.config.n_head,
                                       activation=model.config.activation)
    torch.testing.assert_close(logits.double(), ref, rtol=1e-4, atol=1e-4)
    for hook, h in zip(hooks, neurons):
        torch.testing.assert_close(cache[hook].double(), h, rtol=1e-4, atol=1e-5)


def test_two_ista_steps_by_default():
    """SPEC.md section 1: two unrolled ISTA steps unless a config says otherwise, and the block runs that many."""
    assert preset_config("crate", "B").ista_steps == 2 and crate.ModelConfig().ista_steps == 2
    model = crate.build_model("crate", "micro").eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 17))
    out = model(idx).double()
    ref = {s: crate_forward_float64(model.state_dict(), idx, 1, model.config.n_head, steps=s)[0] for s in (1, 2, 3)}
    torch.testing.assert_close(out, ref[2], rtol=1e-4, atol=1e-5)
    assert (out - ref[1]).abs().max() > 1e-3 and (out - ref[3]).abs().max() > 1e-3  # the step count shows


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_embd": 100, "n_head": 3}, "not divisible by n_head"),
        ({"n_layr": 3}, r"unknown model config keys \['n_layr'\]"),
        ({"activation": "swish"}, "activation must be"),
        ({"ista_impl": "cuda"}, "ista_impl must be"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
    ],
)
def test_bad_configs_fail_clearly(kwargs, match):
    with pytest.raises(crate.ConfigError, match=match):
        preset_config("crate", "tiny", **kwargs)


def test_unknown_preset():
    with pytest.raises(crate.ConfigError, match="unknown preset 'XL'"):
        crate.build_model("gpt", "XL")


def test_out_of_vocabulary_tokens_fail_clearly():
    model = crate.build_model("gpt", "micro")
    with pytest.raises(crate.TokenOutOfRangeError, match=r"\[0, 128\).*max 128"):
        model(torch.tensor([[1, 2, 128]]))
    with pytest.raises(ValueError, match="longer than block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_cli_info_prints_the_presets(capsys):
    from crate.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for n in PAPER_COUNTS.values():
        assert f"{n:,}" in out
