"""`crate train`: assemble the Lightning Trainer from a recipe, run it, resume it, export the result.

A run directory holds

    config.yaml             the resolved recipe (model config included), written before step 1, and the
                            `history` of the settings a resume changed (step, key: [old, new])
    metrics.csv             one CSV per run, appended by every launch and flushed at every row: loss, lr,
                            grad norm, tokens/s, MFU, val loss; a resume at step S drops the rows after S,
                            so each step appears once; wandb/ when W&B is on
    checkpoints/last.ckpt   Lightning checkpoints: last, every `ckpt_every` steps (the newest `ckpt_keep`),
    checkpoints/best.ckpt   and the best validation loss; each written atomically
    final/                  the finished model in our format (`crate.load` reads it)

A run folder is written by one training at a time: when one starts, it removes what killed launches left
(temporaries of atomic writes, periodic checkpoints beyond `ckpt_keep` or after the step it resumes from).
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from crate.atomic import atomic_file, remove_stale_temporaries, write_bytes
from crate.config import IMPLEMENTATION_KEYS
from crate.loading import model_from_state, read_checkpoint_identity
from crate.errors import CheckpointError, ConfigError, DataError
from crate.provenance import STAMP, check_owned
from crate.train.config import RunConfig, load_recipe
from crate.train.flops import flops_per_token, peak_flops


# --- atomic checkpoints ------------------------------------------------------------------------
PERIODIC = re.compile(r"^step-(\d+)\.ckpt$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, then os.replace(): a kill mid-save leaves the
    previous checkpoint intact and never a half-written one under the final name. After a periodic
    checkpoint only the newest `keep` of them stay (-1: all)."""

    def __init__(self, keep: int = -1):
        super().__init__()
        self.keep = keep

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        with atomic_file(path) as f:
            torch.save(checkpoint, f)
        if PERIODIC.match(Path(path).name):
            prune_checkpoints(Path(path).parent, self.keep)


def periodic_checkpoints(folder: Path) -> dict[int, Path]:
    """{step: path} of the step-*.ckpt files in `folder`."""
    found = (PERIODIC.match(p.name) for p in folder.iterdir()) if folder.is_dir() else ()
    return {int(m.group(1)): folder / m.group(0) for m in found if m}


def prune_checkpoints(folder: Path, keep: int, after: int | None = None, protect: Path | None = None) -> list[Path]:
    """Remove the periodic checkpoints beyond the newest `keep` (-1 keeps all), and those of steps > `after`
    (a continuation the resumed checkpoint does not hold); never `protect`. Returns the removed paths."""
    steps = sorted(periodic_checkpoints(folder).items())
    doomed = [p for s, p in steps if after is not None and s > after]
    kept = [p for s, p in steps if after is None or s <= after]
    if keep >= 0:
        doomed += kept[: max(0, len(kept) - keep)]
    doomed = [p for p in doomed if protect is None or p.resolve() != protect.resolve()]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def tidy_run_folder(run_dir: Path, keep: int, resume: Path | None, resume_step: int) -> None:
    """Before a launch trains (rank 0): clear what killed launches left in the run folder and its
    checkpoints, and when resuming from a named checkpoint of this run, make last.ckpt that checkpoint (an
    automatic resume later must continue this history, not the abandoned one)."""
    ckpt_dir = run_dir / "checkpoints"
    for p in remove_stale_temporaries(run_dir) + remove_stale_temporaries(ckpt_dir):
        print(f"removed {p} (left by a killed launch)", flush=True)
    for p in prune_checkpoints(ckpt_dir, keep, after=resume_step, protect=resume):
        print(f"removed {p} (beyond train.ckpt_keep={keep}, or after the resumed step {resume_step})", flush=True)
    last = ckpt_dir / "last.ckpt"
    if resume is not None and resume.parent.resolve() == ckpt_dir.resolve() and resume.name != last.name:
        tmp = ckpt_dir / f".last.ckpt.tmp{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(resume, tmp)  # instant and atomic where hard links work
        except OSError:
            shutil.copyfile(resume, tmp)
        os.replace(tmp, last)


# --- the metrics log ---------------------------------------------------------------------------
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


# --- callbacks ---------------------------------------------------------------------------------
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


# --- assembling a run --------------------------------------------------------------------------
def global_rank() -> int:
    for key in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def ensure_data(cfg: RunConfig, progress: bool = True) -> Path:
    """The prepared data directory; prepared here (by rank 0, the others wait) when missing and a source is
    set. A prepared one is used when data.* names the inputs it was prepared from (or data.source is
    null); a folder that `crate prepare` did not write is never written into."""
    from crate.train.data import MANIFEST, check_out_dir, input_differences, prepare, prepare_args, read_manifest

    path, d = Path(cfg.data.path), cfg.data
    inputs = dict(tokenizer=d.tokenizer, vocab_size=d.vocab_size, val_fraction=d.val_fraction, seed=d.seed,
                  text_field=d.text_field, max_documents=d.max_documents, encoding=d.encoding)
    if (path / MANIFEST).exists():
        if d.source:
            differences = input_differences(read_manifest(path)["args"], prepare_args(d.source, **inputs))
            if differences:
                raise DataError(
                    f"data.path {path} was prepared from other inputs than data.* gives ({'; '.join(differences)}): "
                    f"set data.source=null to train on it as it is, point data.path to a new folder, or re-prepare "
                    f"it with `crate prepare ... --out {path} --overwrite`"
                )
            if global_rank() == 0:
                print(f"reused {path}: prepared earlier from the same inputs", flush=True)
        return path
    if not d.source:
        raise DataError(f"{path} is not a prepared data directory and data.source is not set: run `crate prepare` first")
    if global_rank() == 0:  # the others wait (if it fails, the launcher stops them)
        check_out_dir(path, "data.path")
        print(f"preparing {d.source} into {path} ({d.tokenizer} tokenizer)", flush=True)
        prepare(d.source, path, **inputs, progress=progress)
    else:
        deadline = time.time() + 24 * 3600
        while not (path / MANIFEST).exists():
            if time.time() > deadline:
                raise DataError(f"timed out waiting for rank 0 to prepare {path}")
            time.sleep(5)
    return path


def resolve_precision(cfg: RunConfig) -> str:
    p = cfg.train.precision
    if p != "auto":
        return p
    gpu = torch.cuda.is_available() and cfg.system.accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if gpu else "32-true"  # bf16 autocast on CPU is ~30x slower: never use it there


def world_size(cfg: RunConfig) -> int:
    """The number of processes the Trainer will run (devices x nodes), resolved as Lightning does."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    system = cfg.system
    try:
        conn = _AcceleratorConnector(accelerator=system.accelerator, devices=system.devices,
                                     num_nodes=system.num_nodes, strategy=_strategy(cfg))
    except (ValueError, MisconfigurationException) as e:  # e.g. more devices than there are
        raise ConfigError(
            f"system.accelerator={system.accelerator} devices={system.devices} strategy={system.strategy} "
            f"cannot run on this machine: {e}"
        ) from e
    return len(conn._parallel_devices) * cfg.system.num_nodes


def _strategy(cfg: RunConfig) -> Any:
    if cfg.system.strategy == "fsdp":
        from crate.train.fsdp import FSDPStrategy

        return FSDPStrategy()
    return cfg.system.strategy


def _wandb_logger(cfg: RunConfig, run_dir: Path) -> Any:
    mode = {False: "off", True: "on"}.get(cfg.system.wandb, cfg.system.wandb)  # YAML reads off as False
    if mode == "off":
        return None
    try:
        import wandb  # noqa: F401
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:
        if mode == "on":
            raise ConfigError("system.wandb=on but wandb is not installed: pip install wandb") from None
        return None
    logged_in = bool(os.environ.get("WANDB_API_KEY"))
    if not logged_in:
        try:
            import netrc

            logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            pass
    offline = os.environ.get("WANDB_MODE") == "offline" or not logged_in
    return WandbLogger(project=cfg.system.wandb_project, name=run_dir.name, save_dir=str(run_dir), offline=offline,
                       config=cfg.to_dict())


FIXED_ON_RESUME = ("batch_size", "context", "seed", "betas", "weight_decay", "eps", "precision")


def check_resume(ckpt: Path, model_config: dict[str, Any], tokenizer: dict[str, Any] | None, fsdp: bool,
                 train_cfg: dict[str, Any] | None = None, data_dir: Path | None = None,
                 state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Refuse to resume with another model config, tokenizer, data folder, optimizer-state layout or one of
    the train settings that fix what the run computes (FIXED_ON_RESUME) than the checkpoint's. Returns
    {"step": its step, "changed": {"train.key": [old, new]}} for the train settings that may change (the
    schedule, max_steps, clipping, validation, checkpointing, micro_batch_size with the world size)."""
    state = state if state is not None else read_checkpoint_identity(ckpt)  # `state`: the caller's reading of it
    saved = state["crate"]
    if bool(saved.get("fsdp")) != fsdp:
        fix = ("resume it with system.strategy=fsdp (any number of processes)" if saved.get("fsdp")
               else "resume it without system.strategy=fsdp")
        raise CheckpointError(
            f"cannot resume from {ckpt}: it was written {'with' if saved.get('fsdp') else 'without'} FSDP and this "
            f"run is {'with' if fsdp else 'without'} it, and the two order the optimizer state differently; {fix}"
        )
    keys = (set(model_config) | set(saved["model"])) - set(IMPLEMENTATION_KEYS)
    diff = sorted(k for k in keys if model_config.get(k) != saved["model"].get(k))
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved['model'].get(k)!r} vs now {model_config.get(k)!r}" for k in diff)
        raise CheckpointError(f"cannot resume from {ckpt}: the model config differs ({detail})")
    old, new = (saved.get("tokenizer") or {}), (tokenizer or {})
    if old.get("sha256") and new.get("sha256") and old["sha256"] != new["sha256"]:
        raise CheckpointError(
            f"cannot resume from {ckpt}: it was trained with tokenizer {old.get('name')} (sha256 {old['sha256'][:12]}) "
            f"but the data uses {new.get('name')} (sha256 {new['sha256'][:12]})"
        )
    if data_dir is not None and saved.get("data_dir") and saved["data_dir"] != str(data_dir.resolve()):
        raise CheckpointError(f"cannot resume from {ckpt} with other data: data.path: {saved['data_dir']!r} -> "
                              f"{str(data_dir.resolve())!r}; resume with data.path={saved['data_dir']}")
    before = (state.get("hyper_parameters") or {}).get("train") or {}
    now = train_cfg or {}
    fixed = [k for k in FIXED_ON_RESUME if k in before and k in now and before[k] != now[k]]
    if fixed:
        detail = ", ".join(f"train.{k}: {before[k]!r} -> {now[k]!r}" for k in fixed)
        raise CheckpointError(f"cannot resume from {ckpt} with {detail}: that changes what the run computes from "
                              f"here on; resume with the checkpoint's value, or start a new run in another --out")
    changed = {f"train.{k}": [before[k], now[k]] for k in now if k in before and before[k] != now[k]}
    return {"step": int(state.get("global_step", 0)), "changed": changed}


def default_run_dir(cfg: RunConfig) -> Path:
    name = cfg.name or f"{cfg.model['arch']}-{cfg.model['preset']}"
    if os.environ.get("SLURM_JOB_ID"):  # a requeued job finds its own run again
        return Path("runs") / f"{name}-slurm{os.environ['SLURM_JOB_ID']}"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


RUN_OUTPUTS = ("config.yaml", "metrics.csv", "checkpoints", "final", STAMP)


def _check_new_run_dir(run_dir: Path) -> None:
    """A run writes config.yaml, metrics.csv, checkpoints/ and final/ into its folder: a new or empty one, or one of
    our runs (its config.yaml has the `resolved` section `train` writes), never a folder of files we did not write."""
    check_owned(run_dir, RUN_OUTPUTS, "another --out")
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        try:
            doc = yaml.safe_load(cfg.read_text())
        except yaml.YAMLError:
            doc = None
        if not (isinstance(doc, dict) and "resolved" in doc):
            raise ConfigError(f"{cfg} was not written by crate train (it has no `resolved` section), and a run writes "
                              f"its own config.yaml there: choose another --out")


def _resume_point(cfg: RunConfig, out: str | Path | None, resume: str | Path | None) -> tuple[Path, Path | None]:
    """(run dir, checkpoint to resume from or None): `resume` is a run dir or a .ckpt; a run dir that holds
    checkpoints/last.ckpt resumes from it."""
    ckpt_path: Path | None = None
    if resume is not None:
        r = Path(resume)
        ckpt_path = r / "checkpoints" / "last.ckpt" if r.is_dir() else r
        if not ckpt_path.is_file():
            raise CheckpointError(f"nothing to resume: {ckpt_path} does not exist")
        if out is None:
            out = r if r.is_dir() else r.parent.parent
    run_dir = Path(out) if out is not None else default_run_dir(cfg)
    if ckpt_path is None and (run_dir / "checkpoints" / "last.ckpt").is_file():
        ckpt_path = run_dir / "checkpoints" / "last.ckpt"
        print(f"resuming {run_dir} from {ckpt_path}", flush=True)
    return run_dir, ckpt_path


def _history(run_dir: Path, ckpt_path: Path | None, cfg: RunConfig, resumed: dict[str, Any]) -> list[dict[str, Any]]:
    """config.yaml's `history`: per resume that changed settings, its step and {key: [old, new]}. Kept from the
    previous config.yaml up to the resumed step (later entries belong to the abandoned continuation)."""
    if not resumed:
        return []
    previous: dict[str, Any] = {}
    for candidate in (run_dir / "config.yaml", *([ckpt_path.parent.parent / "config.yaml"] if ckpt_path else [])):
        if candidate.is_file():
            previous = yaml.safe_load(candidate.read_text()) or {}
            break
    history = [h for h in previous.get("history") or [] if h.get("step", 0) <= resumed["step"]]
    changed = dict(resumed["changed"])
    old_system, new_system = previous.get("system") or {}, _asdict(cfg.system)
    changed.update({f"system.{k}": [old_system[k], v] for k, v in new_system.items()
                    if k in old_system and old_system[k] != v})
    if changed:
        history.append({"step": resumed["step"], "changed": changed})
        if global_rank() == 0:
            print(f"resuming at step {resumed['step']} with "
                  + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()), flush=True)
    return history


def _recovery(error: Exception, ckpt_dir: Path, lr: float) -> str:
    """The NaN stop's advice: a command that resumes the newest checkpoint before the NaN with half the rate
    (resuming the run folder as it is would repeat the same steps and stop again)."""
    candidates = periodic_checkpoints(ckpt_dir)
    last = ckpt_dir / "last.ckpt"
    if last.is_file():  # newer than the periodic ones after a preemption; a periodic one wins a tie
        candidates.setdefault(int(read_checkpoint_identity(last).get("global_step", 0)), last)
    good = candidates[max(candidates)] if candidates else None
    if good is None:
        return (f"{error}; no checkpoint was written before it: start again with a lower rate, e.g. "
                f"`crate train --config {ckpt_dir.parent / 'config.yaml'} --out {ckpt_dir.parent} train.lr={lr / 2:.3g}`")
    return (f"{error}; the checkpoints before it are kept: resume from the newest with a lower rate: "
            f"`crate train --resume {good} train.lr={lr / 2:.3g}`")


def train(cfg: RunConfig, out: str | Path | None = None, resume: str | Path | None = None,
          progress: bool | None = None) -> dict[str, Any]:
    """Run a recipe. Returns a summary: run dir, steps, final val loss, whether a signal stopped it (`signal`,
    `preempted`, `requeued`).

    `resume`: a run directory (its checkpoints/last.ckpt) or a .ckpt file. A run directory that already
    holds checkpoints/last.ckpt is resumed automatically (a requeued SLURM job)."""
    from lightning.pytorch.callbacks import RichProgressBar

    from crate.train.data import load_tokenizer, read_manifest, validate_data
    from crate.train.datamodule import WindowDataModule
    from crate.train.module import LMModule, NonFiniteLossError
    from crate.tokenizer import tokenizer_identity

    t = cfg.train
    run_dir, ckpt_path = _resume_point(cfg, out, resume)
    if ckpt_path is None:
        _check_new_run_dir(run_dir)
    # read once, before any data is prepared: a foreign or unsafe file is refused first
    ckpt_state = read_checkpoint_identity(ckpt_path) if ckpt_path is not None else None
    show_progress = sys.stdout.isatty() if progress is None else progress

    # data first: the model's vocabulary may come from it; shards are validated before any step
    data_dir = ensure_data(cfg, progress=show_progress)
    manifest = read_manifest(data_dir)
    model_cfg = cfg.model_config(manifest["vocab_size"])
    context = t.context or model_cfg.block_size
    if context > model_cfg.block_size:
        raise ConfigError(f"train.context={context} exceeds model.block_size={model_cfg.block_size}")
    validate_data(data_dir, model_cfg.vocab_size, tokenizer_sha256=manifest["tokenizer"]["sha256"])
    tok = load_tokenizer(data_dir)
    tok_id = tokenizer_identity(tok, manifest["tokenizer"]["name"])
    if tok_id["sha256"] != manifest["tokenizer"]["sha256"]:
        raise DataError(f"{data_dir}/tokenizer.json does not match the manifest's tokenizer hash: re-run `crate prepare`")
    train_dict = {**_asdict(t), "betas": list(t.betas)}
    resumed: dict[str, Any] = {}
    if ckpt_path is not None:
        resumed = check_resume(ckpt_path, model_cfg.to_dict(), tok_id, fsdp=cfg.system.strategy == "fsdp",
                               train_cfg=train_dict, data_dir=data_dir, state=ckpt_state)

    world = world_size(cfg)
    if t.batch_size % (t.micro_batch_size * world):
        raise ConfigError(
            f"the global batch train.batch_size={t.batch_size} must be a multiple of micro_batch_size x world size "
            f"= {t.micro_batch_size} x {world}; change micro_batch_size so that it divides {t.batch_size // world if t.batch_size >= world else t.batch_size}"
        )
    accum = t.batch_size // (t.micro_batch_size * world)
    tokens_per_step = t.batch_size * context

    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    resolved = cfg.to_dict()
    resolved["resolved"] = {"model": model_cfg.to_dict(), "context": context, "world_size": world,
                            "accumulation": accum, "tokens_per_step": tokens_per_step, "tokenizer": tok_id,
                            "data_dir": str(data_dir)}
    resolved["history"] = _history(run_dir, ckpt_path, cfg, resumed)
    if global_rank() == 0:
        write_bytes(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())
        tidy_run_folder(run_dir, t.ckpt_keep, ckpt_path, resumed.get("step", 0))

    L.seed_everything(t.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision(cfg.system.matmul_precision)
    module = LMModule(model_cfg.to_dict(), train_dict, tokenizer=tok_id, accumulation=accum,
                      data_dir=str(data_dir.resolve()))
    datamodule = WindowDataModule(data_dir, context, t.batch_size, t.micro_batch_size, t.seed,
                                  t.val_batches, t.final_val_batches, tok_id["sha256"])

    # the newest ckpt_keep periodic checkpoints are kept by AtomicCheckpointIO, from the files themselves
    periodic = ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:07d}", every_n_train_steps=t.ckpt_every,
                               save_top_k=-1, save_last=True, auto_insert_metric_name=False,
                               save_on_train_epoch_end=False, enable_version_counter=False)
    callbacks: list[Callback] = [periodic]
    if t.val_every:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min",
                                         save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False))
    peak = cfg.system.peak_flops or peak_flops()
    fpt = flops_per_token(model_cfg, context)["train"]
    callbacks.append(StepMetrics(tokens_per_step, fpt, peak, cfg.system.log_every, echo=not show_progress))
    preemption = Preemption(ckpt_dir / "last.ckpt", requeue=True)
    callbacks.append(preemption)
    if show_progress and cfg.system.progress_bar:
        callbacks.append(RichProgressBar())
    loggers: list[Any] = [MetricsCSV(run_dir / "metrics.csv", start_step=resumed.get("step", 0))]
    wb = _wandb_logger(cfg, run_dir)
    if wb is not None:
        loggers.append(wb)

    plugins: list[Any] = [AtomicCheckpointIO(keep=t.ckpt_keep)]
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_NTASKS"):
        from lightning.fabric.plugins.environments import SLURMEnvironment

        # our Preemption callback checkpoints at a step boundary and requeues; Lightning's own would not wait
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = L.Trainer(
        accelerator=cfg.system.accelerator, devices=cfg.system.devices, num_nodes=cfg.system.num_nodes,
        strategy=_strategy(cfg), precision=resolve_precision(cfg), max_steps=t.max_steps, max_epochs=-1,
        accumulate_grad_batches=accum, val_check_interval=(t.val_every or t.max_steps + 1) * accum,
        check_val_every_n_epoch=None, num_sanity_val_steps=0,
        callbacks=callbacks, logger=loggers, plugins=plugins, default_root_dir=str(run_dir),
        enable_progress_bar=bool(show_progress and cfg.system.progress_bar), log_every_n_steps=cfg.system.log_every,
        use_distributed_sampler=False, enable_model_summary=show_progress, benchmark=False,
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(_recovery(e, ckpt_dir, t.lr)) from None
    finally:
        preemption.restore()
    summary: dict[str, Any] = {"run_dir": str(run_dir), "step": trainer.global_step, "preempted": False,
                               "world_size": trainer.world_size, "accumulation": accum}

    def stopped() -> dict[str, Any]:
        return {**summary, "preempted": True, "signal": preemption.signal, "requeued": preemption.requeued}

    if preemption.preempted_at is not None:
        return stopped()
    if trainer.global_step < t.max_steps:  # stopped by something else: keep what we have
        return summary
    if not (ckpt_dir / "last.ckpt").is_file() or periodic._last_global_step_saved != trainer.global_step:
        trainer.save_checkpoint(ckpt_dir / "last.ckpt")

    # final eval over the val split (or final_val_batches of it), then our checkpoint format
    datamodule.final = True
    try:
        result = trainer.validate(module, datamodule=datamodule, verbose=False)
    except Interrupted:  # a signal during it: the steps are done and checkpointed; a resume validates again
        return stopped()
    finally:
        preemption.restore()
    val_loss = float(result[0]["val/loss"]) if result else float("nan")
    summary["val_loss"] = val_loss
    summary["val_ppl"] = math.exp(val_loss) if val_loss < 50 else float("inf")
    state = trainer.strategy.lightning_module_state_dict()  # on every rank: FSDP gathers the weights to rank 0
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics({"final/val_loss": val_loss}, step=trainer.global_step)
            logger.save()
        summary["final"] = str(export_model(model_from_state(model_cfg.to_dict(), state), run_dir / "final",
                                            module.train_cfg, tok, tok_id, manifest, trainer.global_step, val_loss,
                                            data_dir))
    return summary


def _asdict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


def export_model(model: Any, out: Path, train_cfg: dict[str, Any] | None, tok: Any, tok_id: dict[str, Any],
                 manifest: dict[str, Any] | None, step: int, val_loss: float | None = None,
                 data_dir: str | Path | None = None) -> Path:
    """Our checkpoint directory (crate.save: model.safetensors + config.json with the tokenizer identity),
    plus the tokenizer itself as tokenizer.json beside them so the directory decodes text on its own."""
    import crate

    metadata = {"step": step, "val_loss": val_loss, "train": train_cfg,
                "data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None,
                "data": {"source": manifest.get("source"), "tokens": manifest.get("tokens")} if manifest else None}
    path = Path(crate.save(model, out, tokenizer=dict(tok_id) if tok_id else None, metadata=metadata) or out)
    if tok is not None:
        write_bytes(path / "tokenizer.json", tok.to_str().encode())
    return path


def export_checkpoint(ckpt: str | Path, out: str | Path, data_dir: str | Path | None = None) -> Path:
    """Any Lightning training checkpoint of ours (last, step-N, best) -> our checkpoint directory."""
    from crate.checkpoint import check_replaceable

    check_replaceable(Path(out))  # before reading the checkpoint
    ckpt = Path(ckpt)
    state = read_checkpoint_identity(ckpt)
    model = model_from_state(state["crate"]["model"], state["state_dict"])
    tok_id = state["crate"].get("tokenizer")
    tok, manifest = None, None
    if data_dir is None:
        run_cfg = ckpt.parent.parent / "config.yaml"
        if run_cfg.is_file():
            data_dir = (yaml.safe_load(run_cfg.read_text()).get("resolved") or {}).get("data_dir")
    if data_dir is not None and Path(data_dir, "tokenizer.json").is_file():
        from crate.train.data import load_tokenizer, read_manifest

        manifest = read_manifest(data_dir)
        if tok_id is None or manifest["tokenizer"]["sha256"] == tok_id.get("sha256"):
            tok = load_tokenizer(data_dir)

    train_cfg = (state.get("hyper_parameters") or {}).get("train")
    step = int(state.get("global_step", 0))
    return export_model(model, Path(out), train_cfg, tok, tok_id or {}, manifest, step,
                        data_dir=data_dir if tok else None)


def run_from_cli(config: str | None, overrides: list[str], out: str | None, resume: str | None) -> dict[str, Any]:
    """`crate train`: the recipe is --config, else the config.yaml of the run being resumed (a run dir, or
    the run dir of a .ckpt in its checkpoints/ folder), else the default; the overrides apply on top."""
    if resume is not None and config is None:
        r = Path(resume)
        run_config = r / "config.yaml" if r.is_dir() else r.parent.parent / "config.yaml"
        if run_config.is_file():
            config = str(run_config)
    return train(load_recipe(config, overrides), out=out, resume=resume)
