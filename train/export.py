"""A trained model in our checkpoint format (what `crate.load` reads): the end of `crate train`, the grid of
weights-only checkpoints a run keeps along the way (`train.grid_every`), and `crate export` of any Lightning
checkpoint of ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

from crate.atomic import write_bytes
from crate.loading import model_from_state, read_checkpoint_identity
from crate.train.grid import grid_point


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


class GridExport(Callback):
    """Every `every` steps, at the periodic validation of that step: the weights in our format, with that
    validation loss in their metadata, into <run>/grid/step-<N>/ (cheap: no optimizer state). The final validation
    (over final_val_batches) is not a grid point: every point's loss comes from the same val_batches windows, so
    the points compare with each other (final/ holds the final one)."""

    def __init__(self, run_dir: Path, every: int, model_cfg: dict[str, Any], tok: Any, tok_id: dict[str, Any],
                 manifest: dict[str, Any], data_dir: Path):
        self.run_dir, self.every, self.model_cfg = run_dir, every, model_cfg
        self.tok, self.tok_id, self.manifest, self.data_dir = tok, tok_id, manifest, data_dir
        self.warned = False

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or getattr(trainer.datamodule, "final", False) or not step:
            return
        if step % self.every:  # Lightning schedules validations in micro-batches: a resume that changed them moves it
            if trainer.is_global_zero and not self.warned:
                print(f"warning: a validation at step {step} is off the grid (train.grid_every={self.every}), so the "
                      "grid gets no point there; resume with the run's own micro_batch_size and devices to keep it",
                      flush=True)
                self.warned = True
            return
        state = trainer.strategy.lightning_module_state_dict()  # on every rank: FSDP gathers the weights to rank 0
        if trainer.is_global_zero:
            loss = trainer.callback_metrics.get("val/loss")
            export_model(model_from_state(self.model_cfg, state), grid_point(self.run_dir, step),
                         pl_module.train_cfg, self.tok, self.tok_id, self.manifest, step,
                         float(loss) if loss is not None else None, self.data_dir)


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
        from crate.datadir import load_tokenizer, read_manifest

        manifest = read_manifest(data_dir)
        if tok_id is None or manifest["tokenizer"]["sha256"] == tok_id.get("sha256"):
            tok = load_tokenizer(data_dir)

    train_cfg = (state.get("hyper_parameters") or {}).get("train")
    step = int(state.get("global_step", 0))
    return export_model(model, Path(out), train_cfg, tok, tok_id or {}, manifest, step,
                        data_dir=data_dir if tok else None)
