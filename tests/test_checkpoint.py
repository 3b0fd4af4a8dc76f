"""Checkpoints: our format round trip, the authors' and nanoGPT `.pt` files, transformers GPT-2, bad files."""

import collections
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import crate
from crate.loading import read_info
from crate.errors import CheckpointError
from crate.cli import main as cli

transformers = pytest.importorskip("transformers", reason="pip install -e '.[test]' installs transformers")


def tokens(model, n=2, t=17):
    return torch.randint(0, model.config.vocab_size, (n, t))


@pytest.mark.parametrize("arch,extra", [("crate", {}), ("crate", {"block": "alpha", "learn_eta_lambda": True}),
                                        ("gpt", {})])
def test_round_trip_gives_identical_logits(tmp_path, arch, extra):
    model = crate.build_model(arch, "tiny", **extra).eval()
    tok = {"name": "bpe-512", "vocab_size": 512, "sha256": "ab" * 32}
    crate.save(model, tmp_path / "ckpt", tokenizer=tok, metadata={"step": 7})
    loaded = crate.load(tmp_path / "ckpt")
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = tokens(model)
    assert torch.equal(loaded(idx), model(idx))
    info = read_info(tmp_path / "ckpt")
    assert info["tokenizer"] == tok and info["metadata"] == {"step": 7}


def test_save_replaces_atomically_and_leaves_no_temporaries(tmp_path):
    a, b = crate.build_model("gpt", "micro"), crate.build_model("gpt", "micro")
    crate.save(a, tmp_path / "ckpt")
    crate.save(b, tmp_path / "ckpt")
    idx = tokens(a)
    assert torch.equal(crate.load(tmp_path / "ckpt")(idx), b.eval()(idx))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_writers_never_replace_a_folder_of_other_files(tmp_path, capsys):
    """A checkpoint replaces its whole folder: save, export-hf, convert and export refuse a folder of someone else's
    files (naming them), before reading anything, and lose none of them; our own checkpoints are replaced."""
    from crate.hf import export_hf

    model = crate.build_model("gpt", "micro").eval()
    theirs = tmp_path / "theirs"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    (theirs / "sub" / "x.txt").write_text("also mine")
    with pytest.raises(CheckpointError, match=r"theirs holds files crate-lm did not write \(notes.txt, sub\)"):
        crate.save(model, theirs)
    with pytest.raises(CheckpointError, match="did not write"):
        export_hf(model, theirs)
    src = crate.save(model, tmp_path / "ours")
    capsys.readouterr()
    assert cli(["convert", str(tmp_path / "no-such-source"), str(theirs)]) == 2  # refused before the source is read
    assert "did not write" in capsys.readouterr().err
    assert cli(["export-hf", str(src), str(theirs)]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (theirs / "notes.txt").read_text() == "mine" and (theirs / "sub" / "x.txt").read_text() == "also mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "theirs"]  # nothing moved aside either
    (tmp_path / "file").write_text("a file")
    with pytest.raises(CheckpointError, match="is a file"):
        crate.save(model, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    crate.save(model, tmp_path / "empty")  # an empty folder, and our own checkpoint and export, are replaced
    crate.save(model, src)
    export_hf(model, tmp_path / "hf")
    export_hf(model, tmp_path / "hf")
    assert read_info(src)["model"] == model.config.to_dict()


def test_kill_during_save_keeps_the_old_checkpoint(tmp_path):
    old = crate.build_model("crate", "micro")
    crate.save(old, tmp_path / "ckpt")
    script = f"""
import os, signal, safetensors.torch as st, crate
real = st.save_file
def dying(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)   # killed after the weights, before the rename
import crate.checkpoint as c; c.save_file = dying
crate.save(crate.build_model("crate", "micro", n_embd=64, n_head=2), {str(tmp_path / 'ckpt')!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert proc.returncode == -9
    idx = tokens(old)
    assert torch.equal(crate.load(tmp_path / "ckpt")(idx), old.eval()(idx))


def authors_checkpoint(model, prefix="_orig_mod."):
    """A dict shaped like the authors' release (SPEC.md section 5), built from our weights."""
    sd = collections.OrderedDict((prefix + k, v.clone()) for k, v in model.state_dict().items())
    cfg = model.config
    return {
        "model": sd,
        "model_args": dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                           bias=cfg.bias, vocab_size=cfg.vocab_size, dropout=0.0),
        "iter_num": 600000,
        "best_val_loss": torch.tensor(2.27),
        "config": {"learning_rate": 6e-4, "dataset": "pile"},
    }


@pytest.mark.parametrize("arch", ["crate", "gpt"])
def test_authors_format_loads_with_identical_logits(tmp_path, arch):
    model = crate.build_model(arch, "tiny").eval()
    path = tmp_path / "ckpt-600000.pt"
    torch.save(authors_checkpoint(model), path)
    loaded = crate.load(path)
    assert loaded.config.arch == arch
    assert loaded.config == model.config
    idx = tokens(model)
    assert torch.equal(loaded(idx), model(idx))
    # ... and `crate convert` writes it in our format.
    assert cli(["convert", str(path), str(tmp_path / "converted")]) == 0
    assert torch.equal(crate.load(tmp_path / "converted")(idx), model(idx))


def test_nanogpt_checkpoint_with_biases_loads_with_nanogpts_erf_gelu(tmp_path):
    model = crate.build_model("gpt", "tiny", bias=True, activation="gelu_exact").eval()
    ck = authors_checkpoint(model, prefix="")
    for i in range(model.config.n_layer):  # old nanoGPT saves the causal mask buffer
        ck["model"][f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 128, 128).tril()
    torch.save(ck, tmp_path / "ckpt.pt")
    with pytest.warns(UserWarning, match="assuming gelu_exact"):  # the file does not record it: the guess is said
        loaded = crate.load(tmp_path / "ckpt.pt")
    assert loaded.config.activation == "gelu_exact" and loaded.config.bias
    idx = tokens(model)
    assert torch.equal(loaded(idx), model(idx))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert crate.load(tmp_path / "ckpt.pt", activation="relu").config.activation == "relu"  # said: no guess
    # an untied output head cannot load into a tied model: refused, not replaced by the embedding
    ck["model"]["lm_head.weight"] = ck["model"]["transformer.wte.weight"] + 1.0
    torch.save(ck, tmp_path / "untied.pt")
    with pytest.raises(CheckpointError, match="lm_head.weight differs from transformer.wte.weight"):
        crate.load(tmp_path / "untied.pt", activation="gelu")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_needs_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Evil()}, path)
    with pytest.raises(crate.CheckpointError, match="needs arbitrary code"):
        crate.load(path)
    # a Lightning .ckpt too, in every command that reads one, before anything else (train would prepare data first);
    # torch's advice to retry with weights_only=False is never passed on
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"crate": {}, "state_dict": {}, "payload": Evil()}, ckpt)
    capsys.readouterr()
    for args in (["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "no-data")],
                 ["export", str(ckpt), str(tmp_path / "out")],
                 ["train", "--resume", str(ckpt), "--out", str(tmp_path / "run")]):
        assert cli(args) == 2, args
        err = capsys.readouterr().err
        assert "needs arbitrary code" in err and "weights_only" not in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ckpt", "evil.pt"]


def test_truncated_files_fail_clearly(tmp_path):
    model = crate.build_model("crate", "micro")
    torch.save(authors_checkpoint(model), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(crate.CheckpointError, match="truncated"):
        crate.load(tmp_path / "cut.pt")
    crate.save(model, tmp_path / "dir")
    weights = tmp_path / "dir" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(crate.CheckpointError, match="truncated or corrupted"):
        crate.load(tmp_path / "dir")


def test_mismatched_keys_are_named(tmp_path):
    model = crate.build_model("crate", "tiny")
    ck = authors_checkpoint(model, prefix="")
    sd = ck["model"]
    del sd["transformer.h.1.prenorm_2.bias"]
    sd["transformer.h.0.ista.lambd"] = torch.tensor(0.1)
    sd["transformer.h.1.attn.c_proj.weight"] = torch.zeros(64, 32)
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(crate.CheckpointError) as err:
        crate.load(tmp_path / "bad.pt")
    msg = str(err.value)
    assert "missing keys ['transformer.h.1.prenorm_2.bias']" in msg
    assert "unexpected keys ['transformer.h.0.ista.lambd']" in msg
    assert "transformer.h.1.attn.c_proj.weight: checkpoint (64, 32) vs model (64, 64)" in msg


SIGNATURE = {"crate": "ista.weight", "gpt": "mlp.c_fc.weight"}  # the key that tells the architecture


@pytest.mark.parametrize("arch", ["crate", "gpt"])
def test_layer0_renames_and_non_layer_keys_are_named(tmp_path, arch):
    model = crate.build_model(arch, "tiny")
    ck = authors_checkpoint(model)
    sd = ck["model"]
    key = f"transformer.h.0.{SIGNATURE[arch]}"
    sd[f"_orig_mod.{key}_renamed"] = sd.pop(f"_orig_mod.{key}")  # was a KeyError
    sd["_orig_mod.transformer.h.extra.foo"] = torch.zeros(3)  # was ValueError: invalid literal for int()
    sd["_orig_mod.transformer.h.0.attn.c_proj.weight"] = torch.zeros(64, 32)
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(crate.CheckpointError) as err:
        crate.load(tmp_path / "bad.pt")
    msg = str(err.value)
    assert f"missing keys ['{key}']" in msg
    assert f"unexpected keys ['{key}_renamed', 'transformer.h.extra.foo']" in msg
    assert "mis-shaped keys ['transformer.h.0.attn.c_proj.weight: checkpoint (64, 32) vs model (64, 64)']" in msg


def test_long_key_lists_are_cut_to_a_readable_message(tmp_path):
    model = crate.build_model("gpt", "tiny")
    torch.save(authors_checkpoint(model), tmp_path / "ckpt.pt")
    with pytest.raises(crate.CheckpointError) as err:
        crate.load(tmp_path / "ckpt.pt", n_layer=5)  # layers 2-4 have no weights in the file
    missing = sorted(set(crate.build_model("gpt", "tiny", n_layer=5).state_dict()) - set(model.state_dict()))
    assert len(missing) > 12
    assert f"missing keys {missing[:12]} and {len(missing) - 12} more." in str(err.value)


def shown_chain(e):
    """The exception and those Python prints with it (its cause, or its context unless suppressed)."""
    while e is not None:
        yield e
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)


class NeedsAClass:  # a plain class: unpickling it means importing and running this module's code
    pass


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path, capsys):
    model = crate.build_model("crate", "micro")
    torch.save(authors_checkpoint(model), tmp_path / "full.pt")
    zipped = (tmp_path / "full.pt").read_bytes()
    assert zipped[:4] == b"PK\x03\x04"  # torch.save writes a zip archive
    cases = {
        "random.pt": (torch.Generator().manual_seed(0), "is not a checkpoint: it is neither a torch.save file"),
        "cut.pt": (zipped[: len(zipped) // 3], "truncated or not a torch checkpoint"),
        "class.pt": (None, "needs arbitrary code to unpickle (test_checkpoint.NeedsAClass)"),
        "weights.pt": (None, "is a safetensors file, not a torch checkpoint"),
        "empty.pt": (b"", "is empty (0 bytes)"),
    }
    rand = torch.randint(0, 256, (4096,), generator=cases["random.pt"][0], dtype=torch.uint8).numpy().tobytes()
    assert rand[:1] not in (b"\x80", b"P")  # neither a pickle nor a zip by accident
    (tmp_path / "random.pt").write_bytes(rand)
    (tmp_path / "cut.pt").write_bytes(cases["cut.pt"][0])
    torch.save({"model": {}, "obj": NeedsAClass()}, tmp_path / "class.pt")
    from safetensors.torch import save_file

    save_file({"wte.weight": torch.zeros(4, 2)}, tmp_path / "weights.pt")  # e.g. a Hugging Face model.safetensors
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, (_, expected) in cases.items():
        with pytest.raises(crate.CheckpointError) as err:
            crate.load(tmp_path / name)
        assert expected in str(err.value), (name, str(err.value))
        # torch's advice to retry with weights_only=False runs the file's code: never passed on, not even chained
        assert not any("weights_only" in str(e) for e in shown_chain(err.value)), name
        assert cli(["convert", str(tmp_path / name), str(tmp_path / "out")]) == 2
        out = capsys.readouterr()
        assert expected in out.err and "Traceback" not in out.err and "weights_only" not in out.err


def test_foreign_files_fail_clearly(tmp_path):
    torch.save({"model": {"encoder.weight": torch.zeros(3)}}, tmp_path / "other.pt")
    with pytest.raises(crate.CheckpointError, match="cannot tell the architecture"):
        crate.load(tmp_path / "other.pt")
    (tmp_path / "d").mkdir()
    with pytest.raises(crate.CheckpointError, match="config.json is missing"):
        crate.load(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(crate.CheckpointError, match="expected 'crate-lm/1'"):
        crate.load(tmp_path / "d")
    with pytest.raises(FileNotFoundError):
        crate.load(tmp_path / "nothing")


def hf_with_our_weights(model):
    from crate.hf import gpt2_config, gpt2_state_dict

    hf = transformers.GPT2LMHeadModel(gpt2_config(model)).eval()
    hf.load_state_dict(gpt2_state_dict(model), strict=False)
    return hf


@pytest.mark.parametrize("extra", [{"activation": "gelu", "bias": True}, {}])
def test_gpt_matches_transformers_and_exports(tmp_path, extra):
    model = crate.build_model("gpt", "tiny", **extra).eval()
    if extra.get("bias"):  # non-zero biases so that they are really compared
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    idx = tokens(model, t=40)
    ours = model(idx)
    torch.testing.assert_close(hf_with_our_weights(model)(idx).logits, ours, rtol=1e-5, atol=1e-5)
    crate.save(model, tmp_path / "ours")
    assert cli(["export-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(exported(idx).logits, ours, rtol=1e-5, atol=1e-5)


def test_crate_does_not_export_to_gpt2(tmp_path):
    from crate.hf import gpt2_state_dict

    with pytest.raises(crate.CheckpointError, match="CrateForCausalLM"):  # CRATE exports to its own class
        gpt2_state_dict(crate.build_model("crate", "micro"))
