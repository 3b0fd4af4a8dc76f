"""Simulators: how active an explanation predicts a neuron to be, behind one small interface.

    Simulator.simulate(explanation, token_lists) -> list[list[float]]     expected activation per token (0..10)
    Simulator.detect(explanation, token_lists) -> list[float]             P(the text activates the neuron)
    Simulator.fuzz(explanation, token_lists, marks) -> list[float]        P(the marked tokens are the right ones)
    Simulator.intruder(questions, marks) -> list[list[float]]             P(each choice is the intruder), per question

Optionally `call_many([(method, args), ...]) -> results`: many neurons' calls at once, so that an LLM backend batches
across neurons (crate.eval.autointerp.schedule's batched schedule; objects without it are called one call at a time).

Implementations: `LLMSimulator` on any `crate.eval.llm.base.LLM`, and the deterministic, LLM-free `StatsSimulator`
(it reads the token-statistics explanations of crate.eval.autointerp.explainers.StatsExplainer).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from crate.eval.autointerp.explainers import STATS_PREFIX, shared_llm, token_key
from crate.eval.autointerp.prompts import (
    DIGITS, INTRUDER_PROMPT_VERSION, PROMPT_VERSION, YES_NO, detection_prompt, fuzzing_prompt, intruder_prompt,
    simulate_pieces,
)
from crate.eval.autointerp.scoring import expected_value


class Simulator(Protocol):
    identity: dict[str, Any]

    def simulate(self, explanation: str, token_lists: Sequence[Sequence[str]]) -> list[list[float]]: ...

    def detect(self, explanation: str, token_lists: Sequence[Sequence[str]]) -> list[float]: ...

    def fuzz(self, explanation: str, token_lists: Sequence[Sequence[str]], marks: Sequence[Sequence[bool]]) -> list[float]: ...

    def intruder(self, questions: Sequence[Sequence[Sequence[str]]],
                 marks: Sequence[Sequence[Sequence[bool]]]) -> list[list[float]]: ...


class LLMSimulator:
    def __init__(self, llm: Any):
        self.llm = llm
        self.identity = {"kind": "llm", **llm.identity, "prompt_version": PROMPT_VERSION,
                         "intruder_prompt_version": INTRUDER_PROMPT_VERSION}
        self.values = [float(v) for v in DIGITS]

    def simulate(self, explanation: str, token_lists: Sequence[Sequence[str]]) -> list[list[float]]:
        return self.call_many([("simulate", (explanation, token_lists))])[0]

    def detect(self, explanation: str, token_lists: Sequence[Sequence[str]]) -> list[float]:
        return self.call_many([("detect", (explanation, token_lists))])[0]

    def fuzz(self, explanation: str, token_lists: Sequence[Sequence[str]], marks: Sequence[Sequence[bool]]) -> list[float]:
        return self.call_many([("fuzz", (explanation, token_lists, marks))])[0]

    def intruder(self, questions: Sequence[Sequence[Sequence[str]]],
                 marks: Sequence[Sequence[Sequence[bool]]]) -> list[list[float]]:
        """Per question (its records' tokens and marks), the probability of each choice's index, renormalised over
        the choices (all 0 when the LLM puts no mass on any): crate.eval.autointerp.intruder."""
        return self.call_many([("intruder", (questions, marks))])[0]

    def call_many(self, requests: Sequence[tuple[str, tuple]]) -> list[Any]:
        """Many (method, args) calls of simulate / detect / fuzz / intruder, of many neurons, in one `slot_probs` call
        (over the digits and Yes / No at once: each candidate's probability is the same whatever the others), so
        that the backend batches, and shares prefixes, across neurons and kinds of prompt."""
        prompts: list[list[str]] = []
        spans = []
        for method, args in requests:
            if method == "simulate":
                new = [simulate_pieces(args[0], t) for t in args[1]]
            elif method == "detect":
                new = [detection_prompt(args[0], t) for t in args[1]]
            elif method == "fuzz":
                new = [fuzzing_prompt(args[0], t, m) for t, m in zip(args[1], args[2])]
            elif method == "intruder":
                new = [intruder_prompt(q, m) for q, m in zip(args[0], args[1])]
            else:
                raise ValueError(f"a simulator has no method {method!r}")
            spans.append((method, args, len(prompts), len(new)))
            prompts += new
        probs = self.llm.slot_probs(prompts, DIGITS + YES_NO) if prompts else []
        out = []
        for method, args, start, n in spans:
            part = probs[start : start + n]
            if method == "simulate":
                out.append([[expected_value(row[: len(DIGITS)], self.values) for row in p] for p in part])
            elif method == "intruder":
                choices = [p[0, : len(q)] for p, q in zip(part, args[0])]  # the digits 0 .. n - 1
                out.append([(c / c.sum() if c.sum() > 0 else c).tolist() for c in choices])
            else:
                yes_no = [p[0, len(DIGITS):] for p in part]
                out.append([float(p[0] / p.sum()) if p.sum() > 0 else 0.5 for p in yes_no])
        return out


class StatsSimulator:
    """Predicts each token's listed mean (0 for others); for free-text explanations, 10 for tokens it names."""

    identity = {"kind": "stats", "version": 1}

    @staticmethod
    def table(explanation: str) -> dict[str, float]:
        if explanation.startswith(STATS_PREFIX):
            return {k: float(v) for k, v in json.loads(explanation[len(STATS_PREFIX):]).items()}
        words = re.findall(r"[\w']+|[^\w\s]", explanation.lower())
        return {w: 10.0 for w in words if len(w) > 2}

    def simulate(self, explanation: str, token_lists: Sequence[Sequence[str]]) -> list[list[float]]:
        tab = self.table(explanation)
        return [[tab.get(token_key(t), 0.0) for t in ts] for ts in token_lists]

    def detect(self, explanation: str, token_lists: Sequence[Sequence[str]]) -> list[float]:
        return [min(1.0, max(s, default=0.0) / 10) for s in self.simulate(explanation, token_lists)]

    def fuzz(self, explanation: str, token_lists: Sequence[Sequence[str]], marks: Sequence[Sequence[bool]]) -> list[float]:
        out = []
        for sims, ms in zip(self.simulate(explanation, token_lists), marks):
            marked = [s for s, m in zip(sims, ms) if m]
            out.append(float(np.mean([s > 0 for s in marked])) if marked else 0.0)
        return out

    def intruder(self, questions: Sequence[Sequence[Sequence[str]]],
                 marks: Sequence[Sequence[Sequence[bool]]]) -> list[list[float]]:
        """A deterministic, LLM-free baseline judge, not delphi's (an LLM): it names the record whose marked tokens
        share the fewest token keys with the other records' marked tokens, summed over the others (ties: the
        first), with probability 1."""
        out = []
        for records, record_marks in zip(questions, marks):
            keys = [{token_key(t) for t, m in zip(ts, ms) if m} for ts, ms in zip(records, record_marks)]
            shared = [sum(len(k & o) for j, o in enumerate(keys) if j != i) for i, k in enumerate(keys)]
            pick = shared.index(min(shared))
            out.append([float(i == pick) for i in range(len(keys))])
        return out


def ask(obj: Any, requests: Sequence[tuple[str, tuple]]) -> list[Any]:
    """The answers to (method, args) calls of one explainer or simulator: one `call_many` when it batches (an LLM's
    across every request), else one call at a time."""
    many = getattr(obj, "call_many", None)
    return many(list(requests)) if many else [getattr(obj, m)(*a) for m, a in requests]


def make_simulator(spec: str, cache: str | None = None, **llm_options: Any) -> Simulator:
    if spec == "stats":
        return StatsSimulator()
    return LLMSimulator(shared_llm(spec, cache, llm_options))


__all__ = ["Simulator", "LLMSimulator", "StatsSimulator", "ask", "make_simulator"]
