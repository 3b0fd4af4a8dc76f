"""Prompt formats for explaining, simulating and judging (written by us; PROMPT_VERSION names them).

A prompt for reading probabilities is a list of text pieces: the LLM's next-token distribution is read at
the end of every piece but the last (a "slot"). The simulator's prompt puts one slot after each token of a
record ("<token>\\t" then the slot), with the placeholder "unknown" after it, so one forward pass gives the
distribution over "0".."10" at every token (OpenAI's "all at once").

Every prompt puts what one explanation's prompts share first (the few-shot preamble, the explanation, the
question) and the record last, so that a backend computes that prefix once for all of them (crate.eval.llm.hf
`HFLLM.slot_probs`; vLLM's automatic prefix caching).
"""

from __future__ import annotations

from collections.abc import Sequence

PROMPT_VERSION = "crate-interp-prompts-v2"  # v2: detection and fuzzing ask before the text
DIGITS = [str(v) for v in range(11)]
YES_NO = [" Yes", " No"]

_HEADER_EXPLAIN = (
    "We're studying neurons in a neural network. Each neuron looks for one particular thing in a short text. "
    "Look at the tokens the neuron activates for and summarize in a short phrase what the neuron is looking for. "
    "Activations are integers from 0 to 10; most are 0.\n\n"
)
_HEADER_SIMULATE = (
    "We're studying neurons in a neural network. Each neuron looks for one particular thing in a short text. "
    "Given an explanation of what a neuron looks for, predict its activation on each token: an integer from "
    "0 to 10, where most tokens are 0.\n\n"
)
# Two worked examples of different kinds, so that the LLM learns the format rather than one answer.
_EXAMPLES = [
    (["Let", " f", "(", "x", ")", " =", " (", "a", " +", " b", ")", " *", " x"],
     [0, 0, 0, 0, 10, 0, 0, 0, 0, 1, 9, 0, 0], "closing parentheses in formulas"),
    (["It", " rained", " all", " night", ",", " then", " the", " snow", " and", " wind", " came", "."],
     [0, 10, 0, 0, 0, 0, 0, 9, 0, 8, 0, 0], "words about the weather"),
]
_EXAMPLE_TOKENS, _EXAMPLE_ACTS, _EXAMPLE_EXPLANATION = _EXAMPLES[0]
_INTRO = "Explanation of neuron {name} behavior: the main thing this neuron does is find"


def show_token(token: str) -> str:
    """A token as one prompt cell: newlines and tabs escaped so that the line format survives."""
    return token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def normalise(activations: Sequence[float], max_activation: float) -> list[int]:
    """SPEC.md section 6: min(10, floor(10 * relu(a) / max_a)); all zeros when max_a <= 0."""
    if not max_activation > 0:
        return [0 for _ in activations]
    return [min(10, int(10 * max(0.0, float(a)) / max_activation)) for a in activations]


def _table(tokens: Sequence[str], values: Sequence[int]) -> str:
    lines = "".join(f"{show_token(t)}\t{v}\n" for t, v in zip(tokens, values))
    return f"Activations:\n<start>\n{lines}<end>\n"


def explain_prompt(records: Sequence[tuple[Sequence[str], Sequence[int]]]) -> str:
    """The explainer's prompt: two worked examples, then the neuron's records as (token, 0..10) tables."""
    p = _HEADER_EXPLAIN
    for i, (tokens_, acts_, expl_) in enumerate(_EXAMPLES, start=1):
        p += f"Neuron {i}\n" + _table(tokens_, acts_) + f"{_INTRO.format(name=i)} {expl_}.\n\n"
    name = len(_EXAMPLES) + 1
    p += f"Neuron {name}\n"
    for tokens, values in records:
        p += _table(tokens, values)
        nz = [(t, v) for t, v in zip(tokens, values) if v > 0]
        if nz:
            p += "Same activations, but with all zeros filtered out:\n<start>\n"
            p += "".join(f"{show_token(t)}\t{v}\n" for t, v in nz) + "<end>\n"
        p += "\n"
    return p + _INTRO.format(name=name)


def parse_explanation(completion: str) -> str:
    """The first sentence of the completion, without the trailing period."""
    text = completion.strip().split("\n")[0].strip()
    for stop in _STOPS:
        if stop in text:
            text = text.split(stop)[0]
    return text.strip().rstrip(".").strip()


_STOPS = (". ", "<end>", "Neuron ")


def explanation_complete(completion: str) -> bool:
    """Whether `parse_explanation` of anything that continues `completion` is already fixed: its first line (after
    leading blanks) has ended, or holds one of the markers the explanation is cut at with more than blanks after
    it (a line's trailing blanks are stripped before the markers are looked for). Generation can stop there."""
    text = completion.lstrip()
    if "\n" in text:
        return True
    for stop in _STOPS:
        j = text.find(stop)
        if j >= 0 and text[j + len(stop):].strip():
            return True
    return False


def simulate_pieces(explanation: str, tokens: Sequence[str]) -> list[str]:
    """Pieces for one record: a slot after "<token>\\t" for each token (len(tokens) slots)."""
    head = _HEADER_SIMULATE + "Neuron 1\n" + f"{_INTRO.format(name=1)} {_EXAMPLE_EXPLANATION}.\n"
    head += _table(_EXAMPLE_TOKENS, _EXAMPLE_ACTS) + "\nNeuron 2\n"
    head += f"{_INTRO.format(name=2)} {explanation.strip()}.\nActivations:\n<start>\n"
    if not tokens:
        return [head]
    pieces = [head + show_token(tokens[0]) + "\t"]
    for t in tokens[1:]:
        pieces.append("unknown\n" + show_token(t) + "\t")
    pieces.append("unknown\n<end>\n")
    return pieces


def detection_prompt(explanation: str, tokens: Sequence[str]) -> list[str]:
    """Does this text contain what the explanation describes? One slot where " Yes" or " No" comes. The question
    comes before the text, so that one explanation's prompts share everything up to the text (prefix caching)."""
    text = "".join(tokens).replace("\n", " ")
    return [
        "A neuron in a language model fires on: " + explanation.strip() + ".\n"
        "Does the neuron fire somewhere in the text below? Answer Yes or No.\n"
        f"Text: \"{text}\"\nAnswer:",
        "",
    ]


def fuzzing_prompt(explanation: str, tokens: Sequence[str], marked: Sequence[bool]) -> list[str]:
    """Are the <<marked>> tokens the ones the explanation describes? One slot for " Yes" / " No"; the question
    before the text, as in `detection_prompt`."""
    text = "".join(f"<<{t}>>" if m else t for t, m in zip(tokens, marked)).replace("\n", " ")
    return [
        "A neuron in a language model fires on: " + explanation.strip() + ".\n"
        "Are the tokens marked <<like this>> in the text below the ones this neuron fires on? Answer Yes or No.\n"
        f"Text: \"{text}\"\nAnswer:",
        "",
    ]


INTRUDER_PROMPT_VERSION = "crate-intruder-prompt-v1"
# delphi's intruder prompt (delphi/scorers/classifier/prompts/intruder_prompt.py: its system prompt and its three worked
# questions, the GPT-2 byte artefacts of their texts undone), as one completion prompt. The answer is "#<digit>": the
# digit then follows a non-space character, a token of its own (Llama's and SmolLM2's tokenizers split digits).
_HEADER_INTRUDER = (
    'You are an intelligent and meticulous linguistics researcher doing an "intruder detection" task.\n\n'
    'You will then be given several text examples, either full sentences or words. Your task is to determine which '
    'examples should be classified as "intruder".\nSome sentences will have words highlighted with <<>> tags. '
    "Do not overthink.\n\nThere is only ever one intruder in the examples.\n\n"
    "You should write [RESPONSE]: # followed by the index of the intruder.\n\n"
)
_INTRUDER_EXAMPLES = [
    (["Getty Images  Patriots tight end Rob Gronkowski had his boss'",
      " Media Day 2015  LSU defensive end Isaiah Washington (94) speaks to the",
      " shown, is generally not eligible for ads. For example, videos about recent tragedies,",
      " line, with the left side - namely tackle Byron Bell at tackle and guard Amini"], 2),
    ([' enact an individual health insurance mandate?", Pelosi\'s response was to dismiss both',
      " climate, Tomblin's Chief of Staff Charlie Lorensen said.",
      " no wonderworking relics, no true Body and Blood of Christ, no true Baptism",
      "  It has been devised by Director of Public Prosecutions (DPP)",
      " and fair investigation not even include the Director of Athletics? Finally, we believe the"], 0),
    ([" Climbing", " running", " swim", " eating", " cycling"], 3),
]


def highlight(tokens: Sequence[str], marks: Sequence[bool]) -> str:
    """The text with each run of marked tokens in one pair of <<>> (delphi's `_highlight`), newlines as spaces."""
    out, inside = [], False
    for t, m in zip(tokens, marks):
        if m != inside:
            out.append("<<" if m else ">>")
            inside = m
        out.append(t)
    return ("".join(out) + (">>" if inside else "")).replace("\n", " ")


def _intruder_question(texts: Sequence[str]) -> str:
    return "Examples:\n\n" + "".join(f"Example #{i}: {t.strip()}\n" for i, t in enumerate(texts)) + "\n[RESPONSE]: #"


def intruder_prompt(token_lists: Sequence[Sequence[str]], marks: Sequence[Sequence[bool]]) -> list[str]:
    """Which record is the intruder? No explanation: the header, delphi's worked questions, then the records
    (marked, numbered from 0); one slot, where the intruder's index (a digit) comes."""
    p = _HEADER_INTRUDER + "".join(f"{_intruder_question(texts)}{answer}\n\n" for texts, answer in _INTRUDER_EXAMPLES)
    return [p + _intruder_question([highlight(t, m) for t, m in zip(token_lists, marks)]), ""]


__all__ = [
    "PROMPT_VERSION", "DIGITS", "YES_NO", "normalise", "explain_prompt", "parse_explanation", "explanation_complete",
    "simulate_pieces", "detection_prompt", "fuzzing_prompt", "show_token", "INTRUDER_PROMPT_VERSION", "highlight",
    "intruder_prompt",
]
