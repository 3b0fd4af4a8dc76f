"""Estimands of a layer's score: unit categories against planted units and brute force, the two layer means, density
bins and the density-reweighted difference against hand-computed answers and Simpson's-paradox controls."""

import math

import numpy as np
import pytest
import torch

from crate import build_model
from crate.eval.autointerp.explainers import StatsExplainer
from crate.eval.autointerp.protocols import get_protocol
from crate.eval.autointerp.simulators import StatsSimulator
from crate.eval.autointerp.steps import score_neuron
from crate.eval.record.recorder import LayerRecording, RecordingSpec, record_activations
from crate.eval.record.windows import neuron_windows
from crate.eval.stats.neurons import bootstrap_ci
from crate.eval.validity.estimands import (
    active_share, density_bins, density_reweighted, layer_means, unit_counts,
)


def _recording(A: np.ndarray, rand_pos: np.ndarray) -> LayerRecording:
    """A LayerRecording of a dense (tokens, units) matrix: what unit_counts and the recording measures read (the
    records are the single tokens at its top and at rand_pos; no quantiles or token statistics)."""
    n_tok, N = A.shape
    nan = np.full(N, np.nan)
    return LayerRecording(
        layer="0", hook="h", n_tokens=n_tok, seq_len=n_tok, window=1, left=0, top_vals=A.max(0)[None],
        top_pos=A.argmax(0)[None], top_win=A.max(0)[None, :, None], rand_pos=rand_pos,
        rand_win=np.take_along_axis(A, rand_pos, 0)[..., None],
        q_pos=np.zeros((0, 0, N), int), q_win=np.zeros((0, 0, N, 1)), boundaries=np.zeros((N, 1)),
        mean=A.mean(0), var=A.var(0), skew=nan, kurt=nan, max=A.max(0), min=A.min(0),
        active_count=(A > 0).sum(0), l0_sum=float((A > 0).sum()), l0_sq_sum=float(((A > 0).sum(1) ** 2).sum()),
        token_top10_share=nan, token_effective_types=nan)


def _line(neuron, score, record_ids, true):
    return {"neuron": neuron, "score": score, "record_ids": record_ids, "true_activations": true}


def test_unit_counts_finds_planted_units():
    n_tok, rng = 2000, np.random.default_rng(0)
    A = np.zeros((n_tok, 8))
    A[:, 1] = 1.0 + rng.random(n_tok)  # always on
    A[:: n_tok // 2, 2] = 1.0  # rare: 2 tokens of 2000 (0.1%), at 0 and 1000
    A[:, 3] = rng.random(n_tok) < 0.3  # ordinary
    A[5, 4] = 2.0  # rare, 1 token of 2000
    A[:, 5] = -rng.random(n_tok)  # negative only: dead (never > 0) though not constant
    A[:, 6] = np.arange(n_tok) % 100 != 0  # on 99% of tokens: always on (the threshold is inclusive)
    A[:, 7] = np.arange(n_tok) % 50 != 0  # on 98%: not
    rand_pos = np.tile(np.arange(10, 20)[:, None], (1, 8))  # no random record catches units 2 or 4
    rec = _recording(A, rand_pos)
    ids = ["top:1"] + [f"random:{r}" for r in range(10)]
    lines = [_line(n, s, ids, [[float(A.max(0)[n])]] + [[float(A[p, n])] for p in rand_pos[:, n]])
             for n, s in [(0, None), (1, 0.2), (2, 0.0), (3, 0.4), (4, math.nan), (5, None), (6, 0.0), (7, 0.1)]]
    c = unit_counts(rec, lines, rare=0.002)
    assert {k: v for k, v in c.items() if k.endswith("_neurons")} == {
        "scored_neurons": [1, 2, 3, 6, 7], "dead_neurons": [0, 5], "always_on_neurons": [1, 6],
        "rare_neurons": [2, 4], "never_sampled_neurons": [2, 4]}
    assert (c["n_units"], c["n_lines"], c["scored"], c["dead"], c["always_on"], c["rare"], c["never_sampled"]) == (
        8, 8, 5, 2, 2, 2, 2)
    assert c["always_on_threshold"] == 0.99 and c["n_tokens"] == n_tok
    # the rare threshold is strict: 2 tokens of 2000 are not rarer than 0.1%
    assert unit_counts(rec, lines, rare=1e-3)["rare_neurons"] == [4]
    # a unit caught by a random record is sampled; a line with no random record counts in none
    lines[2]["true_activations"][4] = [1.0]
    lines[4] = _line(4, math.nan, ["top:1"], [[2.0]])
    assert unit_counts(rec, lines, rare=0.002)["never_sampled_neurons"] == []



def test_active_share_is_the_scorers_active_share_of_the_random_records():
    """Normalised activation >= 1 (a tenth of the explanation records' maximum) on random:* tokens only: top
    records and a unit's tiny positive values (0 < a < max / 10) do not count."""
    line = {"record_ids": ["top:0", "random:0", "random:1"], "max_activation": 10.0,
            "true_activations": [[10.0, 10.0], [0.5, 1.0, 0.0, 3.0], [0.99, 2.0]]}
    assert active_share(line) == pytest.approx(3 / 6)  # 1.0, 3.0 and 2.0 of the six random tokens
    assert math.isnan(active_share({**line, "record_ids": ["top:0", "top:1", "top:2"]}))


@pytest.fixture(scope="module")
def planted_gpt():
    """A micro GPT layer with planted units (1, 3 dead; 2 always on; 4-11 biased down, rarer and rarer), its
    recording, brute-force activations and its Random-only lines (token-statistics explainer and simulator)."""
    torch.manual_seed(0)
    model = build_model("gpt", "micro", bias=True).eval()
    with torch.no_grad():
        fc = model.transformer.h[0].mlp.c_fc
        fc.weight[1:4] = 0.0
        fc.bias[1:4] = torch.tensor([-1.0, 1.0, 0.0])
        fc.bias[4:12] = -torch.linspace(0.15, 0.3, 8)
    T, n_seq = 32, 20
    stream = np.random.default_rng(0).integers(0, 128, size=T * n_seq).astype(np.uint16)
    spec = RecordingSpec(seq_len=T, window=8, top_k=10, n_random=10, n_bins=0, per_bin=0, seed=0, device="cpu")
    rec = record_activations(model, stream, spec, layers=[0])["0"]
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.from_numpy(stream.astype(np.int64)).view(n_seq, T),
                                        [model.neuron_hook(0)])
    A = cache[model.neuron_hook(0)].reshape(T * n_seq, -1).double().numpy()
    strings = [f"t{i}" for i in range(128)]
    lines = [{"neuron": n, **score_neuron(neuron_windows(rec, n, stream, strings), get_protocol("random"),
                                          StatsExplainer(), StatsSimulator(), extra_scores=False)}
             for n in range(rec.n_neurons)]
    return rec, A, lines


def test_unit_counts_match_brute_force_on_a_recorded_model(planted_gpt):
    rec, A, lines = planted_gpt
    c = unit_counts(rec, lines, rare=0.02)
    freq = (A > 0).mean(0)
    live = freq > 0
    assert c["dead_neurons"] == np.flatnonzero(~live).tolist() and {1, 3} <= set(c["dead_neurons"])
    assert c["always_on_neurons"] == np.flatnonzero(freq >= 0.99).tolist() and 2 in c["always_on_neurons"]
    assert c["rare_neurons"] == np.flatnonzero(live & (freq < 0.02)).tolist() and c["rare"] >= 2
    # never sampled: live, and every random window (NaN outside the sequence) is <= 0
    quiet = np.all(np.nan_to_num(rec.rand_win, nan=0.0) <= 0, axis=(0, 2))
    assert c["never_sampled_neurons"] == np.flatnonzero(live & quiet).tolist() and c["never_sampled"] >= 1
    assert c["scored_neurons"] == [ln["neuron"] for ln in lines if math.isfinite(ln["score"])]
    assert c["dead"] == len(c["dead_neurons"]) and c["always_on"] == len(c["always_on_neurons"])
    # Random-only leaves every dead and every never-sampled unit unscored
    assert not set(c["scored_neurons"]) & (set(c["dead_neurons"]) | set(c["never_sampled_neurons"]))


def test_layer_means_known_answer_and_controls(planted_gpt):
    lines = [_line(0, 0.5, [], []), _line(3, None, [], []), _line(1, 0.1, [], []), _line(4, math.nan, [], [])]
    m = layer_means(lines, dead=[3, 99])  # 99 has no line: a sample of neurons adds no others
    assert m["over_scored"] == pytest.approx(0.3) and m["dead_as_zero"] == pytest.approx(0.2)
    assert (m["n_scored"], m["n_dead"], m["n_dead_as_zero"], m["n_left_out"]) == (2, 1, 3, 1)
    # no dead unit: both estimands agree (negative control)
    m0 = layer_means(lines[:1] + lines[2:], dead=[])
    assert m0["over_scored"] == m0["dead_as_zero"] == pytest.approx(0.3)
    # the recorded model: dead units pull the dead-as-zero mean down by exactly the dead share
    rec, _, rlines = planted_gpt
    c = unit_counts(rec, rlines)
    m = layer_means(rlines, c["dead_neurons"])
    assert m["n_dead"] == c["dead"] >= 2
    assert m["dead_as_zero"] == pytest.approx(m["over_scored"] * m["n_scored"] / m["n_dead_as_zero"])


def test_density_bins_known_answer():
    freq = {0: 0.005, 1: 0.008, 2: 0.3, 3: 1.0, 4: 0.0, 5: 0.05}
    scores = {0: 0.1, 1: 0.3, 2: 0.5, 3: 0.2, 4: math.nan, 5: None, 6: 0.9}  # 4, 5 unscored, 6 has no density
    b = density_bins(freq, scores)
    assert [x["bin"] for x in b] == [[0.0, 0.01], [0.01, 0.05], [0.05, 0.2], [0.2, 0.5], [0.5, 1.0]]
    assert [x["n"] for x in b] == [2, 0, 0, 1, 1]
    assert b[0]["mean"] == pytest.approx(0.2) and b[3]["mean"] == 0.5 and b[4]["mean"] == 0.2
    assert math.isnan(b[1]["mean"]) and all(math.isnan(v) for v in b[1]["ci95"])
    assert b[3]["ci95"] == [0.5, 0.5] and 0.1 <= b[0]["ci95"][0] <= b[0]["ci95"][1] <= 0.3
    assert [x["n"] for x in density_bins(freq, scores, edges=(0.0, 0.05, 1.0))] == [2, 2]  # 0.05 opens the bin
    assert density_bins(freq, scores, n_boot=300, seed=4)[0]["ci95"] == list(bootstrap_ci([0.1, 0.3], 300, seed=4))


def test_density_reweighted_known_answer():
    a = ({0: 0.001, 1: 0.002, 2: 0.3}, {0: 0.1, 1: 0.3, 2: 0.5})
    b = ({0: 0.003, 1: 0.2, 2: 0.25, 3: 0.4, 4: 0.9}, {0: 0.0, 1: 0.4, 2: 0.4, 3: 0.4, 4: 0.9})
    r = density_reweighted(a, b, n_boot=500)
    # bins [0, .01): a {.1, .3}, b {0}; [.2, .5): a {.5}, b {.4 x 3}; [.5, 1]: b only, dropped
    assert r["bins_used"] == [[0.0, 0.01], [0.2, 0.5]]
    assert r["weights"] == pytest.approx([3 / 7, 4 / 7])
    assert r["difference"] == pytest.approx(3 / 7 * 0.2 + 4 / 7 * 0.1)
    assert r["bins_dropped"] == [{"bin": [0.01, 0.05], "n_a": 0, "n_b": 0}, {"bin": [0.05, 0.2], "n_a": 0, "n_b": 0},
                                 {"bin": [0.5, 1.0], "n_a": 0, "n_b": 1}]
    assert r["raw_difference"] == pytest.approx(0.3 - 2.1 / 5)
    # bins of constant scores resample to themselves except a's first: the interval spans its bootstrap only
    lo, hi = r["ci95"]
    assert 3 / 7 * (0.1 - 0.0) + 4 / 7 * 0.1 - 1e-12 <= lo <= r["difference"] <= hi <= 3 / 7 * 0.3 + 4 / 7 * 0.1 + 1e-12


def _system(rng, n_dense, n_rare, shift=0.0):
    """Units whose score depends on density (dense 0.3, rare 0.05, noise 0.05), plus `shift` everywhere."""
    f = np.concatenate([rng.uniform(0.2, 0.5, n_dense), rng.uniform(0.0, 0.01, n_rare)])
    s = np.concatenate([0.3 + rng.normal(0, 0.05, n_dense), 0.05 + rng.normal(0, 0.05, n_rare)]) + shift
    return dict(enumerate(f)), dict(enumerate(s))


def test_density_reweighted_controls():
    rng = np.random.default_rng(1)
    # Simpson: the same units per bin, different mix; the raw difference is large, the reweighted one is not
    a, b = _system(rng, 400, 100), _system(rng, 100, 400)
    r = density_reweighted(a, b)
    assert r["raw_difference"] > 0.12
    assert r["ci95"][0] < 0 < r["ci95"][1] and abs(r["difference"]) < 0.01
    # a real shift of 0.1 in every bin survives reweighting (positive control), with a different mix against it
    a, b = _system(rng, 100, 400, shift=0.1), _system(rng, 400, 100)
    r = density_reweighted(a, b)
    assert r["raw_difference"] < 0 and r["difference"] == pytest.approx(0.1, abs=0.01) and r["ci95"][0] > 0.08
    # the interval's half-width agrees with the normal approximation sqrt(sum w^2 (var_a / n_a + var_b / n_b))
    w = np.asarray(r["weights"])
    se = math.sqrt(sum(wk**2 * 0.05**2 * (1 / na + 1 / nb) for wk, na, nb in zip(w, (400, 100), (100, 400))))
    assert (r["ci95"][1] - r["ci95"][0]) / 2 == pytest.approx(1.96 * se, rel=0.2)
    assert r["weights"] == pytest.approx([0.5, 0.5])
    # reproducible with its seed
    assert density_reweighted(a, b, seed=3) == density_reweighted(a, b, seed=3)
