"""Explainers: a neuron's explanation from its explanation records, behind one small interface.

    Explainer.explain(records: list[Window], seed: int) -> str

Optionally `call_many([("explain", (records, seed)), ...]) -> explanations`: many neurons' calls at once, so that
an LLM backend batches across neurons (crate.eval.autointerp.schedule's batched schedule; objects without it are
called one call at a time).

Implementations: `LLMExplainer` on any `crate.eval.llm.base.LLM`, and the deterministic, LLM-free
`StatsExplainer` (token statistics), fast enough for CI and sweeps. Also what the simulators share with them:
the token-statistics explanation's format (`STATS_PREFIX`, `token_key`) and the process-wide LLM of a spec and
cache (`shared_llm`, so that an explainer and a simulator of the same LLM load it once).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

from crate.eval.autointerp.prompts import (
    PROMPT_VERSION, explain_prompt, explanation_complete, normalise, parse_explanation,
)
from crate.eval.record.windows import Window


class Explainer(Protocol):
    identity: dict[str, Any]

    def explain(self, records: Sequence[Window], seed: int = 0) -> str: ...


def max_activation(records: Sequence[Window]) -> float:
    """The largest activation of the records (0 for none): what activations are normalised by (0..10)."""
    return max((a for r in records for a in r.activations), default=0.0)


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
        from crate.eval.llm.base import generate_many

        prompts = [_explain_prompt(records) for _, (records, _seed) in requests]
        texts = generate_many(self.llm, prompts, [seed for _, (_r, seed) in requests],
                              max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              until=explanation_complete if self.stop_early else None)
        return [parse_explanation(t) or "(empty explanation)" for t in texts]


def _explain_prompt(records: Sequence[Window]) -> str:
    m = max_activation(records)
    return explain_prompt([(r.tokens, normalise(r.activations, m)) for r in records])


STATS_PREFIX = "token statistics: "


def token_key(token: str) -> str:
    """A token as the token-statistics explanation names it (stripped, lower case)."""
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
                sums[token_key(t)] += v
                counts[token_key(t)] += 1
        means = {k: sums[k] / counts[k] for k in sums}
        best = sorted((k for k in means if means[k] >= self.min_mean), key=lambda k: (-means[k], -counts[k], k))
        return STATS_PREFIX + json.dumps({k: round(means[k], 2) for k in best[: self.top]}, ensure_ascii=False)


def make_explainer(spec: str, cache: str | None = None, **llm_options: Any) -> Explainer:
    if spec == "stats":
        return StatsExplainer()
    return LLMExplainer(shared_llm(spec, cache, llm_options))


_CACHES: dict[tuple[str, str], Any] = {}


def shared_llm(spec: str, cache: str | None, options: dict[str, Any]) -> Any:
    """The LLM of `spec`; with `cache`, wrapped in that disk cache, one wrapper per (LLM identity, cache) in the
    process, so that an explainer and a simulator of the same LLM share it (and its hit counts)."""
    from crate.eval.llm.cache import CachedLLM
    from crate.eval.llm.registry import make_llm

    llm = make_llm(spec, **options)
    if cache is None:
        return llm
    key = (json.dumps(llm.identity, sort_keys=True, default=str), str(cache))
    if key not in _CACHES:
        _CACHES[key] = CachedLLM(llm, cache)
    return _CACHES[key]


__all__ = ["Explainer", "LLMExplainer", "StatsExplainer", "make_explainer", "max_activation", "STATS_PREFIX",
           "token_key", "shared_llm"]
