"""The scores that survive NeuronEval's sanity checks, in every scoring line: AUPRC (against sklearn, ties included)
and the correlation over the uniformly sampled records (hand-computed), with positive and negative controls."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from crate.eval.autointerp.explainers import StatsExplainer
from crate.eval.autointerp.protocols import get_protocol
from crate.eval.autointerp.scoring import auprc, average_precision, random_correlation, score_simulation
from crate.eval.autointerp.simulators import StatsSimulator
from crate.eval.autointerp.steps import score_neuron
from crate.eval.record.windows import Window


def test_average_precision_hand_computed_and_against_sklearn_with_ties():
    # thresholds 3 (1 of 1 right, recall 1/2) and 2 (2 of 3 right, recall 1): 1/2 * 1 + 1/2 * 2/3
    assert average_precision(np.array([3, 2, 2, 1.0]), np.array([1, 0, 1, 0], bool)) == pytest.approx(5 / 6, abs=1e-15)
    rng = np.random.default_rng(0)
    for n, levels in [(7, 2), (50, 3), (400, 11), (1000, 1000)]:  # few levels: many ties
        y = rng.random(n) < 0.3
        y[0] = True
        s = rng.integers(0, levels, n).astype(float) + 2.0 * y * rng.random(n)
        for scores in (s, np.round(s)):
            assert average_precision(scores, y) == pytest.approx(average_precision_score(y, scores), abs=1e-12)
    y = np.array([1, 0, 0, 0], bool)
    assert average_precision(np.array([3, 2, 1, 0.0]), y) == 1.0  # positive control: the positive ranked first
    assert average_precision(np.array([0, 1, 2, 3.0]), y) == pytest.approx(1 / 4)  # negative: ranked last
    assert average_precision(np.full(4, 5.0), y) == pytest.approx(1 / 4)  # all tied: the prevalence
    assert math.isnan(average_precision(np.array([1, 2.0]), np.zeros(2, bool)))


def test_auprc_labels_are_the_normalised_activations_of_detection():
    # max 1: normalised [0, 10], [5, 0] -> active F T T F; scores 3 1 2 0: thresholds 3 (0/1), 2 (1/2, recall 1/2),
    # 1 (2/3, recall 1) -> 1/2 * 1/2 + 1/2 * 2/3
    true, expected = [[0.05, 1.0], [0.5, 0.09]], [[3, 1], [2, 0]]
    ap, note = auprc(true, expected, 1.0)
    assert ap == pytest.approx(7 / 12) and note is None
    assert ap == pytest.approx(average_precision_score([0, 1, 1, 0], [3, 1, 2, 0]), abs=1e-12)
    ap, note = auprc(true, expected, 20.0)  # everything below a tenth of the maximum: nothing active
    assert math.isnan(ap) and "no scoring token is active" in note


def test_random_score_is_the_correlation_over_random_records_only():
    ids = ["top:1", "random:0", "random:2"]
    true, expected = [[5, 0], [0, 2], [1, 0]], [[9, 9], [0, 4], [2, 1]]
    # t = 0 2 1 0 (mean 3/4), e = 0 4 2 1 (mean 7/4): sums of products 4.75, squares 2.75 and 8.75
    r, note = random_correlation(true, expected, ids)
    assert r == pytest.approx(4.75 / math.sqrt(2.75 * 8.75), abs=1e-15) and note is None
    s = score_simulation(true, expected, 5.0, ids)
    assert s["random_score"] == r
    assert s["score"] == pytest.approx(np.corrcoef([5, 0, 0, 2, 1, 0], [9, 9, 0, 4, 2, 1])[0, 1])
    assert s["score"] < 0.6 < r  # the top record's wrong prediction hurts score only
    # negative controls: a constant prediction of a unit that varies predicts nothing (0, as score); a unit zero on
    # every random record was never sampled (NaN, which crate.eval.validity.estimands counts); no random records
    r, note = random_correlation(true, [[9, 9], [3, 3], [3, 3]], ids)
    assert r == 0.0 and "predicts nothing" in note
    r, note = random_correlation([[5, 0], [0, 0], [0, 0]], expected, ids)
    assert math.isnan(r) and note == "never sampled: not above 0 on any uniformly sampled record"
    # a GELU unit's negative values vary but never fire: never sampled too (as crate.eval.validity.estimands counts)
    r, note = random_correlation([[5, 0], [-0.1, -0.2], [-0.05, 0]], expected, ids)
    assert math.isnan(r) and note.startswith("never sampled")
    r, note = random_correlation(true, expected, ["top:1", "top:3", "quantile:0:2"])
    assert math.isnan(r) and "no uniformly sampled" in note


def _w(tokens, acts, rid):
    return Window(tokens=list(tokens), activations=list(acts), center=0, id=rid)


def _windows(firing_random: bool):
    """A "cat" detector: the top records hold it, half of the random ones too (or none: never sampled)."""
    def rec(text, rid):
        toks = text.split()
        return _w(toks, [8.0 if t == "cat" else 0.0 for t in toks], rid)

    top = [rec("the cat sat on a mat", f"top:{i}") for i in range(10)]
    rnd = [rec("a cat flew over the dog" if firing_random and i % 4 == 0 else "nothing here at all", f"random:{i}")
           for i in range(10)]
    return {"top": top, "random": rnd, "quantile": []}


class _Contrary(StatsSimulator):
    """Predicts the opposite of the token-statistics simulation: 10 where it says 0, 0 where it says more."""

    def simulate(self, explanation, token_lists):
        return [[0.0 if v > 0 else 10.0 for v in row] for row in super().simulate(explanation, token_lists)]


def test_scoring_lines_carry_auprc_and_random_score_that_recompute():
    tar = get_protocol("tar")
    good = score_neuron(_windows(True), tar, StatsExplainer(), StatsSimulator())
    bad = score_neuron(_windows(True), tar, StatsExplainer(), _Contrary())
    for res in (good, bad):
        labels = [v >= 8.0 for r in res["true_activations"] for v in r]
        flat = [v for r in res["expected_activations"] for v in r]
        assert res["auprc"] == pytest.approx(average_precision_score(labels, flat), abs=1e-12)
        rnd = [i for i, rid in enumerate(res["record_ids"]) if rid.startswith("random:")]
        t = [v for i in rnd for v in res["true_activations"][i]]
        e = [v for i in rnd for v in res["expected_activations"][i]]
        assert res["random_score"] == pytest.approx(np.corrcoef(t, e)[0, 1], abs=1e-12)
    assert good["auprc"] == 1.0 and good["random_score"] == pytest.approx(1.0)  # positive control
    n_active = sum(v > 0 for r in bad["true_activations"] for v in r)
    n_tokens = sum(len(r) for r in bad["true_activations"])
    assert bad["auprc"] == pytest.approx(n_active / n_tokens)  # every active token tied at 0, ranked last
    assert bad["random_score"] == pytest.approx(-1.0)
    never = score_neuron(_windows(False), tar, StatsExplainer(), StatsSimulator())
    assert never["score"] == pytest.approx(1.0) and math.isnan(never["random_score"])
    assert never["random_score_note"].startswith("never sampled") and never["auprc"] == 1.0
    dead = score_neuron({"top": [_w("ab", [0, 0], f"top:{i}") for i in range(10)], "random": [], "quantile": []},
                        tar, StatsExplainer(), StatsSimulator())
    assert math.isnan(dead["auprc"]) and dead["auprc_note"] and math.isnan(dead["random_score"])


def test_auprc_chance_and_lift_in_the_line():
    """AUPRC's chance level is the active share: a dense unit gets a high AUPRC from any ranking, a lift of 0."""
    true = [[8.0, 8.0, 8.0, 0.0]] * 5  # active on 3 of 4 tokens
    noise = [[1.0, 2.0, 3.0, 4.0]] * 5  # ranks the one inactive token first
    s = score_simulation(true, noise, 8.0, ["random:0"] * 5)
    assert s["auprc_chance"] == pytest.approx(0.75)
    assert s["auprc"] == pytest.approx(average_precision_score([1, 1, 1, 0] * 5, [1, 2, 3, 4] * 5), abs=1e-12)
    assert s["auprc_lift"] == pytest.approx((s["auprc"] - 0.75) / 0.25)
    flat = score_simulation(true, [[0.0] * 4] * 5, 8.0, [])  # a constant ranking: exactly chance
    assert flat["auprc"] == pytest.approx(0.75) and flat["auprc_lift"] == pytest.approx(0.0)
    perfect = score_simulation(true, [[10.0, 10.0, 10.0, 0.0]] * 5, 8.0, [])
    assert perfect["auprc"] == 1.0 and perfect["auprc_lift"] == 1.0
