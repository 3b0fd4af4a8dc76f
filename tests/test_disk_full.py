"""A full disk: every atomic write (files, checkpoint folders, Lightning checkpoints through AtomicCheckpointIO) says
which file, where, and that the old one is intact, removes its partial write, and is a CrateError the CLI prints
without a traceback; errors that are not a full disk pass through unchanged."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple

import pytest
import torch

from crate.atomic import atomic_dir, atomic_file, write_bytes
from crate.errors import CrateError, DiskFullError
from crate.train.checkpoint_io import AtomicCheckpointIO

Usage = namedtuple("Usage", "total used free")


def test_enospc_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "metrics.csv"
    write_bytes(target, b"old")
    with pytest.raises(DiskFullError, match=r"is full .* while writing metrics.csv: .*metrics.csv is as it was") as e:
        with atomic_file(target) as f:
            f.write(b"new, partly")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(e.value, CrateError) and target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no temporary left


def test_a_writers_own_error_on_a_full_disk_is_a_full_disk(tmp_path, monkeypatch):
    """torch.save reports ENOSPC as RuntimeError ("unexpected pos"): with under 1 MiB free it is a full disk, through
    the checkpoint IO Lightning uses; with space left the same error is the writer's, passed on unchanged."""

    def failing(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4096 vs 0")

    monkeypatch.setattr(torch, "save", failing)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 4096, 4096))
    path = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(DiskFullError, match=r"nothing was written at .*last.ckpt"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, path)
    assert list(path.parent.iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 0, 10**12))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # space left: not a full disk
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, path)


def test_the_disk_is_judged_before_the_partial_write_is_removed(tmp_path, monkeypatch):
    """Removing the partial write frees what it took: a disk that is full while it exists reads as roomy after, so
    the check comes first (a large checkpoint's 'unexpected pos' would otherwise pass as the writer's own error)."""
    target = tmp_path / "last.ckpt"
    partial = target.with_name(f".last.ckpt.tmp{os.getpid()}")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 0, 0 if partial.exists() else 10**9))
    with pytest.raises(DiskFullError):
        with atomic_file(target) as f:
            f.write(b"most of a checkpoint")
            raise RuntimeError("unexpected pos 4096 vs 0")
    assert not partial.exists()


def test_a_checkpoint_folder_on_a_full_disk_is_left_as_it_was(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("{}")
    with pytest.raises(DiskFullError, match="while writing final"):
        with atomic_dir(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"] and (final / "config.json").read_text() == "{}"
    with pytest.raises(ValueError, match="a bug"):  # anything else: unchanged
        with atomic_dir(final):
            raise ValueError("a bug")


def test_a_full_disk_anywhere_else_is_one_line_that_says_how_to_resume(monkeypatch, capsys):
    """A write outside crate.atomic (a score line appended, a library's file) that hits a full disk: the CLI prints
    one line with the command's resume advice, no traceback; other OS errors still raise."""
    import argparse

    import crate.cli as cli

    def command(error):
        def run(args):
            raise error
        return lambda argv: argparse.Namespace(command="interpret", func=run)

    monkeypatch.setattr(cli, "parse", command(OSError(errno.ENOSPC, "No space left on device", "out/scores/tar/0.jsonl")))
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crate interpret: error: the disk is full (out/scores/tar/0.jsonl)") and "Traceback" not in err
    assert "scored neurons are kept and reused" in err
    monkeypatch.setattr(cli, "parse", command(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(PermissionError):
        cli.main([])
