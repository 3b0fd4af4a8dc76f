"""Flags with a range are checked by argparse: a one-line usage error naming the flag (exit 2), before any work
(here no checkpoint, data or output folder exists, so anything that got further would fail otherwise)."""

from __future__ import annotations

import pytest
import torch

from crate.cli import main

BAD = [
    (["interpret", "-c", "x", "-d", "y", "-o", "z", "--batch-size", "0"], "--batch-size: must be an integer >= 1, got 0"),
    (["interpret", "-c", "x", "-d", "y", "-o", "z", "--seq-len", "0"], "--seq-len: must be an integer >= 1, got 0"),
    (["interpret", "-c", "x", "-d", "y", "-o", "z", "--tokens", "0"], "--tokens: must be an integer >= 1, got 0"),
    (["interpret", "-c", "x", "-d", "y", "-o", "z", "--seed", "-1"], "--seed: must be an integer >= 0, got -1"),
    (["interpret", "-c", "x", "-d", "y", "-o", "z", "--split", "test"], "--split: invalid choice: 'test'"),
    (["interpret", "-c", "x", "-d", "y", "-o", "z", "--control", "--controls"], "not allowed with argument --control"),
    (["eval", "--checkpoint", "x", "--data", "y", "--batch-size", "-3"], "--batch-size: must be an integer >= 1"),
    (["eval", "--checkpoint", "x", "--data", "y", "--context", "ten"], "--context: must be an integer, got 'ten'"),
    (["eval", "--checkpoint", "x", "--device", "tpu"], "'tpu' is not a device here"),
    (["sae", "train", "-c", "x", "-d", "y", "--layer", "0", "--split", "test"], "--split: invalid choice: 'test'"),
    # a zero was read as "not given" and ran the defaults; a negative count failed after preparing data
    (["demo", "--steps", "0"], "--steps: must be an integer >= 1, got 0"),
    (["demo", "--neurons", "0"], "--neurons: must be an integer >= 1, got 0"),
    (["demo", "--tokens", "0"], "--tokens: must be an integer >= 1, got 0"),
    (["demo", "--steps", "-5"], "--steps: must be an integer >= 1, got -5"),
    (["study", "--seeds", "0"], "--seeds: must be an integer >= 1, got 0"),
    (["study", "--llm-neurons", "-1"], "--llm-neurons: must be an integer >= 0, got -1"),
    (["study", "--vocab-size", "0"], "--vocab-size: must be an integer >= 1, got 0"),
    (["reproduce", "--size", "1L", "--sae-steps", "0"], "--sae-steps: must be an integer >= 1, got 0"),
    # NaN and infinities printed tables of nan
    (["steer", "-c", "x", "--layer", "0", "--neuron", "0", "--value", "nan", "--prompt", "1"],
     "--value: must be a finite number, got nan"),
    (["steer", "-c", "x", "--layer", "0", "--neuron", "0", "--value=-inf", "--prompt", "1"],
     "--value: must be a finite number, got -inf"),
    (["steer", "-c", "x", "--sweep", "--units", "0"], "--units: must be an integer >= 1, got 0"),
    (["browse", "x", "--top", "-1"], "--top: must be an integer >= 0, got -1"),
    (["report", "x", "--n-boot", "0"], "--n-boot: must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_flags_are_usage_errors(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without CUDA")
def test_cuda_without_a_gpu_says_so(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", "x", "--device", "cuda"])
    assert "--device: cuda: no CUDA device here" in capsys.readouterr().err


def test_steering_multiples_must_be_finite(capsys, tmp_path):
    code = main(["steer", "--sweep", "-c", "x", "--data", str(tmp_path), "--multiples", "0,nan,2",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "--multiples '0,nan,2': NaN and infinities" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_demo_of_the_defaults_is_the_demo_with_no_flags(monkeypatch, tmp_path):
    """`demo --steps N` etc. with the default values gives the options of a bare `demo` (a value is not read as a
    flag's absence, and the defaults are what the flags say)."""
    from crate.eval.workflows import demo as demo_module

    seen = []
    monkeypatch.setattr(demo_module, "demo", lambda opts: seen.append(opts))
    main(["demo", "--out", str(tmp_path)])
    main(["demo", "--out", str(tmp_path), "--steps", str(demo_module.DEMO_STEPS),
          "--neurons", str(demo_module.DEMO_NEURONS), "--tokens", "16384"])
    bare, explicit = seen
    assert explicit.n_tokens == bare.n_tokens == 16384
    assert (explicit.steps, explicit.neurons) == (demo_module.DEMO_STEPS, demo_module.DEMO_NEURONS)
    assert bare.steps is None and bare.neurons is None  # filled in by demo(): DEMO_STEPS, DEMO_NEURONS


def test_overrides_are_taken_on_both_sides_of_the_options(tmp_path, capsys):
    """argparse takes a positional list as one run: KEY=VALUE after an option was "unrecognized". They join the
    overrides wherever they stand; anything else unknown stays a usage error."""
    from crate.cli import parse

    args = parse(["train", "train.max_steps=3", "--out", "x", "model.n_layer=2"])
    assert args.overrides == ["train.max_steps=3", "model.n_layer=2"] and args.out == "x"
    assert parse(["study", "model.n_embd=64", "--seeds", "2", "train.lr=1e-3"]).overrides == [
        "model.n_embd=64", "train.lr=1e-3"]
    for argv in (["eval", "--checkpoint", "x", "a=b"], ["train", "--bogus"], ["train", "a=1", "--out", "x", "stray"]):
        with pytest.raises(SystemExit):
            parse(argv)
        assert "unrecognized arguments" in capsys.readouterr().err
    # the second group reaches the recipe: its mistyped key is what the run refuses, before anything is written
    assert main(["train", "train.max_steps=3", "--out", str(tmp_path / "r"), "model.n_layerz=2"]) == 2
    assert "n_layerz" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_study_options_reach_the_study(monkeypatch, tmp_path):
    """What `crate study` is given on the command line is what the study runs with (the sensitivity rows' options)."""
    import crate.eval.workflows.study as study_module

    got = []
    monkeypatch.setattr(study_module, "study", lambda opts, command=None: got.append((opts, command)))
    assert main(["study", "--out", str(tmp_path / "s"), "--vocab-size", "2048", "--context", "128", "--match", "width",
                 "--tokens", "32768", "--sizes", "1L,2L", "--llm-neurons", "0"]) == 0
    opts = got[0][0]
    assert (opts.vocab_size, opts.context, opts.match, opts.n_tokens, opts.sizes, opts.llm_neurons) == (
        2048, 128, "width", 32768, ["1L", "2L"], 0)

