"""Scores, statistics and the explain/simulate/score step against hand-computed numbers."""

import math

import numpy as np
import pytest

from crate.eval.record.windows import Window
from crate.eval.autointerp.steps import score_neuron
from crate.eval.autointerp.prompts import normalise, simulate_pieces
from crate.eval.autointerp.protocols import central, get_protocol
from crate.eval.autointerp.scoring import (
    absolute_dev_explained, balanced_accuracy, expected_value, pooled_correlation, rsquared, score_simulation,
)
from crate.eval.autointerp.explainers import StatsExplainer
from crate.eval.autointerp.simulators import LLMSimulator, StatsSimulator
from crate.eval.stats.neurons import aggregate_ci, bootstrap_ci, compare_models, layer_summary, model_aggregate, sample_neurons


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
    # a constant prediction of a neuron that varies predicts nothing: 0, not a NaN that the layer mean would skip
    s = score_simulation([[0, 1], [0, 2]], [[3, 3], [3, 3]], 2.0)
    assert s["score"] == 0.0 and s["score_x100"] == 0.0 and "predicts nothing" in s["score_note"]
    # t scaled to 0, 5, 0, 10 (mean 3.75) against 3 everywhere
    assert s["rsquared"] == pytest.approx(1 - (9 + 4 + 9 + 49) / (3.75**2 + 1.25**2 + 3.75**2 + 6.25**2))


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
    assert [x.id for x in s] == ["top:1", "top:3", "top:5", "top:7", "top:9",
                                 "random:0", "random:2", "random:4", "random:6", "random:8"]
    e, s = get_protocol("random-only").split(w)
    assert [x.id for x in e] == ["top:0", "top:2", "top:4", "top:6", "top:8"]
    assert [x.id for x in s] == ["random:0", "random:1", "random:2", "random:3", "random:4", "random:5", "random:6",
                                 "random:7", "random:8", "random:9"]
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


class _Judge:
    """Answers every fuzzing prompt "Yes" exactly when its marks are the true ones; records what it was shown."""

    identity = {"kind": "judge"}

    def __init__(self, true_marks):
        self.true_marks, self.shown = true_marks, []

    def simulate(self, explanation, token_lists):
        return [[0.0] * len(t) for t in token_lists]

    def detect(self, explanation, token_lists):
        return [1.0] * len(token_lists)

    def intruder(self, questions, marks):
        return [[0.0] * len(q) for q in questions]

    def fuzz(self, explanation, token_lists, marks):
        self.shown = [list(m) for m in marks]
        return [1.0 if list(m) in self.true_marks else 0.0 for m in marks]


def test_fuzzing_marks_wrong_tokens_only_among_inactive_ones():
    # records where the neuron fires on 3 of 4 tokens, and one where it fires on all 4: the wrong marks must fall on
    # inactive tokens (the one there is), and the all-active record has no wrong version; a judge that knows the
    # true marks then scores 1 (with wrong marks drawn anywhere, some would equal the true ones: a perfect judge
    # would fall below 1)
    top = [_w("abcd", [9.0, 8.0, 0.0, 7.0], f"top:{i}") for i in range(9)] + [_w("abcd", [9.0] * 4, "top:9")]
    rnd = [_w("abcd", [0.0] * 4, f"random:{i}") for i in range(10)]
    true_marks = [[True, True, False, True], [True] * 4]
    judge = _Judge(true_marks)
    res = score_neuron({"top": top, "random": rnd, "quantile": []}, get_protocol("tar"), StatsExplainer(), judge)
    wrong = [m for m in judge.shown if m not in true_marks]
    assert len(judge.shown) == 5 + 4 and wrong == [[False, False, True, False]] * 4  # top #1, 3, 5, 7 have one
    assert res["fuzzing"] == pytest.approx(1.0)


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


# Independent percentile bootstraps, written out with crate.eval.stats.neurons' seed convention (np.random.default_rng(seed);
# bootstrap_ci draws one (n_boot, n) index array; the model aggregates draw each layer's indices in layer order, once
# per resample, and a paired difference uses the same indices for both models). tests/test_demo.py and
# tests/test_autointerp_interpret.py check the written tables against them.
def quantile(x: list[float], q: float) -> float:
    """The q-quantile by linear interpolation between order statistics (numpy's default, written out)."""
    xs = sorted(x)
    pos = q * (len(xs) - 1)
    i = int(math.floor(pos))
    return xs[i] + (pos - i) * (xs[min(i + 1, len(xs) - 1)] - xs[i])


def percentile_interval(draws: list[float], level: float = 0.95) -> list[float]:
    d = [float(v) for v in draws if math.isfinite(v)]
    return [quantile(d, (1 - level) / 2), quantile(d, (1 + level) / 2)]


def bootstrap_reference(v: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> list[float]:
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    return percentile_interval([sum(v[i] for i in row) / len(row) for row in idx], level)


def mean_of_layer_means(layers: list[np.ndarray]) -> float:
    """The paper's model score: the mean over layers of the mean of each layer's finite (scored) neurons."""
    means = [x[np.isfinite(x)].mean() for x in layers if np.isfinite(x).any()]
    return sum(means) / len(means) if means else math.nan


def _draw(layers: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.integers(0, len(x), size=len(x)) for x in layers]


def aggregate_interval_reference(layers: list[np.ndarray], n_boot: int, seed: int, level: float = 0.95) -> list[float]:
    """layers: each layer's neuron scores in neuron order (NaN: unscored, resampled then dropped)."""
    rng = np.random.default_rng(seed)
    return percentile_interval([mean_of_layer_means([x[i] for x, i in zip(layers, _draw(layers, rng))])
                                for _ in range(n_boot)], level)


def difference_interval_reference(a: list[np.ndarray], b: list[np.ndarray], n_boot: int, seed: int, paired: bool,
                                  level: float = 0.95) -> list[float]:
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        ia = _draw(a, rng)
        ib = ia if paired else _draw(b, rng)
        draws.append(mean_of_layer_means([x[i] for x, i in zip(a, ia)])
                     - mean_of_layer_means([x[i] for x, i in zip(b, ib)]))
    return percentile_interval(draws, level)


def pearson(true: list[list[float]], expected: list[list[float]]) -> float:
    """Pearson's r over every token of every record, by hand in float64; NaN when a side is constant."""
    t = [float(v) for r in true for v in r]
    e = [float(v) for r in expected for v in r]
    mt, me = math.fsum(t) / len(t), math.fsum(e) / len(e)
    stt, see = math.fsum((a - mt) ** 2 for a in t), math.fsum((b - me) ** 2 for b in e)
    if stt == 0 or see == 0:
        return math.nan
    return math.fsum((a - mt) * (b - me) for a, b in zip(t, e)) / math.sqrt(stt * see)


def as_layers(scores: dict) -> list[np.ndarray]:
    """{layer: {neuron: score}} -> each layer's scores in neuron order, layers in order."""
    return [np.asarray([scores[k][n] for n in sorted(scores[k])], dtype=np.float64) for k in sorted(scores, key=int)]


def test_bootstrap_ci_is_a_95_percent_percentile_bootstrap():
    v = np.random.default_rng(0).normal(1.0, 1.0, size=400)
    lo, hi = bootstrap_ci(v, n_boot=500, seed=3)
    assert [lo, hi] == pytest.approx(bootstrap_reference(v, 500, 3), rel=1e-12)
    assert lo != pytest.approx(bootstrap_reference(v, 500, 3, level=0.90)[0], rel=1e-3)  # a 90% interval would not pass
    # known answer on large n: the normal-theory interval mean +- 1.96 se, to the bootstrap's Monte Carlo error
    lo, hi = bootstrap_ci(v, n_boot=20000, seed=0)
    se = v.std(ddof=1) / math.sqrt(len(v))
    assert (hi - lo) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.05)  # 90%: 0.84, 99%: 1.31
    assert (lo + hi) / 2 == pytest.approx(v.mean(), abs=0.05 * se)


def _two_layer_pair() -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """Two models scored on the same neurons of two layers, b close to a (strongly paired): {layer: {neuron: score}}."""
    rng = np.random.default_rng(1)
    a0, a1 = rng.normal(0.3, 1.0, 400), rng.normal(0.1, 0.5, 300)
    d0, d1 = rng.normal(0.2, 0.3, 400), rng.normal(0.1, 0.8, 300)
    a = {"0": dict(enumerate(a0)), "1": dict(enumerate(a1))}
    b = {"0": dict(enumerate(a0 - d0)), "1": dict(enumerate(a1 - d1))}
    return a, b, d0, d1


def test_paired_comparison_interval_is_a_95_percent_paired_bootstrap():
    a, b, d0, d1 = _two_layer_pair()
    small = [{k: {n: v[n] for n in range(40)} for k, v in x.items()} for x in (a, b)]
    c = compare_models(*small, 2, 2, n_boot=300, seed=5)
    ref = [difference_interval_reference(*map(as_layers, small), 300, 5, paired=True, level=lv) for lv in (0.95, 0.9)]
    assert c["paired"] and c["ci95"] == pytest.approx(ref[0], rel=1e-12)
    assert c["ci95"][0] != pytest.approx(ref[1][0], rel=1e-3)  # a 90% interval would not pass
    assert aggregate_ci(small[0], ["0", "1"], n_boot=300, seed=5) == pytest.approx(
        aggregate_interval_reference(as_layers(small[0]), 300, 5), rel=1e-12)
    # known answer: the mean over the 2 layers of the mean paired differences, se from the per-neuron differences
    c = compare_models(a, b, 2, 2, n_boot=4000, seed=0)
    assert c["difference"] == pytest.approx((d0.mean() + d1.mean()) / 2, rel=1e-12)
    se = 0.5 * math.sqrt(d0.var(ddof=1) / len(d0) + d1.var(ddof=1) / len(d1))
    lo, hi = c["ci95"]
    assert (hi - lo) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.05)  # unpaired resampling: 1.9x as wide
    # the model aggregate's interval (the report's CRATE / GPT columns): independent resampling per layer
    a0, a1 = (np.asarray(list(a[k].values())) for k in ("0", "1"))
    lo, hi = aggregate_ci(a, ["0", "1"], n_boot=4000, seed=0)
    se = 0.5 * math.sqrt(a0.var(ddof=1) / len(a0) + a1.var(ddof=1) / len(a1))
    assert (hi - lo) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.05)


def test_statistics_aggregation_and_comparison():
    v = np.random.default_rng(0).normal(1.0, 1.0, size=400)
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
    # paired differences: layer 0 [1, 2], layer 1 [1, 1]; resampled, (mean of layer 0's + 1) / 2 is 1, 1.25 or 1.5
    # with probabilities 1/4, 1/2, 1/4, so both 2.5% tails sit on the extremes (unpaired resampling gives [0.5, 2.0])
    assert c["ci95"] == [1.0, 1.5]
    assert sample_neurons(100, 10, 0) == sample_neurons(100, 10, 0) != sample_neurons(100, 10, 1)
    assert sample_neurons(100, None, 0) == list(range(100))
