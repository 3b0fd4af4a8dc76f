"""Scores, statistics and the explain/simulate/score step against hand-computed numbers."""

import math

import numpy as np
import pytest

from crate.eval.activations import Window
from crate.eval.interpret import score_neuron
from crate.eval.prompts import normalise, simulate_pieces
from crate.eval.protocols import central, get_protocol
from crate.eval.scoring import (
    absolute_dev_explained, balanced_accuracy, expected_value, pooled_correlation, rsquared, score_simulation,
)
from crate.eval.simulate import LLMSimulator, StatsExplainer, StatsSimulator
from crate.eval.stats import bootstrap_ci, compare_models, layer_summary, model_aggregate, sample_neurons


def test_expected_value_renormalises_over_candidates():
    assert expected_value([0, 0, 0, 0.25, 0, 0, 0, 0.5, 0, 0, 0], range(11)) == pytest.approx(17 / 3)
    assert expected_value([0.1] * 11, range(11)) == pytest.approx(5.0)
    assert expected_value([0.0] * 11, range(11)) == 0.0


def test_pooled_correlation_hand_computed_and_not_a_mean_of_records():
    true, exp = [[0, 1], [2, 3]], [[0, 0], [1, 1]]
    r, note = pooled_correlation(true, exp)
    assert r == pytest.approx(2 / math.sqrt(5)) and note is None
    # per-record correlations would be undefined here (constant predictions per record); pooled is not
    true, exp = [[1, 2, 3], [10, 20, 30]], [[3, 2, 1], [1, 2, 3]]
    r, _ = pooled_correlation(true, exp)
    t, e = np.array([1, 2, 3, 10, 20, 30.0]), np.array([3, 2, 1, 1, 2, 3.0])
    assert r == pytest.approx(np.corrcoef(t, e)[0, 1])


def test_constant_or_zero_neurons_give_nan_with_a_reason():
    r, note = pooled_correlation([[0, 0], [0, 0]], [[1, 2], [3, 4]])
    assert math.isnan(r) and "constant" in note
    r, note = pooled_correlation([[0, 1], [0, 2]], [[0, 0], [0, 0]])
    assert math.isnan(r) and "simulator" in note
    s = score_simulation([[0, 0]], [[1, 2]], 0.0)
    assert math.isnan(s["score"]) and math.isnan(s["rsquared"]) and s["score_note"]


def test_rsquared_absdev_and_balanced_accuracy_hand_computed():
    # true scaled by 10 / max 2 -> [0, 5, 10]; expected [0, 5, 10] -> perfect
    assert rsquared([[0, 1, 2]], [[0, 5, 10]], 2.0) == pytest.approx(1.0)
    # expected all 5: SS_res = 25 + 0 + 25 = 50, SS_tot = 50 -> 0
    assert rsquared([[0, 1, 2]], [[5, 5, 5]], 2.0) == pytest.approx(0.0)
    # |t - median| = 5 + 0 + 5 = 10; |t - e| with e = [0, 0, 0]: 0 + 5 + 10 = 15 -> 1 - 1.5
    assert absolute_dev_explained([[0, 1, 2]], [[0, 0, 0]], 2.0) == pytest.approx(-0.5)
    assert balanced_accuracy([True, True, False, False], [True, False, False, False]) == pytest.approx(0.75)
    assert balanced_accuracy([True, True, True, False], [True, True, True, True]) == pytest.approx(0.5)


def test_normalisation_matches_spec():
    assert normalise([-1.0, 0.0, 0.49, 0.5, 1.0, 2.0], 1.0) == [0, 0, 4, 5, 10, 10]
    assert normalise([1.0, 2.0], 0.0) == [0, 0]


def _w(tokens, acts, rid, center=0):
    return Window(tokens=list(tokens), activations=list(acts), center=center, id=rid)


def test_protocol_splits_follow_the_spec_table():
    top = [_w("ab", [1, 1], f"top:{i}") for i in range(50)]
    rnd = [_w("ab", [0, 0], f"random:{i}") for i in range(50)]
    qs = [[_w("ab", [1, 0], f"quantile:{q}:{p}") for p in range(4)] for q in range(11)]
    w = {"top": top, "random": rnd, "quantile": qs}
    e, s = get_protocol("tar").split(w)
    assert [x.id for x in e] == ["top:0", "top:2", "top:4", "top:6", "top:8"]
    assert [x.id for x in s] == ["top:1", "top:3", "top:5", "top:7", "top:9"] + [f"random:{i}" for i in (0, 2, 4, 6, 8)]
    e, s = get_protocol("random-only").split(w)
    assert all(x.id.startswith("random") for x in s) and len(s) == 10
    e, s = get_protocol("short").split(w)
    assert len(e) == 15 + 22 + 5 and len(s) == 10 + 22 + 5 + 10
    assert s[-1].id == "top3:34" and len(s[-1].tokens) == 2  # a 2-token record stays 2 tokens
    c = central(_w("abcdefgh", range(8), "top:3", center=4), 3, "x")
    assert c.tokens == list("def") and c.activations == [3, 4, 5] and c.center == 1


def test_stats_backend_scores_a_token_detector_perfectly():
    # a neuron that fires on "cat" (8) and "dog" (4): the stats explainer finds both, the simulator reproduces it
    def rec(text, rid):
        toks = text.split()
        return _w(toks, [8.0 if t == "cat" else 4.0 if t == "dog" else 0.0 for t in toks], rid)

    top = [rec("the cat sat on a dog", f"top:{i}") for i in range(10)]
    rnd = [rec("a bird flew over the cat" if i % 2 else "nothing here at all", f"random:{i}") for i in range(10)]
    res = score_neuron({"top": top, "random": rnd, "quantile": []}, get_protocol("tar"), StatsExplainer(),
                       StatsSimulator(), seed=0)
    assert res["explanation"].startswith("token statistics:") and '"cat": 10.0' in res["explanation"]
    assert res["score"] == pytest.approx(1.0)
    assert res["detection"] == pytest.approx(1.0) and res["fuzzing"] == pytest.approx(1.0)
    assert len(res["true_activations"]) == len(res["expected_activations"]) == len(res["record_ids"]) == 10
    # the line's lists recompute its score
    r, _ = pooled_correlation(res["true_activations"], res["expected_activations"])
    assert r == pytest.approx(res["score"])


def test_dead_neuron_is_reported_not_crashing():
    zero = [_w("ab", [0.0, 0.0], f"top:{i}") for i in range(10)]
    res = score_neuron({"top": zero, "random": zero, "quantile": []}, get_protocol("tar"), StatsExplainer(),
                       StatsSimulator())
    assert math.isnan(res["score"]) and "constant" in res["score_note"] and "dead" in res["explanation"]


class _FakeLLM:
    identity = {"backend": "fake"}

    def slot_probs(self, prompts, candidates):
        out = []
        for pieces in prompts:
            p = np.zeros((len(pieces) - 1, len(candidates)))
            for s, piece in enumerate(pieces[:-1]):
                token = piece.rsplit("\n", 1)[-1].rstrip("\t")
                p[s, candidates.index("8" if token == "cat" else "0")] = 0.5
                p[s, candidates.index("2")] = 0.5
            out.append(p)
        return out


def test_llm_simulator_reads_every_slot_of_a_record_in_one_prompt():
    pieces = simulate_pieces("cats", ["the", "cat", "sat"])
    assert len(pieces) == 4 and pieces[0].endswith("the\t") and pieces[1] == "unknown\ncat\t"
    got = LLMSimulator(_FakeLLM()).simulate("cats", [["the", "cat", "sat"], ["cat"]])
    assert got == [[1.0, 5.0, 1.0], [5.0]]


def test_statistics_bootstrap_aggregation_and_comparison():
    v = np.random.default_rng(0).normal(1.0, 1.0, size=400)
    lo, hi = bootstrap_ci(v, seed=0)
    se = v.std(ddof=1) / math.sqrt(len(v))
    assert lo < v.mean() < hi and (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)
    s = layer_summary(list(v[:100]) + [float("nan")], n_total=101)
    assert s["n"] == 100 and s["n_nan"] == 1 and s["ci95_fpc"] == [s["mean"], s["mean"]]
    part = layer_summary(list(v[:100]), n_total=400)
    width, fpc_width = np.diff(part["ci95"])[0], np.diff(part["ci95_fpc"])[0]
    assert fpc_width == pytest.approx(width * math.sqrt(300 / 399))
    agg = model_aggregate({str(i): float(i + 1) for i in range(6)}, n_layer=6)
    assert agg["layers_used"] == ["0", "1", "2", "3", "4"] and agg["mean"] == 3.0 and agg["var_pop"] == 2.0
    agg = model_aggregate({str(i): float(i + 1) for i in range(6)}, n_layer=6, exclude_last=False)
    assert agg["mean"] == 3.5
    a = {"0": {0: 1.0, 1: 3.0}, "1": {0: 2.0, 1: 2.0}}
    b = {"0": {0: 0.0, 1: 1.0}, "1": {0: 1.0, 1: 1.0}}
    c = compare_models(a, b, 2, 2)
    assert c["difference"] == pytest.approx(2.0 - 0.75) and c["paired"]
    assert c["ci95"][0] <= c["difference"] <= c["ci95"][1]
    assert sample_neurons(100, 10, 0) == sample_neurons(100, 10, 0) != sample_neurons(100, 10, 1)
    assert sample_neurons(100, None, 0) == list(range(100))
