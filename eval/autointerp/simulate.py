"""Explainers and simulators: separate, swappable steps behind two small interfaces.

    Explainer.explain(records: list[Window], seed: int) -> str
    Simulator.simulate(explanation, token_lists) -> list[list[float]]     expected activation per token (0..10)
    Simulator.detect(explanation, token_lists) -> list[float]             P(the text activates the neuron)
    Simulator.fuzz(explanation, token_lists, marks) -> list[float]        P(the marked tokens are the right ones)

Optionally `call_many([(method, args), ...]) -> results`: many neurons' calls at once, so that an LLM backend batches
across neurons (crate.eval.autointerp.interpret's batched schedule; objects without it are called one call at a time).

Implementations: `LLMExplainer` / `LLMSimulator` on any `crate.eval.llm.backends.LLM`, and the deterministic,
LLM-free `StatsExplainer` / `StatsSimulator` (token statistics), fast enough for CI and sweeps.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from crate.eval.record.recorder import Window
from crate.eval.autointerp.prompts import (
    DIGITS, PROMPT_VERSION, YES_NO, detection_prompt, explain_prompt, explanation_complete, fuzzing_prompt, normalise,
    parse_explanation, simulate_pieces,
)
from crate.eval.autointerp.scoring import expected_value


class Explainer(Protocol):
    identity: dict[str, Any]

    def explain(self, records: Sequence[Window], seed: int = 0) -> str: ...


class Simulator(Protocol):
    identity: dict[str, Any]

    def simulate(self, explanation: str, token_lists: Sequence[Sequence[str]]) -> list[list[float]]: ...

    def detect(self, explanation: str, token_lists: Sequence[Sequence[str]]) -> list[float]: ...

    def fuzz(self, explanation: str, token_lists: Sequence[Sequence[str]], marks: Sequence[Sequence[bool]]) -> list[float]: ...


def max_activation(records: Sequence[Window]) -> float:
    return max((a for r in records for a in r.activations), default=0.0)


# ------------------------------------------------------------------------------------------------------------


class LLMExplainer:
    """`stop_early`: stop generating once the explanation (the completion's first sentence) is complete; the
    explanation is the same as without (in-process; a server generates the whole completion anyway)."""

    def __init__(self, llm: Any, max_new_tokens: int = 60, temperature: float = 1.0, stop_early: bool = True):
        self.llm, self.max_new_tokens, self.temperature = llm, max_new_tokens, temperature
        self.stop_early = stop_early
        self.identity = {"kind": "llm", **llm.identity, "max_new_tokens": max_new_tokens,
                         "temperature": temperature, "prompt_version": PROMPT_VERSION}

    def explain(self, records: Sequence[Window], seed: int = 0) -> str:
        return self.call_many([("explain", (records, seed))])[0]

    def call_many(self, requests: Sequence[tuple[str, tuple]]) -> list[str]:
        """Many neurons' `explain(records, seed)` calls at once (each keeps its seed): see `generate_many`."""
        from crate.eval.llm.backends import generate_many

        prompts = [_explain_prompt(records) for _, (records, _seed) in requests]
        texts = generate_many(self.llm, prompts, [seed for _, (_r, seed) in requests],
                              max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              until=explanation_complete if self.stop_early else None)
        return [parse_explanation(t) or "(empty explanation)" for t in texts]


def _explain_prompt(records: Sequence[Window]) -> str:
    m = max_activation(records)
    return explain_prompt([(r.tokens, normalise(r.activations, m)) for r in records])


class LLMSimulator:
    def __init__(self, llm: Any):
        self.llm = llm
        self.identity = {"kind": "llm", **llm.identity, "prompt_version": PROMPT_VERSION}
        self.values = [float(v) for v in DIGITS]

    def simulate(self, explanation: str, token_lists: Sequence[Sequence[str]]) -> list[list[float]]:
        return self.call_many([("simulate", (explanation, token_lists))])[0]

    def detect(self, explanation: str, token_lists: Sequence[Sequence[str]]) -> list[float]:
        return self.call_many([("detect", (explanation, token_lists))])[0]

    def fuzz(self, explanation: str, token_lists: Sequence[Sequence[str]], marks: Sequence[Sequence[bool]]) -> list[float]:
        return self.call_many([("fuzz", (explanation, token_lists, marks))])[0]

    def call_many(self, requests: Sequence[tuple[str, tuple]]) -> list[Any]:
        """Many (method, args) calls of simulate / detect / fuzz, of many neurons, in one `slot_probs` call (over
        the digits and Yes / No at once: each candidate's probability is the same whatever the others), so that
        the backend batches, and shares prefixes, across neurons and kinds of prompt."""
        prompts: list[list[str]] = []
        spans = []
        for method, args in requests:
            if method == "simulate":
                new = [simulate_pieces(args[0], t) for t in args[1]]
            elif method == "detect":
                new = [detection_prompt(args[0], t) for t in args[1]]
            elif method == "fuzz":
                new = [fuzzing_prompt(args[0], t, m) for t, m in zip(args[1], args[2])]
            else:
                raise ValueError(f"a simulator has no method {method!r}")
            spans.append((method, len(prompts), len(new)))
            prompts += new
        probs = self.llm.slot_probs(prompts, DIGITS + YES_NO) if prompts else []
        out = []
        for method, start, n in spans:
            part = probs[start : start + n]
            if method == "simulate":
                out.append([[expected_value(row[: len(DIGITS)], self.values) for row in p] for p in part])
            else:
                yes_no = [p[0, len(DIGITS):] for p in part]
                out.append([float(p[0] / p.sum()) if p.sum() > 0 else 0.5 for p in yes_no])
        return out


# ------------------------------------------------------------------------------------------------------------

STATS_PREFIX = "token statistics: "


def _key(token: str) -> str:
    return token.strip().lower()


class StatsExplainer:
    """The explanation lists the token types with the highest mean normalised activation in the records, as JSON."""

    def __init__(self, top: int = 8, min_mean: float = 1.0):
        self.top, self.min_mean = top, min_mean
        self.identity = {"kind": "stats", "version": 1, "top": top, "min_mean": min_mean}

    def explain(self, records: Sequence[Window], seed: int = 0) -> str:
        m = max_activation(records)
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for r in records:
            for t, v in zip(r.tokens, normalise(r.activations, m)):
                sums[_key(t)] += v
                counts[_key(t)] += 1
        means = {k: sums[k] / counts[k] for k in sums}
        best = sorted((k for k in means if means[k] >= self.min_mean), key=lambda k: (-means[k], -counts[k], k))
        return STATS_PREFIX + json.dumps({k: round(means[k], 2) for k in best[: self.top]}, ensure_ascii=False)


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
        return [[tab.get(_key(t), 0.0) for t in ts] for ts in token_lists]

    def detect(self, explanation: str, token_lists: Sequence[Sequence[str]]) -> list[float]:
        return [min(1.0, max(s, default=0.0) / 10) for s in self.simulate(explanation, token_lists)]

    def fuzz(self, explanation: str, token_lists: Sequence[Sequence[str]], marks: Sequence[Sequence[bool]]) -> list[float]:
        out = []
        for sims, ms in zip(self.simulate(explanation, token_lists), marks):
            marked = [s for s, m in zip(sims, ms) if m]
            out.append(float(np.mean([s > 0 for s in marked])) if marked else 0.0)
        return out


def make_explainer(spec: str, cache: str | None = None, **llm_options: Any) -> Explainer:
    if spec == "stats":
        return StatsExplainer()
    return LLMExplainer(_llm(spec, cache, llm_options))


def make_simulator(spec: str, cache: str | None = None, **llm_options: Any) -> Simulator:
    if spec == "stats":
        return StatsSimulator()
    return LLMSimulator(_llm(spec, cache, llm_options))


_CACHES: dict[tuple[str, str], Any] = {}


def _llm(spec: str, cache: str | None, options: dict[str, Any]) -> Any:
    from crate.eval.llm.backends import CachedLLM, make_llm

    llm = make_llm(spec, **options)
    if cache is None:
        return llm
    key = (json.dumps(llm.identity, sort_keys=True, default=str), str(cache))
    if key not in _CACHES:
        _CACHES[key] = CachedLLM(llm, cache)
    return _CACHES[key]


__all__ = ["Explainer", "Simulator", "LLMExplainer", "LLMSimulator", "StatsExplainer", "StatsSimulator",
           "make_explainer", "make_simulator", "max_activation"]
