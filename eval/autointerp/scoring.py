"""Scores of a simulation against the true activations, all from plain lists so anyone can recompute them.

- `pooled_correlation`: Pearson r over every token of every scoring record (SPEC.md section 6; the paper's
  score, reported x100). NaN with a reason when either side is constant; `correlation_score` (the line's
  `score`) scores a constant prediction of a varying neuron 0 (no predictive power) and keeps NaN for a neuron
  constant on those tokens.
- `rsquared` and `absolute_dev_explained`: 1 - SS_res / SS_tot and 1 - sum|t - e| / sum|t - median t|, on the
  true activations rescaled to 0..10 by the neuron's maximum (the simulator's scale): not comparable with
  neuron_explainer's, which use the raw activations.
- `random_correlation` (the line's `random_score`): the same correlation over the uniformly sampled scoring
  records only ("random:*"), the sample on which correlation passed NeuronEval's sanity checks (SPEC.md 6d; on
  top-and-random samples it failed their extra-labels check). crate.eval.validity.sanity runs the checks here.
- `auprc`: average precision of the tokens ranked by the simulation against the unit being active there
  (`active_tokens`: normalised activation >= 1, the labels of detection and fuzzing); it passed both of
  NeuronEval's checks. Its chance level is the active share of the tokens (`auprc_chance`: any ranking no better
  than chance, a constant one included, gets it), high for dense units, so `auprc_lift` = (AUPRC - chance) /
  (1 - chance) (0 at chance, 1 perfect) is the one to compare across units and systems of other densities.
- `balanced_accuracy`: detection and fuzzing scores as EleutherAI's delphi computes them, (TPR + TNR) / 2 (the
  samples are ours: crate.eval.autointerp.steps `neuron_steps`); `judge_accuracy` applies it to a judge's answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from crate.eval.autointerp.prompts import normalise

RANDOM_PREFIX = "random:"  # the record ids of the uniformly sampled records


def expected_value(probs: Sequence[float], values: Sequence[float]) -> float:
    """E = sum_v v p(v) with p renormalised over the candidate values; 0 when no candidate has mass."""
    p = np.asarray(probs, dtype=np.float64)
    total = p.sum()
    if not total > 0:
        return 0.0
    return float((p / total) @ np.asarray(values, dtype=np.float64))


def _flat(lists: Sequence[Sequence[float]]) -> np.ndarray:
    parts = [np.asarray(xs, dtype=np.float64).ravel() for xs in lists]
    return np.concatenate(parts) if parts else np.zeros(0)


def pooled_correlation(true: Sequence[Sequence[float]], expected: Sequence[Sequence[float]]) -> tuple[float, str | None]:
    """(r, note): Pearson correlation pooled over all tokens; (nan, reason) when undefined."""
    t, e = _flat(true), _flat(expected)
    if len(t) != len(e):
        raise ValueError(f"{len(t)} true activations but {len(e)} expected ones")
    if len(t) < 2:
        return math.nan, "fewer than two tokens to correlate"
    if np.ptp(t) == 0:
        return math.nan, f"the neuron is constant ({t[0]:g}) on every scoring token: correlation undefined"
    if np.ptp(e) == 0:
        return math.nan, f"the simulator predicted a constant ({e[0]:g}) on every token: correlation undefined"
    tc, ec = t - t.mean(), e - e.mean()
    return float((tc @ ec) / math.sqrt((tc @ tc) * (ec @ ec))), None


def correlation_score(true: Sequence[Sequence[float]], expected: Sequence[Sequence[float]]) -> tuple[float, str | None]:
    """`pooled_correlation`, but a constant prediction of a neuron that varies scores 0: the explanation predicts
    nothing (an LLM's expected values are never exactly constant, the token-statistics simulator's are whenever
    no listed token occurs); left out as NaN, such neurons would lift the layer mean. Only a neuron constant on
    the tokens (dead there) stays NaN."""
    r, note = pooled_correlation(true, expected)
    t = _flat(true)
    if math.isnan(r) and len(t) >= 2 and np.ptp(t) > 0:
        r, note = 0.0, note.replace("correlation undefined", "it predicts nothing, scored 0")
    return r, note


def random_records(record_ids: Sequence[str]) -> list[int]:
    """The indices of the uniformly sampled records ("random:*") among a line's scoring records."""
    return [i for i, rid in enumerate(record_ids) if rid.startswith(RANDOM_PREFIX)]


def random_correlation(true: Sequence[Sequence[float]], expected: Sequence[Sequence[float]],
                       record_ids: Sequence[str]) -> tuple[float, str | None]:
    """`correlation_score` over the records whose id starts with "random:" (uniformly sampled positions)."""
    keep = random_records(record_ids)
    if not keep:
        return math.nan, "no uniformly sampled (random:*) scoring records"
    t = [true[i] for i in keep]
    if not (_flat(t) > 0).any():  # a GELU unit's small negative values are not firing either
        return math.nan, "never sampled: not above 0 on any uniformly sampled record"
    return correlation_score(t, [expected[i] for i in keep])


def active_tokens(true: Sequence[Sequence[float]], max_activation: float) -> list[list[bool]]:
    """Where the unit is active, per token of each record: normalised activation >= 1 (SPEC.md section 6, the
    prompts' 0..10 scale; none when max_activation <= 0)."""
    return [[v >= 1 for v in normalise(a, max_activation)] for a in true]


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Sum over distinct score thresholds, highest first, of (recall gain) x precision: the step-wise area under the
    precision-recall curve, tied scores entering together (sklearn's average_precision_score); NaN without a
    positive label."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if not y.any():
        return math.nan
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last token of each run of tied scores
    tp = np.cumsum(y)[last]
    recall_gain = np.diff(np.r_[0, tp]) / tp[-1]
    return float(recall_gain @ (tp / (last + 1)))


def auprc(true: Sequence[Sequence[float]], expected: Sequence[Sequence[float]],
          max_activation: float) -> tuple[float, str | None]:
    """(average precision, note): the simulation as the score, the unit's `active_tokens` as the labels; NaN with a
    note when no scoring token is active."""
    return _auprc(_active_flat(true, max_activation), expected)


def _active_flat(true: Sequence[Sequence[float]], max_activation: float) -> np.ndarray:
    return np.asarray([x for xs in active_tokens(true, max_activation) for x in xs], dtype=bool)


def _auprc(labels: np.ndarray, expected: Sequence[Sequence[float]]) -> tuple[float, str | None]:
    if not labels.any():
        return math.nan, "no scoring token is active (normalised activation >= 1): AUPRC undefined"
    return average_precision(_flat(expected), labels), None


def _scaled(true: Sequence[Sequence[float]], max_activation: float) -> np.ndarray:
    t = np.maximum(_flat(true), 0.0)
    return 10.0 * t / max_activation if max_activation > 0 else np.zeros_like(t)


def rsquared(true: Sequence[Sequence[float]], expected: Sequence[Sequence[float]], max_activation: float) -> float:
    t, e = _scaled(true, max_activation), _flat(expected)
    ss_tot = float(((t - t.mean()) ** 2).sum())
    return math.nan if ss_tot == 0 else 1.0 - float(((t - e) ** 2).sum()) / ss_tot


def absolute_dev_explained(true: Sequence[Sequence[float]], expected: Sequence[Sequence[float]],
                           max_activation: float) -> float:
    t, e = _scaled(true, max_activation), _flat(expected)
    base = float(np.abs(t - np.median(t)).sum())
    return math.nan if base == 0 else 1.0 - float(np.abs(t - e).sum()) / base


def balanced_accuracy(labels: Sequence[bool], predictions: Sequence[bool]) -> float:
    """(TPR + TNR) / 2; with one class only, the accuracy on that class."""
    y, p = np.asarray(labels, dtype=bool), np.asarray(predictions, dtype=bool)
    rates = [float((p[y] == True).mean()) if y.any() else None,  # noqa: E712
             float((p[~y] == False).mean()) if (~y).any() else None]  # noqa: E712
    rates = [r for r in rates if r is not None]
    return float(np.mean(rates)) if rates else math.nan


def judge_accuracy(labels: Sequence[bool], probabilities: Sequence[float]) -> float:
    """`balanced_accuracy` of a judge's answers (detection, fuzzing): yes when P(yes) > 0.5."""
    return balanced_accuracy(labels, [p > 0.5 for p in probabilities])


def score_simulation(true: Sequence[Sequence[float]], expected: Sequence[Sequence[float]], max_activation: float,
                     record_ids: Sequence[str] = ()) -> dict[str, float | str | None]:
    """The neuron's scores (`correlation_score` for `score`); `record_ids` name the records, to find the random ones."""
    r, note = correlation_score(true, expected)
    labels = _active_flat(true, max_activation)  # once: AUPRC's labels and its chance level
    ap, ap_note = _auprc(labels, expected)
    chance = float(labels.mean()) if labels.size else math.nan
    rr, rr_note = random_correlation(true, expected, record_ids)
    return {
        "score": r,
        "score_x100": r * 100 if math.isfinite(r) else math.nan,
        "score_note": note,
        "rsquared": rsquared(true, expected, max_activation),
        "absolute_dev_explained": absolute_dev_explained(true, expected, max_activation),
        "auprc": ap,
        "auprc_note": ap_note,
        "auprc_chance": chance,
        "auprc_lift": (ap - chance) / (1 - chance) if math.isfinite(ap) and chance < 1 else math.nan,
        "random_score": rr,
        "random_score_note": rr_note,
    }


__all__ = ["RANDOM_PREFIX", "expected_value", "pooled_correlation", "correlation_score", "random_records",
           "random_correlation", "active_tokens", "average_precision", "auprc", "rsquared", "absolute_dev_explained", "balanced_accuracy",
           "judge_accuracy", "score_simulation"]
