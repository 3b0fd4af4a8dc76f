"""Inputs from outside: steering requests checked before any forward pass, and SentencePiece tokenizers
(the paper's Llama-2 and Mistral simulators) tokenising a simulator prompt exactly as one whole-prompt pass."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch

from crate import build_model, save
from crate.cli import main
from crate.eval.autointerp.prompts import DIGITS, simulate_pieces
from crate.eval.steer.clamp import SteerError, parse_prompt, steer, zero_check

PROMPT = [1, 2, 3, 4, 5]


def counting_forwards(model: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.mark.parametrize("arch", ["crate", "gpt"])
def test_steer_names_the_valid_range_before_any_forward_pass(arch: str) -> None:
    model = build_model(arch, "tiny").eval()  # 2 layers, 4 x 64 = 256 neurons, vocabulary 512
    calls = counting_forwards(model)
    bad = {
        "layer 5 does not exist: this 2-layer model has layers 0..1": dict(layer=5, neuron=0),
        "layer -1 does not exist": dict(layer=-1, neuron=0),
        "neuron 9999 does not exist: layer 1 has 256 neurons, 0..255": dict(layer=1, neuron=9999),
        "neuron 256 does not exist": dict(layer=0, neuron=256),
    }
    for message, unit in bad.items():
        with pytest.raises(SteerError, match=message):
            steer(model, PROMPT, value=1.0, **unit)
        with pytest.raises(SteerError, match=message):
            zero_check(model, PROMPT, **unit)
    for ids in ([1, 512], parse_prompt("-1, 2")):  # "-1" is an id, not text for a tokenizer
        with pytest.raises(SteerError, match=r"outside the model's vocabulary: valid ids are 0\.\.511"):
            steer(model, ids, 0, 0, 1.0)
    assert calls == []
    steer(model, PROMPT, 1, 255, 1.0)  # the last layer and neuron are valid
    assert calls


def test_steer_cli_reports_bad_requests_in_one_line(tmp_path, capsys) -> None:
    save(build_model("gpt", "tiny"), tmp_path / "ck")
    base = ["steer", "--checkpoint", str(tmp_path / "ck"), "--value", "5"]
    cases = {
        "layers 0..1": ["--layer", "5", "--neuron", "0", "--prompt", "1,2,3"],
        "256 neurons, 0..255": ["--layer", "0", "--neuron", "9999", "--prompt", "1,2,3"],
        "valid ids are 0..511": ["--layer", "0", "--neuron", "0", "--prompt", "1,600,-3"],
    }
    for message, args in cases.items():
        assert main(base + args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# SentencePiece-style tokenizers: Metaspace ("▁" before a word, and before the start of any text it is given)

SENTENCES = [
    "We're studying neurons in a neural network.",
    "Each neuron looks for one particular thing in a short text.",
    "Look at the tokens the neuron activates for and summarize what the neuron is looking for.",
    "the cat sat on the mat",
    "Explanation of neuron behavior: the main thing this neuron does is find",
]


@pytest.fixture(scope="module")
def sentencepiece_llm():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from crate.eval.llm.hf import HFLLM

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")  # Llama-2's scheme
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    # no digits, tabs or newlines in the text: they stay single-character pieces (so "10" is two tokens)
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                      unk_token="<unk>", initial_alphabet=list(string.printable))
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024)
    return HFLLM(model=LlamaForCausalLM(config), tokenizer=hf_tok, device="cpu", batch_size=2)


def test_sentencepiece_prompt_is_tokenised_once_and_slots_match_a_brute_force_forward(sentencepiece_llm):
    llm, tok = sentencepiece_llm, sentencepiece_llm.tok
    prompts = [simulate_pieces("the cat", ["the", " cat", " sat", "\n", " mat"]),
               simulate_pieces("neurons", ["Each", " neuron"]), ["", "Answer: the"]]
    got = llm.slot_probs(prompts, DIGITS)  # batches of 2, with padding
    digits = [tok.convert_tokens_to_ids(d) for d in DIGITS[:10]]
    assert tok.unk_token_id not in digits
    for pieces, p in zip(prompts, got):
        whole = tok("".join(pieces))["input_ids"]
        assert whole[0] == tok.bos_token_id
        ids, slots = llm._encode_pieces(pieces)
        assert ids == whole  # one whole-prompt pass, BOS included
        if len(pieces) > 2:  # the bug: a piece tokenised alone starts with a spurious "▁"
            alone = [i for piece in pieces for i in tok(piece, add_special_tokens=False)["input_ids"]]
            assert len(alone) > len(whole) - 1
        # each slot, independently: the last token of the prompt cut after its piece (pieces end in "\t", a piece
        # of its own, so the cut prompt tokenises as a prefix of the whole one)
        want_slots = []
        for i in range(len(pieces) - 1):
            prefix = tok("".join(pieces[: i + 1]))["input_ids"]
            assert prefix == whole[: len(prefix)]
            want_slots.append(len(prefix) - 1)
        assert slots == want_slots
        with torch.no_grad():
            probs = torch.softmax(llm.model(torch.tensor([whole])).logits[0, want_slots].double(), -1)
        np.testing.assert_allclose(p[:, :10], probs[:, digits].numpy(), rtol=1e-4, atol=1e-7)
        assert (p[:, 10] == 0).all()  # "10" is two tokens here: no probability
    assert [g.shape for g in got] == [(5, 11), (2, 11), (1, 11)]
