"""The lookup ceiling against hand-computed answers, three independent formulas and every lookup we can build; the
shuffled-explanation floor against hand-computed answers and indicator units."""

import json
import math
from collections import defaultdict

import numpy as np
import pytest
from scipy.stats import f_oneway

from crate.eval.autointerp.explainers import STATS_PREFIX, StatsExplainer, token_key
from crate.eval.autointerp.protocols import get_protocol
from crate.eval.autointerp.scoring import score_simulation
from crate.eval.autointerp.simulators import StatsSimulator
from crate.eval.autointerp.steps import score_neuron
from crate.eval.record.windows import Window
from crate.eval.validity.ceilings import ceiling_summary, derangement, lookup_ceiling, shuffled_floor

WORDS = [f"w{i}" for i in range(30)]


def _hand(tokens, true, **extra):
    return {"tokens": tokens, "true_activations": true, **extra}


def _unit_line(neuron, tokens, acts, seed=0, half=4):
    """A neuron's JSONL line (Top-and-Random, token statistics) from a token stream and its activations: top
    records around its 10 highest tokens, random ones around 10 seeded positions, windows of 2 * half tokens."""
    acts = np.asarray(acts, dtype=np.float64)
    inner = np.arange(half, len(tokens) - half)
    win = lambda p, rid: Window(tokens[p - half:p + half], acts[p - half:p + half].tolist(), half, rid)  # noqa: E731
    top = inner[np.argsort(-acts[inner], kind="stable")[:10]]
    rnd = np.random.default_rng(seed).choice(inner, size=10, replace=False)
    windows = {"top": [win(p, f"top:{k}") for k, p in enumerate(top)],
               "random": [win(p, f"random:{k}") for k, p in enumerate(rnd)], "quantile": []}
    out = score_neuron(windows, get_protocol("tar"), StatsExplainer(), StatsSimulator(), extra_scores=False)
    return {"neuron": neuron, **out}


def _stream(n=3000, seed=0):
    return [str(w) for w in np.random.default_rng(seed).choice(WORDS, size=n)]


def test_lookup_ceiling_known_answers():
    # keys a: {0, 2}, b: {2, 4} ("b" and "B " are one key): SS_between 4, SS_total 8
    assert lookup_ceiling(_hand([["a", "a"], ["b", "B "]], [[0, 2], [2, 4]])) == pytest.approx(math.sqrt(0.5))
    assert lookup_ceiling(_hand([["a", "a", "b", "b"]], [[0, 2, 1, 1]])) == 0.0  # equal key means
    assert lookup_ceiling(_hand([["a", "b"]], [[0, 1]])) == 1.0
    assert math.isnan(lookup_ceiling(_hand([["a", "b"]], [[3, 3]])))  # constant
    assert math.isnan(lookup_ceiling(_hand([["a"], []], [[1.0], []])))  # one token


def _references(keys, t):
    """eta three other ways: a pure-Python sum of squares (fsum), one-way ANOVA's F (scipy) and the correlation
    with the per-key means (numpy)."""
    groups = defaultdict(list)
    for k, v in zip(keys, t):
        groups[k].append(float(v))
    mean = math.fsum(t) / len(t)
    ssb = math.fsum(len(g) * (math.fsum(g) / len(g) - mean) ** 2 for g in groups.values())
    sst = math.fsum((v - mean) ** 2 for v in t)
    F = f_oneway(*groups.values()).statistic
    k, n = len(groups), len(t)
    fitted = [math.fsum(groups[key]) / len(groups[key]) for key in keys]
    return math.sqrt(ssb / sst), math.sqrt(F * (k - 1) / (F * (k - 1) + n - k)), np.corrcoef(t, fitted)[0, 1]


def test_lookup_ceiling_equals_independent_formulas_and_no_lookup_beats_it():
    rng = np.random.default_rng(0)
    sim = StatsSimulator()
    for trial in range(5):
        tokens = [[str(rng.choice(["the", " The", "cat", "sat", " on", "mat", "dog"])) for _ in range(16)]
                  for _ in range(6)]
        true = (rng.exponential(size=(6, 16)) * (rng.random((6, 16)) < 0.4)).tolist()
        line = _hand(tokens, true)
        c = lookup_ceiling(line)
        keys = [token_key(t) for ts in tokens for t in ts]
        for ref in _references(keys, [v for vs in true for v in vs]):
            assert c == pytest.approx(ref, abs=1e-12)
        # every table of values per key, fed to the token-statistics simulator as its explanation: never above
        key_set = sorted(set(keys))
        best = 0.0
        for _ in range(300):
            table = dict(zip(key_set, (rng.random(len(key_set)) * 10 * (rng.random(len(key_set)) < 0.7)).tolist()))
            s = score_simulation(true, sim.simulate(STATS_PREFIX + json.dumps(table), tokens), 1.0)["score"]
            assert s <= c + 1e-12
            best = max(best, s)
        assert best > 0.5 * c  # the tables are not all trivially bad
        # the per-key means reach it; so does any positive affine map of them
        means = {k: float(np.mean([v for kk, v in zip(keys, np.ravel(true)) if kk == k])) for k in key_set}
        for a, b in [(1.0, 0.0), (3.0, 1.0)]:
            table = {k: a * v + b for k, v in means.items()}
            s = score_simulation(true, sim.simulate(STATS_PREFIX + json.dumps(table), tokens), 1.0)["score"]
            assert s == pytest.approx(c, abs=1e-9)
        # the stats explanation of the line's own records is one such lookup
        own = StatsExplainer().explain([Window(ts, vs, 0, "top:0") for ts, vs in zip(tokens, true)])
        assert score_simulation(true, sim.simulate(own, tokens), 1.0)["score"] <= c + 1e-12


def test_lookup_ceiling_controls():
    # positive: a unit that a token lookup determines has ceiling 1, and its own stats explanation gets close
    tokens = _stream()
    value = {"w0": 10.0, "w1": 6.0, "w2": 3.0, "w3": 8.0}
    line = _unit_line(0, tokens, [value.get(token_key(t), 0.0) for t in tokens])
    assert lookup_ceiling(line) == pytest.approx(1.0) and line["score"] > 0.95
    # negative: noise independent of the token over 4 repeated keys: E[eta^2] = (k - 1) / (n - 1) (normal data)
    rng = np.random.default_rng(1)
    keys = [["a", "b", "c", "d"] * 100]
    eta2 = [lookup_ceiling(_hand(keys, [rng.normal(size=400).tolist()])) ** 2 for _ in range(200)]
    assert np.mean(eta2) == pytest.approx(3 / 399, rel=0.2) and max(eta2) < 0.05
    # ... but with every token seen once the in-sample bound is vacuous: 1 whatever the activations
    assert lookup_ceiling(_hand([[f"u{i}" for i in range(50)]], [rng.normal(size=50).tolist()])) == pytest.approx(1)
    # a unit of the previous token ("fires after w0") is beyond token lookups, not beyond a context lookup
    acts = [5.0 if i and tokens[i - 1] == "w0" else 0.0 for i in range(len(tokens))]
    line = _unit_line(1, tokens, acts, half=32)
    after = [[5.0 if j and ts[j - 1] == "w0" else 0.0 for j in range(len(ts))] for ts in line["tokens"]]
    assert lookup_ceiling(line) < 0.5 and line["score"] <= lookup_ceiling(line)
    assert score_simulation(line["true_activations"], after, 5.0)["score"] > 0.95


def test_ceiling_summary_known_answer_and_controls():
    lines = [_hand([["a", "a", "b", "b"]], [[0, 2, 2, 4]], neuron=0, score=0.5),
             _hand([["a", "b"]], [[0, 1]], neuron=1, score=0.25),
             _hand([["a", "b"]], [[3, 3]], neuron=2, score=None),  # constant: no ceiling
             _hand([["a", "b"]], [[1, 3]], neuron=3, score=math.nan)]  # not scored
    s = ceiling_summary(lines)
    c0 = math.sqrt(0.5)
    assert s["n"] == 2 and s["mean_ceiling"] == pytest.approx((c0 + 1) / 2)
    assert s["mean_score"] == pytest.approx(0.375) and s["fraction"] == pytest.approx(0.375 / ((c0 + 1) / 2))
    assert s["ceilings"][0] == pytest.approx(c0) and s["ceilings"][3] == 1.0 and math.isnan(s["ceilings"][2])
    # indicator units explained by their own token reach the whole ceiling; by another unit's, none of it
    tokens = _stream()
    ind = [_unit_line(k, tokens, [10.0 * (t == f"w{k}") for t in tokens], seed=k) for k in range(3)]
    assert ceiling_summary(ind)["fraction"] == pytest.approx(1.0)
    floor = shuffled_floor(ind, StatsSimulator())
    s = ceiling_summary([{**ln, "score": floor[ln["neuron"]]} for ln in ind])
    assert s["mean_ceiling"] == pytest.approx(1.0) and abs(s["fraction"]) < 0.15


def test_shuffled_floor_known_answer():
    lines = [_hand([["a", "b", "a", "b"]], [[0, 5, 0, 5]], neuron=0, max_activation=5.0,
                   explanation=STATS_PREFIX + '{"b": 10}'),
             _hand([["a", "b"]], [[0, 0]], neuron=2, max_activation=0.0,
                   explanation="(no activating records: the neuron is dead on this data)"),
             _hand([["a", "b", "c", "d"]], [[3, 0, 0, 0]], neuron=1, max_activation=3.0,
                   explanation=STATS_PREFIX + '{"a": 10}')]
    for seed in range(5):  # the dead unit neither gives nor receives: the two live ones swap
        f = shuffled_floor(lines, StatsSimulator(), seed=seed)
        assert f.keys() == {0, 1}
        assert f[0] == pytest.approx(-1.0) and f[1] == pytest.approx(-1 / 3)  # disjoint indicators, 1 of 4 each
    assert shuffled_floor(lines[:2], StatsSimulator()) == {}


def test_shuffled_floor_controls():
    tokens = _stream()
    # negative: indicator units of different tokens; their own explanations score 1, another's about 0
    ind = [_unit_line(k, tokens, [10.0 * (t == f"w{k}") for t in tokens], seed=k) for k in range(6)]
    assert all(ln["score"] == pytest.approx(1.0) for ln in ind)
    for seed in range(3):
        f = shuffled_floor(ind, StatsSimulator(), seed=seed)
        assert f.keys() == set(range(6)) and all(abs(v) < 0.15 for v in f.values())
    assert shuffled_floor(ind, StatsSimulator(), seed=1) == shuffled_floor(ind, StatsSimulator(), seed=1)
    # positive: units that all fire on the same token, at different scales: any of their explanations scores 1
    same = [_unit_line(k, tokens, [(k + 1.0) * (t == "w0") for t in tokens], seed=k) for k in range(4)]
    assert all(v == pytest.approx(1.0) for v in shuffled_floor(same, StatsSimulator()).values())


def test_derangement():
    for n in range(2, 8):
        for seed in range(20):
            p = derangement(n, seed)
            assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))
    assert {tuple(derangement(3, s)) for s in range(20)} == {(1, 2, 0), (2, 0, 1)}
    with pytest.raises(ValueError):
        derangement(1)
