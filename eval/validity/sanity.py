"""NeuronEval's sanity checks (Oikarinen, Yan, Weng, ICML 2025; SPEC.md 6d), run on our own explanations: does a
metric's score drop when the explanation's concept loses some of its positives ("missing labels") or gains false
ones ("extra labels")? A metric whose score does not drop cannot tell a worse explanation from a better one.

The concept of an explanation is its simulation (a scoring line's expected_activations, 0..10 per scoring token),
positive where >= 1; the unit is its true activations on the same tokens, active where the normalised activation
is >= 1 (scoring.active_tokens: the labels of detection and fuzzing). Two levels of check:

- label level (every line): NeuronEval's perturbations of the simulation. Missing: each true positive (a positive
  token where the unit is active) is kept with probability r_minus (else set to 0). Extra: each false negative
  candidate (a negative token where the unit is inactive) becomes positive with probability
  (r_plus - 1) d / (1 - d), d the concept's positive rate on the uniformly sampled (random:*) records: NeuronEval
  doubles a concept's positives over the whole data, every token flipping with that probability, and the random
  records estimate the data's rate without the top records' excess (so top-and-random correlation meets extra
  labels as it does there: few fall in its sample). Their concepts are ground truth, so every label they remove is
  true and every one they add false; our explanations are not, so only true labels are removed and only false
  ones added (an added label on an active token would make the explanation better, and a metric that rises then
  is right). Their concepts are binary, ours graded: a new positive takes a value drawn from the line's own
  positive values. Without random records, d is the rate over all scoring tokens.
- explanation level (the explanation itself changed and asked of the simulator again; detection and fuzzing, which
  ask the simulator, are checked here too):
  - token-statistics explanations: missing drops each listed token with probability 0.5 (at least one dropped, one
    kept when it lists two or more); extra adds as many tokens of the scoring records as it lists, valued like the
    listed ones, among the tokens on which the unit is never active there (false labels, as above).
  - free-text explanations (an LLM's), after NeuronEval's semantic tests (their appendix E.3, code
    additional_experiments/semantic_{subclass_missing,superclass_extra}_labels_app_E3.ipynb: the concept replaced
    by a subclass for missing labels, by a superclass for extra ones): missing keeps part of the list the
    explanation gives (`listed_items`: quoted items, or a short unquoted list; each item dropped with probability
    0.5, at least one dropped and one kept, the text around the list kept), a narrower concept by a heuristic that
    reads lists only; an explanation without a list has no subclass here and is untestable for missing. Extra joins another live unit's
    explanation of the same layer ("X, or Y"), a broader one: units of a layer seldom share concepts, so Y's
    labels are mostly false for this unit (where Y is true too the score may rise: the rate is then a lower bound).
    At most TEXT_UNITS free-text units (a seeded sample) are tested: each costs the simulator two more scorings.

Pass rule (NeuronEval's code): a unit decreases when the mean over `draws` of (m(perturbed) - m(original)) /
range(m) is below -0.001 (range 2 for correlations and cosine, 1 otherwise); a check's rate is the % of tested units
(the metric defined on the original) that decrease, a score that becomes undefined counting as no decrease. A metric
passes when every check that ran is >= 90%: their code states no threshold, their table marks 93.6 as a pass and
89.5 as a fail. Each unit's draws are seeded by (seed, layer, neuron): the same whatever the order of the lines.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from crate.eval.autointerp.explainers import STATS_PREFIX, token_key
from crate.eval.autointerp.scoring import (
    RANDOM_PREFIX, active_tokens, average_precision, balanced_accuracy, correlation_score, judge_accuracy,
)
from crate.eval.autointerp.simulators import Simulator, StatsSimulator, ask
from crate.eval.autointerp.steps import fuzzing_request, neuron_seed

R_MINUS = 0.5  # missing labels: the probability that a positive is kept
R_PLUS = 2.0  # extra labels: the factor on the number of positives, in expectation
EPSILON = 0.001  # the smallest normalised drop that counts as a decrease
PASS_PCT = 90.0
CHECKS = ("missing", "extra")
TEXT_UNITS = 32  # free-text explanations tested at explanation level (a seeded sample beyond)
_QUOTED = re.compile(r""""[^"]+"|“[^”]+”|(?<!\w)'[^']+'(?!\w)""")
_SEPARATOR = r"\s*(?:[,;/]\s*(?:(?:and|or)\s+)?|(?:and|or)\s+)\s*"  # between two items of a list
_BETWEEN = re.compile(rf"^{_SEPARATOR}$", re.IGNORECASE)
_PARTS = re.compile(_SEPARATOR, re.IGNORECASE)
SHORT_ITEM = 3  # words at most in an item of an unquoted list

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], float]


def _binary(concept: np.ndarray) -> np.ndarray:
    return concept >= 1


def f1(active: np.ndarray, predicted: np.ndarray) -> float:
    """2 TP / (2 TP + FP + FN); NaN when both sides are empty."""
    tp, total = int((active & predicted).sum()), int(active.sum() + predicted.sum())
    return 2 * tp / total if total else math.nan


def iou(active: np.ndarray, predicted: np.ndarray) -> float:
    """TP / |active or predicted|; NaN when both sides are empty."""
    union = int((active | predicted).sum())
    return int((active & predicted).sum()) / union if union else math.nan


def cosine(true: np.ndarray, concept: np.ndarray) -> float:
    """Uncentred cosine similarity, as NeuronEval. A zero concept of a non-zero unit predicts nothing: 0 (the
    score's rule, and what NeuronEval's normalisation gives); NaN for a zero unit."""
    nt, nc = float(np.linalg.norm(true)), float(np.linalg.norm(concept))
    if nt == 0:
        return math.nan
    return float(true @ concept) / (nt * nc) if nc > 0 else 0.0


def _balanced_accuracy(active: np.ndarray, predicted: np.ndarray) -> float:
    """NeuronEval's: the unit as the truth, the binarised concept as the prediction; it needs both classes."""
    return balanced_accuracy(active, predicted) if 0 < active.sum() < active.size else math.nan


# name -> metric(true activations, concept, unit active, token from a random:* record), all flat over the tokens;
# the correlations follow the score's rules (scoring.correlation_score: a constant concept of a varying unit is 0)
METRICS: dict[str, Metric] = {
    "correlation": lambda t, c, a, s: correlation_score([t], [c])[0],
    "random_correlation": lambda t, c, a, s: correlation_score([t[s]], [c[s]])[0],
    "auprc": lambda t, c, a, s: average_precision(c, a),
    "f1": lambda t, c, a, s: f1(a, _binary(c)),
    "iou": lambda t, c, a, s: iou(a, _binary(c)),
    "cosine": lambda t, c, a, s: cosine(t, c),
    "balanced_accuracy": lambda t, c, a, s: _balanced_accuracy(a, _binary(c)),
}
RANGES = {"correlation": 2.0, "random_correlation": 2.0, "cosine": 2.0}  # the others (and judges) span 1


def relative_change(metric: str, before: float, after: float) -> float:
    """(after - before) / the metric's range: NeuronEval's normalised change."""
    return (after - before) / RANGES.get(metric, 1.0)


def missing_labels(concept: np.ndarray, rng: np.random.Generator, r_minus: float = R_MINUS,
                   true: np.ndarray | None = None) -> np.ndarray:
    """Each positive token (of those where `true`, when given: the unit's active tokens) kept with probability
    r_minus, else set to 0; drawn again until one is dropped (over a whole dataset some always are: a draw that
    drops none tests nothing)."""
    pos = _binary(concept) & (True if true is None else true)
    if not pos.any():
        return concept.copy()
    while True:
        dropped = pos & (rng.random(concept.shape) >= r_minus)
        if dropped.any():
            return np.where(dropped, 0.0, concept)


def extra_labels(concept: np.ndarray, rng: np.random.Generator, r_plus: float = R_PLUS,
                 false: np.ndarray | None = None, rate_on: np.ndarray | None = None) -> np.ndarray:
    """Each negative token (of those where `false`, when given: the unit's inactive tokens) made positive with
    probability (r_plus - 1) d / (1 - d), d the positive rate on the tokens `rate_on` (all when None), valued as a
    positive drawn at random from the concept's own positives."""
    pos = _binary(concept)
    sample = pos if rate_on is None or not rate_on.any() else pos[rate_on]
    d = float(sample.mean()) if sample.size else 0.0
    if not pos.any() or d >= 1:
        return concept.copy()
    eligible = ~pos & (True if false is None else false)
    new = eligible & (rng.random(concept.shape) < min(1.0, (r_plus - 1) * d / (1 - d)))
    out = concept.copy()
    out[new] = rng.choice(concept[pos], size=int(new.sum()))
    return out


def _kept(n: int, rng: np.random.Generator) -> np.ndarray:
    """Each of n items kept with probability 0.5, drawn again until one is dropped and (of two or more) one is kept."""
    while True:
        kept = rng.random(n) < 0.5
        if not kept.all() and (kept.any() or n == 1):
            return kept


def drop_tokens(table: dict[str, float], rng: np.random.Generator) -> dict[str, float]:
    """Each listed token dropped with probability 0.5 (`_kept`)."""
    return {k: v for (k, v), on in zip(table.items(), _kept(len(table), rng)) if on}


def listed_items(explanation: str) -> tuple[str, list[str], str]:
    """(text before, items, text after) of the list a free-text explanation gives, ([] items when it gives none):
    two or more quoted items with only separators (commas, semicolons, slashes, "and", "or") between them
    ('the words "the", "a" and "an" at the start' -> ('the words ', ['"the"', '"a"', '"an"'], ' at the start')), or
    else, unquoted, the whole explanation when its parts between separators are all short (at most SHORT_ITEM words:
    'commas and periods' -> ('', ['commas', 'periods'], '')). A heuristic: 'capitalised words and at the start of a
    line' is no list (its second part is long), so is a quoted word that is context ('"the", especially after "of"')."""
    found = list(_QUOTED.finditer(explanation))
    run: list[re.Match] = []
    for m in found:
        if run and _BETWEEN.match(explanation[run[-1].end(): m.start()]):
            run.append(m)
        elif len(run) < 2:
            run = [m]
    if len(run) >= 2:
        return explanation[: run[0].start()], [m.group(0) for m in run], explanation[run[-1].end():]
    parts = [p for p in _PARTS.split(explanation.strip()) if p]
    if len(parts) >= 2 and not found and all(len(p.split()) <= SHORT_ITEM for p in parts):
        return "", parts, ""
    return explanation, [], ""


def narrower(explanation: str, rng: np.random.Generator) -> str | None:
    """A subclass of a free-text explanation's concept: part of the list it gives (`listed_items`, each item dropped
    with probability 0.5, at least one dropped and one kept), the text around the list kept; None without a list."""
    head, items, tail = listed_items(explanation)
    if len(items) < 2:
        return None
    kept = [x for x, on in zip(items, _kept(len(items), rng)) if on]
    return head + (", ".join(kept[:-1]) + " and " + kept[-1] if len(kept) > 1 else kept[0]) + tail


def broader(explanation: str, others: Sequence[str], rng: np.random.Generator) -> str | None:
    """A superclass of a free-text explanation's concept: it or one of `others` (other units' explanations; one
    with the same text excluded) drawn at random; None when there is no other."""
    own = explanation.strip().lower()
    donors = sorted({o for o in others if o.strip().lower() != own})
    return f"{explanation}, or {donors[int(rng.integers(len(donors)))]}" if donors else None


def add_tokens(table: dict[str, float], candidates: Sequence[str], rng: np.random.Generator) -> dict[str, float]:
    """As many new tokens as the table lists (all candidates when fewer), each valued as a listed one at random."""
    k = min(len(table), len(candidates))
    new = rng.choice(len(candidates), size=k, replace=False)
    values = rng.choice(np.asarray(list(table.values())), size=k)
    return {**table, **{candidates[i]: float(v) for i, v in zip(new, values)}}


def _stats_explanation(table: dict[str, float]) -> str:
    return STATS_PREFIX + json.dumps(table, ensure_ascii=False)


class _Unit:
    """One line as flat arrays, with the generator of each check's draws."""

    def __init__(self, line: dict[str, Any], seed: int):
        true, m = line["true_activations"], float(line["max_activation"])
        self.line = line
        self.t = np.asarray([float(x) for xs in true for x in xs], dtype=np.float64)
        self.c = np.asarray([float(x) for xs in line["expected_activations"] for x in xs], dtype=np.float64)
        self.active_lists = active_tokens(true, m)
        self.a = np.asarray([x for xs in self.active_lists for x in xs], dtype=bool)
        self.s = np.asarray([rid.startswith(RANDOM_PREFIX) for rid, xs in zip(line["record_ids"], true) for _ in xs],
                            dtype=bool)
        self.seed = neuron_seed(seed, str(line["layer"]), int(line["neuron"]))
        self.m = m

    def rng(self, level: int, check: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, level, check])

    def scores(self, concept: np.ndarray) -> dict[str, float]:
        return {name: float(f(self.t, concept, self.a, self.s)) for name, f in METRICS.items()}


Trial = tuple[dict[str, float], dict[str, list[dict[str, float]]]]  # scores before, each check's draws after


def _label_trial(u: _Unit, draws: int) -> Trial | None:
    pos = _binary(u.c)
    if not 0 < pos.sum() < pos.size:
        return None
    mrng, xrng = u.rng(0, 0), u.rng(0, 1)
    # no true label to remove (the explanation predicts none of the unit's active tokens): untestable, not a failure;
    # extras that miss the sample are a failure (the sampled metric cannot see what the data gained)
    missing = [u.scores(missing_labels(u.c, mrng, true=u.a)) for _ in range(draws)] if (pos & u.a).any() else []
    return u.scores(u.c), {"missing": missing,
                           "extra": [u.scores(extra_labels(u.c, xrng, false=~u.a, rate_on=u.s))
                                     for _ in range(draws)]}


def _explanation_texts(u: _Unit, others: Sequence[str], draws: int) -> tuple[str, dict[str, list[str]]] | None:
    """The explanation and each check's perturbed explanations: token-statistics explanations lose or gain tokens,
    free-text ones become narrower or broader (the module's docstring); None when neither check can be built."""
    explanation, tokens = u.line["explanation"], u.line["tokens"]
    mrng, xrng = u.rng(1, 0), u.rng(1, 1)
    if explanation.startswith(STATS_PREFIX):
        table = StatsSimulator.table(explanation)
        # false labels only: tokens of the scoring records on which the unit is never active
        active_keys = {token_key(x) for ts, acts in zip(tokens, u.active_lists) for x, on in zip(ts, acts) if on}
        candidates = sorted({token_key(x) for ts in tokens for x in ts} - set(table) - active_keys)
        if not table or not candidates:
            return None
        return explanation, {"missing": [_stats_explanation(drop_tokens(table, mrng)) for _ in range(draws)],
                             "extra": [_stats_explanation(add_tokens(table, candidates, xrng)) for _ in range(draws)]}
    texts = {"missing": [narrower(explanation, mrng) for _ in range(draws)],
             "extra": [broader(explanation, others, xrng) for _ in range(draws)]}
    texts = {check: [t for t in ts if t is not None] for check, ts in texts.items()}
    return (explanation, texts) if any(texts.values()) else None


def _explanation_trials(jobs: Sequence[tuple[_Unit, str, dict[str, list[str]]]], simulator: Simulator) -> list[Trial]:
    """Every job's explanations scored by the simulator, all the calls in one batch (`ask`)."""
    calls: list[tuple[str, tuple]] = []
    plan = []  # per job and explanation: where its answers sit and its fuzzing labels
    for u, original, perturbed in jobs:
        tokens = u.line["tokens"]
        for text in [original, *perturbed["missing"], *perturbed["extra"]]:
            fuzz, fuzz_labels = fuzzing_request(text, tokens, u.active_lists, u.seed)
            plan.append((len(calls), fuzz_labels))
            calls += [("simulate", (text, tokens)), ("detect", (text, tokens))] + [(m, a) for _, m, a in fuzz]
    answers = ask(simulator, calls)
    trials, at = [], iter(plan)
    for u, _, perturbed in jobs:
        labels = [any(a) for a in u.active_lists]

        def scores(start: int, fuzz_labels: list[bool]) -> dict[str, float]:
            out = u.scores(np.asarray([x for xs in answers[start] for x in xs], dtype=np.float64))
            out["detection"] = judge_accuracy(labels, answers[start + 1]) if u.m > 0 else math.nan
            out["fuzzing"] = judge_accuracy(fuzz_labels, answers[start + 2]) if fuzz_labels else math.nan
            return out

        before = scores(*next(at))
        trials.append((before, {check: [scores(*next(at)) for _ in texts] for check, texts in perturbed.items()}))
    return trials


def _tally(trials: list[Trial]) -> dict[str, dict[str, Any]]:
    """Per metric: each check's % of tested units that decrease, n tested, undefined (left out: undefined on the
    original), untestable (left out of a check: nothing it could perturb) and undefined_after (tested units whose
    perturbed score is undefined: counted as no decrease)."""
    out: dict[str, dict[str, Any]] = {}
    for name in trials[0][0]:
        tested = [(before[name], after) for before, after in trials if math.isfinite(before[name])]
        row: dict[str, Any] = {"n": len(tested), "undefined": len(trials) - len(tested), "undefined_after": {},
                               "untestable": {}}
        for check in CHECKS:
            diffs = [float(np.mean([relative_change(name, b, a[name]) for a in after[check]]))
                     for b, after in tested if after[check]]
            row[check] = 100.0 * float(np.mean([d < -EPSILON for d in diffs])) if diffs else None
            row["undefined_after"][check] = sum(not math.isfinite(d) for d in diffs)
            row["untestable"][check] = len(tested) - len(diffs)
        out[name] = row
    return out


def _passes(rows: list[dict[str, Any]]) -> bool | None:
    """>= PASS_PCT on every check of `rows` that ran; None when none ran."""
    rates = [row[c] for row in rows for c in CHECKS if row[c] is not None]
    return all(r >= PASS_PCT for r in rates) if rates else None


def sanity_checks(lines: Sequence[dict[str, Any]], simulator: Simulator | None = None, seed: int = 0,
                  draws: int = 1) -> dict[str, Any]:
    """NeuronEval's missing- and extra-labels checks on scoring lines (each with layer and neuron, as the JSONL
    lines have them): the label-level checks on every line whose simulation has a positive and a negative token,
    and with `simulator`, the explanation-level checks on its live units' explanations (token statistics, and up to
    TEXT_UNITS free-text ones)."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, not {draws}")
    units = [_Unit(line, seed) for line in lines]
    label_trials = [t for t in (_label_trial(u, draws) for u in units) if t is not None]
    stats = [u for u in units if u.line["explanation"].startswith(STATS_PREFIX)]
    text = [u for u in units if u.m > 0 and not u.line["explanation"].startswith(STATS_PREFIX)]
    sampled = sorted(text, key=lambda u: u.seed)[:TEXT_UNITS]
    by_layer: dict[Any, list[str]] = {}
    for v in text:
        by_layer.setdefault(v.line["layer"], []).append(v.line["explanation"])
    jobs = [(u, *made) for u in stats + sampled
            if (made := _explanation_texts(u, by_layer.get(u.line["layer"], []), draws)) is not None] \
        if simulator is not None else []
    expl_trials = _explanation_trials(jobs, simulator) if jobs else []
    notes = [f"pass: >= {PASS_PCT:g}% on every check that ran (NeuronEval's code states no threshold; their table "
             "marks 93.6 as a pass and 89.5 as a fail)"]
    if simulator is None:
        notes.append("no simulator: the explanation-level checks did not run")
    if text:
        notes.append(f"{len(text)} of {len(units)} explanations are free text (an LLM's): at explanation level made "
                     "narrower (part of what they list) and broader (joined with another unit's), NeuronEval's "
                     f"semantic subclass and superclass tests; {len(sampled)} tested")
    label = _tally(label_trials) if label_trials else None
    explanation = _tally(expl_trials) if expl_trials else None
    levels = [x for x in (label, explanation) if x]
    passes = {name: _passes([level[name] for level in levels if name in level])
              for name in dict.fromkeys(k for level in levels for k in level)}
    return {
        "label": label,
        "explanation": explanation,
        "passes": passes,
        "passes_by_level": {name: {m: _passes([row]) for m, row in level.items()} if level else None
                            for name, level in (("label", label), ("explanation", explanation))},
        "units": {"lines": len(units), "label_tested": len(label_trials), "stats_explanations": len(stats),
                  "text_explanations": len(text), "explanation_tested": len(expl_trials)},
        "settings": {"r_minus": R_MINUS, "r_plus": R_PLUS, "epsilon": EPSILON, "pass_pct": PASS_PCT, "draws": draws,
                     "seed": seed},
        "notes": notes,
    }


__all__ = ["METRICS", "RANGES", "CHECKS", "R_MINUS", "R_PLUS", "EPSILON", "PASS_PCT", "f1", "iou", "cosine",
           "relative_change", "missing_labels", "extra_labels", "drop_tokens", "add_tokens", "listed_items", "narrower",
           "broader", "TEXT_UNITS", "SHORT_ITEM", "sanity_checks"]
