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
    grid/step-<N>/          with train.grid_every: the weights every grid_every steps, in the same format, each with
                            its validation loss (config.json's metadata), for comparisons at matched loss

A run folder is written by one training at a time: when one starts, it removes what killed launches left
(temporaries of atomic writes, periodic checkpoints beyond `ckpt_keep` or after the step it resumes from).

This module assembles and runs the Trainer; its parts are crate.train.callbacks (metrics.csv, per-step metrics,
preemption), crate.train.checkpoint_io (atomic and periodic checkpoints, resume checks) and crate.train.export
(final/).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from crate.atomic import write_bytes
from crate.config import ModelConfig
from crate.errors import CheckpointError, ConfigError, DataError
from crate.loading import model_from_state, read_checkpoint_identity
from crate.provenance import check_owned, claim
from crate.train.callbacks import Interrupted, MetricsCSV, Preemption, StepMetrics, ValidationLog
from crate.train.checkpoint_io import AtomicCheckpointIO, check_resume, recovery_advice, tidy_run_folder
from crate.train.config import RunConfig, load_recipe
from crate.train.export import GridExport, export_model
from crate.train.flops import flops_per_token, peak_flops


# --- the machine and the data -------------------------------------------------------------------
def global_rank() -> int:
    for key in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def ensure_data(cfg: RunConfig, progress: bool = True) -> Path:
    """The prepared data directory; prepared here (by rank 0, the others wait) when missing and a source is
    set. A prepared one is used when data.* names the inputs it was prepared from (or data.source is
    null); a folder that `crate prepare` did not write is never written into."""
    from crate.datadir import MANIFEST, read_manifest
    from crate.train.prepare import check_out_dir, input_differences, prepare, prepare_args

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


# --- the run folder -----------------------------------------------------------------------------
def default_run_dir(cfg: RunConfig) -> Path:
    name = cfg.name or f"{cfg.model['arch']}-{cfg.model['preset']}"
    if os.environ.get("SLURM_JOB_ID"):  # a requeued job finds its own run again
        return Path("runs") / f"{name}-slurm{os.environ['SLURM_JOB_ID']}"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_new_run_dir(run_dir: Path) -> None:
    """A run writes config.yaml, metrics.csv, checkpoints/ and final/ into its folder: a new or empty one, or one of
    our runs (its config.yaml has the `resolved` section `train` writes), never a folder of files we did not write."""
    check_owned(run_dir, "another --out")
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
    old_system, new_system = previous.get("system") or {}, asdict(cfg.system)
    changed.update({f"system.{k}": [old_system[k], v] for k, v in new_system.items()
                    if k in old_system and old_system[k] != v})
    if changed:
        history.append({"step": resumed["step"], "changed": changed})
        if global_rank() == 0:
            print(f"resuming at step {resumed['step']} with "
                  + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()), flush=True)
    return history


# --- the run ------------------------------------------------------------------------------------
def train(cfg: RunConfig, out: str | Path | None = None, resume: str | Path | None = None,
          progress: bool | None = None) -> dict[str, Any]:
    """Run a recipe. Returns a summary: run dir, steps, final val loss, whether a signal stopped it (`signal`,
    `preempted`, `requeued`).

    `resume`: a run directory (its checkpoints/last.ckpt) or a .ckpt file. A run directory that already
    holds checkpoints/last.ckpt is resumed automatically (a requeued SLURM job)."""
    from crate.train.datamodule import WindowDataModule
    from crate.train.module import LMModule, NonFiniteLossError

    t = cfg.train
    run_dir, ckpt_path = _resume_point(cfg, out, resume)
    if ckpt_path is None:
        _check_new_run_dir(run_dir)
    # read once, before any data is prepared: a foreign or unsafe file is refused first
    ckpt_state = read_checkpoint_identity(ckpt_path) if ckpt_path is not None else None
    show_progress = sys.stdout.isatty() if progress is None else progress

    inputs = _inputs(cfg, show_progress)
    train_dict = {**asdict(t), "betas": list(t.betas)}
    resumed: dict[str, Any] = {}
    if ckpt_path is not None:
        resumed = check_resume(ckpt_path, inputs.model_cfg.to_dict(), inputs.tok_id, fsdp=cfg.system.strategy == "fsdp",
                               train_cfg=train_dict, data_dir=inputs.data_dir, state=ckpt_state)
    world = world_size(cfg)
    accum = _accumulation(cfg, world)
    tokens_per_step = t.batch_size * inputs.context
    _write_run_config(cfg, run_dir, ckpt_path, inputs, resumed, world, accum, tokens_per_step)

    L.seed_everything(t.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision(cfg.system.matmul_precision)
    module = LMModule(inputs.model_cfg.to_dict(), train_dict, tokenizer=inputs.tok_id, accumulation=accum,
                      data_dir=str(inputs.data_dir.resolve()))
    datamodule = WindowDataModule(inputs.data_dir, inputs.context, t.batch_size, t.micro_batch_size, t.seed,
                                  t.val_batches, t.final_val_batches, inputs.tok_id["sha256"])
    ckpt_dir = run_dir / "checkpoints"
    callbacks, periodic, preemption = _callbacks(cfg, ckpt_dir, inputs, tokens_per_step, show_progress)
    trainer = _trainer(cfg, run_dir, accum, callbacks, _loggers(cfg, run_dir, resumed.get("step", 0)), show_progress)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(recovery_advice(e, ckpt_dir, t.lr)) from None
    finally:
        preemption.restore()
    summary: dict[str, Any] = {"run_dir": str(run_dir), "step": trainer.global_step, "preempted": False,
                               "world_size": trainer.world_size, "accumulation": accum}
    if preemption.preempted_at is not None:
        return _stopped(summary, preemption)
    if trainer.global_step < t.max_steps:  # stopped by something else: keep what we have
        return summary
    if not (ckpt_dir / "last.ckpt").is_file() or periodic._last_global_step_saved != trainer.global_step:
        trainer.save_checkpoint(ckpt_dir / "last.ckpt")
    return _validate_and_export(trainer, module, datamodule, preemption, run_dir, inputs, summary)


@dataclass
class _Inputs:
    """What a run trains on, read and checked before anything is written."""

    data_dir: Path
    manifest: dict[str, Any]
    model_cfg: ModelConfig
    context: int
    tok: Any
    tok_id: dict[str, Any]


def _inputs(cfg: RunConfig, show_progress: bool) -> _Inputs:
    """The data first (the model's vocabulary may come from it), prepared when missing, every shard validated
    before any step; then the model config, the context and the tokenizer."""
    from crate.tokenizer import tokenizer_identity
    from crate.datadir import load_tokenizer, read_manifest
    from crate.train.data import validate_data

    data_dir = ensure_data(cfg, progress=show_progress)
    manifest = read_manifest(data_dir)
    model_cfg = cfg.model_config(manifest["vocab_size"])
    context = cfg.train.context or model_cfg.block_size
    if context > model_cfg.block_size:
        raise ConfigError(f"train.context={context} exceeds model.block_size={model_cfg.block_size}")
    validate_data(data_dir, model_cfg.vocab_size, tokenizer_sha256=manifest["tokenizer"]["sha256"])
    tok = load_tokenizer(data_dir)
    tok_id = tokenizer_identity(tok, manifest["tokenizer"]["name"])  # read_manifest checked it is the manifest's
    return _Inputs(data_dir, manifest, model_cfg, context, tok, tok_id)


def _accumulation(cfg: RunConfig, world: int) -> int:
    """Micro-batches per optimizer step: the global batch over micro_batch_size x world size, which must divide it."""
    t = cfg.train
    if t.batch_size % (t.micro_batch_size * world):
        raise ConfigError(
            f"the global batch train.batch_size={t.batch_size} must be a multiple of micro_batch_size x world size "
            f"= {t.micro_batch_size} x {world}; change micro_batch_size so that it divides {t.batch_size // world if t.batch_size >= world else t.batch_size}"
        )
    return t.batch_size // (t.micro_batch_size * world)


def _write_run_config(cfg: RunConfig, run_dir: Path, ckpt_path: Path | None, inputs: _Inputs,
                      resumed: dict[str, Any], world: int, accum: int, tokens_per_step: int) -> None:
    """config.yaml: the recipe, what it resolved to and the history of resumes; then (rank 0) the run folder
    cleared of what killed launches left."""
    claim(run_dir)
    resolved = cfg.to_dict()
    resolved["resolved"] = {"model": inputs.model_cfg.to_dict(), "context": inputs.context, "world_size": world,
                            "accumulation": accum, "tokens_per_step": tokens_per_step, "tokenizer": inputs.tok_id,
                            "data_dir": str(inputs.data_dir)}
    resolved["history"] = _history(run_dir, ckpt_path, cfg, resumed)
    if global_rank() == 0:
        write_bytes(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())
        tidy_run_folder(run_dir, cfg.train.ckpt_keep, ckpt_path, resumed.get("step", 0))


def _callbacks(cfg: RunConfig, ckpt_dir: Path, inputs: _Inputs, tokens_per_step: int,
               show_progress: bool) -> tuple[list[Callback], ModelCheckpoint, Preemption]:
    """(all callbacks, the periodic checkpoints' and the preemption handler, which `train` reads afterwards)."""
    from lightning.pytorch.callbacks import RichProgressBar

    t = cfg.train
    # the newest ckpt_keep periodic checkpoints are kept by AtomicCheckpointIO, from the files themselves
    periodic = ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:07d}", every_n_train_steps=t.ckpt_every,
                               save_top_k=-1, save_last=True, auto_insert_metric_name=False,
                               save_on_train_epoch_end=False, enable_version_counter=False)
    callbacks: list[Callback] = [periodic]
    if t.val_every:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min",
                                         save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False))
    peak = cfg.system.peak_flops or peak_flops()
    fpt = flops_per_token(inputs.model_cfg, inputs.context)["train"]
    callbacks.append(StepMetrics(tokens_per_step, fpt, peak, cfg.system.log_every, echo=not show_progress))
    callbacks.append(ValidationLog())
    if t.grid_every:
        callbacks.append(GridExport(ckpt_dir.parent, t.grid_every, inputs.model_cfg.to_dict(), inputs.tok,
                                    inputs.tok_id, inputs.manifest, inputs.data_dir))
    preemption = Preemption(ckpt_dir / "last.ckpt", requeue=True)
    callbacks.append(preemption)
    if show_progress and cfg.system.progress_bar:
        callbacks.append(RichProgressBar())
    return callbacks, periodic, preemption


def _loggers(cfg: RunConfig, run_dir: Path, start_step: int) -> list[Any]:
    loggers: list[Any] = [MetricsCSV(run_dir / "metrics.csv", start_step=start_step)]
    wb = _wandb_logger(cfg, run_dir)
    if wb is not None:
        loggers.append(wb)
    return loggers


def _trainer(cfg: RunConfig, run_dir: Path, accum: int, callbacks: list[Callback], loggers: list[Any],
             show_progress: bool) -> L.Trainer:
    t = cfg.train
    plugins: list[Any] = [AtomicCheckpointIO(keep=t.ckpt_keep)]
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_NTASKS"):
        from lightning.fabric.plugins.environments import SLURMEnvironment

        # our Preemption callback checkpoints at a step boundary and requeues; Lightning's own would not wait
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        accelerator=cfg.system.accelerator, devices=cfg.system.devices, num_nodes=cfg.system.num_nodes,
        strategy=_strategy(cfg), precision=resolve_precision(cfg), max_steps=t.max_steps, max_epochs=-1,
        accumulate_grad_batches=accum, val_check_interval=(t.val_every or t.max_steps + 1) * accum,
        check_val_every_n_epoch=None, num_sanity_val_steps=0,
        callbacks=callbacks, logger=loggers, plugins=plugins, default_root_dir=str(run_dir),
        enable_progress_bar=bool(show_progress and cfg.system.progress_bar), log_every_n_steps=cfg.system.log_every,
        use_distributed_sampler=False, enable_model_summary=show_progress, benchmark=False,
    )


def _stopped(summary: dict[str, Any], preemption: Preemption) -> dict[str, Any]:
    """The summary of a run a signal stopped."""
    return {**summary, "preempted": True, "signal": preemption.signal, "requeued": preemption.requeued}


def _validate_and_export(trainer: L.Trainer, module: Any, datamodule: Any, preemption: Preemption, run_dir: Path,
                         inputs: _Inputs, summary: dict[str, Any]) -> dict[str, Any]:
    """Every step done: the final eval over the val split (or final_val_batches of it), then our checkpoint format."""
    datamodule.final = True
    try:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # Lightning clears the metrics first
    except Interrupted:  # a signal during it: the steps are done and checkpointed; a resume validates again
        return _stopped(summary, preemption)
    finally:
        preemption.restore()
    loss = trainer.callback_metrics.get("val/loss")  # logged for the progress bar and callbacks, not the loggers
    val_loss = float(loss) if loss is not None else float("nan")
    summary["val_loss"] = val_loss
    summary["val_ppl"] = math.exp(val_loss) if val_loss < 50 else float("inf")
    state = trainer.strategy.lightning_module_state_dict()  # on every rank: FSDP gathers the weights to rank 0
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics({"final/val_loss": val_loss}, step=trainer.global_step)
            logger.save()
        summary["final"] = str(export_model(model_from_state(inputs.model_cfg.to_dict(), state), run_dir / "final",
                                            module.train_cfg, inputs.tok, inputs.tok_id, inputs.manifest,
                                            trainer.global_step, val_loss, inputs.data_dir))
    return summary


def run_from_cli(config: str | None, overrides: list[str], out: str | None, resume: str | None) -> dict[str, Any]:
    """`crate train`: the recipe is --config, else the config.yaml of the run being resumed (a run dir, or
    the run dir of a .ckpt in its checkpoints/ folder), else the default; the overrides apply on top."""
    if resume is not None and config is None:
        r = Path(resume)
        run_config = r / "config.yaml" if r.is_dir() else r.parent.parent / "config.yaml"
        if run_config.is_file():
            config = str(run_config)
    from crate.train.noise import quiet_lightning

    quiet_lightning()
    return train(load_recipe(config, overrides), out=out, resume=resume)
