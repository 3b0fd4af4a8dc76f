"""Facts of the paper and of exact resumption that no other test pins: each test fails if its fact is changed.

The ISTA step count (tests/test_model.py), the protocol splits (tests/test_autointerp_scoring.py) and the 95% bootstrap
level (tests/test_autointerp_scoring.py) are pinned beside the tests of their code."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from crate.config import preset_config
from crate.eval.record.windows import Window
from crate.eval.autointerp.explainers import LLMExplainer, StatsExplainer
from crate.train.module import LMModule

TRAIN = {"lr": 6e-4, "min_lr": 6e-5, "warmup_steps": 5, "lr_decay_steps": 25, "max_steps": 40, "weight_decay": 0.1,
         "betas": (0.9, 0.95), "eps": 1e-8, "seed": 1337}


def module(arch: str, train: dict | None = None, **model: object) -> LMModule:
    return LMModule(preset_config(arch, "micro", **model).to_dict(), {**TRAIN, **(train or {})})


# --- AdamW's decay groups (SPEC.md section 1) ----------------------------------------------------------------
BLOCK = "model.transformer.h.0."
DECAYED = {
    "crate": {"model.transformer.wte.weight", "model.transformer.wpe.weight", BLOCK + "attn.c_attn.weight",
              BLOCK + "attn.c_proj.weight", BLOCK + "ista.weight"},
    "gpt": {"model.transformer.wte.weight", "model.transformer.wpe.weight", BLOCK + "attn.c_attn.weight",
            BLOCK + "attn.c_proj.weight", BLOCK + "mlp.c_fc.weight", BLOCK + "mlp.c_proj.weight"},
}
NOT_DECAYED = {
    "crate": {BLOCK + "prenorm_1.weight", BLOCK + "prenorm_1.bias", BLOCK + "attn.c_proj.bias",
              BLOCK + "prenorm_2.weight", BLOCK + "prenorm_2.bias", "model.transformer.ln_f.weight",
              "model.transformer.ln_f.bias"},
    "gpt": {BLOCK + "ln_1.weight", BLOCK + "ln_2.weight", "model.transformer.ln_f.weight"},  # the paper's: no biases
}


@pytest.mark.parametrize("arch", ["crate", "gpt"])
def test_weight_decay_on_embeddings_and_dictionary_not_on_biases_and_norms(arch: str) -> None:
    m = module(arch)
    names = {id(p): n for n, p in m.named_parameters()}  # the tied LM head is the token embedding: listed once
    opt = m.configure_optimizers()["optimizer"]
    groups = {g["weight_decay"]: [names[id(p)] for p in g["params"]] for g in opt.param_groups}
    assert set(groups) == {0.1, 0.0}
    assert sorted(groups[0.1]) == sorted(DECAYED[arch])
    assert sorted(groups[0.0]) == sorted(NOT_DECAYED[arch])


# --- the learning-rate schedule --------------------------------------------------------------------------------
# nanoGPT's get_lr by hand, for lr 6e-4, min_lr 6e-5, 5 warm-up steps, cosine until step 25: warm-up
# lr * (it + 1) / (warmup + 1) = 1e-4 * (it + 1) for it < 5; then
# min_lr + (lr - min_lr) (1 + cos(pi (it - 5) / 20)) / 2: 6e-4 at step 5, 3.3e-4 halfway (step 15); min_lr from 25 on.
HAND_LR = {0: 1e-4, 1: 2e-4, 4: 5e-4, 5: 6e-4, 15: 3.3e-4}
FLOOR_STEPS = (25, 26, 30, 39)


def lrs_by_step(n: int) -> list[float]:
    """The learning rate each optimizer step 0..n-1 uses: the scheduler as Lightning steps it (once per step)."""
    cfg = module("gpt").configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert cfg["lr_scheduler"]["interval"] == "step" and cfg["lr_scheduler"]["frequency"] == 1
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        assert all(g["lr"] == out[-1] for g in opt.param_groups)
        opt.step()
        sched.step()
    return out


def test_warmup_starts_at_lr_over_warmup_plus_one() -> None:
    lr = lrs_by_step(16)
    for step, want in HAND_LR.items():
        assert lr[step] == pytest.approx(want, rel=1e-12), step


def test_cosine_ends_on_min_lr_and_stays_there() -> None:
    lr = lrs_by_step(40)
    assert lr[24] > 6e-5 * (1 + 1e-6)  # still decaying one step before
    for step in FLOOR_STEPS:
        assert lr[step] == pytest.approx(6e-5, rel=1e-12), step


# --- dropout re-seeded for exact resumption (train/module.py, on_train_batch_start) --------------------------
def dropout_outputs(m: LMModule, step: int, rank: int, accumulation: int = 2) -> list[torch.Tensor]:
    """The training-mode logits of each micro-batch of one optimizer step on one rank, on the same input, so that
    they differ exactly when the dropout masks do. The global RNG is scrambled first: only the re-seeding counts."""
    torch.manual_seed(987654321 + 17 * step + rank)
    m._trainer = SimpleNamespace(global_step=step, global_rank=rank)  # what Lightning's Trainer exposes
    m.accumulation = accumulation
    m.train()
    x = torch.arange(12).view(1, 12) % m.config.vocab_size
    out = []
    for micro in range(accumulation):
        m.on_train_batch_start((x, x), step * accumulation + micro)
        with torch.no_grad():
            out.append(m.model(x))
    return out


def test_dropout_masks_depend_on_seed_step_rank_and_micro_batch_only() -> None:
    m = module("gpt", dropout=0.5)
    (a0, a1), (b0, b1) = dropout_outputs(m, 3, 0), dropout_outputs(m, 3, 0)
    assert torch.equal(a0, b0) and torch.equal(a1, b1)  # the same (seed, step, rank, micro-batch): the same mask
    assert not torch.equal(a0, a1)  # two micro-batches of one step
    r0, r1 = dropout_outputs(m, 3, 1)
    assert not torch.equal(a0, r0) and not torch.equal(a1, r1)  # two ranks
    s0, _ = dropout_outputs(m, 4, 0)
    assert not torch.equal(a0, s0)  # two steps
    other = module("gpt", {"seed": 1338}, dropout=0.5)
    other.load_state_dict(m.state_dict())
    o0, _ = dropout_outputs(other, 3, 0)
    assert not torch.equal(a0, o0)  # two seeds
    m.eval()
    with torch.no_grad():
        x = torch.arange(12).view(1, 12) % m.config.vocab_size
        assert not torch.equal(m.model(x), a0)  # dropout was on: the masks are what differs


# --- the explainer's normalisation (SPEC.md section 6) ----------------------------------------------------------
class _PromptLLM:
    identity = {"backend": "records the prompt"}

    def generate(self, prompt: str, **_: object) -> str:
        self.prompt = prompt
        return " the letter a."


# max_a over the records shown is 2.0: record 2 becomes [2, 1]; normalised per record it would be [10, 5]
RECORDS = [Window(["a", "b"], [2.0, 1.0], 0, "top:0"), Window(["c", "d"], [0.5, 0.25], 0, "top:2")]


def test_llm_explainer_normalises_over_the_records_shown_not_per_record() -> None:
    llm = _PromptLLM()
    assert LLMExplainer(llm).explain(RECORDS) == "the letter a"
    neuron = llm.prompt[llm.prompt.index("Neuron 3"):]
    assert neuron.count("Activations:\n<start>\n") == 2
    assert "<start>\na\t10\nb\t5\n<end>\n" in neuron and "<start>\nc\t2\nd\t1\n<end>\n" in neuron
    assert "c\t10" not in neuron


def test_stats_explainer_normalises_over_the_records_shown_not_per_record() -> None:
    assert StatsExplainer().explain(RECORDS) == 'token statistics: {"a": 10.0, "b": 5.0, "c": 2.0, "d": 1.0}'
