"""`crate prepare`: text -> tokenized uint16/uint32 memmap shards with a train/val split and a JSON manifest
(the folder's layout: crate.train.data).

Documents are cut into pieces of at most `piece_chars` characters, at paragraph breaks, else at line
breaks, sentence ends or spaces; each piece goes to val with probability `val_fraction`, decided by a hash
of (seed, document, piece), so the split is deterministic and the same for every machine; the second piece
of the stream goes to val when the first did not and val_fraction > 0, so any input of two pieces or more
has a val split. Each document ends with <|endoftext|>.
Shards are committed one at a time with `progress.json`; an interrupted `prepare` resumes there.
`prepare` writes only into a new or empty folder or one it wrote (its manifest.json or progress.json), and
reuses a prepared folder only when every input that shapes the tokens is the same (`args` in the manifest).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from crate.atomic import atomic_file, write_bytes
from crate.datadir import FORMAT, MANIFEST, PROGRESS, SPLITS, TOKENIZER, load_tokenizer, read_manifest
from crate.errors import DataError
from crate.tokenizer import EOT, check_bpe_vocab_size, gpt2_tokenizer, tokenizer_identity, train_bpe
from crate.train.corpus import LOCAL_SUFFIXES, documents
from crate.train.data import token_dtype

__all__ = ["prepare", "prepare_args", "input_differences", "check_out_dir"]
LAYOUT_KEYS = ("shard_tokens",)  # how the tokens are cut into files, not which tokens: a finished folder is reused
ARG_DEFAULTS = {"encoding": "utf-8", "pieces_version": 1}  # inputs that manifests of earlier versions did not record
# how documents become token streams: 2 marks every run of a document's pieces in a split with <|endoftext|>, keeps
# a cut's space with the next word, and encodes "<|endoftext|>" inside a text as text (1: none of these)
PIECES_VERSION = 2



def _write_json(path: Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


SEPARATORS = ("\n\n", "\n", ". ", " ")  # paragraph, line, sentence, word


def _pieces(text: str, piece_chars: int, separators: tuple[str, ...] = SEPARATORS) -> list[str]:
    """Cut a document into pieces of at most about `piece_chars` characters that concatenate back to it: at
    paragraph breaks, and a paragraph longer than that at line breaks, then sentence ends, then spaces. A cut at
    a space leaves the space at the start of the next piece, where GPT-2's BPE puts it (" word" is one token;
    "word " then "word" would be two tokens that the whole text never gives)."""
    if len(text) <= piece_chars:
        return [text]
    if not separators:
        return [text[i : i + piece_chars] for i in range(0, len(text), piece_chars)]
    sep, finer = separators[0], separators[1:]
    keep, carry = (sep[:-1], " ") if sep.endswith(" ") else (sep, "")  # the end of a piece, the next one's start
    parts = text.split(sep)
    out, cur = [], ""
    for i, part in enumerate(parts):
        head = carry if i > 0 else ""
        tail = keep if i < len(parts) - 1 else ""
        if len(head + part) > piece_chars:
            if cur:
                out.append(cur)
            out += _pieces(head + part, piece_chars, finer)
            out[-1] += tail
            cur = ""
            continue
        if cur and len(cur) + len(head + part) > piece_chars:
            out.append(cur)
            cur = ""
        cur += head + part + tail
    if cur:
        out.append(cur)
    return out


def _is_val(seed: int, doc: int, piece: int, val_fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{doc}:{piece}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def _stream(source: str, args: dict[str, Any]) -> Iterator[tuple[int, str, bool, bool]]:
    """(split index 0=train 1=val, text, ends a document, ends a run) for every piece of every document, in order.
    A run is a document's consecutive pieces that go to the same split: <|endoftext|> follows each, so that a split
    never joins text that does not follow in its source without a boundary."""
    docs = documents(source, text_field=args["text_field"], hf_split=args["hf_split"], hf_config=args["hf_config"],
                     encoding=args["encoding"])
    index, any_val = 0, False
    for d, text in enumerate(docs):
        if args["max_documents"] is not None and d >= args["max_documents"]:
            return
        pieces = _pieces(text, args["piece_chars"])
        splits = []
        for p in range(len(pieces)):
            val = _is_val(args["seed"], d, p, args["val_fraction"]) or (index == 1 and not any_val and args["val_fraction"] > 0)
            any_val, index = any_val or val, index + 1
            splits.append(int(val))
        for p, (split, piece) in enumerate(zip(splits, pieces)):
            last = p == len(pieces) - 1
            yield split, piece, last, last or splits[p + 1] != split


_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer_json: str) -> None:
    """The tokenizer without its special tokens: `tokenizers` matches them inside the text even without
    add_special_tokens, so a document that quotes "<|endoftext|>" would get a document boundary in its middle
    (nanoGPT's `encode_ordinary` encodes it as text, as this does); the boundaries are appended by id."""
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer_json)
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if not t.get("special")]
    _WORKER_TOKENIZER = Tokenizer.from_str(json.dumps(spec))


def _init_pool_worker(tokenizer_json: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: one message, no tracebacks
    _init_worker(tokenizer_json)


def _encode(texts: list[str]) -> list[list[int]]:
    return [e.ids for e in _WORKER_TOKENIZER.encode_batch(texts, add_special_tokens=False)]


def _batches(items: Iterator[tuple[int, str, bool, bool]], chars: int) -> Iterator[list[tuple[int, str, bool, bool]]]:
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item[1])
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _ShardWriter:
    """Appends tokens to a split and cuts them into shards of exactly `shard_tokens` tokens. The tokens not
    yet in a shard are saved with each snapshot under a name of their own, which progress.json names: a
    kill at any point leaves progress.json and the files it names consistent."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, state: dict[str, Any]):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = state.get("shards", [])
        pending = state.get("pending")
        if pending is True:  # progress.json of an earlier version
            pending = f".pending-{split}.npy"
        if pending and not (out / pending).is_file():
            raise DataError(f"{out / PROGRESS} names {pending}, which is missing: start over with --overwrite")
        self.pending = [np.load(out / pending)] if pending else []
        self.n_pending = sum(len(p) for p in self.pending)
        self.saved: str | None = pending or None
        self._stale: str | None = None
        self.wrote = False

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.n_pending += len(ids)
        while self.n_pending >= self.shard_tokens:
            buf = np.concatenate(self.pending)
            self._write(buf[: self.shard_tokens])
            rest = buf[self.shard_tokens :]
            self.pending, self.n_pending = ([rest] if len(rest) else []), len(rest)

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        write_bytes(self.out / name, tokens.astype(self.dtype, copy=False).tobytes())
        self.shards.append({"file": name, "tokens": int(len(tokens)), "max_id": int(tokens.max()) if len(tokens) else 0})
        self.wrote = True

    def state(self, tag: int) -> dict[str, Any]:
        """Save the pending tokens as `.pending-<split>-<tag>.npy`; the returned dict goes into progress.json."""
        previous, self.saved = self.saved, f".pending-{self.split}-{tag}.npy"
        with atomic_file(self.out / self.saved) as f:
            np.save(f, np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype))
        self._stale = previous
        return {"shards": self.shards, "pending": self.saved}

    def committed(self) -> None:
        """progress.json names the new pending file: the previous one is no longer needed."""
        if self._stale and self._stale != self.saved:
            (self.out / self._stale).unlink(missing_ok=True)
        self._stale = None

    def finish(self) -> None:
        if self.pending:
            self._write(np.concatenate(self.pending))
            self.pending, self.n_pending = [], 0


def prepare_args(source: str, *, tokenizer: str = "bpe", vocab_size: int = 512, val_fraction: float = 0.05,
                 seed: int = 0, text_field: str = "text", hf_split: str = "train", hf_config: str | None = None,
                 max_documents: int | None = None, shard_tokens: int = 1 << 27, piece_chars: int = 8192,
                 bpe_train_chars: int = 200_000_000, encoding: str = "utf-8") -> dict[str, Any]:
    """The inputs of a `prepare`, as its manifest records them (`args`), so that two can be compared."""
    return dict(
        source=source if source == "embedded" or source.startswith("hf:") else str(Path(source).resolve()),
        tokenizer=tokenizer, vocab_size=vocab_size if tokenizer == "bpe" else None, val_fraction=val_fraction,
        seed=seed, text_field=text_field, hf_split=hf_split, hf_config=hf_config, max_documents=max_documents,
        shard_tokens=shard_tokens, piece_chars=piece_chars, bpe_train_chars=bpe_train_chars if tokenizer == "bpe" else None,
        encoding=encoding, pieces_version=PIECES_VERSION,
    )


def input_differences(stored: dict[str, Any], args: dict[str, Any], layout: bool = False) -> list[str]:
    """`key: old -> new` for each input in which `args` differs from `stored` (a manifest's or progress.json's
    args); the file layout (shard_tokens) counts only with `layout` (resuming an interrupted prepare)."""
    from crate.provenance import differences

    keys = [k for k in args if layout or k not in LAYOUT_KEYS]
    old = {**ARG_DEFAULTS, **stored}
    return differences({k: old.get(k) for k in keys}, {k: args[k] for k in keys})


def _written_by_prepare(path: Path) -> bool:
    """A manifest.json of our format, or a progress.json with our `args` (not a file of that name by another tool)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and (obj.get("format") == FORMAT if path.name == MANIFEST else "args" in obj)


def _nothing_done(out: Path, state: dict[str, Any]) -> bool:
    """An interrupted prepare that committed no piece and wrote no shard: starting over with other inputs loses
    nothing (it failed on its input, e.g. an empty corpus, or was stopped while training its BPE)."""
    return not state.get("pieces_done") and not any(out.glob("*-*.bin")) and not any(out.glob(".pending-*"))


def check_out_dir(out: Path, setting: str = "--out") -> None:
    """Refuse a folder that `prepare` must not write into: a new or empty one is fine, and so is one that crate-lm
    marked (crate.provenance.claim) or whose manifest.json or progress.json (of an interrupted run) `prepare` wrote,
    the stamps it writes first; it only ever writes and replaces its own files there."""
    from crate.provenance import ProvenanceError, check_owned

    stamps = [path for path in (out / MANIFEST, out / PROGRESS) if path.is_file()]
    for path in stamps:
        if not _written_by_prepare(path):
            raise DataError(f"{setting}: {path} was not written by `crate prepare`: choose another {setting}")
    try:
        if not stamps:
            check_owned(out, flag=f"another {setting} (a new or empty folder)")
    except ProvenanceError as e:
        if not any(p.suffix in LOCAL_SUFFIXES for p in out.rglob("*") if p.is_file()):
            raise DataError(f"{setting}: {e}") from None
        then = " and set data.path to that folder" if setting == "data.path" else ""
        raise DataError(f"{setting}: {e}; to use the text files in it, prepare them into another folder: "
                        f"`crate prepare {out} --out <new folder>`{then}") from None


def prepare(
    source: str,
    out_dir: str | Path,
    *,
    tokenizer: str = "bpe",
    vocab_size: int = 512,
    val_fraction: float = 0.05,
    seed: int = 0,
    num_proc: int | None = None,
    text_field: str = "text",
    hf_split: str = "train",
    hf_config: str | None = None,
    max_documents: int | None = None,
    shard_tokens: int = 1 << 27,
    piece_chars: int = 8192,
    bpe_train_chars: int = 200_000_000,
    encoding: str = "utf-8",
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Tokenize `source` into `out_dir` (see the module docstring); returns `out_dir`.

    source: "embedded" (the Shakespeare plays), a .txt/.jsonl/.parquet file or a folder of them, or
    "hf:<dataset>" (streamed). tokenizer: "gpt2" (GPT-2 BPE, offline) or "bpe" (byte-level BPE trained on
    the first `bpe_train_chars` characters of the training pieces, with `vocab_size` entries). `encoding`
    decodes .txt and .jsonl files (strictly). Running it again with the same inputs is a no-op when
    complete and resumes when interrupted; other inputs are refused unless `overwrite`."""
    _check_arguments(tokenizer, vocab_size, val_fraction, encoding)
    out = Path(out_dir)
    args = prepare_args(source, tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction, seed=seed,
                        text_field=text_field, hf_split=hf_split, hf_config=hf_config, max_documents=max_documents,
                        shard_tokens=shard_tokens, piece_chars=piece_chars, bpe_train_chars=bpe_train_chars,
                        encoding=encoding)
    check_out_dir(out)
    if overwrite and out.exists():
        for name in [MANIFEST, TOKENIZER, PROGRESS, *(p.name for p in out.glob("*-*.bin")), *(p.name for p in out.glob(".pending-*"))]:
            (out / name).unlink(missing_ok=True)
    if (out / MANIFEST).exists():
        differences = input_differences(read_manifest(out)["args"], args)
        if differences:
            raise DataError(f"{out} holds data prepared from other inputs ({'; '.join(differences)}): "
                            f"pass --overwrite to replace it, or choose another --out")
        return out
    state = _resume_state(out, args)
    if not args["source"].startswith("hf:") and args["source"] != "embedded":
        from crate.train.corpus import local_files

        local_files(source)  # fail early on a bad path
    from crate.provenance import claim

    claim(out)
    if not state:  # from the first file on, the folder is recognisably ours (check_out_dir)
        _write_json(out / PROGRESS, {"args": args})

    tok = _tokenizer(out, source, args, state, tokenizer, vocab_size, bpe_train_chars)
    tok_json = tok.to_str()
    identity = tokenizer_identity(tok, "gpt2" if tokenizer == "gpt2" else f"bpe-{vocab_size}")
    eot = tok.token_to_id(EOT)
    dtype = token_dtype(identity["vocab_size"])
    write_bytes(out / TOKENIZER, tok_json.encode())

    writers, docs_done, counts = _tokenize(out, source, args, state, tok_json, eot, dtype, shard_tokens, num_proc,
                                           progress)
    if counts[0] == 0:
        raise DataError(f"{source}: no training tokens (empty source, or val_fraction={val_fraction} took everything)")
    manifest = {
        "format": FORMAT,
        "source": args["source"],
        "seed": seed,
        "val_fraction": val_fraction,
        "tokenizer": identity,
        "vocab_size": identity["vocab_size"],
        "eot_id": eot,
        "dtype": dtype.name,
        "documents": docs_done,
        "tokens": {"train": counts[0], "val": counts[1]},
        "splits": {s: {"tokens": c, "shards": w.shards} for s, c, w in zip(SPLITS, counts, writers)},
        "args": args,
    }
    _write_json(out / MANIFEST, manifest)
    for p in [out / PROGRESS, *out.glob(".pending-*.npy")]:
        p.unlink(missing_ok=True)
    return out


def _check_arguments(tokenizer: str, vocab_size: int, val_fraction: float, encoding: str) -> None:
    """Refuse arguments that cannot work, before anything is read or written."""
    if tokenizer not in ("gpt2", "bpe"):
        raise DataError(f"tokenizer must be 'gpt2' or 'bpe', got {tokenizer!r}")
    if tokenizer == "bpe":
        check_bpe_vocab_size(vocab_size)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"unknown --encoding {encoding!r}: use a Python codec name such as utf-8, latin-1, cp1252") from None


def _resume_state(out: Path, args: dict[str, Any]) -> dict[str, Any]:
    """The progress.json of an interrupted prepare of the same inputs ({} when there is none); one of other inputs
    is refused, unless it stopped before its first shard (then it is cleared and this one starts over)."""
    state: dict[str, Any] = {}
    if (out / PROGRESS).exists():
        state = json.loads((out / PROGRESS).read_text())
        differences = input_differences(state["args"], args, layout=True)
        if differences and _nothing_done(out, state):  # it stopped before its first shard (a bad corpus or argument)
            for name in (PROGRESS, TOKENIZER):
                (out / name).unlink(missing_ok=True)
            state, differences = {}, []
        if differences:
            raise DataError(f"{out} holds an interrupted `crate prepare` of other inputs ({'; '.join(differences)}): "
                            f"run it with those to finish it, pass --overwrite to start over, or choose another --out")
    return state


def _tokenizer(out: Path, source: str, args: dict[str, Any], state: dict[str, Any], tokenizer: str, vocab_size: int,
               bpe_train_chars: int) -> Any:
    """1. the tokenizer (kept from an interrupted run, so resuming tokenizes identically)."""
    if (out / TOKENIZER).exists() and state:
        return load_tokenizer(out)
    if tokenizer == "gpt2":
        return gpt2_tokenizer()

    def train_texts() -> Iterator[str]:
        n = 0
        for split, text, *_ in _stream(source, args):
            if split == 0:
                yield text
                n += len(text)
                if n >= bpe_train_chars:
                    return

    return train_bpe(train_texts(), vocab_size)


def _tokenize(out: Path, source: str, args: dict[str, Any], state: dict[str, Any], tok_json: str, eot: int,
              dtype: np.dtype, shard_tokens: int, num_proc: int | None,
              progress: bool) -> tuple[list[_ShardWriter], int, list[int]]:
    """2. tokenize, in order, with a pool of workers; commit progress with every shard written. Returns the split
    writers (finished: every token in a shard), the documents and the tokens per split."""
    writers = [_ShardWriter(out, s, dtype, shard_tokens, state.get(s, {})) for s in SPLITS]
    pieces_done = state.get("pieces_done", 0)
    docs_done = state.get("documents", 0)
    counts = state.get("counts", [0, 0])
    nproc = max(1, num_proc if num_proc is not None else min(8, os.cpu_count() or 1))
    encoded, pool = _encoded_batches(source, args, pieces_done, tok_json, shard_tokens, nproc)

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    t0, new_tokens = time.perf_counter(), 0
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    from rich.console import Console

    with Progress(*columns, disable=not progress, transient=False, console=Console(stderr=True)) as bar:
        task = bar.add_task("tokenizing")
        try:
            for batch in encoded:
                for split, ids, ends_doc, ends_run in batch:
                    if ends_run:
                        ids.append(eot)
                    docs_done += ends_doc
                    arr = np.asarray(ids, dtype=dtype)
                    writers[split].add(arr)
                    counts[split] += len(arr)
                    new_tokens += len(arr)
                pieces_done += len(batch)
                if any(w.wrote for w in writers):
                    _commit(out, args, pieces_done, docs_done, counts, writers)
                rate = new_tokens / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, description=f"tokenizing: {docs_done:,} documents, {sum(counts):,} tokens, {rate:,.0f} tokens/s")
        finally:
            if pool is not None:
                pool.terminate()
    for w in writers:
        w.finish()
    return writers, docs_done, counts


def _encoded_batches(source: str, args: dict[str, Any], pieces_done: int, tok_json: str, shard_tokens: int,
                     nproc: int) -> tuple[Iterator[list[tuple[int, list[int], bool, bool]]], Any]:
    """The pieces after the first `pieces_done`, in batches, encoded in order by `nproc` processes (or this one):
    (the encoded batches, the pool to terminate or None)."""

    def stream() -> Iterator[tuple[int, str, bool, bool]]:
        for i, item in enumerate(_stream(source, args)):
            if i >= pieces_done:
                yield item

    batches = _batches(stream(), chars=min(1 << 20, shard_tokens))  # about one shard per commit at most
    if nproc > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(nproc, initializer=_init_pool_worker, initargs=(tok_json,))
        return pool.imap(_encode_items, batches), pool
    _init_worker(tok_json)
    return map(_encode_items, batches), None


def _commit(out: Path, args: dict[str, Any], pieces_done: int, docs_done: int, counts: list[int],
            writers: list[_ShardWriter]) -> None:
    """The commit point: progress.json names the shards written and each split's pending tokens."""
    snapshot = {"args": args, "pieces_done": pieces_done, "documents": docs_done, "counts": counts}
    snapshot.update({s: w.state(pieces_done) for s, w in zip(SPLITS, writers)})
    _write_json(out / PROGRESS, snapshot)
    for w in writers:
        w.committed()
        w.wrote = False


def _encode_items(batch: list[tuple[int, str, bool, bool]]) -> list[tuple[int, list[int], bool, bool]]:
    ids = _encode([item[1] for item in batch])
    return [(split, i, *ends) for (split, _, *ends), i in zip(batch, ids)]
