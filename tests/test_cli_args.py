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
