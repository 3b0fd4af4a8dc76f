"""`crate train`: assemble the Lightning Trainer from a recipe, run it, resume it, export the result.

A run directory holds

    config.yaml             the resolved recipe (model config included), written before step 1
    logs/version_N/metrics.csv  one CSV per launch (a resume starts the next N): loss, lr, grad norm,
                            tokens/s, MFU, val loss; wandb/ when W&B is on
    checkpoints/last.ckpt   Lightning checkpoints: last, every `ckpt_every` steps (the newest `ckpt_keep`),
    checkpoints/best.ckpt   and the best validation loss; each written atomically
    final/                  the finished model in our format (`crate.load` reads it)
"""

from __future__ import annotations

import math
import os
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

from crate.atomic import atomic_file, write_bytes
from crate.config import IMPLEMENTATION_KEYS
from crate.errors import CheckpointError, ConfigError, CrateError
from crate.train.config import RunConfig, load_recipe
from crate.train.corpus import DataError
from crate.train.flops import flops_per_token, peak_flops


# --- atomic checkpoints ------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, then os.replace(): a kill mid-save leaves the
    previous checkpoint intact and never a half-written one under the final name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        with atomic_file(path) as f:
            torch.save(checkpoint, f)


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


class Preemption(Callback):
    """SIGTERM or SIGUSR1: finish the current optimizer step, write checkpoints/last.ckpt, stop.
    Under SLURM (with requeue on) the job is requeued and resumes from it."""

    def __init__(self, last_path: Path, requeue: bool):
        self.last_path, self.requeue = last_path, requeue
        self.signal: int | None = None
        self.preempted_at: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % pl_module.accumulation:
            return  # only at optimizer-step boundaries: a checkpoint mid-accumulation could not resume exactly
        flag = 1 if self.signal is not None else 0
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            t = torch.tensor([flag], device=pl_module.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = int(t.item())
        if flag:
            trainer.save_checkpoint(self.last_path)
            self.preempted_at = trainer.global_step
            trainer.should_stop = True
            if trainer.is_global_zero:
                name = signal.Signals(self.signal).name if self.signal else "a signal on another rank"
                print(f"received {name}: wrote {self.last_path} at step {trainer.global_step}; stopping", flush=True)
                if self.requeue and os.environ.get("SLURM_JOB_ID"):
                    subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)


# --- assembling a run --------------------------------------------------------------------------
def global_rank() -> int:
    for key in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def ensure_data(cfg: RunConfig, progress: bool = True) -> Path:
    """The prepared data directory; prepared here (by rank 0, the others wait) when missing and a source is set."""
    from crate.train.data import MANIFEST, prepare

    path = Path(cfg.data.path)
    if (path / MANIFEST).exists():
        return path
    if not cfg.data.source:
        raise DataError(f"{path} is not a prepared data directory and data.source is not set: run `crate prepare` first")
    d = cfg.data
    if global_rank() == 0:
        print(f"preparing {d.source} into {path} ({d.tokenizer} tokenizer)", flush=True)
        prepare(d.source, path, tokenizer=d.tokenizer, vocab_size=d.vocab_size, val_fraction=d.val_fraction,
                seed=d.seed, text_field=d.text_field, max_documents=d.max_documents, progress=progress)
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
    mode = {False: "off", True: "on", None: "off"}.get(cfg.system.wandb, cfg.system.wandb)  # YAML reads off as False
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"system.wandb must be auto, on or off, got {cfg.system.wandb!r}")
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


def read_checkpoint_identity(ckpt: Path) -> dict[str, Any]:
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"cannot read the training checkpoint {ckpt}: {e}") from None
    if "crate" not in state:
        raise CheckpointError(f"{ckpt} is not a crate training checkpoint (no 'crate' entry)")
    return state


def check_resume(ckpt: Path, model_config: dict[str, Any], tokenizer: dict[str, Any] | None, fsdp: bool) -> None:
    """Refuse to resume with another model config, tokenizer or optimizer-state layout than the checkpoint's."""
    saved = read_checkpoint_identity(ckpt)["crate"]
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


def default_run_dir(cfg: RunConfig) -> Path:
    name = cfg.name or f"{cfg.model['arch']}-{cfg.model['preset']}"
    if os.environ.get("SLURM_JOB_ID"):  # a requeued job finds its own run again
        return Path("runs") / f"{name}-slurm{os.environ['SLURM_JOB_ID']}"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: RunConfig, out: str | Path | None = None, resume: str | Path | None = None,
          progress: bool | None = None) -> dict[str, Any]:
    """Run a recipe. Returns a summary: run dir, steps, final val loss, whether it was preempted.

    `resume`: a run directory (its checkpoints/last.ckpt) or a .ckpt file. A run directory that already
    holds checkpoints/last.ckpt is resumed automatically (a requeued SLURM job)."""
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.loggers import CSVLogger

    from crate.train.data import load_tokenizer, validate_data
    from crate.train.datamodule import WindowDataModule
    from crate.train.module import LMModule
    from crate.train.tokenizer import tokenizer_identity

    t = cfg.train
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
    show_progress = sys.stdout.isatty() if progress is None else progress

    # data first: the model's vocabulary may come from it; shards are validated before any step
    data_dir = ensure_data(cfg, progress=show_progress)
    from crate.train.data import read_manifest

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
    if ckpt_path is not None:
        check_resume(ckpt_path, model_cfg.to_dict(), tok_id, fsdp=cfg.system.strategy == "fsdp")

    world = world_size(cfg)
    if t.batch_size % (t.micro_batch_size * world):
        raise ConfigError(
            f"the global batch train.batch_size={t.batch_size} must be a multiple of micro_batch_size x world size "
            f"= {t.micro_batch_size} x {world}; change micro_batch_size so that it divides {t.batch_size // world if t.batch_size >= world else t.batch_size}"
        )
    accum = t.batch_size // (t.micro_batch_size * world)
    tokens_per_step = t.batch_size * context

    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = cfg.to_dict()
    resolved["resolved"] = {"model": model_cfg.to_dict(), "context": context, "world_size": world,
                            "accumulation": accum, "tokens_per_step": tokens_per_step, "tokenizer": tok_id,
                            "data_dir": str(data_dir)}
    if global_rank() == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    L.seed_everything(t.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision(cfg.system.matmul_precision)
    train_dict = {**_asdict(t), "betas": list(t.betas)}
    module = LMModule(model_cfg.to_dict(), train_dict, tokenizer=tok_id, accumulation=accum)
    datamodule = WindowDataModule(data_dir, context, t.batch_size, t.micro_batch_size, t.seed,
                                  t.val_batches, t.final_val_batches, tok_id["sha256"])

    ckpt_dir = run_dir / "checkpoints"
    periodic = ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:07d}", every_n_train_steps=t.ckpt_every,
                               save_top_k=t.ckpt_keep, monitor="step", mode="max", save_last=True,
                               auto_insert_metric_name=False, save_on_train_epoch_end=False)
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
    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="logs")]  # logs/version_N/metrics.csv per launch
    wb = _wandb_logger(cfg, run_dir)
    if wb is not None:
        loggers.append(wb)

    plugins: list[Any] = [AtomicCheckpointIO()]
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
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "step": trainer.global_step, "preempted": False,
                               "world_size": trainer.world_size, "accumulation": accum}
    if preemption.preempted_at is not None:
        summary["preempted"] = True
        return summary
    if trainer.global_step < t.max_steps:  # stopped by something else (interrupt): keep what we have
        return summary
    if not (ckpt_dir / "last.ckpt").is_file() or periodic._last_global_step_saved != trainer.global_step:
        trainer.save_checkpoint(ckpt_dir / "last.ckpt")

    # final eval over the val split (or final_val_batches of it), then our checkpoint format
    datamodule.final = True
    result = trainer.validate(module, datamodule=datamodule, verbose=False)
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


def model_from_state(model_config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Any:
    """A plain LanguageModel from the LightningModule's state dict (`model.` keys, compiled or not)."""
    from crate.checkpoint import load_state
    from crate.config import ModelConfig
    from crate.model import LanguageModel

    model = LanguageModel(ModelConfig.from_dict(model_config))
    load_state(model, {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")})
    return model


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
    if resume is not None and config is None and Path(resume).is_dir() and (Path(resume) / "config.yaml").is_file():
        raw = yaml.safe_load((Path(resume) / "config.yaml").read_text())
        raw.pop("resolved", None)
        from crate.train.config import apply_overrides

        cfg = RunConfig.from_dict(apply_overrides(raw, overrides))
    else:
        cfg = load_recipe(config, overrides)
    try:
        return train(cfg, out=out, resume=resume)
    except KeyboardInterrupt:
        raise CrateError("interrupted; resume with `crate train --resume <run dir>`") from None
