"""Tests run offline and deterministic: no hub look-ups, no W&B network, fixed seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# A small prepared corpus (3 plays, BPE-300) shared by the training tests, prepared once per session.
TRAIN_DATA = dict(tokenizer="bpe", vocab_size=300, max_documents=3, num_proc=1, progress=False, piece_chars=4096)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from crate.train import prepare as P

    return P.prepare("embedded", tmp_path_factory.mktemp("train-data") / "d", **TRAIN_DATA)


@pytest.fixture()
def one_thread():
    """Other test processes share the 2 cores: one torch thread each is much faster than contending."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def prepare_tiny(root, name: str = "data", vocab_size: int = 300, paragraphs: int = 150, **options):
    """A prepared split of a small English-like corpus (random 12-word lines over 18 words, 8 lines a paragraph,
    one seeded text) in root/name: the interpretability tests' data."""
    import random

    from crate.train.prepare import prepare

    text = root / "a.txt"
    if not text.exists():
        rng = random.Random(0)
        words = "the cat sat on a mat and the dog ran to the red house while birds sang in old trees".split()
        paras = ["\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(8)) for _ in range(paragraphs)]
        text.write_text("\n\n".join(paras))
    options = {"val_fraction": 0.3, "piece_chars": 600, "progress": False, **options}
    return prepare(str(text), root / name, tokenizer="bpe", vocab_size=vocab_size, **options)
