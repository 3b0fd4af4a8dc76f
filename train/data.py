"""Reading a prepared data directory (what `crate prepare`, crate.train.prepare, writes): the token shards of a
split as memmaps, and a check that a model's vocabulary and tokenizer fit them. The data access every stage uses.

A prepared directory holds

    manifest.json        tokenizer identity and hash, token counts, source, seed, shards
    tokenizer.json       a `tokenizers` serialization
    train-00000.bin ...  raw token streams (uint16, or uint32 when the vocabulary exceeds 65536 entries)
    val-00000.bin ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from crate.datadir import SPLITS, read_manifest
from crate.errors import DataError

__all__ = ["open_split", "open_shards", "validate_data", "token_dtype"]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def open_shards(data_dir: str | Path, split: str) -> list[np.memmap]:
    """The read-only memmaps of a split's shards, in order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = read_manifest(data_dir)
    dtype = np.dtype(manifest["dtype"])
    out = []
    for shard in manifest["splits"][split]["shards"]:
        path = Path(data_dir) / shard["file"]
        if not path.is_file():
            raise DataError(f"shard {path} listed in the manifest is missing")
        size = path.stat().st_size
        if size != shard["tokens"] * dtype.itemsize:
            raise DataError(
                f"shard {path} has {size} bytes, the manifest says {shard['tokens']} tokens of {dtype} "
                f"({shard['tokens'] * dtype.itemsize} bytes): truncated or of another dtype; re-run `crate prepare`"
            )
        if shard["tokens"]:
            out.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["tokens"],)))
    return out


def open_split(data_dir: str | Path, split: str) -> np.ndarray:
    """A split as one 1-D read-only token stream: a np.memmap for one shard, a concatenation for several."""
    shards = open_shards(data_dir, split)
    if not shards:
        manifest = read_manifest(data_dir)
        return np.zeros(0, dtype=np.dtype(manifest["dtype"]))
    if len(shards) == 1:
        return shards[0]
    out = np.concatenate(shards)
    out.flags.writeable = False
    return out


def validate_data(data_dir: str | Path, vocab_size: int, tokenizer_sha256: str | None = None,
                  full_scan_limit: int = 2_000_000_000) -> dict[str, Any]:
    """Check a prepared directory before training: manifest, shard sizes and dtype, token ids < `vocab_size`,
    and optionally the tokenizer hash. Splits up to `full_scan_limit` tokens are scanned in full;
    larger ones are checked against the per-shard maxima recorded by `prepare` and a sample."""
    manifest = read_manifest(data_dir)
    if tokenizer_sha256 is not None and manifest["tokenizer"]["sha256"] != tokenizer_sha256:
        raise DataError(
            f"{data_dir} was tokenized with {manifest['tokenizer']['name']} (sha256 {manifest['tokenizer']['sha256'][:12]}), "
            f"not with the tokenizer of this run (sha256 {tokenizer_sha256[:12]})"
        )
    dtype = np.dtype(manifest["dtype"])
    if dtype != token_dtype(manifest["vocab_size"]):
        raise DataError(f"{data_dir}: dtype {dtype} does not fit vocab_size {manifest['vocab_size']}")
    if manifest["vocab_size"] > vocab_size:
        raise DataError(
            f"{data_dir} has a vocabulary of {manifest['vocab_size']} tokens but the model only {vocab_size}: "
            f"set model.vocab_size >= {manifest['vocab_size']}"
        )
    for split in SPLITS:
        shards = open_shards(data_dir, split)
        total = sum(len(s) for s in shards)
        for info, shard in zip([s for s in manifest["splits"][split]["shards"] if s["tokens"]], shards):
            if info.get("max_id", 0) >= vocab_size:
                raise DataError(f"{info['file']}: token id {info['max_id']} >= vocab_size {vocab_size}")
            if total <= full_scan_limit:
                view = shard
            else:  # a fixed sample of 1M tokens per shard
                view = shard[:: max(1, len(shard) // 1_000_000)]
            hi = 0
            for i in range(0, len(view), 1 << 24):
                hi = max(hi, int(view[i : i + (1 << 24)].max()))
            if hi >= vocab_size:
                raise DataError(
                    f"{Path(data_dir) / info['file']}: token id {hi} >= vocab_size {vocab_size}: "
                    f"the shard is corrupted or was tokenized with another tokenizer"
                )
    return manifest
