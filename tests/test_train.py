"""Training: end-to-end learning, exact resume through SIGTERM, SIGUSR1, NaN stop, mismatched resume,
bad shards, atomic checkpoints, DDP on 2 CPU processes, FLOPs counting."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import crate
from crate.errors import CheckpointError, ConfigError, DataError
from crate.train import data as D
from crate.train import prepare as P
from crate import datadir
from crate.train.config import RunConfig, load_recipe
from crate.train.checkpoint_io import AtomicCheckpointIO
from crate.train.run import train
from conftest import TRAIN_DATA

pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(data_dir: Path, **over) -> RunConfig:
    """A micro run: d=32, 1 layer... overridable by dotted keys given as model__x / train__x / system__x."""
    raw = {
        "model": {"arch": "crate", "preset": "micro", "vocab_size": None, "block_size": 32},
        "data": {"path": str(data_dir), "source": None},
        "train": {"max_steps": 20, "batch_size": 8, "micro_batch_size": 4, "context": 32, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 5, "lr_decay_steps": 40, "val_every": 0, "val_batches": 4, "final_val_batches": 8,
                  "ckpt_every": 5, "seed": 3},
        "system": {"accelerator": "cpu", "devices": 1, "wandb": "off", "log_every": 1, "progress_bar": False},
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw[section][name] = value
    return RunConfig.from_dict(raw)


def metric_rows(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every row of the run's metrics.csv (all launches) that has `key`, in file order."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss over every launch of a run; each step must appear once."""
    rows = metric_rows(run_dir, "train/loss")
    assert len({s for s, _ in rows}) == len(rows), f"a step logged twice: {[s for s, _ in rows]}"
    return dict(rows)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def unigram_cross_entropy(data_dir: Path) -> float:
    """Nats per token of the best context-free model: train-split unigram frequencies, scored on val."""
    V = datadir.read_manifest(data_dir)["vocab_size"]
    counts = np.bincount(np.asarray(D.open_split(data_dir, "train")), minlength=V) + 1.0
    p = counts / counts.sum()
    val = np.asarray(D.open_split(data_dir, "val"))
    return float(-np.log(p[val]).mean())


@pytest.mark.parametrize("arch", ["crate", "gpt"])
def test_end_to_end_learns(data_dir: Path, tmp_path: Path, arch: str) -> None:
    cfg = recipe(data_dir, model__arch=arch, model__preset="tiny", model__block_size=64, train__context=64,
                 train__max_steps=250, train__batch_size=16, train__micro_batch_size=16, train__lr=1e-2,
                 train__min_lr=1e-3, train__warmup_steps=20, train__lr_decay_steps=250, train__val_every=125,
                 train__ckpt_every=125, train__final_val_batches=None, system__log_every=25)
    summary = train(cfg, out=tmp_path / "run", progress=False)
    baseline = unigram_cross_entropy(data_dir)
    assert summary["step"] == 250
    print(f"{arch}: val loss {summary['val_loss']:.3f} vs unigram {baseline:.3f}")
    assert summary["val_loss"] < baseline - 0.7, (summary["val_loss"], baseline)
    ckpts = {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()}
    assert {"last.ckpt", "best.ckpt", "step-0000125.ckpt", "step-0000250.ckpt"} <= ckpts
    assert (tmp_path / "run" / "config.yaml").is_file()
    # the exported model reloads through crate.load and scores the same on the whole val split
    from crate.eval.evaluate.loss import evaluate

    r = evaluate(summary["final"], data_dir, batch_size=16, context=64, progress=False)
    from crate.loading import read_info

    assert read_info(summary["final"])["tokenizer"] == datadir.read_manifest(data_dir)["tokenizer"]
    assert (Path(summary["final"]) / "tokenizer.json").read_bytes() == (data_dir / "tokenizer.json").read_bytes()
    assert r["loss"] == pytest.approx(summary["val_loss"], rel=1e-3)


class SignalAt(Callback):
    """Send a signal to ourselves in the middle of an accumulation window (after micro-batch `batch`)."""

    def __init__(self, batch: int, sig: int):
        self.batch, self.sig, self.sent = batch, sig, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.sig)


def run_with(cfg: RunConfig, out: Path, callback: Callback | None = None, **kw):
    import lightning as L

    real = L.Trainer.__init__

    def init(self, *a, callbacks=None, **k):
        real(self, *a, callbacks=[*(callbacks or []), *([callback] if callback else [])], **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(L.Trainer, "__init__", init)
        return train(cfg, out=out, progress=False, **kw)


def test_sigterm_checkpoint_and_exact_resume(data_dir: Path, tmp_path: Path) -> None:
    cfg = recipe(data_dir, model__dropout=0.1, train__max_steps=16)  # accumulation 2; dropout draws RNG
    full = train(cfg, out=tmp_path / "full", progress=False)
    # SIGTERM after micro-batch 14 (mid-step 8): the checkpoint is written at the end of step 8
    stopped = run_with(cfg, tmp_path / "cut", SignalAt(14, signal.SIGTERM))
    assert stopped["preempted"] and stopped["step"] == 8
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    resumed = train(cfg, out=tmp_path / "cut", progress=False)  # finds last.ckpt in its run dir
    assert resumed["step"] == 16 and not resumed["preempted"]
    a, b = step_losses(tmp_path / "full"), step_losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 17))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed["val_loss"] == full["val_loss"]


def test_sigusr1_checkpoints(data_dir: Path, tmp_path: Path) -> None:
    cfg = recipe(data_dir, train__batch_size=4, train__max_steps=50)
    stopped = run_with(cfg, tmp_path / "r", SignalAt(2, signal.SIGUSR1))
    assert stopped["preempted"] and stopped["step"] == 4  # sent after step 3 was checked: step 4 finishes
    assert signal.getsignal(signal.SIGUSR1) is not None  # handlers restored after the run


def test_nan_stops_and_keeps_last_good_checkpoint(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from crate.train.module import LMModule, NonFiniteLossError

    real = LMModule.loss

    def poisoned(self, x, y):
        loss = real(self, x, y)
        return loss * float("nan") if self.global_step == 7 else loss

    monkeypatch.setattr(LMModule, "loss", poisoned)
    cfg = recipe(data_dir, train__max_steps=20)
    ckpt = tmp_path / "r" / "checkpoints" / "step-0000005.ckpt"
    with pytest.raises(NonFiniteLossError, match=f"at step 8: .*`crate train --resume {ckpt} train.lr=0.0015`"):
        train(cfg, out=tmp_path / "r", progress=False)
    last = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_mismatched_resume_bad_shards_eval_export(data_dir: Path, tmp_path: Path, capsys) -> None:
    train(recipe(data_dir, train__max_steps=5), out=tmp_path / "r", progress=False)
    with pytest.raises(CheckpointError, match="n_layer: checkpoint 1 vs now 2"):
        train(recipe(data_dir, model__n_layer=2, train__max_steps=10), out=tmp_path / "r", progress=False)
    other = P.prepare("embedded", tmp_path / "other", **{**TRAIN_DATA, "vocab_size": 290, "max_documents": 1})
    with pytest.raises(CheckpointError, match="tokenizer"):
        train(recipe(other, model__vocab_size=300, train__max_steps=10), out=tmp_path / "r", progress=False)
    # crate eval on the training checkpoint equals crate eval on its export (our format, through crate.load)
    from crate.cli import main

    assert main(["export", str(tmp_path / "r" / "checkpoints" / "last.ckpt"), str(tmp_path / "exp")]) == 0
    capsys.readouterr()
    for ckpt in (tmp_path / "r" / "checkpoints" / "last.ckpt", tmp_path / "exp"):
        assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data_dir), "--json", "--max-batches", "4"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert out[0]["loss"] == pytest.approx(out[1]["loss"], rel=1e-6) and out[0]["tokens"] == 4 * 8 * 32
    assert main(["eval", "--checkpoint", str(tmp_path / "exp"), "--data", str(other)]) == 2  # other tokenizer: clean error
    # a training checkpoint that lacks a weight is refused, naming it (not evaluated with that weight random)
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=True)
    lost = next(k for k in state["state_dict"] if k.endswith("ln_f.weight"))
    del state["state_dict"][lost]
    torch.save(state, tmp_path / "lost.ckpt")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "lost.ckpt"), "--data", str(data_dir)]) == 2
    assert "missing keys ['transformer.ln_f.weight']" in capsys.readouterr().err
    # a corrupted shard stops the run before training starts
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    arr = np.memmap(bad / "val-00000.bin", dtype=np.uint16, mode="r+")
    arr[5] = 4000
    arr.flush()
    del arr
    with pytest.raises(DataError, match="token id 4000"):
        train(recipe(bad), out=tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_a_run_never_writes_into_a_folder_of_other_files(tmp_path: Path) -> None:
    """--out of someone else's files (or their own config.yaml) is refused before any data is read or prepared."""
    from crate.provenance import OWNER, ProvenanceError

    theirs, other_cfg = tmp_path / "theirs", tmp_path / "cfg"
    theirs.mkdir(), other_cfg.mkdir()
    (theirs / "notes.txt").write_text("mine")
    (other_cfg / "config.yaml").write_text("lr: 3\n")
    no_data = tmp_path / "no-data"  # were the data looked at first, this would fail otherwise
    for folder, names in ((theirs, "notes.txt"), (other_cfg, "config.yaml")):  # their own config.yaml too
        with pytest.raises(ProvenanceError, match=rf"has not marked it as its own \(no .crate-lm among {names}\)"):
            train(recipe(no_data), out=folder, progress=False)
    # a config.yaml that crate train did not write, in a folder marked as ours: refused all the same
    (other_cfg / OWNER).write_text("")
    with pytest.raises(ConfigError, match="config.yaml was not written by crate train"):
        train(recipe(no_data), out=other_cfg, progress=False)
    (other_cfg / OWNER).unlink()
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"] and (theirs / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in other_cfg.iterdir()) == ["config.yaml"]
    assert (other_cfg / "config.yaml").read_text() == "lr: 3\n" and not no_data.exists()


def test_atomic_checkpoint_survives_kill(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    pid = os.fork()
    if pid == 0:  # child: a slow, large save that gets killed half-way
        try:
            io.save_checkpoint({"step": 2, "w": torch.randn(60_000_000)}, path)
        finally:
            os._exit(0)
    deadline = time.time() + 30
    while time.time() < deadline:
        tmps = list(tmp_path.glob(".last.ckpt.tmp*"))
        if tmps and tmps[0].stat().st_size > 1_000_000:
            break
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint, intact


def test_recipes_and_overrides() -> None:
    from crate.config import preset_config

    configs = Path(__file__).resolve().parent.parent / "configs"
    for arch in ("crate", "gpt"):
        for size in ("1L", "2L", "3L", "S", "B"):
            cfg = load_recipe(configs / f"{arch}-{size}.yaml")
            assert cfg.model_config(50257) == preset_config(arch, size)
            t = cfg.train
            assert (t.lr, t.min_lr, t.warmup_steps, t.max_steps, t.weight_decay, t.grad_clip, tuple(t.betas)) == (
                6e-4, 6e-5, 2000, 600_000, 0.1, 1.0, (0.9, 0.95))
            assert t.batch_size * t.context == 480 * 1024 and cfg.data.tokenizer == "gpt2"
    cfg = load_recipe("tiny-gpt", ["train.max_steps=7", "model.n_layer=3", "train.betas=[0.8, 0.9]"])
    assert cfg.train.max_steps == 7 and cfg.model["n_layer"] == 3 and cfg.train.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="unknown key"):
        load_recipe("tiny-gpt", ["train.max_step=7"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_recipe("tiny-gpt", ["model.n_layers=7"])
    with pytest.raises(ConfigError, match="not found"):
        load_recipe("no-such-recipe")


def test_flops_count_the_matmuls() -> None:
    from crate.config import preset_config
    from crate.train.flops import flops_per_token, mfu, peak_flops

    d, h, V, T, L = 768, 3072, 50304, 1024, 12
    t = (T + 1) / 2
    crate = flops_per_token(preset_config("crate", "B"))
    gpt = flops_per_token(preset_config("gpt", "B"))
    assert crate["forward"] == L * (4 * d * d + 4 * t * d + 4 * 2 * d * h) + 2 * d * V
    assert gpt["forward"] == L * (8 * d * d + 4 * t * d + 4 * d * h) + 2 * d * V
    assert crate["train"] == 3 * crate["forward"]
    # 6N undercounts CRATE: its dictionary is one tensor but runs four times
    n_crate = 81_148_416
    assert crate["train"] > 6 * n_crate * 1.2
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("Some CPU") is None
    assert mfu(1e5, preset_config("gpt", "B"), peak=989e12) == pytest.approx(1e5 * gpt["train"] / 989e12)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(cmds: list[list[str]], **env_extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env_extra}
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-4000:]


@pytest.mark.parametrize("launch", ["ddp", "torchrun-2-nodes", "fsdp"])
def test_two_processes_match_one(data_dir: Path, tmp_path: Path, launch: str) -> None:
    """2 gloo processes (micro 2 x accumulation 2 each) vs 1 process (micro 4 x accumulation 2): same global batch.

    `ddp`: one node, Lightning starts the second process. `torchrun-2-nodes`: two torchrun launches on loopback,
    one per node (system.num_nodes=2), as a multi-node job starts. `fsdp`: FSDP2, each rank holding half of every
    weight; its checkpoints are full, and one resumes exactly in a single FSDP process (but not under DDP)."""
    common = [f"data.path={data_dir}", "data.source=null", "model.preset=micro", "model.block_size=32",
              "train.context=32", "train.max_steps=6", "train.batch_size=8", "train.val_every=0",
              "train.final_val_batches=4", "train.lr_decay_steps=6", "train.warmup_steps=2", "train.lr=3e-3",
              "train.ckpt_every=3", "system.accelerator=cpu", "system.wandb=off", "system.log_every=1",
              "system.progress_bar=false"]
    args = ["train", "--config", "tiny-crate", "--out", str(tmp_path / "ddp"), *common, "train.micro_batch_size=2"]
    env: dict[str, str] = {}
    if launch == "ddp":
        cmds = [[sys.executable, "-m", "crate.cli", *args, "system.devices=2", "system.strategy=ddp"]]
    elif launch == "fsdp":  # with the fused ISTA kernels (Triton's interpreter) on the all-gathered weights
        cmds = [[sys.executable, "-m", "crate.cli", *args, "system.devices=2", "system.strategy=fsdp",
                 "model.ista_impl=triton"]]
        env["TRITON_INTERPRET"] = "1"
    else:
        port = free_port()
        cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                 f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
                 "-m", "crate.cli", *args, "system.devices=1", "system.num_nodes=2", "system.strategy=ddp"]
                for rank in (0, 1)]
    run_processes(cmds, **env)
    import yaml

    resolved = yaml.safe_load((tmp_path / "ddp" / "config.yaml").read_text())["resolved"]
    assert (resolved["world_size"], resolved["accumulation"]) == (2, 2)
    single = load_recipe("tiny-crate", [*common, "train.micro_batch_size=4", "system.devices=1"])
    train(single, out=tmp_path / "one", progress=False)
    a, b = step_losses(tmp_path / "ddp"), step_losses(tmp_path / "one")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-6), (s, a[s], b[s])
    wa, wb = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    if launch != "fsdp":
        return
    fa, fb = (crate.load(tmp_path / run / "final").state_dict() for run in ("ddp", "one"))  # gathered for export
    for k in fb:
        torch.testing.assert_close(fa[k], fb[k], rtol=1e-4, atol=1e-5)
    resumed = tmp_path / "fsdp-resumed"
    run_processes([[sys.executable, "-m", "crate.cli", "train", "--config", "tiny-crate", "--out", str(resumed),
                    "--resume", str(tmp_path / "ddp" / "checkpoints" / "step-0000003.ckpt"), *common,
                    "train.micro_batch_size=4", "system.devices=1", "system.strategy=fsdp"]])  # another world size
    c = step_losses(resumed)
    assert sorted(c) == [4, 5, 6]
    for s in c:
        assert c[s] == pytest.approx(b[s], rel=1e-5, abs=1e-6), (s, c[s], b[s])
    for k, v in weights(resumed).items():
        torch.testing.assert_close(v, wb[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointError, match="written with FSDP.*resume it with system.strategy=fsdp"):
        train(single, out=tmp_path / "cross", resume=tmp_path / "ddp" / "checkpoints" / "step-0000003.ckpt")


def test_compiled_training_matches_eager(data_dir: Path, tmp_path: Path) -> None:
    """`train.compile=true` wraps the model in torch.compile: same losses as eager, plain keys in the export."""
    base = dict(train__max_steps=3, train__ckpt_every=3, train__final_val_batches=2)
    eager = train(recipe(data_dir, **base), out=tmp_path / "eager", progress=False)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = train(recipe(data_dir, train__compile=True, **base), out=tmp_path / "compiled", progress=False)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really compiled the model
    a, b = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)
    assert all(not k.startswith("model._orig_mod.") for k in weights(tmp_path / "compiled"))
    import crate

    crate.load(compiled["final"])  # the export of a compiled run loads as a plain model


def test_crate_train_prints_the_run_not_lightnings_advertising(data_dir: Path, tmp_path: Path) -> None:
    """`crate train` (a fresh process, warnings on as a user has them): no litlogger tip and no deprecation warning
    of Lightning's own pytree use; the run's own lines and Lightning's device banner stay."""
    cmd = [sys.executable, "-W", "default", "-m", "crate.cli", "train", "--out", str(tmp_path / "r"),
           f"data.path={data_dir}", "data.source=null", "model.preset=micro", "model.block_size=32", "train.context=32",
           "train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=4", "train.val_every=0",
           "train.val_batches=1", "train.final_val_batches=1", "system.wandb=off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "done: 2 steps" in text and "GPU available" in text
    assert "litlogger" not in text and "treespec" not in text
