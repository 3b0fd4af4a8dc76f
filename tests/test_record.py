"""Activation recording against brute force on a small activation tensor; records in neuron_explainer's format."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from crate import build_model
from crate.eval.record.recorder import LayerRecording, RecordingSpec, random_positions, record_activations
from crate.eval.record.recordings_io import write_records
from crate.eval.record.windows import neuron_windows, window_token_ids
from crate.eval.record.neuron_record import (
    ActivationRecord, NeuronId, NeuronRecord, load_neuron_record, loads, record_path, to_dict,
)

T, NSEQ = 32, 20

# neuron_explainer's fields, copied from openai/automated-interpretability,
# neuron-explainer/neuron_explainer/activations/activations.py (commit 0f08c3d2): ActivationRecord, NeuronId,
# NeuronRecord, in declaration order. Each also has `dataclass_name` (fast_dataclasses.FastDataclass: a field with
# init=False that `loads` strips before calling the constructor with every other key).
OPENAI_FIELDS = {
    "ActivationRecord": ["tokens", "activations"],
    "NeuronId": ["layer_index", "neuron_index"],
    "NeuronRecord": ["neuron_id", "random_sample", "random_sample_by_quantile", "quantile_boundaries",
                     "mean", "variance", "skewness", "kurtosis", "most_positive_activation_records"],
}


def _brute(model, stream, layer=0):
    ids = torch.from_numpy(stream[: NSEQ * T].astype(np.int64)).view(NSEQ, T)
    _, cache = model.run_with_cache(ids, [model.neuron_hook(layer)])
    return cache[model.neuron_hook(layer)].reshape(NSEQ * T, -1).double().numpy()


@pytest.fixture(scope="module", params=["crate", "gpt"])
def setup(request):
    torch.manual_seed(1)
    model = build_model(request.param, "micro").eval()
    with torch.no_grad():  # neuron 1 never fires: a constant neuron (its skewness and kurtosis are undefined)
        block = model.transformer.h[0]
        (block.ista.weight if request.param == "crate" else block.mlp.c_fc.weight)[1] = 0.0
    rng = np.random.default_rng(0)
    stream = rng.integers(0, model.config.vocab_size, size=NSEQ * T + 7).astype(np.uint16)
    spec = RecordingSpec(seq_len=T, window=8, top_k=6, n_random=5, n_bins=4, per_bin=3, seed=3, batch_size=3,
                         device="cpu")
    recs = record_activations(model, stream, spec, layers=[0])
    return model, stream, recs["0"], _brute(model, stream)


def test_topk_moments_and_windows_match_brute_force(setup):
    model, stream, rec, A = setup
    assert rec.n_tokens == NSEQ * T  # the 7 trailing tokens are not a whole sequence
    order = np.argsort(-A, axis=0, kind="stable")[:6]
    np.testing.assert_allclose(rec.top_vals, np.take_along_axis(A, order, 0), rtol=1e-5, atol=1e-6)
    for n in range(A.shape[1]):  # positions equal up to ties
        np.testing.assert_allclose(A[rec.top_pos[:, n], n], rec.top_vals[:, n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rec.mean, A.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rec.var, A.var(0), rtol=1e-4, atol=1e-9)
    c = A - A.mean(0)
    m2, m3, m4 = (c**2).mean(0), (c**3).mean(0), (c**4).mean(0)
    ok = m2 > 1e-10
    np.testing.assert_allclose(rec.skew[ok], m3[ok] / m2[ok] ** 1.5, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(rec.kurt[ok], m4[ok] / m2[ok] ** 2 - 3, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(rec.active_count, (A > 0).sum(0))
    assert rec.l0_sum == pytest.approx((A > 0).sum())
    # windows: activations of the window around each top position, clipped to its sequence
    for k in range(6):
        for n in (0, 5, A.shape[1] - 1):
            p = rec.top_pos[k, n]
            s, t = divmod(p, T)
            lo, hi = max(0, t - 4), min(T, t + 4)
            got = rec.top_win[k, n]
            want = np.full(8, np.nan)
            want[lo - t + 4 : hi - t + 4] = A[s * T + lo : s * T + hi, n]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # random windows at the pre-drawn positions
    np.testing.assert_array_equal(rec.rand_pos, random_positions(NSEQ * T, A.shape[1], 5, seed=3))
    for r in range(5):
        n = 7
        p = rec.rand_pos[r, n]
        np.testing.assert_allclose(rec.rand_win[r, n, 4], A[p, n], rtol=1e-5, atol=1e-6)


def test_token_selectivity_matches_brute_force(setup):
    model, stream, rec, A = setup
    ids = stream[: NSEQ * T].astype(np.int64)
    n = int(np.argmax((A > 0).sum(0)))
    mass = np.bincount(ids, weights=np.maximum(A[:, n], 0), minlength=model.config.vocab_size)
    p = mass / mass.sum()
    assert rec.token_top10_share[n] == pytest.approx(np.sort(mass)[-10:].sum() / mass.sum(), rel=1e-4)
    nz = p[p > 0]
    assert rec.token_effective_types[n] == pytest.approx(np.exp(-(nz * np.log(nz)).sum()), rel=1e-4)


def test_quantile_boundaries_and_samples(setup):
    model, stream, rec, A = setup
    for n in range(A.shape[1]):
        pos = A[:, n][A[:, n] > 0]
        if len(pos) < 20:
            continue
        want = np.quantile(pos, np.arange(5) / 4)
        got = rec.boundaries[n]
        # interior boundaries within the histogram's resolution (3.3% relative) plus one rank either side
        for j in (1, 2, 3):
            lo, hi = np.quantile(pos, [max(0, j / 4 - 1.5 / len(pos)), min(1, j / 4 + 1.5 / len(pos))])
            assert lo / 1.04 <= got[j] <= hi * 1.04, (n, j, got[j], want[j])
        assert got[-1] == pytest.approx(pos.max(), rel=1e-6)
        for q in range(4):
            in_bin = np.flatnonzero((A[:, n] > got[q]) & (A[:, n] <= got[q + 1]))
            sampled = [p for p in rec.q_pos[q, :, n] if p >= 0]
            assert len(sampled) == min(3, len(in_bin)), (n, q)
            assert len(set(sampled)) == len(sampled) and set(sampled) <= set(in_bin.tolist())
            for i, p in enumerate(rec.q_pos[q, :, n]):
                if p >= 0:
                    assert rec.q_win[q, i, n, 4] == pytest.approx(A[p, n], rel=1e-5, abs=1e-6)


def test_without_quantile_bins_the_other_records_are_the_same(setup):
    """per_bin 0 skips the second pass (what a protocol without quantile records asks for): every other array of the
    recording is bit-identical to the two-pass one, so its scores are too."""
    model, stream, rec, _ = setup
    spec = RecordingSpec(seq_len=T, window=8, top_k=6, n_random=5, n_bins=4, per_bin=0, seed=3, batch_size=3,
                         device="cpu")
    one = record_activations(model, stream, spec, layers=[0])["0"]
    assert (one.q_pos == -1).all() and rec.q_pos.max() >= 0
    for f in dataclasses.fields(LayerRecording):
        if f.name not in ("q_pos", "q_win"):
            np.testing.assert_array_equal(np.asarray(getattr(one, f.name)), np.asarray(getattr(rec, f.name)), f.name)


def test_random_positions_shared_across_models_and_reproducible():
    a = random_positions(10_000, 8, 5, seed=0)
    b = random_positions(10_000, 16, 5, seed=0)  # a wider model: same positions for the shared neurons
    np.testing.assert_array_equal(a, b[:, :8])
    assert not np.array_equal(a, random_positions(10_000, 8, 5, seed=1))
    stream = np.arange(NSEQ * T, dtype=np.int64) % 128
    spec = RecordingSpec(seq_len=T, window=8, top_k=3, n_random=4, per_bin=0, seed=5, batch_size=4, device="cpu")
    rc = record_activations(build_model("crate", "micro"), stream, spec, layers=[0])["0"]
    rg = record_activations(build_model("gpt", "micro"), stream, spec, layers=[0])["0"]
    np.testing.assert_array_equal(rc.rand_pos, rg.rand_pos)


def test_windows_at_stream_edges():
    stream = np.arange(3 * 10)
    ids = window_token_ids(stream, np.array([0, 9, 10, 15, 29]), seq_len=10, window=8, left=4)
    assert ids[0].tolist() == [-1, -1, -1, -1, 0, 1, 2, 3]  # start of the stream
    assert ids[1].tolist() == [5, 6, 7, 8, 9, -1, -1, -1]  # end of a sequence: the next one is not context
    assert ids[2].tolist() == [-1, -1, -1, -1, 10, 11, 12, 13]  # start of a sequence
    assert ids[3].tolist() == [11, 12, 13, 14, 15, 16, 17, 18]
    assert ids[4].tolist() == [25, 26, 27, 28, 29, -1, -1, -1]  # end of the stream


def test_neuron_record_json_roundtrip_in_neuron_explainer_format(setup, tmp_path):
    model, stream, rec, A = setup
    strings = [f"t{i}" for i in range(model.config.vocab_size)]
    write_records({"0": rec}, stream, strings, tmp_path, neurons={"0": [2, 3]})
    nr = load_neuron_record(record_path(tmp_path, 0, 3))
    assert isinstance(nr, NeuronRecord) and nr.neuron_id == NeuronId(0, 3)
    w = neuron_windows(rec, 3, stream, strings)
    first = nr.most_positive_activation_records[0]
    assert first.tokens == w["top"][0].tokens and first.tokens[w["top"][0].center] == strings[stream[rec.top_pos[0, 3]]]
    assert first.activations[w["top"][0].center] == pytest.approx(float(A[:, 3].max()), rel=1e-5)
    assert len(nr.random_sample) == 5 and len(nr.random_sample_by_quantile) == 4
    raw = json.loads(record_path(tmp_path, 0, 3).read_text())
    assert raw["dataclass_name"] == "NeuronRecord" and raw["neuron_id"]["dataclass_name"] == "NeuronId"
    assert set(raw) == {"dataclass_name", *OPENAI_FIELDS["NeuronRecord"]}
    assert raw["random_sample"][0]["dataclass_name"] == "ActivationRecord"
    assert set(raw["random_sample"][0]) == {"dataclass_name", "tokens", "activations"}
    assert loads(json.dumps(to_dict(ActivationRecord(["a"], [1.0])))) == ActivationRecord(["a"], [1.0])
    back = LayerRecording.load(tmp_path / "0" / "cache.npz")
    np.testing.assert_array_equal(back.top_pos, rec.top_pos)
    assert back.layer == "0" and back.seq_len == T


def test_explanation_free_measures_match_brute_force(setup):
    from crate.eval.record.measures import layer_measures

    model, stream, rec, A = setup
    m = layer_measures(rec, always_on_threshold=0.5, top_records=6)
    active = A > 0
    assert m["l0_per_token"] == pytest.approx(active.sum(1).mean())
    assert m["l0_per_token_std"] == pytest.approx(active.sum(1).std(), rel=1e-6, abs=1e-9)
    assert m["dead"] == int((active.sum(0) == 0).sum())
    assert m["always_on"] == int((active.mean(0) >= 0.5).sum())
    assert m["activation_frequency_mean"] == pytest.approx(active.mean())
    def ratio_median(rec):
        ratios = []
        for n in np.flatnonzero(active.sum(0) > 0):
            top = np.nanmean(np.clip(rec.top_win[:6, n], 0, None))
            rnd = np.nanmean(np.clip(rec.rand_win[:, n], 0, None))
            ratios.append(top / rnd if rnd > 0 else np.inf)
        return float(np.median(ratios))

    assert m["top_random_ratio_median"] == pytest.approx(ratio_median(rec))
    # negative values (a GELU unit) count as 0 on both sides: the top side is not lowered alone
    import copy

    gelu = copy.deepcopy(rec)
    gelu.top_win = np.where(gelu.top_win == 0, -0.17, gelu.top_win)
    assert layer_measures(gelu, top_records=6)["top_random_ratio_median"] == pytest.approx(ratio_median(rec))


def openai_loads(text: str):
    """neuron_explainer.fast_dataclasses.loads, restated: json object_hook -> registered class by dataclass_name,
    called with every other key as a keyword (an unknown or missing key raises TypeError)."""
    classes = {name: dataclasses.make_dataclass(name, fields) for name, fields in OPENAI_FIELDS.items()}

    def hook(d):
        name = d.get("dataclass_name")
        assert name in classes, f"untagged or unknown object: {sorted(d)}"
        return classes[name](**{k: v for k, v in d.items() if k != "dataclass_name"})

    return json.loads(text, object_hook=hook)


def population_moments(xs: list[float]) -> tuple[float, float, float, float]:
    """mean, population variance, skewness m3/m2^1.5, excess kurtosis m4/m2^2 - 3; plain float64, no numpy."""
    n = len(xs)
    mean = math.fsum(xs) / n
    m2, m3, m4 = (math.fsum((x - mean) ** k for x in xs) / n for k in (2, 3, 4))
    return mean, m2, m3 / m2**1.5, m4 / m2**2 - 3.0


def test_records_are_field_exact_to_neuron_explainer_and_carry_the_moments(setup, tmp_path):
    model, stream, rec, A = setup
    assert [f.name for f in dataclasses.fields(NeuronRecord)] == OPENAI_FIELDS["NeuronRecord"]
    assert [f.name for f in dataclasses.fields(ActivationRecord)] == OPENAI_FIELDS["ActivationRecord"]
    assert [f.name for f in dataclasses.fields(NeuronId)] == OPENAI_FIELDS["NeuronId"]
    strings = [f"t{i}" for i in range(model.config.vocab_size)]
    write_records({"0": rec}, stream, strings, tmp_path)

    def objects(x):
        if isinstance(x, dict):
            yield x
            for v in x.values():
                yield from objects(v)
        elif isinstance(x, list):
            for v in x:
                yield from objects(v)

    n_constant = 0
    for n in range(A.shape[1]):
        text = record_path(tmp_path, 0, n).read_text()
        for obj in objects(json.loads(text)):  # a tag on every object, and exactly that class's fields
            assert set(obj) == {"dataclass_name", *OPENAI_FIELDS[obj["dataclass_name"]]}
        theirs = openai_loads(text)
        assert type(theirs).__name__ == "NeuronRecord" and theirs.neuron_id.neuron_index == n
        assert type(theirs.most_positive_activation_records[0]).__name__ == "ActivationRecord"
        xs = [float(a) for a in A[:, n]]  # every recorded token (NSEQ * T), float64
        if max(xs) == min(xs):  # a constant neuron: no skewness or kurtosis (JSON null, NaN in Python)
            n_constant += 1
            assert theirs.variance == 0 and theirs.skewness is None and theirs.kurtosis is None
            assert math.isnan(load_neuron_record(record_path(tmp_path, 0, n)).kurtosis)
            continue
        want = population_moments(xs)
        got = (theirs.mean, theirs.variance, theirs.skewness, theirs.kurtosis)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-9), n
    assert n_constant == 1  # neuron 1
