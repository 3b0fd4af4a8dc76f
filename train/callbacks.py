"""What a training run reports and how it stops: the metrics log (<run>/metrics.csv), the per-step metrics
(loss, lr, grad norm, tokens/s, MFU) and the preemption handler (a signal checkpoints at a step boundary and stops,
requeued under SLURM).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from crate.atomic import write_bytes


class MetricsCSV(Logger):
    """<run>/metrics.csv, one per run: each launch appends to it and flushes every row, so a kill loses no
    logged row. The first write of a launch that starts at step `start_step` drops the rows after that step
    (logged by a launch whose later steps the checkpoint does not hold). A key not yet in the header
    rewrites the file with a wider header (atomically)."""

    COLUMNS = ("step", "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/tokens",
               "train/mfu", "val/loss", "final/val_loss")

    def __init__(self, path: Path, start_step: int):
        super().__init__()
        self.path, self.start_step = Path(path), start_step
        self.columns: list[str] | None = None

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # config.yaml holds them

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_bytes(self.path, buf.getvalue().encode())

    def _open(self) -> None:
        """The first write of this launch: the header so far, and the rows up to `start_step`."""
        rows: list[dict[str, str]] = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                self.columns = list(reader.fieldnames or self.COLUMNS)
        else:
            self.columns = list(self.COLUMNS)
        kept = [r for r in rows if r.get("step") not in (None, "") and int(r["step"]) <= self.start_step]
        if len(kept) != len(rows) or not self.path.is_file():
            self._rewrite(kept)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.columns is None:
            self._open()
        assert self.columns is not None
        row = {"step": step, **metrics}
        new = [k for k in row if k not in self.columns]
        if new:
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            self.columns += new
            self._rewrite(rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, lineterminator="\n").writerow(row)
            f.flush()


class StepMetrics(Callback):
    """At every optimizer step: loss, lr, grad norm, tokens/s and MFU to the loggers every `log_every` steps."""

    def __init__(self, tokens_per_step: int, flops_per_token_train: float, peak: float | None, log_every: int,
                 echo: bool):
        self.tokens_per_step, self.fpt, self.peak = tokens_per_step, flops_per_token_train, peak
        self.log_every, self.echo = max(1, log_every), echo
        self._t0: float | None = None
        self._steps = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._t0, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % pl_module.accumulation:
            return
        self._steps += 1
        step = trainer.global_step
        if step % self.log_every and step != trainer.max_steps:
            return
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt = max(now - (self._t0 or now), 1e-9)
        tps = self._steps * self.tokens_per_step / dt
        metrics: dict[str, float] = {
            "train/loss": pl_module.step_loss,
            "train/lr": trainer.optimizers[0].param_groups[0]["lr"],
            "train/tokens_per_s": tps,
            "train/tokens": step * self.tokens_per_step,
        }
        if pl_module.grad_norm is not None:
            metrics["train/grad_norm"] = pl_module.grad_norm
        if self.peak:
            metrics["train/mfu"] = tps / trainer.world_size * self.fpt / self.peak
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self.echo and trainer.is_global_zero:
            mfu = f"  mfu {metrics['train/mfu']:.1%}" if "train/mfu" in metrics else ""
            print(f"step {step}/{trainer.max_steps}  loss {metrics['train/loss']:.4f}  lr {metrics['train/lr']:.2e}  "
                  f"{tps:,.0f} tok/s{mfu}", flush=True)
        self._t0, self._steps = now, 0


class ValidationLog(Callback):
    """The periodic validation loss to the loggers at the optimizer step whose weights it measured (Lightning's own
    logging labels it with the step before); the final validation goes as final/val_loss (crate.train.run)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or getattr(trainer.datamodule, "final", False) or loss is None:
            return
        for logger in trainer.loggers:
            logger.log_metrics({"val/loss": float(loss)}, step=trainer.global_step)


class Interrupted(BaseException):
    """A signal during the final validation: stop it (the run resumes there); not an Exception, so that
    nothing on the way mistakes it for an error to handle."""


class Preemption(Callback):
    """SIGINT (Ctrl-C), SIGTERM or SIGUSR1: finish the current optimizer step, write checkpoints/last.ckpt,
    stop. Under SLURM (with requeue on) the job is requeued and resumes from it. Our handlers are in place
    from the trainer's setup on (a signal before the first step stops at the first step), set again when
    training and validation start (Lightning installs its own SIGTERM handler, which would stop
    mid-accumulation), and `restore` puts the original ones back. A signal during the final validation
    stops it (every step is done: a resume only validates and exports). `signal` ends up the same on every
    rank (the largest signal number any rank received)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, last_path: Path, requeue: bool):
        self.last_path, self.requeue = last_path, requeue
        self.signal: int | None = None
        self.preempted_at: int | None = None
        self.requeued = False
        self._originals: dict[int, Any] | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def _install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        if self._originals is None:
            self._originals = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def restore(self) -> None:
        """The handlers from before the run (also after Lightning's teardown, which reinstalls ours)."""
        for sig, handler in (self._originals or {}).items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(sig, handler)

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._install()

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._install()

    def teardown(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self.restore()

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self.restore()

    def _agreed_signal(self, trainer: L.Trainer, pl_module: Any) -> int:
        signum = self.signal or 0
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            t = torch.tensor([signum], device=pl_module.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            signum = int(t.item())
        return signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % pl_module.accumulation:
            return  # only at optimizer-step boundaries: a checkpoint mid-accumulation could not resume exactly
        signum = self._agreed_signal(trainer, pl_module)
        if signum:
            self.signal = signum
            trainer.save_checkpoint(self.last_path)
            self.preempted_at = trainer.global_step
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(f"received {signal.Signals(signum).name}: wrote {self.last_path} at step {trainer.global_step}; "
                      f"stopping", flush=True)
            self._requeue(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if trainer.state.fn == "validate" and self._agreed_signal(trainer, pl_module):
            self._requeue(trainer)
            raise Interrupted

    def _requeue(self, trainer: L.Trainer) -> None:
        """Under SLURM with requeue on: every rank counts the job as requeued; rank 0 asks for it."""
        job = os.environ.get("SLURM_JOB_ID")
        if not (self.requeue and job):
            return
        self.requeued = True
        if trainer.is_global_zero:
            try:
                done = subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0
            except OSError:
                done = False
            if not done:
                print(f"could not requeue SLURM job {job} (scontrol requeue failed): resubmit it", flush=True)
                self.requeued = False
