"""NeuronEval's sanity checks (crate.eval.validity.sanity): the metrics against hand-computed numbers, the
perturbations against their expected rates, NeuronEval's theoretical table reproduced on their setup, and the checks
on constructed scoring lines where the answer is known both ways (a metric that must drop, one that must not)."""

import json
import math
import re

import numpy as np
import pytest

from crate.eval.autointerp.explainers import StatsExplainer
from crate.eval.autointerp.protocols import get_protocol
from crate.eval.autointerp.simulators import StatsSimulator
from crate.eval.autointerp.steps import score_neuron
from crate.eval.record.windows import Window
from crate.eval.validity.sanity import (
    EPSILON, METRICS, add_tokens, broader, cosine, drop_tokens, extra_labels, f1, iou, listed_items, missing_labels,
    narrower, relative_change, sanity_checks,
)


def test_f1_iou_cosine_balanced_accuracy_hand_computed():
    active = np.array([1, 1, 0, 0, 1], bool)
    true = np.array([1, 2, 0, 0, 3.0])
    concept = np.array([10, 0, 5, 0, 0.5])  # binarised at >= 1: T F T F F -> TP 1, FP 1, FN 2, TN 1
    predicted = concept >= 1
    assert f1(active, predicted) == pytest.approx(2 / 5) and iou(active, predicted) == pytest.approx(1 / 4)
    assert cosine(true, concept) == pytest.approx(11.5 / math.sqrt(14 * 125.25))
    m = {k: f(true, concept, active, np.ones(5, bool)) for k, f in METRICS.items()}
    assert m["balanced_accuracy"] == pytest.approx((1 / 3 + 1 / 2) / 2)  # the unit as truth: TPR 1/3, TNR 1/2
    assert m["f1"] == f1(active, predicted) and m["cosine"] == cosine(true, concept)
    # positive controls: the concept a copy of the unit
    assert f1(active, active) == iou(active, active) == cosine(true, true) == pytest.approx(1.0)
    # negative controls: disjoint; a zero concept predicts nothing (0), a zero unit leaves cosine undefined
    assert f1(active, ~active) == iou(active, ~active) == cosine(true, true * ~active) == 0.0
    assert cosine(true, np.zeros(5)) == 0.0 and math.isnan(cosine(np.zeros(5), concept))
    none = np.zeros(3, bool)
    assert math.isnan(f1(none, none)) and math.isnan(iou(none, none))
    assert math.isnan(METRICS["balanced_accuracy"](true, concept, np.ones(5, bool), None))  # one class: undefined


def test_label_perturbations_have_neuroneval_rates():
    rng = np.random.default_rng(0)
    n, n_pos = 100_000, 10_000
    concept = np.zeros(n)
    concept[:n_pos] = rng.choice([1.0, 4.0, 10.0], n_pos)
    concept[n_pos:n_pos + 5000] = 0.5  # graded but below the threshold: a negative
    lost = missing_labels(concept, rng)
    assert np.array_equal(lost[n_pos:], concept[n_pos:]) and set(np.unique(lost[:n_pos])) <= {0.0, 1.0, 4.0, 10.0}
    kept = (lost[:n_pos] == concept[:n_pos]).mean()
    assert kept == pytest.approx(0.5, abs=0.015)  # r_minus: 3 sd of a Binomial(10^4, 1/2) mean
    more = extra_labels(concept, rng)
    assert np.array_equal(more[:n_pos], concept[:n_pos])
    new = (more[n_pos:] >= 1)
    assert new.mean() == pytest.approx(n_pos / (n - n_pos), abs=0.003)  # doubles the positives in expectation
    assert set(np.unique(more[n_pos:][new])) <= {1.0, 4.0, 10.0}  # values drawn from the positives' own
    assert np.array_equal(extra_labels(np.zeros(5), rng), np.zeros(5))  # nothing to double


def test_explanation_perturbations_drop_and_add_listed_tokens():
    rng = np.random.default_rng(0)
    table = {"cat": 10.0, "dog": 6.0, "fox": 3.0}
    for _ in range(50):
        fewer = drop_tokens(table, rng)
        assert 1 <= len(fewer) < 3 and all(table[k] == v for k, v in fewer.items())
    assert drop_tokens({"cat": 10.0}, rng) == {}
    more = add_tokens(table, ["a", "b", "c", "d", "e"], rng)
    added = set(more) - set(table)
    assert len(added) == 3 and added <= set("abcde") and all(more[k] in table.values() for k in added)
    assert set(add_tokens(table, ["a"], rng)) == {"cat", "dog", "fox", "a"}  # fewer candidates: all of them


def test_neuroneval_theoretical_table_reproduced():
    """Their theoretical check: a concept on the first freq * N inputs, the neuron its exact copy; the % of draws in
    which each metric drops, averaged over the 5 frequencies. Their table: correlation, cosine, AUPRC, F1 and IoU
    100 / 100; balanced accuracy fails extra labels with 60 (100, 100, 100, 0, 0: a drop of n_extra / (2 (N - n_pos))
    is below 0.001 from frequency 0.001 on). N = 20,000 for speed (500,000 theirs): at frequency 0.0001 two
    positives, so 1/4 of the draws drop neither and 1/4 drop both (then cosine is 0 as theirs is: a drop)."""
    n, draws, freqs = 20_000, 30, [0.499, 0.1, 0.01, 0.001, 0.0001]
    names = ["correlation", "cosine", "auprc", "f1", "iou", "balanced_accuracy"]
    rng = np.random.default_rng(0)
    rates = {k: {"missing": [], "extra": []} for k in names}
    everywhere = np.ones(n, bool)
    for freq in freqs:
        concept = np.zeros(n)
        concept[: round(freq * n)] = 1.0
        neuron = concept.copy()
        before = {k: METRICS[k](neuron, concept, neuron >= 1, everywhere) for k in names}
        for check, perturb in (("missing", missing_labels), ("extra", extra_labels)):
            drops = dict.fromkeys(names, 0)
            for _ in range(draws):
                c = perturb(concept, rng)
                for k in names:
                    drops[k] += relative_change(k, before[k], METRICS[k](neuron, c, neuron >= 1, everywhere)) < -EPSILON
            for k in names:
                rates[k][check].append(100 * drops[k] / draws)
    for k in names:
        assert rates[k]["missing"][:4] == [100.0] * 4, k
        assert np.mean(rates[k]["missing"]) >= 90, k
    for k in names[:-1]:
        assert rates[k]["extra"][:4] == [100.0] * 4 and np.mean(rates[k]["extra"]) >= 90, k
    assert rates["balanced_accuracy"]["extra"] == [100.0, 100.0, 100.0, 0.0, 0.0]  # mean 60: fails


def _line(neuron, true, expected, ids, explanation="(free text)"):
    return {"layer": "0", "neuron": neuron, "explanation": explanation, "record_ids": ids,
            "tokens": [["x"] * len(r) for r in true], "true_activations": true, "expected_activations": expected,
            "max_activation": 8.0}


def _indicator_lines(n_units, n_pos, n_records=10, width=500, random_positives=True):
    """Units that fire (8) on n_pos tokens of a 5,000-token sample; the simulation a perfect indicator (10)."""
    rng = np.random.default_rng(1)
    ids = [f"top:{i}" for i in range(n_records // 2)] + [f"random:{i}" for i in range(n_records // 2)]
    lines = []
    for u in range(n_units):
        on = np.zeros(n_records * width, bool)
        half = n_records * width // 2
        on[rng.choice(half, n_pos, replace=False) + (half if random_positives or u % 2 else 0)] = True
        true, expected = (on * 8.0).reshape(n_records, width), (on * 10.0).reshape(n_records, width)
        lines.append(_line(u, true.tolist(), expected.tolist(), ids))
    return lines


def test_pearson_on_a_perfect_indicator_always_drops():
    lines = _indicator_lines(20, 100)  # 2% of the tokens
    out = sanity_checks(lines)
    for k in ("correlation", "random_correlation", "auprc", "f1", "iou", "cosine", "balanced_accuracy"):
        assert out["label"][k]["missing"] == out["label"][k]["extra"] == 100.0, k
        assert out["label"][k]["n"] == 20 and out["label"][k]["undefined"] == 0 and out["passes"][k]
    assert out["explanation"] is None and out["units"]["label_tested"] == 20
    assert any("free text" in x for x in out["notes"]) and any("no simulator" in x for x in out["notes"])


def test_balanced_accuracy_fails_extra_labels_at_low_frequency_where_the_others_pass():
    """5 positives in 5,000 tokens, as many in the random records (frequency 0.002 there): the extras double that
    rate over the ~5,000 negatives, about 10, and move balanced accuracy by about 10 / (2 * 4,995), at EPSILON: a
    drop in about half the units; one extra moves the others. Missing fails only when all 5 are kept (1/32)."""
    lines = _indicator_lines(60, 5)
    out = sanity_checks(lines, seed=3)
    label = out["label"]
    assert 20 < label["balanced_accuracy"]["extra"] < 80 and label["balanced_accuracy"]["missing"] >= 90
    assert not out["passes"]["balanced_accuracy"]
    for k in ("correlation", "random_correlation", "auprc", "f1", "iou", "cosine"):
        assert label[k]["missing"] >= 90 and label[k]["extra"] >= 90 and out["passes"][k], k
    # seeded per unit: the order of the lines changes nothing; another seed changes the draws
    assert sanity_checks(lines[::-1], seed=3) == out
    assert sanity_checks(lines, seed=4)["label"]["balanced_accuracy"] != label["balanced_accuracy"]


def test_top_and_random_correlation_fails_extra_labels_when_the_concept_lives_in_the_top_records():
    """NeuronEval's finding for our headline: half the units fire only in top records, so the data's rate (the
    random records') is 0 and doubling it adds no label to the sample: their scores cannot drop (50%). Random-record
    correlation is undefined on those (never sampled: left out, counted) and passes on the others."""
    out = sanity_checks(_indicator_lines(60, 5, random_positives=False), seed=3)
    label = out["label"]
    assert label["correlation"]["extra"] == pytest.approx(50, abs=5) and not out["passes"]["correlation"]
    assert label["correlation"]["missing"] >= 90
    assert label["random_correlation"]["n"] == 30 and label["random_correlation"]["undefined"] == 30
    assert label["random_correlation"]["extra"] == 100.0 and out["passes"]["random_correlation"]


def test_only_true_labels_go_missing_and_only_false_ones_are_added():
    """Our explanations are not ground truth: a removed label must be a true one (the unit active) and an added one
    a false one (the unit inactive), else a worse explanation could be a better one. The extra rate is the
    concept's rate on the random records, doubled (NeuronEval doubles it over the whole data)."""
    rng = np.random.default_rng(0)
    n = 200_000
    concept = np.where(np.arange(n) % 10 == 0, 10.0, 0.0)  # positive on 10% of tokens
    active = np.arange(n) % 20 == 0  # the unit: half of the concept's positives
    lost = missing_labels(concept, rng, true=active)
    assert np.array_equal(lost[~active], concept[~active])  # unexplained positives untouched
    assert (lost[active] == 0).mean() == pytest.approx(0.5, abs=0.01)
    sampled = np.arange(n) < n // 2
    concept_s = concept.copy()
    concept_s[sampled & (np.arange(n) % 10 == 0) & (np.arange(n) % 40 != 0)] = 0.0  # rate 2.5% on the sample
    more = extra_labels(concept_s, rng, false=~active, rate_on=sampled)
    new = (more >= 1) & (concept_s < 1)
    assert not (new & active).any()  # never on an active token
    d = 0.025
    assert new[~active & (concept_s < 1)].mean() == pytest.approx(d / (1 - d), abs=0.002)


def test_explanation_level_checks_on_token_statistics():
    """Units that fire on "cat" and "dog", both in every top record; the stats explanation lists both. Dropping one
    lowers every token-level metric and fuzzing (half the marked tokens predicted), but not detection: each active
    record still holds the kept token. Adding tokens of the random records (all of them inactive, each holding every
    other word) lowers every metric, detection included."""
    def rec(text, rid):
        toks = text.split()
        return Window(tokens=toks, activations=[8.0 if t in ("cat", "dog") else 0.0 for t in toks], center=0, id=rid)

    windows = {"top": [rec("the cat sat on the dog", f"top:{i}") for i in range(10)],
               "random": [rec("a bird flew over the mat sat on", f"random:{i}") for i in range(10)], "quantile": []}
    lines = []
    for n in range(8):
        line = score_neuron(windows, get_protocol("tar"), StatsExplainer(), StatsSimulator(), seed=n)
        assert line["explanation"] == 'token statistics: {"cat": 10.0, "dog": 10.0}'
        lines.append({"layer": "0", "neuron": n, **line})
    out = sanity_checks(lines, StatsSimulator(), draws=2)
    expl = out["explanation"]
    assert out["units"] == {"lines": 8, "label_tested": 8, "stats_explanations": 8, "text_explanations": 0,
                            "explanation_tested": 8}
    for k in ("correlation", "auprc", "f1", "iou", "cosine", "balanced_accuracy"):
        assert expl[k]["missing"] == expl[k]["extra"] == 100.0 and expl[k]["n"] == 8, k
    assert expl["detection"]["missing"] == 0.0 and expl["detection"]["extra"] == 100.0
    assert expl["fuzzing"]["missing"] == 100.0
    assert not out["passes"]["detection"]
    # label level: "cat" and "dog" never occur in the random records, so the data's rate is 0, doubling it adds no
    # label, and no score drops: top-and-random correlation fails there (NeuronEval's finding), whatever this level
    assert out["label"]["correlation"]["extra"] == 0.0 and not out["passes"]["correlation"]
    # the units are never active on random records: random correlation undefined everywhere, no verdict
    assert expl["random_correlation"]["n"] == 0 and out["passes"]["random_correlation"] is None
    assert "detection" not in out["label"]


class _Counting(StatsSimulator):
    """The stats simulator behind a batching interface that counts its batches."""

    def __init__(self):
        self.batches = 0

    def call_many(self, requests):
        self.batches += 1
        return [getattr(self, m)(*a) for m, a in requests]


def test_free_text_explanations_made_narrower_and_broader():
    """NeuronEval's semantic tests on free text: units fire on "cat" and "dog" (both in every top record), explained
    "cat and dog". Narrower ("cat" or "dog") loses true labels: every token-level metric and fuzzing drop, detection
    does not (each active record still holds the kept word). Broader joins another unit's explanation ("bird flew",
    words of the inactive random records): every metric drops, detection too. A unit that lists one thing has no
    narrower form (untestable for missing), and one whose layer has no other explanation no broader one (not
    tested); all the simulator's calls go in one batch."""
    def rec(text, rid):
        toks = text.split()
        return Window(tokens=toks, activations=[8.0 if t in ("cat", "dog") else 0.0 for t in toks], center=0, id=rid)

    windows = {"top": [rec("the cat sat on the dog", f"top:{i}") for i in range(10)],
               "random": [rec("a bird flew over the mat sat on", f"random:{i}") for i in range(10)], "quantile": []}
    base = score_neuron(windows, get_protocol("tar"), StatsExplainer(), StatsSimulator(), seed=0)
    lines = [{**base, "layer": "0", "neuron": n, "explanation": "cat and dog"} for n in range(8)]
    lines.append({**base, "layer": "0", "neuron": 8, "explanation": "bird flew"})  # the donor: one item
    lines.append({**base, "layer": "1", "neuron": 0, "explanation": "cat and dog"})  # alone in its layer
    sim = _Counting()
    out = sanity_checks(lines, sim, draws=2)
    expl = out["explanation"]
    assert sim.batches == 1
    assert out["units"]["text_explanations"] == 10 and out["units"]["explanation_tested"] == 10
    for k in ("correlation", "auprc", "f1", "iou", "cosine", "balanced_accuracy"):
        assert expl[k]["missing"] == 100.0 and expl[k]["untestable"]["missing"] == 1, k  # "bird flew" lists one
        assert expl[k]["extra"] < 100.0  # the donor's own broader form adds what it already says or true labels
    assert expl["detection"]["missing"] == 0.0 and expl["fuzzing"]["missing"] == 100.0
    # extra: the 8 "cat and dog" units of layer 0 get "..., or bird flew" and drop; layer 1's has no donor
    assert expl["correlation"]["untestable"]["extra"] == 1 and expl["detection"]["extra"] == pytest.approx(100 * 8 / 9)
    assert any("10 of 10 explanations are free text" in x for x in out["notes"])


def test_batched_explanation_trials_match_each_unit_alone():
    """All units' questions go to the simulator in one batch; a unit with no active token asks no fuzzing question,
    and the answers of the units after it must still be theirs: each unit's trial equals the one it gets alone."""
    from crate.eval.validity.sanity import _Unit, _explanation_texts, _explanation_trials

    def rec(text, rid, on):
        toks = text.split()
        return Window(tokens=toks, activations=[8.0 if on and t in ("cat", "dog") else 0.0 for t in toks], center=0,
                      id=rid)

    lines = []
    for n, on in enumerate([True, False, True]):
        windows = {"top": [rec("the cat sat on the dog", f"top:{i}", on) for i in range(4)],
                   "random": [rec("a bird flew over the mat", f"random:{i}", on) for i in range(4)], "quantile": []}
        line = score_neuron(windows, get_protocol("tar"), StatsExplainer(), StatsSimulator(), seed=n)
        lines.append({**line, "layer": "0", "neuron": n, "max_activation": 8.0,
                      "explanation": "cat and dog" if n != 2 else "cat, dog and the"})
    units = [_Unit(x, 0) for x in lines]
    jobs = [(u, *_explanation_texts(u, ["bird flew"], 2)) for u in units]
    assert not any(any(a) for a in units[1].active_lists)  # the middle unit asks no fuzzing question
    together = _explanation_trials(jobs, _Counting())
    alone = [_explanation_trials([job], StatsSimulator())[0] for job in jobs]
    assert len(together) == 3
    for (b1, a1), (b2, a2) in zip(together, alone):
        assert json.dumps(b1) == json.dumps(b2) and json.dumps(a1) == json.dumps(a2)


def test_listed_items_narrower_broader_known_answers():
    rng = np.random.default_rng(0)
    assert listed_items('the words "the", "a" and "an"') == ("the words ", ['"the"', '"a"', '"an"'], "")
    assert listed_items("commas and periods") == ("", ["commas", "periods"], "")
    assert listed_items("a, b; c / d or e") == ("", ["a", "b", "c", "d", "e"], "")
    assert listed_items("Orange android")[1] == []  # "or" and "and" as words only
    assert listed_items("don't stop")[1] == []  # an apostrophe is not a quote
    # no list: a conjunction of long parts, or a quoted word that is context rather than an item
    assert listed_items("capitalized words and at the start of a line")[1] == []
    assert listed_items('the word "the", especially after "of" or "in"') == (
        'the word "the", especially after ', ['"of"', '"in"'], "")  # the list is "of" or "in"
    for _ in range(20):
        less = narrower('the words "the", "a" and "an" at the start of a sentence', rng)
        items = re.findall(r'"[^"]+"', less)
        assert less.startswith("the words ") and less.endswith(" at the start of a sentence")  # the context stays
        assert 1 <= len(items) < 3 and set(items) <= {'"the"', '"a"', '"an"'}
    assert narrower("names of people", rng) is None  # lists one thing: no subclass
    assert broader("cats", ["cats", "Cats ", "dogs"], rng) == "cats, or dogs"  # its own text is no donor
    assert broader("cats", ["cats"], rng) is None


def test_a_draw_that_removes_nothing_is_drawn_again_and_nothing_to_remove_is_untestable():
    """One active token that the explanation predicts: a coin flip would keep it half the time and test nothing, so
    the draw is repeated until it goes (every metric then drops). An explanation predicting none of the unit's active
    tokens has no true label to lose: it is untestable for "missing", counted apart, not a failure."""
    ids = ["top:0", "random:0"]
    hit = _line(0, [[0, 8.0, 0, 0], [0, 0, 0, 0]], [[0, 10.0, 0, 0], [0, 0, 0, 0]], ids)
    miss = _line(1, [[0, 8.0, 0, 0], [0, 0, 0, 0]], [[10.0, 0, 0, 0], [0, 0, 0, 0]], ids)
    out = sanity_checks([hit, miss], seed=0)
    for k in ("correlation", "auprc", "f1", "iou", "cosine"):
        row = out["label"][k]
        assert row["missing"] == 100.0 and row["untestable"]["missing"] == 1, k  # hit tested and dropped; miss apart
    assert np.array_equal(missing_labels(np.array([10.0, 0]), np.random.default_rng(0), true=np.array([False, True])),
                          [10.0, 0])  # nothing true to remove: unchanged
