"""Provenance: the complete identity of what produced an output, and the one rule for reusing it.

Every stage that writes results (records, scores, summaries, the demo's and reproduce's steps) describes its
inputs as a JSON-able dict (weights hash, data manifest, token budget, protocol, explainer, seeds, code
version...) and stores it beside its output (a "stamp"). On a rerun the stage compares the stored identity with
the one it would produce now:

    new     nothing there yet: compute
    reuse   identical: reuse, and say so
    stale   different: the differences are listed ("n_tokens: 16384 -> 4096"); the stage recomputes what is cheap
            to recompute and refuses (ProvenanceError, naming the differences and the flag that overrides) where
            recomputing would destroy results the user may want

Hashes are of content, never of names: `weights_hash` covers every tensor of a model, `file_hash` every byte of
a file (cached by path, size and modification time, so a 14 GB LLM is hashed once).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from crate.atomic import write_bytes
from crate.errors import CrateError

STAMP = ".provenance.json"
OWNER = ".crate-lm"  # in every folder a command writes: the mark that makes the folder ours (check_owned)


class ProvenanceError(CrateError):
    """An output that exists with other inputs than asked for, or would mix results of different inputs."""


def canonical(obj: Any) -> Any:
    """`obj` as plain JSON values (tuples as lists, NaN/inf as None, anything else by str): the form identities
    are hashed in, and the one NaN -> null cleaning of every result written as JSON. A list of floats (activations,
    most of a score line) takes one comprehension instead of a call per element."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if all(type(v) is float for v in obj):
            return [v if math.isfinite(v) else None for v in obj]
        return [canonical(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        return canonical(obj.item())
    return str(obj)


def digest(obj: Any, n: int = 16) -> str:
    """A short sha256 of `obj`'s canonical JSON: equal identities give equal digests on any machine."""
    blob = json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def tensors_hash(named: Iterable[tuple[str, Any]]) -> str:
    """sha256 over every (name, dtype, shape, bytes) of the tensors, in name order."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def weights_hash(model: Any) -> str:
    """Content hash of all of a model's weights (parameters and buffers that the state dict holds)."""
    return tensors_hash(model.state_dict().items())


def _hash_cache_path() -> Path:
    return Path(os.environ.get("CRATE_CACHE", Path.home() / ".cache" / "crate-lm")) / "file-hashes.json"


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered by (real path, size, mtime) so that large files are read once."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = _hash_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    cache[key] = h.hexdigest()
    try:
        write_bytes(cache_file, json.dumps(cache).encode())
    except OSError:
        pass  # a read-only home: hash again next time, still correct
    return cache[key]


def tree_hash(root: str | os.PathLike, patterns: Iterable[str] = ("*",)) -> str:
    """Content hash of the files under `root` matching `patterns` (relative names and bytes), links followed."""
    root = Path(root)
    files = sorted({f for pat in patterns for f in root.rglob(pat) if f.is_file()})
    return digest({str(f.relative_to(root)): file_hash(f) for f in files}, n=64)


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two identities: ["spec.n_tokens: 16384 -> 4096", ...]."""
    old, new = canonical(old), canonical(new)
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += differences(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    if old == new:
        return []
    return [f"{prefix.rstrip('.') or 'value'}: {_short(old)} -> {_short(new)}"]


def _short(v: Any, limit: int = 60) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= limit else s[: limit - 3] + "..."


def read_stamp(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / STAMP
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return {"identity": "<unreadable stamp>"}


def write_stamp(folder: str | os.PathLike, stage: str, identity: Mapping[str, Any]) -> None:
    """Record what produced `folder` (atomically, so a kill never leaves a stamp for half an output), and on what:
    the crate-lm version and the CPU instruction set torch ran with (its float rounding depends on it). Neither is
    part of the key: an output made elsewhere is reused, and the stamp says where it came from."""
    import torch

    from crate import __version__

    stamp = {"stage": stage, "key": digest(identity), "identity": canonical(identity), "crate_version": __version__,
             "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    write_bytes(Path(folder) / STAMP, (json.dumps(stamp, indent=1, sort_keys=True) + "\n").encode())


Status = Literal["new", "reuse", "stale"]


def check_stamp(folder: str | os.PathLike, identity: Mapping[str, Any]) -> tuple[Status, list[str]]:
    """Compare `folder`'s stamp with `identity`: ("new", []), ("reuse", []) or ("stale", differences)."""
    stamp = read_stamp(folder)
    if stamp is None:
        return "new", []
    diffs = differences(stamp.get("identity"), identity)
    return ("reuse", []) if not diffs else ("stale", diffs)


def describe(diffs: list[str], limit: int = 8) -> str:
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def refuse(what: str, where: str | os.PathLike, diffs: list[str], flag: str) -> None:
    """Raise the error for an output that exists with other inputs, naming the differences and the override."""
    raise ProvenanceError(
        f"{where} already holds {what} of other inputs ({describe(diffs)}); use another output folder, or pass "
        f"{flag} to discard them and recompute")


def claim(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and mark it as crate-lm's (`OWNER`, once): what `check_owned` reads on a rerun."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mark = folder / OWNER
    if not mark.exists():
        from crate import __version__

        write_bytes(mark, (json.dumps({"writer": "crate-lm", "crate_version": __version__}) + "\n").encode())
    return folder


def check_owned(folder: str | os.PathLike, flag: str = "another output folder") -> None:
    """Refuse to write into an existing, non-empty folder that crate-lm has not marked as its own (`claim`), itself
    or in a folder above it (a pipeline's folders inside its own): judged by the mark we write, never by the names
    of the files in it."""
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            raise ProvenanceError(f"{folder} exists and is not a folder: choose {flag}")
        return
    entries = sorted(e.name for e in folder.iterdir())
    if entries and not any((p / OWNER).is_file() for p in (folder, *folder.resolve().parents)):
        raise ProvenanceError(
            f"{folder} is not empty and crate-lm has not marked it as its own (no {OWNER} among "
            f"{', '.join(entries[:5])}{'...' if len(entries) > 5 else ''}); we never write over files we did not write: "
            f"choose {flag} (a folder an earlier crate-lm wrote has no mark: `touch {folder / OWNER}` adopts it)")


def check_tokenizers(model_tokenizer: Mapping[str, Any] | None, manifest: Mapping[str, Any], model_label: str,
                     data_label: str) -> None:
    """The one check wherever a model meets data: the data's tokenizer must be the one the model was trained with."""
    data_tok = manifest.get("tokenizer") or {}
    if model_tokenizer and model_tokenizer.get("sha256") and data_tok.get("sha256") \
            and model_tokenizer["sha256"] != data_tok["sha256"]:
        from crate.errors import DataError

        raise DataError(
            f"{model_label} was trained with tokenizer {model_tokenizer.get('name')} (sha256 "
            f"{model_tokenizer['sha256'][:12]}) but {data_label} was tokenized with {data_tok.get('name')} (sha256 "
            f"{data_tok['sha256'][:12]}): pick the data directory the model was trained on, or prepare the data with "
            f"the model's tokenizer ({prepare_flags(model_tokenizer.get('name'))})")


def prepare_flags(tokenizer_name: str | None) -> str:
    """How `crate prepare` makes the tokenizer of this name: GPT-2's is fixed; a trained BPE ("bpe-<V>") is the
    same only when trained on the same corpus with the same settings."""
    name = str(tokenizer_name or "")
    if name == "gpt2":
        return "`crate prepare SOURCE --out DIR --tokenizer gpt2`"
    if name.startswith("bpe-") and name[4:].isdigit():
        return (f"`crate prepare SOURCE --out DIR --tokenizer bpe --vocab-size {name[4:]}` on the model's own "
                f"training corpus: a trained BPE is the model's only when trained on the same text and settings")
    return f"the tokenizer {name or '(unnamed)'} the model was trained with"


__all__ = ["ProvenanceError", "canonical", "digest", "tensors_hash", "weights_hash", "file_hash", "tree_hash",
           "differences", "read_stamp", "write_stamp", "check_stamp", "refuse", "check_owned", "claim", "check_tokenizers",
           "describe", "prepare_flags", "STAMP", "OWNER"]
