"""The checkpoints of a training run: written atomically, the periodic ones pruned, the run folder tidied before a
launch, a resume checked against the checkpoint it continues, and the checkpoint a diverged run goes back to.

Lightning writes checkpoints/last.ckpt, step-<N>.ckpt (every `ckpt_every` steps, the newest `ckpt_keep` kept) and
best.ckpt through AtomicCheckpointIO; crate.train.run assembles the run around them.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from crate.atomic import atomic_file, remove_stale_temporaries
from crate.config import IMPLEMENTATION_KEYS
from crate.errors import CheckpointError
from crate.loading import read_checkpoint_identity
from crate.train.grid import GRID, grid_points, numbered

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
    """{step: path} of the step-*.ckpt files in `folder`, in step order."""
    return numbered(folder, PERIODIC)


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
    for p in remove_stale_temporaries(run_dir) + remove_stale_temporaries(ckpt_dir) + remove_stale_temporaries(
            run_dir / GRID):
        print(f"removed {p} (left by a killed launch)", flush=True)
    for p in prune_checkpoints(ckpt_dir, keep, after=resume_step, protect=resume):
        print(f"removed {p} (beyond train.ckpt_keep={keep}, or after the resumed step {resume_step})", flush=True)
    for step, p in grid_points(run_dir).items():
        if step > resume_step:  # a grid point of the continuation the resumed checkpoint does not hold
            shutil.rmtree(p)
            print(f"removed {p} (after the resumed step {resume_step})", flush=True)
    last = ckpt_dir / "last.ckpt"
    if resume is not None and resume.parent.resolve() == ckpt_dir.resolve() and resume.name != last.name:
        tmp = ckpt_dir / f".last.ckpt.tmp{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(resume, tmp)  # instant and atomic where hard links work
        except OSError:
            shutil.copyfile(resume, tmp)
        os.replace(tmp, last)


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


def recovery_advice(error: Exception, ckpt_dir: Path, lr: float) -> str:
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
