"""Explainers and simulators: separate, swappable steps behind two small interfaces.

    Explainer.explain(records: list[Window], seed: int) -> str
    Simulator.simulate(explanation, token_lists) -> list[list[float]]     expected activation per token (0..10)
    Simulator.detect(explanation, token_lists) -> list[float]             P(the text activates the neuron)
    Simulator.fuzz(explanation, token_lists, marks) -> list[float]        P(the marked tokens are the right ones)

Implementations: `LLMExplainer` / `LLMSimulator` on any `crate.eval.backends.LLM`, and the deterministic,
LLM-free `StatsExplainer` / `StatsSimulator` (token statistics), fast enough for CI and sweeps.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from crate.eval.activations import Window
from crate.eval.prompts import (
    DIGITS, PROMPT_VERSION, YES_NO, detection_prompt, explain_prompt, fuzzing_prompt, normalise, parse_explanation,
    simulate_pieces,
)
from crate.eval.scoring import expected_value


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
    def __init__(self, llm: Any, max_new_tokens: int = 60, temperature: float = 1.0):
        self.llm, self.max_new_tokens, self.temperature = llm, max_new_tokens, temperature
        self.identity = {"kind": "llm", **llm.identity, "max_new_tokens": max_new_tokens,
                         "temperature": temperature, "prompt_version": PROMPT_VERSION}

    def explain(self, records: Sequence[Window], seed: int = 0) -> str:
        m = max_activation(records)
        prompt = explain_prompt([(r.tokens, normalise(r.activations, m)) for r in records])
        text = self.llm.generate(prompt, max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=seed)
        return parse_explanation(text) or "(empty explanation)"


class LLMSimulator:
    def __init__(self, llm: Any):
        self.llm = llm
        self.identity = {"kind": "llm", **llm.identity, "prompt_version": PROMPT_VERSION}
        self.values = [float(v) for v in DIGITS]

    def simulate(self, explanation: str, token_lists: Sequence[Sequence[str]]) -> list[list[float]]:
        probs = self.llm.slot_probs([simulate_pieces(explanation, t) for t in token_lists], DIGITS)
        return [[expected_value(row, self.values) for row in p] for p in probs]

    def _yes(self, prompts: list[list[str]]) -> list[float]:
        probs = self.llm.slot_probs(prompts, YES_NO)
        return [float(p[0, 0] / (p[0].sum())) if p[0].sum() > 0 else 0.5 for p in probs]

    def detect(self, explanation: str, token_lists: Sequence[Sequence[str]]) -> list[float]:
        return self._yes([detection_prompt(explanation, t) for t in token_lists])

    def fuzz(self, explanation: str, token_lists: Sequence[Sequence[str]], marks: Sequence[Sequence[bool]]) -> list[float]:
        return self._yes([fuzzing_prompt(explanation, t, m) for t, m in zip(token_lists, marks)])


# ------------------------------------------------------------------------------------------------------------

STATS_PREFIX = "token statistics: "


def _key(token: str) -> str:
    return token.strip().lower()


class StatsExplainer:
    """The explanation lists the token types with the highest mean normalised activation in the records, as JSON."""

    identity = {"kind": "stats", "version": 1}

    def __init__(self, top: int = 8, min_mean: float = 1.0):
        self.top, self.min_mean = top, min_mean

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
    from crate.eval.backends import CachedLLM, make_llm

    llm = make_llm(spec, **options)
    if cache is None:
        return llm
    key = (json.dumps(llm.identity, sort_keys=True, default=str), str(cache))
    if key not in _CACHES:
        _CACHES[key] = CachedLLM(llm, cache)
    return _CACHES[key]


__all__ = ["Explainer", "Simulator", "LLMExplainer", "LLMSimulator", "StatsExplainer", "StatsSimulator",
           "make_explainer", "make_simulator", "max_activation"]
