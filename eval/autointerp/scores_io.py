"""A run's score files, `<out>/scores/<protocol>/<layer>.jsonl` (one JSON line per neuron): which neurons are
already scored with this key (a line cut by an interruption is dropped), refusing scores of other inputs, and
rewriting a layer's file atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crate.atomic import write_bytes
from crate.eval.progress import say
from crate.provenance import check_stamp, refuse


def done_neurons(path: Path, key: str) -> dict[int, tuple[dict[str, Any], str]]:
    """Results already in a layer's JSONL, each with its line; a line cut by an interruption is dropped (the file is
    rewritten). A line of other inputs than `key` is never reused: the caller refuses before that (`check_scores`)."""
    done: dict[int, tuple[dict[str, Any], str]] = {}
    if not path.exists():
        return done
    text = path.read_text(encoding="utf-8")
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (row.get("provenance") or {}).get("key") == key:
            done[int(row["neuron"])] = (row, line)
    return done


def check_scores(scores_dir: Path, identity: dict[str, Any], overwrite: bool) -> list[Path]:
    """Scores of other inputs in `scores_dir` are results the user may want: refuse, or (with `overwrite`) return
    the folder to discard."""
    status, diffs = check_stamp(scores_dir, identity)
    if status == "new" and scores_dir.exists() and any(scores_dir.glob("*.jsonl")):
        status, diffs = "stale", ["scores written without provenance (an older crate-lm)"]
    if status != "stale":
        return []
    if not overwrite:
        refuse("scores", scores_dir, diffs, "--overwrite")
    say(f"scores {scores_dir}: will be discarded, --overwrite ({diffs[0]}{'...' if len(diffs) > 1 else ''})")
    return [scores_dir]


def write_layer_scores(path: Path, lines: list[str]) -> None:
    """A layer's JSONL with exactly `lines`, replaced atomically (never half written)."""
    write_bytes(path, "".join(line + "\n" for line in lines).encode("utf-8"))


__all__ = ["done_neurons", "check_scores", "write_layer_scores"]
