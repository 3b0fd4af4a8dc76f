"""SAEs on a model's neurons (crate.eval.sae): SAELens training and format, metrics against hand-computed and
independently re-derived values, resampling, and SAE latents through the interpret pipeline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import crate
from crate import build_model
from crate.cli import main
from crate.errors import CrateError
from crate.eval.models import split_sae_spec
from crate.eval.sae.attach import attach_saes, load_sae
from crate.eval.sae.metrics import dead_threshold, explained_variance, read_metrics, sae_metrics
from crate.eval.sae.train import SAETrainConfig, resample_dead, train_sae
from crate.hooks import hooks
from conftest import prepare_tiny

T = 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared corpus, an untrained micro GPT (seeded) and a ReLU SAE trained on its neurons by the CLI."""
    root = tmp_path_factory.mktemp("sae")
    data = prepare_tiny(root)
    torch.manual_seed(0)
    ckpt = root / "gpt" / "final"
    crate.save(build_model("gpt", "micro", vocab_size=320, init_std=0.2), ckpt)  # large enough that the MLP matters
    args = ["sae", "train", "-c", str(ckpt), "-d", str(data), "--layer", "0", "--expansion", "2", "--steps", "60",
            "--batch-tokens", "128", "--lm-batch", "8", "--seq-len", str(T), "--buffer-tokens", "512",
            "--resample-at", "30", "--dead-window", "10", "--eval-tokens", "2048", "--lr", "3e-3", "--l1", "1e-3",
            "--device", "cpu"]
    assert main(args) == 0
    return data, ckpt, root / "gpt" / "sae" / "relu-l0", args


def test_explained_variance_about_the_mean_by_hand():
    x = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    x_hat = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    # mean (1, 2): total squares 1+4+1+4 = 10, residual squares 1+1 = 2 -> 1 - 2/10
    assert explained_variance(x, x_hat) == pytest.approx(0.8, abs=1e-12)
    assert dead_threshold(2_000_000) == 15 and dead_threshold(4096) == pytest.approx(15 * 4096 / 2e6)


def test_cli_trains_relu_sae_that_saelens_reads_and_the_loss_falls(prepared, capsys):
    from sae_lens import SAE
    from sae_lens.saes.standard_sae import StandardSAE

    data, ckpt, out, args = prepared
    sae = SAE.load_from_disk(out)
    assert isinstance(sae, StandardSAE) and sae.cfg.d_in == 128 and sae.cfg.d_sae == 256
    assert sae.cfg.metadata.hook_name == "transformer.h.0.hook_neurons"
    m = read_metrics(out)
    tr = m["training"]
    assert tr["loss_last"] < 0.5 * tr["loss_first"]  # SAELens's MSE + L1 falls
    assert set(tr["resampled"]) == {"30"}
    from safetensors.torch import load_file

    freq = 10 ** load_file(out / "sparsity.safetensors")["sparsity"].double()
    assert freq.shape == (256,) and float(freq.sum()) == pytest.approx(m["l0"], rel=1e-4)  # L0 = sum of frequencies
    assert main(args) == 0  # the same inputs: reused, not retrained
    assert main([*args, "--seed", "1"]) != 0  # other settings into the same folder: refused, naming the fix
    assert "config.seed: 0 -> 1" in capsys.readouterr().err


def _reference_metrics(model, sae, idx):
    """L0, explained variance, cosine and CE recovered from the SAE's raw weights in float64 (ReLU SAE)."""
    hook = "transformer.h.0.hook_neurons"
    logits, cache = model.run_with_cache(idx, [hook])
    x = cache[hook].double().reshape(-1, cache[hook].shape[-1])
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    f = torch.relu((x - b_dec) @ W_enc + b_enc)
    x_hat = f @ W_dec + b_dec
    ev = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    cos = ((x * x_hat).sum(1) / (x.norm(dim=1) * x_hat.norm(dim=1))).mean()

    def ce(lg):
        lp = torch.log_softmax(lg[:, :-1].double(), -1)
        return float(-lp.gather(-1, idx[:, 1:, None]).mean())

    mean = x.mean(0).float()
    out = {"clean": ce(logits)}
    for name, fn in {"sae": lambda a: x_hat.float().view_as(a), "zero": torch.zeros_like,
                     "mean": lambda a: mean.expand_as(a)}.items():
        with torch.no_grad(), hooks(model, {hook: fn}):
            out[name] = ce(model(idx))
    return float((f > 0).sum(1).double().mean()), float(ev), float(cos), out


def test_metrics_equal_an_independent_float64_derivation(prepared):
    from crate.train.data import open_split

    data, ckpt, out, _ = prepared
    model, sae = crate.load(ckpt), load_sae(out)
    val = open_split(data, "val")
    n_seq = 6
    m = sae_metrics(model, sae, val, n_seq * T, T, batch=4)
    idx = torch.from_numpy(np.asarray(val[: n_seq * T]).astype(np.int64)).view(n_seq, T)
    l0, ev, cos, ce = _reference_metrics(model, sae, idx)
    assert m["n_tokens"] == n_seq * T
    assert m["l0"] == pytest.approx(l0, rel=1e-6)
    assert m["explained_variance"] == pytest.approx(ev, abs=1e-5)
    assert m["cosine_similarity"] == pytest.approx(cos, abs=1e-5)
    for k in ce:
        assert m["ce_loss"][k] == pytest.approx(ce[k], abs=1e-5)
    assert m["ce_recovered_vs_zero"] == pytest.approx((ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]), rel=1e-3)
    assert m["ce_recovered_vs_mean"] == pytest.approx((ce["mean"] - ce["sae"]) / (ce["mean"] - ce["clean"]), rel=1e-3)


def _identity_sae(d: int):
    """A ReLU SAE that reconstructs non-negative inputs exactly: W_enc = W_dec = I, no biases."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    meta = SAEMetadata(hook_name="transformer.h.0.hook_neurons")
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d, metadata=meta))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_a_perfect_reconstruction_recovers_everything_and_dead_latents_are_the_silent_neurons():
    torch.manual_seed(0)
    model = build_model("gpt", "micro").eval()
    sae = _identity_sae(model.n_neurons)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[:3] = 0.0  # neurons 0-2 are relu(0) = 0 everywhere: dead
    stream = np.random.default_rng(0).integers(0, 128, size=8 * T).astype(np.uint16)
    m = sae_metrics(model, sae, stream, 8 * T, T)
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert m["cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert m["ce_loss"]["sae"] == pytest.approx(m["ce_loss"]["clean"], abs=1e-6)
    assert m["ce_recovered_vs_zero"] == pytest.approx(1.0, abs=1e-3)
    _, cache = model.run_with_cache(torch.from_numpy(stream.astype(np.int64)).view(8, T), ["transformer.h.0.hook_neurons"])
    active = (cache["transformer.h.0.hook_neurons"] > 0).reshape(-1, model.n_neurons)
    assert m["l0"] == pytest.approx(float(active.sum(1).double().mean()))
    assert m["dead_latents"] == [int(i) for i in (~active.any(0)).nonzero().flatten()] and m["dead_latents"][:3] == [0, 1, 2]
    assert m["dead_fraction"] == pytest.approx(len(m["dead_latents"]) / model.n_neurons)


def test_topk_sae_trains_keeps_k_latents_and_reloads(tmp_path):
    from sae_lens import SAE
    from sae_lens.saes.topk_sae import TopKSAE

    torch.manual_seed(0)
    model = build_model("gpt", "micro").eval()
    stream = np.random.default_rng(0).integers(0, 128, size=64 * T).astype(np.uint16)
    cfg = SAETrainConfig(kind="topk", k=8, expansion=2, steps=60, batch_tokens=128, lm_batch=8, seq_len=T,
                         buffer_tokens=512, lr=3e-3, resample_at=(), eval_tokens=1024, device="cpu")
    sae, m = train_sae(model, stream, tmp_path / "topk", cfg)
    assert m["training"]["loss_last"] < 0.5 * m["training"]["loss_first"]
    again = SAE.load_from_disk(tmp_path / "topk")
    assert isinstance(again, TopKSAE) and again.cfg.k == 8
    assert m["l0"] <= 8 + 1e-9 and m["l0"] > 4  # at most k latents per token
    x = torch.rand(5, 128)
    torch.testing.assert_close(again.encode(x), sae.encode(x))


def test_resampling_reinitialises_only_dead_latents_and_their_adam_state():
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=8, d_sae=16))
    opt = torch.optim.Adam(sae.parameters())
    x = torch.rand(32, 8)
    loss = (sae.decode(sae.encode(x)) - x).pow(2).sum()
    loss.backward()
    opt.step()
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[3, 7]] = True
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    assert resample_dead(sae, opt, dead, x) == 2
    assert torch.equal(sae.W_dec[~dead], before["W_dec"][~dead]) and torch.equal(sae.W_enc[:, ~dead], before["W_enc"][:, ~dead])
    assert not torch.equal(sae.W_dec[dead], before["W_dec"][dead])
    # each new decoder row points along one input minus b_dec (Anthropic's recipe), and the biases restart at 0
    cos = torch.nn.functional.cosine_similarity(sae.W_dec[dead][:, None], (x - sae.b_dec)[None], dim=-1)
    assert torch.allclose(cos.max(1).values, torch.ones(2), atol=1e-5) and torch.equal(sae.b_enc[dead], torch.zeros(2))
    assert torch.equal(opt.state[sae.W_dec]["exp_avg"][dead], torch.zeros(2, 8))
    assert not torch.equal(opt.state[sae.W_dec]["exp_avg"][~dead], torch.zeros(14, 8))


def test_latents_through_the_interpret_pipeline(prepared, tmp_path):
    import shutil

    from crate.eval.autointerp.compare import run_compare
    from crate.eval.autointerp.config import InterpretConfig
    from crate.eval.autointerp.interpret import run_interpret
    from crate.eval.record.neuron_record import load_neuron_record

    data, ckpt, trained, _ = prepared
    out = tmp_path / "sae"
    shutil.copytree(trained, out)
    m = read_metrics(out)
    m["dead_latents"] = dead = [i for i in range(256) if i % 16]  # 16 live latents: the sample must come from them
    (out / "metrics.json").write_text(json.dumps(m))
    cfg = InterpretConfig(protocol="tar", seq_len=T, n_tokens=20 * T, batch_size=8, device="cpu", top_k=12,
                          n_random=10, per_bin=2, neurons=6, n_boot=200)
    s = run_compare({"gpt": str(ckpt), "gpt-sae": f"{ckpt}+{out}"}, data, tmp_path / "interp", cfg)
    short = run_interpret(f"{ckpt}+{out}", data, tmp_path / "interp" / "gpt-sae",
                          InterpretConfig(**{**cfg.to_dict(), "protocol": "short"}))  # another protocol, same model
    tmp_path = tmp_path / "interp"
    meta = json.loads((tmp_path / "gpt-sae" / "records" / "meta.json").read_text())
    assert meta["layers"] == {"0": "transformer.h.0.sae.hook_latents"}
    tar_lines = (tmp_path / "gpt-sae" / "scores" / "tar" / "0.jsonl").read_text().splitlines()
    chosen = [str(json.loads(line)["neuron"]) for line in tar_lines]
    assert len(chosen) == 6 and not set(map(int, chosen)) & set(dead)  # dead latents left out of the sample
    assert sorted(short["scores"]["0"], key=int) == chosen  # the same seeded sample under another protocol
    # the sample is one of the 16 live latents, so the finite-population correction is over 16, not 256
    layer = json.loads((tmp_path / "gpt-sae" / "summary.json").read_text())["layers"]["0"]
    assert layer["n_total"] == 16 and layer["n_scored"] == 6
    f = math.sqrt((16 - 6) / 15)
    assert layer["ci95_fpc"] == pytest.approx([layer["mean"] - (layer["mean"] - layer["ci95"][0]) * f,
                                               layer["mean"] + (layer["ci95"][1] - layer["mean"]) * f])
    prov = s["provenance"]
    assert prov["gpt-sae"]["model"]["weights_fingerprint"] != prov["gpt"]["model"]["weights_fingerprint"]
    assert prov["gpt-sae"]["model"]["sae"]["0"]["d_sae"] == 256
    # a latent's top activation equals the SAE's encoding of the GPT neurons at that position
    n = int(chosen[0])
    rec = load_neuron_record(tmp_path / "gpt-sae" / "records" / "0" / f"{n}.json")
    cache = np.load(tmp_path / "gpt-sae" / "records" / "0" / "cache.npz")
    assert cache["top_pos"].shape[1] == 256  # every latent is recorded
    pos = int(cache["top_pos"][0, n])
    from crate.train.data import open_split

    val = open_split(data, "val")
    seq, t = divmod(pos, T)
    idx = torch.from_numpy(np.asarray(val[seq * T:(seq + 1) * T]).astype(np.int64))[None]
    model = crate.load(ckpt)
    _, c = model.run_with_cache(idx, ["transformer.h.0.hook_neurons"])
    with torch.no_grad():
        want = float(load_sae(out).encode(c["transformer.h.0.hook_neurons"][0, t][None])[0, n])
    assert max(rec.most_positive_activation_records[0].activations) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert "gpt - gpt-sae" in s["comparison"]


def test_an_sae_of_another_model_or_layer_is_refused(prepared, tmp_path):
    data, ckpt, out, _ = prepared
    torch.manual_seed(1)
    other = build_model("gpt", "micro", vocab_size=320)
    with pytest.raises(CrateError, match="another model's activations"):
        attach_saes(other, [out])
    assert split_sae_spec(f"{ckpt}+{out}") == (str(ckpt), [str(out)])
    assert split_sae_spec(str(ckpt)) == (str(ckpt), [])
    model = attach_saes(crate.load(ckpt), [out])
    with pytest.raises(CrateError, match="no SAE attached"):
        model._probe(1)
    with pytest.raises(CrateError, match="not an SAE folder"):
        load_sae(tmp_path)


def test_random_init_control_starts_every_sae_as_saelens_training_does(prepared):
    """The control's SAEs are untrained ones: SAELens's training init (its TrainingSAEConfig's decoder_init_norm per
    decoder row, the encoder the decoder's transpose, zero biases), not its inference classes' kaiming init."""
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig

    _, ckpt, trained, _ = prepared
    model = attach_saes(crate.load(ckpt), [trained])
    torch.manual_seed(0)
    model.reset_parameters()
    sae = model.transformer.h[0].sae.sae
    norm = StandardTrainingSAEConfig(d_in=1, d_sae=1).decoder_init_norm
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((sae.cfg.d_sae,), norm))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()


def test_latent_steering_goes_through_the_decoder_and_keeps_the_error(prepared):
    data, ckpt, out, _ = prepared
    base = crate.load(ckpt)
    idx = torch.randint(0, 300, (2, T))
    _, c = base.run_with_cache(idx, ["transformer.h.0.hook_neurons"])
    model = attach_saes(crate.load(ckpt), [out])
    sae = model.transformer.h[0].sae.sae
    x = c["transformer.h.0.hook_neurons"]
    f = sae.encode(x)
    i = int(f.sum((0, 1)).argmax())
    seen = {}
    with torch.no_grad(), model.steer(0, i, 3.0), \
            hooks(model, {"transformer.h.0.hook_resid_post": lambda a: seen.setdefault("r", a)}):
        model(idx)
    w = sae.W_dec[i].detach()
    want = x + (3.0 - f[..., i:i + 1]) * w  # the clamp's definition: x + (c - f_i(x)) W_dec[i]
    blk = base.transformer.h[0]
    with torch.no_grad():
        resid_mid = base.run_with_cache(idx, ["transformer.h.0.hook_resid_mid"])[1]["transformer.h.0.hook_resid_mid"]
        torch.testing.assert_close(seen["r"], resid_mid + blk.mlp.decode(want), atol=1e-5, rtol=1e-5)


def _result(name, arch, size, layer_scores, random_init=False):
    from crate.eval.report.results import ModelResult

    r = ModelResult(name=name, path=None, arch=arch, size=size, n_layer=len(layer_scores), random_init=random_init,
                    scorer="stats")
    r.scores["TaR"] = {str(L): [{"neuron": n, "score": s} for n, s in enumerate(v)] for L, v in enumerate(layer_scores)}
    return r


def test_report_rows_for_gpt_sae_beside_gpt_crate_and_the_papers_numbers():
    from crate.eval.report.reproduction_tables import main_table, sae_table

    sae = _result("gpt-sae", "gpt-sae", "2L", [[0.10, 0.20, 0.30], [0.00, 0.05, 0.10]])
    gpt = _result("gpt", "gpt", "2L", [[0.05, 0.05, 0.05], [0.01, 0.02, 0.03]])
    crt = _result("crate", "crate", "2L", [[0.1, 0.1, 0.1], [0.1, 0.1, 0.1]])
    ctl = _result("gpt-sae-control", "gpt-sae", "2L", [[0.0, 0.01, 0.02], [0.0, 0.0, 0.0]], random_init=True)
    t = sae_table([sae, gpt, crt, ctl], n_boot=200)
    (row,) = t.rows
    # layer means x100: 20 and 5 -> model 12.5; GPT: 5 and 2 -> 3.5; CRATE 10 (paired, same indices)
    assert row["GPT-SAE"] == pytest.approx(12.5) and row["GPT-SAE layers"] == "20.00, 5.00"
    assert row["GPT-SAE var"] == pytest.approx(56.25)  # population variance of (20, 5)
    assert row["GPT-SAE-GPT"] == pytest.approx(9.0) and row["CRATE-GPT-SAE"] == pytest.approx(-2.5)
    assert row["paper GPT-SAE"] == pytest.approx((7.6 + 3.5) / 2) and row["paper GPT-SAE layers"] == "7.6, 3.5"
    assert row["control GPT-SAE"] == pytest.approx(0.5) and row["neurons"] == 6
    (main,) = main_table([sae, gpt, crt], n_boot=200).rows
    assert main["neurons"] == "6 / 6"  # the main table stays CRATE vs GPT


def test_report_finds_interpret_results_of_an_sae_and_its_metrics(prepared, tmp_path):
    from crate.eval.autointerp.config import InterpretConfig
    from crate.eval.autointerp.interpret import run_interpret
    from crate.eval.report.reproduction import write_report

    data, ckpt, out, _ = prepared
    cfg = InterpretConfig(protocol="tar", seq_len=T, n_tokens=12 * T, batch_size=8, device="cpu", top_k=6,
                          n_random=6, per_bin=1, neurons=4, n_boot=100, extra_scores=False)
    run_interpret(f"{ckpt}+{out}", data, tmp_path / "interp" / "gpt-sae", cfg, name="gpt-sae")
    index = write_report([tmp_path / "interp", out], tmp_path / "report", n_boot=100).read_text()
    assert "## GPT-SAE (the paper's third system)" in index and "## SAE metrics" in index
    import csv

    (m,) = list(csv.DictReader((tmp_path / "report" / "sae_metrics.csv").open()))
    assert float(m["L0"]) == pytest.approx(read_metrics(out)["l0"], rel=1e-3)


def test_cli_steer_of_a_latent_passes_the_zero_check(prepared, capsys):
    data, ckpt, out, _ = prepared
    rc = main(["steer", "--checkpoint", f"{ckpt}+{out}", "--layer", "0", "--neuron", "5", "--value", "3",
               "--prompt", "1,2,3,4,5,6"])
    log = capsys.readouterr().out
    assert rc == 0 and "changes the logits by at most 0: OK" in " ".join(log.split())  # an inactive latent at 0


def test_cli_metrics_refuses_an_sae_of_another_model_before_reading_data(prepared, tmp_path, monkeypatch, capsys):
    data, ckpt, out, _ = prepared
    torch.manual_seed(1)
    other = tmp_path / "other"
    crate.save(build_model("gpt", "micro", vocab_size=320, init_std=0.2), other)  # same shape, other weights
    cmd = ["sae", "metrics", str(out), "-d", str(data), "--tokens", str(4 * T), "--seq-len", str(T)]
    assert main([*cmd, "-c", str(ckpt)]) == 0  # its own model: measured
    assert "explained variance" in capsys.readouterr().out

    from crate.train import data as train_data

    def no_data(*a, **k):
        raise AssertionError("the data was read before the SAE was checked")

    monkeypatch.setattr(train_data, "open_split", no_data)
    assert main([*cmd, "-c", str(other)]) == 2  # another model's: refused, as `interpret` and `steer` refuse it
    captured = capsys.readouterr()
    assert "trained on another model's activations" in captured.err and "explained variance" not in captured.out


@pytest.mark.parametrize("option, value, message", [
    ("--l1", "-1", "--l1: must be a number >= 0, got -1"),
    ("--l1", "nan", "--l1: must be a finite number, got nan"),
    ("--l1", "inf", "--l1: must be a finite number, got inf"),
    ("--lr", "0", "--lr: must be a number > 0, got 0"),
    ("--lr", "-0.001", "--lr: must be a number > 0, got -0.001"),
    ("--layer", "-1", "--layer: must be an integer >= 0, got -1"),
    ("--expansion", "0", "--expansion: must be an integer >= 1, got 0"),
    ("-k", "0", "-k/--k: must be an integer >= 1, got 0"),
    ("--steps", "0", "--steps: must be an integer >= 1, got 0"),
    ("--batch-tokens", "-4", "--batch-tokens: must be an integer >= 1, got -4"),
    ("--lm-batch", "0", "--lm-batch: must be an integer >= 1, got 0"),
    ("--buffer-tokens", "0", "--buffer-tokens: must be an integer >= 1, got 0"),
    ("--warmup-steps", "-1", "--warmup-steps: must be an integer >= 0, got -1"),
    ("--dead-window", "0", "--dead-window: must be an integer >= 1, got 0"),
    ("--eval-tokens", "0", "--eval-tokens: must be an integer >= 1, got 0"),
    ("--resample-at", "10,x", "--resample-at: give steps separated by commas"),
    ("--resample-at", "0,100", "--resample-at: steps count from 1"),
])
def test_cli_train_refuses_nonsense_numbers_when_parsing(option, value, message, capsys):
    args = ["sae", "train", "-c", "no-checkpoint", "-d", "no-data", "--layer", "0", option, value]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_sae_settings_out_of_range_are_refused_before_any_work(capsys):
    with pytest.raises(CrateError, match="L1 coefficient -1.0 must be a number >= 0"):
        SAETrainConfig(l1=-1.0).validate()
    with pytest.raises(CrateError, match="learning rate nan"):
        SAETrainConfig(lr=float("nan")).validate()
    with pytest.raises(CrateError, match="resampling steps"):
        SAETrainConfig(resample_at=(0, 10)).validate()
    # a warm-up as long as the training (SAELens's cosine schedule would divide by zero at the end): refused before
    # the checkpoint is read (it does not exist)
    assert main(["sae", "train", "-c", "no-checkpoint", "-d", "no-data", "--layer", "0", "--steps", "10",
                 "--warmup-steps", "10"]) == 2
    assert "--warmup-steps 10 must be at least 0 and below the 10 steps" in capsys.readouterr().err


def test_an_interrupted_training_saves_nothing_says_it_starts_over_and_a_rerun_trains_afresh(prepared, tmp_path,
                                                                                             monkeypatch, capsys):
    import os
    import shutil

    from sae_lens.training.sae_trainer import SAETrainer

    data, ckpt, trained, args = prepared
    out = tmp_path / "sae" / "relu-l0"
    out.parent.mkdir()
    step = SAETrainer.step

    def interrupted(self, batch):
        if self.n_training_steps == 20:
            raise KeyboardInterrupt
        return step(self, batch)

    with monkeypatch.context() as m:
        m.setattr(SAETrainer, "step", interrupted)
        assert main([*args, "-o", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted SAE training saved nothing and starts over" in err and "again to resume" not in err
    assert not out.exists() and not any(out.parent.iterdir())  # no half-written SAE, no temporaries
    assert main([*args, "-o", str(out)]) == 0  # the rerun trains from step 0: the uninterrupted run's SAE
    assert (out / "sae_weights.safetensors").read_bytes() == (trained / "sae_weights.safetensors").read_bytes()

    # an interrupt while an older SAE (other settings) is being replaced leaves one whole SAE, never half of one
    before = sorted(p.name for p in out.iterdir())
    rmtree = shutil.rmtree

    def interrupted_rmtree(path, *a, **k):
        if os.path.exists(os.path.join(path, "sae_weights.safetensors")) and "tmp" not in os.path.basename(path):
            os.remove(os.path.join(path, "sae_weights.safetensors"))
            raise KeyboardInterrupt
        return rmtree(path, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", interrupted_rmtree)
        main([*args, "-o", str(out), "--seed", "1", "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == before
    assert load_sae(out).cfg.d_sae == 256 and read_metrics(out)["training"]["config"]["seed"] == 1


def test_a_folder_of_saes_leaves_out_an_interrupted_saves_leftovers(tmp_path):
    """DIR+FOLDER attaches every SAE folder in FOLDER, but not the hidden .NAME.tmp-* / .NAME.old-* folders an
    interrupted save leaves beside a finished SAE."""
    for name in ("relu-l0", "relu-l1", ".relu-l1.old-123", ".relu-l0.tmp-9"):
        (tmp_path / "saes" / name).mkdir(parents=True)
        (tmp_path / "saes" / name / "cfg.json").write_text("{}")
    base, saes = split_sae_spec(f"{tmp_path / 'ck'}+{tmp_path / 'saes'}")
    assert base == str(tmp_path / "ck")
    assert saes == [str(tmp_path / "saes" / "relu-l0"), str(tmp_path / "saes" / "relu-l1")]
