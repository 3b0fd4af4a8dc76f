"""A prepared data directory (what `crate prepare` writes), as every layer reads it: its manifest and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crate.errors import DataError

FORMAT = "crate-tokens/1"
SPLITS = ("train", "val")
MANIFEST, TOKENIZER, PROGRESS = "manifest.json", "tokenizer.json", "progress.json"


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        hint = " (an interrupted `crate prepare`: run it again to finish)" if (Path(data_dir) / PROGRESS).exists() else ""
        raise DataError(f"{data_dir} is not a prepared data directory: no {MANIFEST}{hint}; create one with `crate prepare`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_tokenizer(data_dir: str | Path) -> Any:
    from tokenizers import Tokenizer

    path = Path(data_dir) / TOKENIZER
    if not path.is_file():
        raise DataError(f"{data_dir} has no {TOKENIZER}; re-run `crate prepare`")
    return Tokenizer.from_file(str(path))
