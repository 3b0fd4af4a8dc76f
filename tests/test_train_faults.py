"""Training faults: signals on a real `crate train` (exit codes, checkpoint, resume), what kill -9 leaves,
umask, recipe type errors, settings that may or may not change on resume, and the NaN stop's recovery."""

from __future__ import annotations

import csv
import math
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import crate
from crate.cli import main
from crate.errors import CheckpointError, ConfigError
from crate.train.config import load_recipe
from crate.train.checkpoint_io import AtomicCheckpointIO
from crate.train.run import train

pytestmark = pytest.mark.usefixtures("one_thread")


def overrides(data_dir: Path, **over: object) -> list[str]:
    """A micro run (d=32, 1 layer, 8 x 32 tokens per step, accumulation 2) as `crate train` overrides."""
    base = {"data.path": str(data_dir), "data.source": None, "model.preset": "micro", "model.block_size": 32,
            "train.context": 32, "train.max_steps": 20, "train.batch_size": 8, "train.micro_batch_size": 4,
            "train.lr": 3e-3, "train.min_lr": 3e-4, "train.warmup_steps": 5, "train.lr_decay_steps": 40,
            "train.val_every": 0, "train.val_batches": 4, "train.final_val_batches": 4, "train.ckpt_every": 3,
            "train.seed": 3, "system.accelerator": "cpu", "system.devices": 1, "system.wandb": "off",
            "system.log_every": 1, "system.progress_bar": False}
    base.update({k.replace("__", "."): v for k, v in over.items()})
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def rows(run_dir: Path, key: str) -> list[tuple[int, float]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


# --- signals on a real `crate train` ---------------------------------------------------------------------
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_signal_on_a_real_crate_train(data_dir: Path, tmp_path: Path, sig: int, code: int) -> None:
    """The signal is sent once step 2 was printed (the row is logged before the line is printed). SIGINT and
    SIGTERM finish the step, write last.ckpt at it, exit 128 + signal and name the resume command; after
    SIGKILL every printed step is in metrics.csv. The run then resumes and logs each step once."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "crate.cli", "train", "--config", "tiny-crate", "--out", str(run),
           *overrides(data_dir, train__max_steps=10_000, train__ckpt_every=10_000)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed = []
    for line in proc.stdout:
        m = re.match(r"step (\d+)/", line)
        if m:
            printed.append(int(m.group(1)))
            if printed[-1] >= 2:
                proc.send_signal(sig)
                break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (out, err[-3000:])
    logged = [s for s, _ in rows(run, "train/loss")]
    assert logged == list(range(1, len(logged) + 1)) and logged[-1] >= printed[-1]
    if sig == signal.SIGKILL:
        return
    assert "Traceback" not in err
    stopped_at = int(re.search(r"wrote \S+last\.ckpt at step (\d+)", out).group(1))
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == stopped_at == logged[-1]
    assert f"stopped by {signal.Signals(sig).name} at step {stopped_at}: resume with `crate train --resume {run}`" in err
    # the command it names, with a new max_steps (a setting that may change), continues from there
    assert main(["train", "--resume", str(run), f"train.max_steps={stopped_at + 2}"]) == 0
    assert [s for s, _ in rows(run, "train/loss")] == list(range(1, stopped_at + 3))
    history = yaml.safe_load((run / "config.yaml").read_text())["history"]
    assert history == [{"step": stopped_at, "changed": {"train.max_steps": [10_000, stopped_at + 2]}}]


@pytest.mark.parametrize("requeue_works,code", [(True, 0), (False, 143)])
def test_sigterm_under_slurm_requeues(data_dir: Path, tmp_path: Path, monkeypatch, capsys, requeue_works: bool,
                                      code: int) -> None:
    """Under SLURM the job is requeued (`scontrol requeue <job>`) and the command exits 0, so the step is not
    counted as failed; when scontrol fails, it says so and exits 143 like any SIGTERM."""
    from crate.train.module import LMModule

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\nexit {0 if requeue_works else 1}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    real = LMModule.training_step

    def preempted(self, batch, batch_idx):
        if batch_idx == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(LMModule, "training_step", preempted)
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny-crate", "--out", str(run), *overrides(data_dir)]) == code
    assert (tmp_path / "calls").read_text() == "requeue 4242\n" and ckpt_step(run / "checkpoints" / "last.ckpt") == 2
    out = capsys.readouterr()
    if requeue_works:
        assert "the SLURM job is requeued and resumes from" in out.out
    else:
        assert "could not requeue SLURM job 4242" in out.out and "stopped by SIGTERM at step 2" in out.err


def test_sigint_during_the_final_validation(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Every step is done: the run stops with the signal, and resuming only validates and exports."""
    from crate.train.module import LMModule

    real = LMModule.validation_step

    def interrupted(self, batch, batch_idx):
        if self.trainer.state.fn == "validate" and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(LMModule, "validation_step", interrupted)
    cfg = load_recipe("tiny-crate", overrides(data_dir, train__max_steps=4))
    before = signal.getsignal(signal.SIGINT)
    summary = train(cfg, out=tmp_path / "r", progress=False)
    assert summary["signal"] == signal.SIGINT and summary["step"] == 4 and not (tmp_path / "r" / "final").exists()
    assert signal.getsignal(signal.SIGINT) is before  # ours are gone again
    monkeypatch.setattr(LMModule, "validation_step", real)
    done = train(cfg, out=tmp_path / "r", progress=False)
    assert done["step"] == 4 and (tmp_path / "r" / "final" / "model.safetensors").is_file()
    assert [s for s, _ in rows(tmp_path / "r", "train/loss")] == [1, 2, 3, 4]


# --- what killed launches leave --------------------------------------------------------------------------
def test_a_launch_clears_what_killed_ones_left(data_dir: Path, tmp_path: Path) -> None:
    """Stale temporaries, periodic checkpoints beyond ckpt_keep or after the resumed step, and metrics rows
    after it (as a kill -9 between logging and checkpointing leaves them) are gone after a resume."""
    run = tmp_path / "r"
    cfg = load_recipe("tiny-crate", overrides(data_dir, train__max_steps=6, train__ckpt_every=2, train__ckpt_keep=3))
    train(cfg, out=run, progress=False)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-0000002.ckpt", "step-0000004.ckpt", "step-0000006.ckpt"]
    for name in (".step-0000008.ckpt.tmp4242", ".last.ckpt.tmp77"):
        (ckpts / name).write_bytes(b"")  # 0-byte temporaries of killed saves
    (run / ".final.tmp-x1y2").mkdir()  # crate.save's temporary folder
    (run / ".metrics.csv.tmp31").write_bytes(b"")
    shutil.copy(ckpts / "step-0000002.ckpt", ckpts / "step-0000001.ckpt")  # older than the newest ckpt_keep
    shutil.copy(ckpts / "step-0000006.ckpt", ckpts / "step-0000008.ckpt")  # from a continuation that was lost
    with open(run / "metrics.csv", "a") as f:  # rows of that continuation
        f.write("7,999.0,,,,,,,\n8,999.0,,,,,,,\n")
    resumed = load_recipe("tiny-crate", overrides(data_dir, train__max_steps=10, train__ckpt_every=2, train__ckpt_keep=2))
    train(resumed, out=run, progress=False)  # resumes last.ckpt (step 6)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-0000008.ckpt", "step-0000010.ckpt"]
    assert sorted(p.name for p in run.iterdir()) == [".crate-lm", "checkpoints", "config.yaml", "final", "metrics.csv"]
    assert ckpt_step(ckpts / "step-0000008.ckpt") == 8
    losses = rows(run, "train/loss")
    assert [s for s, _ in losses] == list(range(1, 11)) and all(v != 999.0 for _, v in losses)


def test_files_and_folders_honour_the_umask(tmp_path: Path) -> None:
    model = crate.build_model("crate", "micro")
    old = os.umask(0o022)
    try:
        for mask, folder_mode, file_mode in ((0o022, 0o755, 0o644), (0o027, 0o750, 0o640)):
            os.umask(mask)
            final = crate.save(model, tmp_path / f"run-{mask:o}" / "final")
            AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / f"run-{mask:o}" / "last.ckpt")
            assert stat.S_IMODE(final.stat().st_mode) == folder_mode
            for name in ("model.safetensors", "config.json"):
                assert stat.S_IMODE((final / name).stat().st_mode) == file_mode, name
            assert stat.S_IMODE((tmp_path / f"run-{mask:o}" / "last.ckpt").stat().st_mode) == file_mode
    finally:
        os.umask(old)


# --- clear errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("train.lr=fast", "train.lr='fast': expected a number > 0"),
    ("train.grad_clip=abc", "train.grad_clip='abc': expected a number >= 0 (0 disables clipping)"),
    ("train.betas=0.9", "train.betas=0.9: expected a list of 2 numbers each in [0, 1)"),
    ("train.lr=-1", "train.lr=-1: expected a number > 0"),
    ("train.betas=[0.9, 1.5]", "train.betas=[0.9, 1.5]: expected a list of 2 numbers each in [0, 1)"),
    ("train.max_steps=10.5", "train.max_steps=10.5: expected an integer > 0"),
    ("train.compile=yes please", "train.compile='yes please': expected true or false"),
    ("data.val_fraction=1", "data.val_fraction=1: expected a number in [0, 1)"),
    ("system.log_every=0", "system.log_every=0: expected an integer > 0"),
])
def test_recipe_values_are_checked_before_anything_runs(tmp_path: Path, capsys, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_recipe("tiny-crate", [override])
    assert str(e.value) == message
    assert main(["train", "--out", str(tmp_path / "run"), override]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_numbers_in_yaml_strings_are_numbers() -> None:
    cfg = load_recipe("tiny-crate", ["train.lr=1e-3", "train.min_lr=0", "train.betas=[0.8, 0.9]"])
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.betas) == (0.001, 0.0, (0.8, 0.9))


# --- resume is honest ------------------------------------------------------------------------------------
def expected_lr(step: int, lr: float, min_lr: float = 3e-4, warmup: int = 5, decay: int = 40) -> float:
    """nanoGPT's schedule by hand: the rate in force after optimizer step `step` (the one logged with it)."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    return min_lr + 0.5 * (1 + math.cos(math.pi * (step - warmup) / (decay - warmup))) * (lr - min_lr)


def test_resume_with_a_new_lr_uses_it_and_records_it(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    train(load_recipe("tiny-crate", overrides(data_dir, train__max_steps=6)), out=run, progress=False)
    assert main(["train", "--resume", str(run), "train.lr=1e-3", "train.max_steps=9", "train.grad_clip=0.5"]) == 0
    for step, lr in rows(run, "train/lr"):
        assert lr == pytest.approx(expected_lr(step, 3e-3 if step <= 6 else 1e-3), rel=1e-9), step
    history = yaml.safe_load((run / "config.yaml").read_text())["history"]
    assert history == [{"step": 6, "changed": {"train.max_steps": [6, 9], "train.lr": [3e-3, 1e-3],
                                               "train.grad_clip": [1.0, 0.5]}}]
    # settings that fix what the run computes are refused, naming the key and both values
    for over, message in (("train.betas=[0.8, 0.9]", "train.betas: [0.9, 0.95] -> [0.8, 0.9]"),
                          ("train.seed=4", "train.seed: 3 -> 4"), ("train.batch_size=4", "train.batch_size: 8 -> 4"),
                          ("train.weight_decay=0.2", "train.weight_decay: 0.1 -> 0.2")):
        with pytest.raises(CheckpointError, match=re.escape(message)):
            train(load_recipe(str(run / "config.yaml"), [over, "train.max_steps=12"]), out=run, progress=False)
    moved = tmp_path / "moved-data"
    shutil.copytree(data_dir, moved)
    with pytest.raises(CheckpointError, match="data.path: .*-> .*moved-data"):
        train(load_recipe(str(run / "config.yaml"), [f"data.path={moved}", "train.max_steps=12"]), out=run, progress=False)


def test_the_nan_stop_names_a_command_that_recovers(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A rate above 5e-3 'diverges' (the loss becomes NaN); lr=8e-3 warms up past it at step 7. The message
    names the newest checkpoint before it with half the rate, and that command trains to the end."""
    from crate.train.module import LMModule, NonFiniteLossError

    real = LMModule.loss

    def diverging(self, x, y):
        loss = real(self, x, y)
        return loss * float("nan") if self.trainer.optimizers[0].param_groups[0]["lr"] > 5e-3 else loss

    monkeypatch.setattr(LMModule, "loss", diverging)
    run = tmp_path / "r"
    cfg = load_recipe("tiny-crate", overrides(data_dir, train__max_steps=12, train__lr=8e-3, train__warmup_steps=10))
    with pytest.raises(NonFiniteLossError, match="at step 7") as e:
        train(cfg, out=run, progress=False)
    command = re.search(r"`(crate train [^`]+)`", str(e.value)).group(1)
    assert command == f"crate train --resume {run / 'checkpoints' / 'step-0000006.ckpt'} train.lr=0.004"
    assert main(shlex.split(command)[1:]) == 0
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 12 and (run / "final" / "model.safetensors").is_file()
    lrs = rows(run, "train/lr")
    assert [s for s, _ in lrs] == list(range(1, 13))
    for step, lr in lrs:
        assert lr == pytest.approx(expected_lr(step, 8e-3 if step <= 6 else 4e-3, warmup=10), rel=1e-9), step
