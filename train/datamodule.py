"""Random windows of `context + 1` tokens, a pure function of (seed, global sample index).

The g-th sample of a run starts at `positions(seed, g)`, drawn in blocks of 4096 from
`np.random.default_rng([seed, block])`. An optimizer step s consumes the samples
[s*G, (s+1)*G) (G = global batch); rank r takes its share of each accumulation micro-step. The only state
is therefore the step to start from, which is saved in the checkpoint: a resumed run continues the exact
same sample stream on every rank, and a run on W devices sees the same samples per step as on one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from crate.errors import DataError
from crate.train.data import open_shards

BLOCK = 4096


class TokenStream:
    """The shards of a split seen as one stream; windows may straddle shard boundaries."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        self.n = int(self.offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        local = start - int(self.offsets[i])
        shard = self.shards[i]
        if local + length <= len(shard):
            return np.asarray(shard[local : local + length])
        parts, need = [], length
        while need > 0:
            piece = np.asarray(self.shards[i][local : local + need])
            parts.append(piece)
            need -= len(piece)
            i, local = i + 1, 0
        return np.concatenate(parts)


def positions(seed: int, indices: np.ndarray, high: int) -> np.ndarray:
    """Start positions in [0, high) of the samples with global indices `indices`."""
    out = np.empty(len(indices), dtype=np.int64)
    blocks = indices // BLOCK
    for b in np.unique(blocks):
        draws = np.random.default_rng([seed, int(b)]).integers(0, high, size=BLOCK)
        mask = blocks == b
        out[mask] = draws[indices[mask] % BLOCK]
    return out


class WindowDataset(Dataset):
    """Indexed by a list of global sample indices; returns the batch (x, y) as int64 tensors."""

    def __init__(self, stream: TokenStream, context: int, seed: int):
        if stream.n < context + 2:
            raise DataError(f"the training split has {stream.n} tokens, fewer than one window of {context + 1}")
        self.stream, self.context, self.seed = stream, context, seed

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        starts = positions(self.seed, np.asarray(indices, dtype=np.int64), self.stream.n - self.context)
        batch = np.stack([self.stream.window(int(p), self.context + 1) for p in starts]).astype(np.int64)
        t = torch.from_numpy(batch)
        return t[:, :-1], t[:, 1:]

    def __len__(self) -> int:  # not used for sampling; the stream is infinite
        return 1 << 62


class StepSampler(Sampler):
    """Yields, for each optimizer step from `start_step()` on, this rank's micro-batches of global indices."""

    def __init__(self, global_batch: int, micro: int, world: int, rank: int, start_step: Callable[[], int]):
        if global_batch % (micro * world):
            raise DataError(
                f"global batch {global_batch} is not a multiple of micro_batch_size x world size = {micro} x {world}"
            )
        self.G, self.micro, self.world, self.rank, self.start_step = global_batch, micro, world, rank, start_step
        self.accum = global_batch // (micro * world)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step()
        while True:
            base = step * self.G
            for m in range(self.accum):
                first = base + (m * self.world + self.rank) * self.micro
                yield list(range(first, first + self.micro))
            step += 1


class ValDataset(Dataset):
    """Fixed non-overlapping windows spread evenly over the val split; rank r takes windows r, r+W, ..."""

    def __init__(self, stream: TokenStream, context: int, n_windows: int, micro: int, world: int, rank: int):
        available = max(0, (stream.n - 1) // context)
        n = min(n_windows, available) // (micro * world) * (micro * world)
        if n == 0:
            raise DataError(
                f"the val split ({stream.n} tokens) holds fewer than {micro * world} windows of {context + 1} tokens: "
                f"prepare with a larger val_fraction or use a shorter context"
            )
        stride = available // n
        self.starts = [i * stride * context for i in range(n)][rank::world]
        self.stream, self.context, self.micro = stream, context, micro

    def __len__(self) -> int:
        return len(self.starts) // self.micro

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.stream.window(s, self.context + 1) for s in self.starts[i * self.micro : (i + 1) * self.micro]]
        t = torch.from_numpy(np.stack(rows).astype(np.int64))
        return t[:, :-1], t[:, 1:]


class WindowDataModule(L.LightningDataModule):
    """Training windows by global sample index; its state (the next step, seed, data identity) is checkpointed."""

    def __init__(self, data_dir: str | Path, context: int, batch_size: int, micro_batch_size: int, seed: int,
                 val_batches: int, final_val_batches: int | None = None, tokenizer_sha256: str = ""):
        super().__init__()
        self.data_dir, self.context, self.seed = Path(data_dir), context, seed
        self.batch_size, self.micro = batch_size, micro_batch_size
        self.val_batches, self.final_val_batches = val_batches, final_val_batches
        self.tokenizer_sha256 = tokenizer_sha256
        self.final = False

    def _world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        stream = TokenStream(open_shards(self.data_dir, "train"))
        sampler = StepSampler(self.batch_size, self.micro, world, rank, start_step=lambda: self.trainer.global_step)
        return DataLoader(WindowDataset(stream, self.context, self.seed), sampler=sampler, batch_size=None,
                          num_workers=0, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        world, rank = self._world()
        stream = TokenStream(open_shards(self.data_dir, "val"))
        batches = self.val_batches
        if self.final:
            batches = self.final_val_batches or 1000
            batches = min(batches, max(1, (stream.n - 1) // self.context // self.micro))
        ds = ValDataset(stream, self.context, batches * self.micro, self.micro, world, rank)
        return DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)

    def state_dict(self) -> dict[str, Any]:
        step = self.trainer.global_step if self.trainer is not None else 0
        return {"next_step": step, "seed": self.seed, "batch_size": self.batch_size, "context": self.context,
                "tokenizer_sha256": self.tokenizer_sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "context"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"resuming with data {key}={getattr(self, key)} but the checkpoint used {state.get(key)}: "
                    f"the sample stream would differ; resume with the checkpoint's train settings"
                )
