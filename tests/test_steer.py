"""Steering: on models built so that one neuron writes one token's direction, clamping it moves p(token)."""

from __future__ import annotations

import pytest
import torch

from crate import build_model, save
from crate.cli import main
from crate.eval.steer.clamp import SteerError, parse_prompt, steer, zero_check
from test_model import crate_forward_float64, gpt_forward_float64

NEURON, TOKEN = 7, 42
PROMPT = [1, 2, 3, 4, 5]


def rigged(arch: str) -> torch.nn.Module:
    """A micro model whose neuron NEURON decodes to a direction u that the tied LM head reads as token TOKEN."""
    model = build_model(arch, "micro", ista_impl="torch") if arch == "crate" else build_model(arch, "micro")
    d = model.config.n_embd
    g = torch.Generator().manual_seed(0)
    u = torch.randn(d, generator=g)
    u = u - u.mean()  # LN_f removes the mean: keep the direction it preserves
    u = u / u.norm()
    with torch.no_grad():
        blk = model.transformer.h[-1]
        if arch == "crate":
            blk.ista.weight[NEURON] = u  # x = D a2: atom NEURON is row NEURON of the stored (h, d) weight
        else:
            blk.mlp.c_proj.weight[:, NEURON] = u  # x += W_proj h: column NEURON
        model.transformer.wte.weight[TOKEN] = 2.0 * u  # tied head: logit_TOKEN = LN_f(x) . (2u)
    return model.eval()


@pytest.mark.parametrize("arch", ["crate", "gpt"])
def test_clamping_moves_the_rigged_token_in_the_expected_direction(arch: str) -> None:
    model = rigged(arch)
    layer = model.config.n_layer - 1
    up = steer(model, PROMPT, layer, NEURON, 50.0, k=5)
    assert up.p_before[TOKEN] < 0.2
    assert up.after[0][0] == TOKEN and up.p_after[TOKEN] > 0.5  # now the top next token
    assert up.delta(TOKEN) > 0.3 and up.biggest_changes(1)[0][0] == TOKEN
    down = steer(model, PROMPT, layer, NEURON, -50.0)  # the opposite direction lowers it
    assert down.p_after[TOKEN] < 0.5 * down.p_before[TOKEN]
    mild = steer(model, PROMPT, layer, NEURON, 5.0)
    assert up.p_before[TOKEN] < mild.p_after[TOKEN] < up.p_after[TOKEN]  # monotone in the value
    assert torch.allclose(up.p_before.sum(), torch.tensor(1.0)) and len(up.before) == 5


def reference(model: torch.nn.Module, idx: torch.Tensor, clamp=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The float64 forward of SPEC.md sections 1-2 from the raw weights (tests/test_model.py), optionally with one
    neuron overwritten at every position."""
    cfg, sd = model.config, model.state_dict()
    if cfg.arch == "crate":
        return crate_forward_float64(sd, idx, cfg.n_layer, cfg.n_head, steps=cfg.ista_steps, clamp=clamp)
    return gpt_forward_float64(sd, idx, cfg.n_layer, cfg.n_head, activation=cfg.activation, clamp=clamp)


@pytest.mark.parametrize("arch", ["crate", "gpt"])
def test_zero_on_an_inactive_unit_changes_nothing(arch: str, monkeypatch) -> None:
    model = build_model(arch, "micro").eval()
    idx = torch.tensor([PROMPT])
    check = zero_check(model, PROMPT, 0)
    assert check.neuron is not None and check.n_inactive > 0
    assert check.max_abs_diff == 0.0 and check.ok
    ref, neurons = reference(model, idx)
    assert (neurons[0][0, :, check.neuron] == 0).all()  # inactive in the independent forward too
    zeroed, _ = reference(model, idx, clamp=(0, check.neuron, 0.0))
    assert torch.equal(zeroed, ref)
    with model.steer(0, check.neuron, 0.0):
        torch.testing.assert_close(model(idx).double(), ref, rtol=1e-4, atol=1e-5)

    # the same clamp on an active unit changes the logits, in the reference and in the model, by the same amount
    active = int(neurons[0][0].amax(0).argmax())
    clamped, _ = reference(model, idx, clamp=(0, active, 0.0))
    assert (clamped - ref).abs().max() > 1e-3
    with model.steer(0, active, 0.0):
        torch.testing.assert_close(model(idx).double(), clamped, rtol=1e-4, atol=1e-5)
    # and the zero check catches a clamp wired to the wrong unit
    steer_unit = type(model).steer
    monkeypatch.setattr(model, "steer", lambda layer, neuron, value: steer_unit(model, layer, active, value))
    wrong = zero_check(model, PROMPT, 0)
    assert wrong.max_abs_diff > 1e-3 and not wrong.ok


def test_prompt_parsing() -> None:
    assert parse_prompt("1,2,3,4,5") == PROMPT and parse_prompt(" 1, 2 3 ") == [1, 2, 3]
    with pytest.raises(SteerError, match="tokenizer"):
        parse_prompt("to be or not")
    with pytest.raises(SteerError, match="outside the model's vocabulary"):
        steer(build_model("crate", "micro"), [1, 999], 0, 0, 1.0)


def test_cli_prints_the_table(tmp_path, capsys) -> None:
    save(rigged("gpt"), tmp_path / "ck")
    rc = main(["steer", "--checkpoint", str(tmp_path / "ck"), "--layer", "0", "--neuron", str(NEURON),
               "--value", "50", "--prompt", "1,2,3,4,5", "-k", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Top next tokens before and after steering" in out and f" {TOKEN} " in out
    assert "zero check" in out and "OK" in out


def test_a_prompt_longer_than_the_context_reports_the_tokens_used(capsys) -> None:
    from crate.eval.steer.clamp import render

    model = rigged("gpt")
    T = model.config.block_size
    ids = [(7 * i) % 100 for i in range(T + 8)]
    result = steer(model, ids, 0, NEURON, 5.0, k=3)
    assert result.prompt_ids == ids[8:] and result.n_cut == 8  # the model reads the last T tokens
    assert torch.equal(result.p_before, steer(model, ids[8:], 0, NEURON, 5.0).p_before)
    render(result)
    assert f"prompt ({T} tokens, the last of {T + 8}: 8 cut to fit the model's context)" in capsys.readouterr().out
    short = steer(model, PROMPT, 0, NEURON, 5.0)
    assert short.prompt_ids == PROMPT and short.n_cut == 0
    render(short)
    assert "prompt (5 tokens): " in capsys.readouterr().out
