"""`crate compare` on cases whose answer is known: CKA against the paper's formula written out here, its
invariances and its null; a model stitched into itself costs about nothing, a random-init source costs more; models
that do not share a vocabulary, and folders that are not ours, are refused before any work; a rerun reuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import crate
from crate import build_model
from crate.cli import main
from crate.errors import CrateError
from crate.eval.compare.cka import GramStats, MinibatchCKA, cka, hsic
from crate.eval.compare.stitch import (
    StitchConfig, bottom, fit_stitch, mean_loss, next_token_nll, stitched_loss, top, train_windows,
)
from crate.provenance import ProvenanceError
from conftest import prepare_tiny

T = 32  # the micro preset's context


def hsic1_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. 2012's unbiased HSIC, as Nguyen, Raghu, Kornblith 2021 (appendix) write it, in float64."""
    n = len(x)
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    return float((np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                  - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3)))


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def test_unbiased_hsic_and_cka_equal_the_papers_formula():
    """Small integer case, every pair of a stack of representations (the Gram-statistics identities of cka.py are
    not used by the reference)."""
    rng = np.random.default_rng(0)
    xs = [rng.integers(-3, 4, size=(7, d)).astype(float) for d in (2, 3)]
    ys = [rng.integers(-3, 4, size=(7, d)).astype(float) for d in (1, 2, 4)]
    got = hsic(GramStats.of([_t(x) for x in xs]), GramStats.of([_t(y) for y in ys]))["unbiased"]
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            assert float(got[i, j]) == pytest.approx(hsic1_reference(x, y), rel=1e-12, abs=1e-12)
    x, y = xs[1], ys[2]
    want = hsic1_reference(x, y) / np.sqrt(hsic1_reference(x, x) * hsic1_reference(y, y))
    assert cka(_t(x), _t(y))["unbiased"] == pytest.approx(want, rel=1e-12)


def test_biased_cka_by_hand():
    """One feature each: CKA is the squared Pearson correlation. x = 1,2,3,4 and y = 1,3,2,4 centre to
    (-1.5,-.5,.5,1.5) and (-1.5,.5,-.5,1.5): x.y = 4, |x|^2 = |y|^2 = 5, so CKA = (4/5)^2 = 0.64."""
    x, y = _t([[1], [2], [3], [4]]), _t([[1], [3], [2], [4]])
    assert cka(x, y)["biased"] == pytest.approx(0.64, abs=1e-14)
    assert cka(x, 10 * y + 7)["biased"] == pytest.approx(0.64, abs=1e-14)  # centred: a shift changes nothing


def test_minibatch_cka_is_the_ratio_of_summed_hsic():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(40, 3))
    y[:, 0] += x[:, 0]
    acc = MinibatchCKA()
    for k in range(0, 40, 10):
        acc.update([_t(x[k:k + 10])], [_t(y[k:k + 10])])
    parts = [(x[k:k + 10], y[k:k + 10]) for k in range(0, 40, 10)]
    xy, xx, yy = (sum(hsic1_reference(a, b) for a, b in pairs) for pairs in
                  (parts, [(a, a) for a, _ in parts], [(b, b) for _, b in parts]))
    assert float(acc.result()["unbiased"][0, 0]) == pytest.approx(xy / np.sqrt(xx * yy), rel=1e-12)


def test_cka_of_itself_is_one_and_invariant_to_rotation_and_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(50, 4, generator=g, dtype=torch.float64)
    y = x[:, :3] @ torch.randn(3, 4, generator=g, dtype=torch.float64) + noise
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    before = cka(x, y)
    after = cka(3.7 * x @ q, y)
    for est in ("unbiased", "biased"):
        assert cka(x, x)[est] == pytest.approx(1.0, abs=1e-12)
        assert 0.2 < before[est] < 0.95  # a case where the invariance is not trivially 0 or 1
        assert after[est] == pytest.approx(before[est], rel=1e-10)


def test_unbiased_cka_of_independent_features_is_zero_on_average():
    """n = 64 tokens, 16 features each, 100 seeds: the unbiased estimate has a standard deviation of about 0.023,
    so its mean is within 0.01 of 0 (4 standard errors); the biased one is about d/n-inflated, near 0.2."""
    unbiased, biased = [], []
    for s in range(100):
        g = torch.Generator().manual_seed(s)
        x, y = (torch.randn(64, 16, generator=g, dtype=torch.float64) for _ in range(2))
        r = cka(x, y)
        unbiased.append(r["unbiased"])
        biased.append(r["biased"])
    assert abs(np.mean(unbiased)) < 0.01
    assert np.mean(biased) > 0.15


# --- stitching --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("compare-data"), paragraphs=60)


def _trained(arch: str, train: np.ndarray, seed: int, steps: int = 150) -> torch.nn.Module:
    """A 2-layer micro model trained briefly: a stitch must reproduce what it learned to match its loss."""
    torch.manual_seed(seed)
    model = build_model(arch, "micro", vocab_size=320, n_layer=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = train_windows(train, T, 16, rng)
        loss = next_token_nll(model(idx), idx) / idx[:, 1:].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", params=["crate", "gpt"])
def trained(request, data):
    from crate.train.data import open_split

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _trained(request.param, open_split(data, "train"), 0)
    finally:
        torch.set_num_threads(n)


def _val(data):
    from crate.train.data import open_split

    val = torch.from_numpy(np.asarray(open_split(data, "val")[: 16 * T]).astype(np.int64)).view(16, T)
    return [val[k:k + 8] for k in (0, 8)]


def test_bottom_then_top_is_the_models_forward(trained):
    idx = torch.randint(0, 320, (2, T))
    for layer in (0, 1):
        assert torch.equal(top(trained, bottom(trained, idx, layer), layer), trained(idx))


def test_a_model_stitched_into_itself_costs_about_nothing_and_a_random_source_costs_more(data, trained, one_thread):
    """The least-squares start recovers the identity (penalty below 1e-4 nats; measured 1e-6: float32 forwards of the
    same computation, a float64 solve with a 1e-6 ridge); 30 Adam steps may lower these undertrained models' loss
    through the map, by 0.01-0.03 nats here, so the trained self-stitch is bounded by 0.05 nats (2% of the loss). A
    random-initialised copy of the model, stitched the same way, costs 0.25-0.5 nats here: more than 0.15."""
    import copy

    from crate.eval.models import reset_weights
    from crate.train.data import open_split

    train, val = open_split(data, "train"), _val(data)
    own = mean_loss(trained, val)
    random_init = copy.deepcopy(trained)
    reset_weights(random_init, 0)
    for layer in (0, 1):
        for steps, tol in ((0, 1e-4), (30, 0.05)):
            stitch, _ = fit_stitch(trained, trained, layer, layer, train, T, StitchConfig(steps=steps), 0)
            assert abs(stitched_loss(trained, trained, layer, layer, stitch, val) - own) < tol
        stitch, _ = fit_stitch(random_init.eval(), trained, layer, layer, train, T, StitchConfig(steps=30), 0)
        assert stitched_loss(random_init, trained, layer, layer, stitch, val) - own > 0.15


# --- the command ---------------------------------------------------------------------------------------------------

def _save(path, arch: str, seed: int, **kw) -> str:
    torch.manual_seed(seed)
    crate.save(build_model(arch, "micro", vocab_size=kw.pop("vocab_size", 320), init_std=0.2), path, **kw)
    return str(path)


def test_models_of_other_vocabularies_or_tokenizers_are_refused_before_any_work(tmp_path, data):
    from crate.datadir import read_manifest
    from crate.eval.compare.run import CompareConfig, compare_files

    a, b = _save(tmp_path / "a", "crate", 0), _save(tmp_path / "b", "gpt", 1, vocab_size=400)
    with pytest.raises(CrateError, match=r"a has a vocabulary of 320 tokens and b of 400"):
        compare_files({"a": a, "b": b}, data, tmp_path / "out", CompareConfig())
    ours = read_manifest(data)["tokenizer"]
    c = _save(tmp_path / "c", "crate", 0, tokenizer=ours)
    d = _save(tmp_path / "d", "gpt", 1, tokenizer={**ours, "name": "bpe-other", "sha256": "f" * 64})
    with pytest.raises(CrateError, match=r"c was trained with tokenizer .* and d with bpe-other .* compare models "
                                         r"trained on data prepared with one tokenizer"):
        compare_files({"c": c, "d": d}, data, tmp_path / "out", CompareConfig())
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_ours_is_refused_before_anything_is_read(tmp_path):
    from crate.eval.compare.run import CompareConfig, compare_files

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "index.md").write_text("my notes")
    with pytest.raises(ProvenanceError, match=r"has not marked it as its own \(no .crate-lm among index.md\)"):
        compare_files({"a": str(tmp_path / "none"), "b": str(tmp_path / "none2")}, tmp_path / "no-data", theirs,
                      CompareConfig())
    assert [p.name for p in theirs.iterdir()] == ["index.md"]


@pytest.mark.parametrize("flag", [["--tokens", "0"], ["--stitch-steps", "-1"], ["--stitch-lr", "nan"],
                                  ["--seq-len", "x"], ["--cka-batch", "0"]])
def test_bad_counts_are_usage_errors(tmp_path, flag):
    with pytest.raises(SystemExit) as e:
        main(["compare", "-c", "a=x", "b=y", "-d", str(tmp_path), *flag])
    assert e.value.code == 2


def test_cli_writes_the_folder_reuses_it_and_refuses_other_inputs(tmp_path, data, capsys, one_thread):
    run = tmp_path / "run"
    a = _save(run / "final", "crate", 0)
    _save(run / "grid" / "step-0000010", "crate", 5)
    _save(run / "grid" / "step-0000020", "crate", 0)  # the final state itself: CKA 1 at every layer
    b = _save(tmp_path / "gpt", "gpt", 1)
    out = tmp_path / "cmp"
    args = ["compare", "-c", f"crate={a}", f"gpt={b}", "-d", str(data), "--out", str(out), "--tokens", "256",
            "--seq-len", str(T), "--cka-batch", "64", "--stitch-steps", "3", "--stitch-batch", "2",
            "--trajectory", str(run)]
    assert main(args) == 0
    res = json.loads((out / "compare.json").read_text())
    assert {"index.md", "cka.md", "cka.csv", "cka-crate-vs-gpt.png", "stitch.md", "stitch.csv", "trajectory.md",
            "trajectory.csv", "trajectory.png"} <= {p.name for p in out.iterdir()}
    (pair,) = res["cka"]
    assert (pair["a"], pair["b"], pair["same_arch"]) == ("crate", "gpt", False)
    assert res["settings"]["n_minibatches"] == 4 and res["settings"]["n_tokens"] == 256
    fingerprints = {n: m["identity"]["weights_fingerprint"] for n, m in res["models"].items()}
    assert len(set(fingerprints.values())) == 2 and res["models"]["gpt"]["arch"] == "gpt"
    kinds = {(r["kind"], r["source"], r["target"]) for r in res["stitch"]}
    assert kinds == {("self", "crate", "crate"), ("self", "gpt", "gpt"), ("trained", "crate", "gpt"),
                     ("trained", "gpt", "crate"), ("control", "crate", "gpt"), ("control", "gpt", "crate")}
    traj = res["trajectory"]
    assert traj["steps"] == [10, 20] and traj["resid"]["unbiased"][1] == pytest.approx([1.0], abs=1e-9)
    assert traj["neurons"]["unbiased"][1] == pytest.approx([1.0], abs=1e-9) and traj["resid"]["unbiased"][0][0] < 0.99
    assert "| crate | gpt | no |" in (out / "index.md").read_text()
    stamp_time = (out / "compare.json").stat().st_mtime_ns

    capsys.readouterr()
    assert main(args) == 0
    assert "reused (same models, tokens and settings)" in capsys.readouterr().out
    assert (out / "compare.json").stat().st_mtime_ns == stamp_time

    other = [*args[:args.index("--tokens")], "--tokens", "128", *args[args.index("--tokens") + 2:]]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "settings.tokens: 256 -> 128" in err and "--overwrite" in err
    assert (out / "compare.json").stat().st_mtime_ns == stamp_time
