"""A prepared data directory (what `crate prepare` writes), as every layer reads it: its manifest and tokenizer.

The manifest names the tokenizer the shards were made with (its sha256), and every check of a model against the data
reads that name; so reading the manifest also checks that the folder's tokenizer.json is that tokenizer."""

from __future__ import annotations

import functools
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
    _check_tokenizer_file(Path(data_dir), manifest)
    return manifest


def _check_tokenizer_file(data_dir: Path, manifest: dict[str, Any]) -> None:
    want = (manifest.get("tokenizer") or {}).get("sha256")
    file = data_dir / TOKENIZER
    if not want or not file.is_file():
        return
    stat = file.stat()
    found = _tokenizer_sha256(str(file.resolve()), stat.st_mtime_ns, stat.st_size, want)
    if found != want:
        raise DataError(f"{file} (sha256 {found[:12]}) is not the tokenizer {MANIFEST} names (sha256 {want[:12]}): "
                        f"the folder was changed after `crate prepare`; prepare it again with `crate prepare SOURCE "
                        f"--out {data_dir} --overwrite` (same options as before)")


@functools.lru_cache(maxsize=16)
def _tokenizer_sha256(path: str, mtime_ns: int, size: int, want: str) -> str:
    """The identity hash of a tokenizer file (crate.tokenizer.tokenizer_identity's), once per file version.
    `prepare` writes exactly the serialization that identity hashes, so the file's bytes give it without parsing
    (and without depending on how the installed tokenizers version would serialize it); a file that is not those
    bytes is parsed and serialized as identity does."""
    import hashlib

    raw = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if raw == want:
        return raw
    from tokenizers import Tokenizer

    from crate.tokenizer import tokenizer_identity

    return tokenizer_identity(Tokenizer.from_file(path), "")["sha256"]


def load_tokenizer(data_dir: str | Path) -> Any:
    from tokenizers import Tokenizer

    path = Path(data_dir) / TOKENIZER
    if not path.is_file():
        raise DataError(f"{data_dir} has no {TOKENIZER}; re-run `crate prepare`")
    return Tokenizer.from_file(str(path))
