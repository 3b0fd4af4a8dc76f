"""`crate eval`: validation loss and perplexity of a checkpoint on a prepared split.

Reads our checkpoint directories and the authors'/nanoGPT `.pt` files (through `crate.load`) and our
Lightning training checkpoints (`.ckpt`). The split is cut into non-overlapping windows of `context + 1`
tokens; the loss is the mean over every predicted token.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from crate.loading import load_any
from crate.errors import CheckpointError, ConfigError, DataError


@torch.no_grad()
def evaluate(checkpoint: str | Path, data_dir: str | Path, split: str = "val", batch_size: int = 8,
             context: int | None = None, max_batches: int | None = None, device: str | None = None,
             progress: bool = True) -> dict[str, float]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from crate.provenance import check_tokenizers
    from crate.datadir import read_manifest
    from crate.train.data import open_shards
    from crate.train.datamodule import TokenStream

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_any(checkpoint, map_location=device)
    manifest = read_manifest(data_dir)
    check_tokenizers(tok, manifest, str(checkpoint), str(data_dir))
    if context is not None and context > model.config.block_size:
        raise ConfigError(f"--context {context} exceeds the model's block_size {model.config.block_size}: give at most "
                          f"{model.config.block_size}, or leave it out")
    if manifest["vocab_size"] > model.config.vocab_size:
        raise DataError(f"{data_dir} has {manifest['vocab_size']} token ids, the model only {model.config.vocab_size}")
    stream = TokenStream(open_shards(data_dir, split))
    T = min(context or model.config.block_size, model.config.block_size)
    n_windows = (stream.n - 1) // T
    if n_windows == 0:
        raise DataError(f"the {split} split of {data_dir} has {stream.n} tokens, fewer than one window of {T + 1}")
    n_batches = math.ceil(n_windows / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    total, count = 0.0, 0
    columns = (TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.description}"))
    from rich.console import Console

    with Progress(*columns, disable=not progress, console=Console(stderr=True)) as bar:
        task = bar.add_task("", total=n_batches)
        for b in range(n_batches):
            rows = [stream.window(w * T, T + 1) for w in range(b * batch_size, min((b + 1) * batch_size, n_windows))]
            t = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
            with autocast:
                logits = model(t[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), t[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += t[:, 1:].numel()
            bar.update(task, advance=1, description=f"loss {total / count:.4f}")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 50 else float("inf"), "tokens": count,
            "context": T, "split": split}


__all__ = ["evaluate", "CheckpointError"]
