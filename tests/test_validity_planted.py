"""Planted units through the real record -> explain -> simulate -> score path (stats explainer and simulator) on a
tiny CRATE model and the embedded corpus: their values against a float64 numpy recomputation from the token ids,
their densities, the scores of units whose truth is known, and the provenance of a re-plant."""

import json

import numpy as np
import pytest
import torch

from crate.errors import CrateError
from crate.eval.autointerp.config import InterpretConfig
from crate.eval.autointerp.explainers import token_key
from crate.eval.autointerp.interpret import plan_interpret, run_interpret
from crate.eval.autointerp.records import load_token_strings
from crate.eval.validity.planted import FAMILIES, PlantedUnit, family_table, plant_units
from crate.hooks import record
from crate.model import build_model
from crate.provenance import check_stamp, weights_hash
from crate.train.data import open_split

N_TOKENS, T, VOCAB = 8192, 128, 320


def _cfg(**kw):
    return InterpretConfig(**{**dict(protocol="tar", explainer="stats", simulator="stats", layers=[0], neurons=None,
                                     n_tokens=N_TOKENS, seq_len=T, n_boot=200, device="cpu"), **kw})


def _lines(out):
    return [json.loads(x) for x in (out / "scores" / "tar" / "0.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(data_dir, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # other test processes share the cores (conftest's one_thread, for the module)
    torch.manual_seed(0)
    model = build_model("crate", "micro", vocab_size=VOCAB, block_size=T)
    stream, strings = open_split(data_dir, "val"), load_token_strings(data_dir, VOCAB)
    planted = plant_units(model, stream, strings, N_TOKENS, T)
    out = tmp_path_factory.mktemp("planted")
    summary = run_interpret(None, None, out, _cfg(), model=planted, stream=stream, token_strings=strings)
    yield dict(model=model, stream=stream, strings=strings, planted=planted, out=out, summary=summary)
    torch.set_num_threads(threads)


# --- an independent recomputation: numpy float64 from the units' keys and seeds, unsigned 64-bit hash arithmetic
M32 = np.uint64(0xFFFFFFFF)


def _mix(x):
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & M32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & M32
    return x ^ (x >> np.uint64(16))


def _uniform(ids, seed):
    n = ids.shape[1]
    t = np.arange(n, dtype=np.uint64)
    seq = _mix(_mix((_mix(t)[None] + ids.astype(np.uint64)) & M32).sum(1) & M32)
    u = _mix((_mix(seq ^ np.uint64(seed))[:, None] + t[None]) & M32)
    return (u >> np.uint64(8)).astype(np.float64) / 2**24


def reference(unit: PlantedUnit, ids: np.ndarray, strings) -> np.ndarray:
    """(B, T) float64 values of `unit` on token ids (B, T), from its definition."""
    table = dict(unit.keys)
    by_id = np.array([table.get(token_key(s), 0.0) for s in strings])
    n = ids.shape[1]
    if unit.family == "previous-token":
        return np.concatenate([np.zeros((len(ids), 1)), by_id[ids[:, :-1]]], axis=1)
    if unit.family == "position":
        return np.broadcast_to(np.arange(n) / (n - 1), ids.shape)
    if unit.family == "noise-dense":
        return _uniform(ids, unit.seed)
    if unit.family == "noise-sparse":
        return (_uniform(ids, unit.seed) < 0.05).astype(np.float64)
    return by_id[ids]


def test_hook_values_equal_reference_and_the_rest_is_the_base(setup):
    planted, model, strings = setup["planted"], setup["model"], setup["strings"]
    K = len(planted.units)
    assert K == len(FAMILIES) * 4 and [u.family for u in planted.units[::4]] == list(FAMILIES)
    ids = torch.from_numpy(np.asarray(setup["stream"][: 6 * T], dtype=np.int64)).view(6, T)
    hook = planted.neuron_hook(0)
    assert hook == "base." + model.neuron_hook(0) and hook in planted.hook_names()
    with torch.no_grad(), record(planted, [hook]) as got:  # registered before the forward, as the recorder does
        logits = planted(ids)
    with torch.no_grad(), record(model, [model.neuron_hook(0)]) as base:
        base_logits = model(ids)
    a = got[hook].double().numpy()
    for u in planted.units:
        np.testing.assert_allclose(a[..., u.neuron], reference(u, ids.numpy(), strings), atol=1e-6, rtol=0,
                                   err_msg=u.family)
    assert torch.equal(got[hook][..., K:], base[model.neuron_hook(0)][..., K:])  # the base's own neurons
    assert not torch.allclose(logits, base_logits)  # the planted values feed the rest of the model
    # the noise is a function of the whole sequence: the same tokens in another sequence get other values
    u = next(x for x in planted.units if x.family == "noise-dense")
    swapped = ids.clone()
    swapped[0, -1] = (ids[0, -1] + 1) % VOCAB
    assert not np.allclose(reference(u, swapped.numpy(), strings)[0, :5], a[0, :5, u.neuron])


def test_densities_as_asked(setup):
    planted, strings = setup["planted"], setup["strings"]
    ids = np.asarray(setup["stream"][:N_TOKENS], dtype=np.int64).reshape(-1, T)
    for u in planted.units:
        assert u.density == pytest.approx((reference(u, ids, strings) > 0).mean(), abs=1e-12), u.family
        if u.family.startswith("lookup"):
            target = int(u.family[len("lookup-"):-1]) / 100
            assert target * 0.9 <= u.density <= target, u.describe
            assert all(0.2 <= v <= 1.0 for _, v in u.keys)
        if u.family.startswith("indicator"):
            assert len(u.keys) == int(u.family.split("-")[1]) and 0 < u.density <= 0.02 * len(u.keys)
    dens = {f: [u.density for u in planted.units if u.family == f] for f in FAMILIES}
    assert all(0.09 <= d <= 0.1 for d in dens["previous-token"])
    assert all(abs(d - 0.05) < 0.01 for d in dens["noise-sparse"])
    assert dens["position"] == [pytest.approx((T - 1) / T)] * 4 and min(dens["noise-dense"]) > 0.999


def test_scores_of_known_units(setup):
    lines, planted, summary = _lines(setup["out"]), setup["planted"], setup["summary"]
    K = len(planted.units)
    assert [x["neuron"] for x in lines] == list(range(K))  # neurons=None: the planted units, nothing else
    assert summary["layers"]["0"]["n_total"] == K
    score = {x["neuron"]: x["score"] for x in lines}
    ind1 = [score[u.neuron] for u in planted.units if u.family == "indicator-1"]
    assert ind1 == [pytest.approx(1.0, abs=1e-9)] * 4  # its explanation names its one key: a perfect simulation
    tab = family_table(lines, planted.units, n_boot=200)
    carried = {m for m in ("score", "auprc", "random_score") if m in lines[0]}  # the metrics the lines carry
    assert list(tab) == list(FAMILIES) and all(set(v) == carried for v in tab.values())
    mean = {f: tab[f]["score"]["mean"] for f in FAMILIES}
    for f in ("noise-dense", "noise-sparse", "position"):  # nothing a token explains
        assert abs(mean[f]) < 0.25 and tab[f]["score"]["n"] == 4, (f, mean[f])
    assert mean["lookup-2%"] > 0.8 and mean["lookup-2%"] > mean["lookup-49%"] + 0.1  # the density bias
    assert min(mean[f] for f in FAMILIES if f.startswith(("indicator", "lookup"))) > max(
        mean["noise-dense"], mean["noise-sparse"], mean["previous-token"])


def _unit(neuron, family):
    return PlantedUnit(neuron, family, 0, 0.1, family)


def test_family_table_known_answers():
    units = [_unit(0, "lookup-2%"), _unit(1, "lookup-2%"), _unit(2, "lookup-2%"), _unit(3, "noise-dense"),
             _unit(4, "indicator-1"), _unit(5, "position")]
    lines = [{"neuron": 0, "score": 0.2, "auprc": 0.9}, {"neuron": 1, "score": 0.6}, {"neuron": 2, "score": None},
             {"neuron": 3, "score": 0.0, "auprc": 0.1}, {"neuron": 4, "score": 1.0}]  # no line for neuron 5
    tab = family_table(lines, units, metrics=("score", "auprc"))
    assert list(tab) == ["indicator-1", "lookup-2%", "noise-dense"]  # display order; position has no line
    # two values: the bootstrap means are 0.2, 0.4 or 0.6 (1/4, 1/2, 1/4): the 2.5% and 97.5% points are the ends
    assert tab["lookup-2%"]["score"] == {"mean": pytest.approx(0.4), "ci95": [0.2, 0.6], "n": 2, "n_nan": 1}
    assert tab["lookup-2%"]["auprc"] == {"mean": 0.9, "ci95": [0.9, 0.9], "n": 1, "n_nan": 0}
    assert tab["indicator-1"] == {"score": {"mean": 1.0, "ci95": [1.0, 1.0], "n": 1, "n_nan": 0}}  # no auprc
    assert tab["noise-dense"]["score"]["mean"] == 0.0


def test_replant_changes_identity_and_records_again(setup, tmp_path):
    model, stream, strings, planted = setup["model"], setup["stream"], setup["strings"], setup["planted"]
    same = plant_units(model, stream, strings, N_TOKENS, T)
    other = plant_units(model, stream, strings, N_TOKENS, T, seed=1)
    fewer = plant_units(model, stream, strings, N_TOKENS, T, families=FAMILIES[:-1])
    assert weights_hash(same) == weights_hash(planted)
    assert len({weights_hash(planted), weights_hash(other), weights_hash(fewer)}) == 3
    assert other.planted_identity == {**planted.planted_identity, "seed": 1}
    out = setup["out"]
    records = out / "records"
    assert check_stamp(records, plan_interpret(None, None, out, _cfg(), model=same, stream=stream,
                                               token_strings=strings).records_identity)[0] == "reuse"
    plan = plan_interpret(None, None, out, _cfg(), model=other, stream=stream, token_strings=strings, overwrite=True)
    assert check_stamp(records, plan.records_identity)[0] == "stale"
    # recorded again: run it in a copy of the folder, whose records then hold the new units
    import shutil

    shutil.copytree(out, tmp_path / "o")
    before = np.load(tmp_path / "o" / "records" / "0" / "cache.npz")["top_pos"][:, :4]
    run_interpret(None, None, tmp_path / "o", _cfg(), model=other, stream=stream, token_strings=strings,
                  overwrite=True)
    assert check_stamp(tmp_path / "o" / "records", plan.records_identity)[0] == "reuse"
    after = np.load(tmp_path / "o" / "records" / "0" / "cache.npz")["top_pos"][:, :4]
    assert not np.array_equal(before, after)  # other indicator keys, other top positions


def test_refusals(setup):
    model, stream, strings = setup["model"], setup["stream"], setup["strings"]
    with pytest.raises(CrateError, match=r"10 families x 13 replicates = 130 planted units.*only 128 neurons.*fewer"):
        plant_units(model, stream, strings, N_TOKENS, T, replicates=13)
    plant_units(model, stream, strings, 8 * T, T, families=["indicator-4"])  # 1024 tokens are enough for 4 keys
    with pytest.raises(CrateError, match=r"indicator-16 needs 16 of the token keys .* the 1,024 recorded tokens have "
                                         r"\d+: record more tokens"):
        plant_units(model, stream, strings, 8 * T, T, families=["indicator-16"])
    # not strict (as --validity plants): the family is left out and named, the others planted
    lenient = plant_units(model, stream, strings, 8 * T, T, families=["indicator-16", "position"], strict=False)
    assert [u.family for u in lenient.units] == ["position"] * 4 and "record more tokens" in lenient.skipped[
        "indicator-16"] and lenient.planted_identity["skipped"] == lenient.skipped
    with pytest.raises(CrateError, match="families must be some of"):
        plant_units(model, stream, strings, N_TOKENS, T, families=["lookup-3%"])


def test_planted_at_a_gelu_gpts_neurons(setup):
    """The hook is the architecture's: on a GELU GPT the recorder reads the planted values too, and the model's own
    neurons past them are the GPT's (negative values included)."""
    stream, strings = setup["stream"], setup["strings"]
    torch.manual_seed(0)
    gpt = build_model("gpt", "micro", vocab_size=VOCAB, block_size=T, activation="gelu")
    planted = plant_units(gpt, stream, strings, N_TOKENS, T, families=["indicator-1", "noise-dense"], replicates=2)
    ids = torch.from_numpy(np.asarray(stream[: 4 * T], dtype=np.int64)).view(4, T)
    hook = planted.neuron_hook(0)
    with torch.no_grad(), record(planted, [hook]) as got:
        planted(ids)
    a = got[hook].double().numpy()
    for u in planted.units:
        np.testing.assert_allclose(a[..., u.neuron], reference(u, ids.numpy(), strings), atol=1e-6, rtol=0)
    assert (a[..., 4:] < 0).any()  # GELU's own neurons, untouched
