"""What a comparison reads, checked before any work: the models (each against the data's tokenizer, and every two
against each other: the same tokens must mean the same strings, and the losses of a stitch must be over the same
vocabulary), a training run's grid of checkpoints, and the identity that keys the output folder's stamp."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from crate.errors import CrateError, DataError

VERSION = 1  # of the comparison's results: a change here makes every earlier output stale


def load_models(checkpoints: dict[str, str], manifest: dict[str, Any], data_dir: str | Path,
                device: str) -> dict[str, Any]:
    """{name: model in eval mode on `device`}, the models checked against each other, then each against the data."""
    from crate.eval.models import load_model
    from crate.provenance import check_tokenizers

    loaded = {name: load_model(ckpt) for name, ckpt in checkpoints.items()}
    check_same_vocabulary({n: m for n, (m, _) in loaded.items()}, {n: t for n, (_, t) in loaded.items()})
    for name, (model, tok) in loaded.items():
        check_tokenizers(tok, manifest, checkpoints[name], str(data_dir))
        check_fits(model.config.vocab_size, manifest, checkpoints[name], data_dir)
    return {name: m.to(device) for name, (m, _) in loaded.items()}


def check_fits(vocab_size: int, manifest: dict[str, Any], label: str, data_dir: str | Path) -> None:
    """A model without a recorded tokenizer still needs every token id of the data in its embedding."""
    if int(manifest.get("vocab_size") or 0) > vocab_size:
        raise DataError(f"{data_dir} has a vocabulary of {manifest['vocab_size']} tokens but {label} only {vocab_size}: "
                        f"the data was tokenized with another tokenizer than the model's; pick the model's data")


def check_same_vocabulary(models: dict[str, Any], tokenizers: dict[str, dict[str, Any] | None]) -> None:
    """Refuse two models whose tokenizers differ (by sha256, where both record one) or whose vocabularies differ."""
    names = list(models)
    for a in names:
        for b in names[names.index(a) + 1:]:
            ta, tb = tokenizers[a] or {}, tokenizers[b] or {}
            if ta.get("sha256") and tb.get("sha256") and ta["sha256"] != tb["sha256"]:
                raise CrateError(
                    f"{a} was trained with tokenizer {ta.get('name')} (sha256 {ta['sha256'][:12]}) and {b} with "
                    f"{tb.get('name')} (sha256 {tb['sha256'][:12]}): their token ids name different strings, so "
                    f"neither their representations of the same tokens nor a stitch between them compare; compare "
                    f"models trained on data prepared with one tokenizer")
            va, vb = models[a].config.vocab_size, models[b].config.vocab_size
            if va != vb:
                raise CrateError(
                    f"{a} has a vocabulary of {va} tokens and {b} of {vb}: a stitch's loss would be over another "
                    f"vocabulary than the model's own; compare models trained with one tokenizer and vocab_size")


def grid_checkpoints(run: str | Path) -> tuple[dict[int, Path], Path]:
    """({step: checkpoint} of a run's grid, <run>/grid/step-<N>/, in step order; the final checkpoint: <run>/final,
    else the last grid point)."""
    from crate.checkpoint import CONFIG
    from crate.train.grid import GRID, grid_points

    run = Path(run)
    points = grid_points(run)
    if not points:
        raise CrateError(f"--trajectory {run}: no grid checkpoints ({run / GRID}/step-<N>/): train with "
                         f"train.grid_every set, or pass the run folder that holds {GRID}/")
    final = run / "final"
    return points, final if (final / CONFIG).is_file() else points[max(points)]


def check_trajectory(points: dict[int, Path], final: Path, manifest: dict[str, Any], data_dir: str | Path) -> int:
    """Every grid point and the final checkpoint against the data's tokenizer (from their config.json, no weights
    read); their smallest context."""
    from crate.loading import read_info
    from crate.provenance import check_tokenizers

    blocks = []
    for ckpt in (*points.values(), final):
        info = read_info(ckpt)
        check_tokenizers(info.get("tokenizer"), manifest, str(ckpt), str(data_dir))
        check_fits(int(info["model"]["vocab_size"]), manifest, str(ckpt), data_dir)
        blocks.append(int(info["model"]["block_size"]))
    return min(blocks)


def tokens_identity(seqs: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    """The held-out tokens read (content hash) and the data they came from (its manifest: what stitching trains on)."""
    from crate.provenance import digest

    tokens = np.ascontiguousarray(seqs.numpy().astype(np.int64))
    return {"val_tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(), "n_tokens": int(tokens.size),
            "tokenizer": (manifest.get("tokenizer") or {}).get("sha256"), "manifest": digest(manifest)}


def identity(models: dict[str, Any], data: dict[str, Any], settings: dict[str, Any],
             trajectory: dict[int, Path] | None, final: Path | None) -> dict[str, Any]:
    """What the results depend on: each model's weights and config (not its path), the tokens, the settings, and
    the content of every trajectory checkpoint."""
    from crate.eval.autointerp.identity import model_identity
    from crate.provenance import tree_hash

    traj = None
    if trajectory is not None and final is not None:
        traj = {"steps": {str(s): tree_hash(p) for s, p in trajectory.items()}, "final": tree_hash(final)}
    return {"stage": "compare", "version": VERSION, "settings": settings, "data": data, "trajectory": traj,
            "models": {n: model_identity(m, control=False, seed=0) for n, m in models.items()}}

__all__ = ["load_models", "check_same_vocabulary", "check_fits", "grid_checkpoints", "check_trajectory", "tokens_identity",
           "identity", "VERSION"]
