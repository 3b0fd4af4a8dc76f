"""One neuron's scoring, step by step: explain on its explanation records, then simulate, detect, fuzz and ask for
the intruder (crate.eval.autointerp.intruder: no explanation) on its scoring records, and score. Written as a
generator of LLM requests so that whoever drives it (one neuron at a time, or many at once:
crate.eval.autointerp.schedule) decides how calls are batched."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Generator
from typing import Any

from crate.eval.autointerp.explainers import Explainer, max_activation
from crate.eval.autointerp.intruder import N_CHOICES, Question, intruder_accuracy, intruder_questions
from crate.eval.autointerp.protocols import Protocol
from crate.eval.autointerp.scoring import active_tokens, judge_accuracy, score_simulation
from crate.eval.autointerp.simulators import Simulator


def neuron_seed(seed: int, layer: str, neuron: int) -> int:
    """The seed of one neuron's explanation and fuzzing marks: the same whatever the order neurons are scored in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{layer}:{neuron}".encode()).digest()[:4], "little")


Request = tuple[str, str, tuple]  # (role: "explainer" | "simulator", method, args)


def score_neuron(windows: dict[str, Any], protocol: Protocol, explainer: Explainer, simulator: Simulator,
                 seed: int = 0, extra_scores: bool = True) -> dict[str, Any]:
    """Explain, simulate and score one neuron from its windows (see `neuron_windows`)."""
    roles = {"explainer": explainer, "simulator": simulator}
    steps = neuron_steps(windows, protocol, seed, extra_scores)
    try:
        requests = next(steps)
        while True:
            requests = steps.send([getattr(roles[role], method)(*args) for role, method, args in requests])
    except StopIteration as done:
        return done.value


def fuzzing_request(explanation: str, tokens: list[list[str]], active: list[list[bool]],
                    seed: int) -> tuple[list[Request], list[bool]]:
    """The fuzzing request and its labels: every activating record with its active tokens (`active`, per token of
    each record: scoring.active_tokens) marked (right ones), then those with inactive tokens marked instead (wrong
    ones); nothing when no record activates."""
    act = [i for i, a in enumerate(active) if any(a)]
    if not act:
        return [], []
    rng = random.Random(seed)
    marks_true = [list(active[i]) for i in act]
    # the wrong marks fall on as many inactive tokens (as delphi draws them): marks that could land on active
    # tokens would be, in part or wholly, right ones labelled wrong; a record with no inactive token has none
    marks_false, wrong_of = [], []
    for i, mk in zip(act, marks_true):
        quiet = [j for j, on in enumerate(mk) if not on]
        if quiet:
            wrong = set(rng.sample(quiet, k=min(sum(mk), len(quiet))))
            marks_false.append([j in wrong for j in range(len(mk))])
            wrong_of.append(i)
    request = ("simulator", "fuzz", (explanation, [tokens[i] for i in act + wrong_of], marks_true + marks_false))
    return [request], [True] * len(act) + [False] * len(wrong_of)


def neuron_steps(windows: dict[str, Any], protocol: Protocol, seed: int = 0,
                 extra_scores: bool = True) -> Generator[list[Request], list[Any], dict[str, Any]]:
    """`score_neuron` as a generator: it yields the LLM calls it needs next (the explanation, then simulation,
    detection, fuzzing and the intruder questions together), receives their results, and returns the JSONL line's
    fields. Whoever drives it decides how calls are batched: one neuron at a time (`score_neuron`) or many at once
    (`score_many`)."""
    explain_recs, score_recs = protocol.split(windows)
    m = max_activation(explain_recs)
    if not explain_recs or not m > 0:
        explanation = "(no activating records: the neuron is dead on this data)"
    else:
        (explanation,) = yield [("explainer", "explain", (explain_recs, seed))]
    tokens = [r.tokens for r in score_recs]
    true = [r.activations for r in score_recs]
    requests: list[Request] = [("simulator", "simulate", (explanation, tokens))] if score_recs else []
    labels: list[bool] = []
    fuzz_labels: list[bool] = []
    questions: list[Question] = []
    if extra_scores and score_recs and m > 0:
        active = active_tokens(true, m)
        labels = [any(a) for a in active]
        requests.append(("simulator", "detect", (explanation, tokens)))
        fuzz, fuzz_labels = fuzzing_request(explanation, tokens, active, seed)
        requests += fuzz
        questions = intruder_questions(score_recs, labels, seed)
        if questions:
            requests.append(("simulator", "intruder", ([[r.tokens for r in q.records] for q in questions],
                                                       [q.marks for q in questions])))
    results = (yield requests) if requests else []
    expected = results[0] if score_recs else []
    out: dict[str, Any] = {
        "explanation": explanation,
        "explanation_records": [r.id for r in explain_recs],
        "record_ids": [r.id for r in score_recs],
        "tokens": tokens,
        "true_activations": true,
        "expected_activations": expected,
        "max_activation": m,
    }
    out.update(score_simulation(true, expected, m, out["record_ids"]))
    out["detection"] = out["fuzzing"] = None
    if labels:
        out["detection"] = judge_accuracy(labels, results[1])
    if fuzz_labels:
        out["fuzzing"] = judge_accuracy(fuzz_labels, results[2])
    out["intruder"] = out["intruder_chance"] = None
    if extra_scores:  # NaN without questions: fewer than N_CHOICES - 1 activating records or no inactive random one
        out["intruder"] = intruder_accuracy([q.intruder for q in questions], results[-1] if questions else [])
        out["intruder_chance"] = 1 / N_CHOICES
    return out


__all__ = ["Request", "neuron_seed", "score_neuron", "neuron_steps", "fuzzing_request"]
