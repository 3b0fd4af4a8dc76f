"""The records stage of an interpret run: the recording parameters of a protocol, the token strings of a data
directory, and the recordings themselves, reused from disk when their stamp matches or recorded (and stamped)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crate.eval.autointerp.config import InterpretConfig
from crate.eval.autointerp.protocols import Protocol
from crate.eval.progress import Progress, say
from crate.eval.record.neuron_record import record_path, save_neuron_record
from crate.eval.record.recorder import LayerRecording, RecordingSpec, record_activations
from crate.eval.record.recordings_io import load_recordings, write_records
from crate.eval.record.windows import neuron_record, token_strings_from
from crate.provenance import check_stamp, describe, write_stamp


def recording_spec(cfg: InterpretConfig, protocol: Protocol) -> RecordingSpec:
    """What to record for `protocol` (its window and token budget unless `cfg.n_tokens`) with `cfg`'s options."""
    return RecordingSpec(n_tokens=cfg.n_tokens or protocol.n_tokens, seq_len=cfg.seq_len, window=protocol.window,
                         top_k=cfg.top_k, n_random=cfg.n_random, per_bin=cfg.per_bin, seed=cfg.seed,
                         batch_size=cfg.batch_size, device=cfg.device)


def load_token_strings(data_dir: str | Path | None, vocab_size: int) -> list[str]:
    """The string of every token id, decoded by the tokenizer of `data_dir` ("<id>" without one, or for ids it
    cannot decode)."""
    if data_dir is None:
        return [f"<{i}>" for i in range(vocab_size)]
    from crate.datadir import load_tokenizer

    tok = load_tokenizer(data_dir)

    def dec(i: int) -> str:
        try:
            s = tok.decode([i])
        except Exception:  # noqa: BLE001 - ids past the tokenizer's vocabulary (padded embedding)
            s = None
        return s if s else (tok.id_to_token(i) or f"<{i}>")

    return token_strings_from(dec, vocab_size)


def get_records(model: Any, stream: np.ndarray, token_strings: Sequence[str], records_dir: Path, spec: RecordingSpec,
                identity: dict[str, Any], layers: list[str], neurons: dict[str, list[int]] | None = None,
                write_json: bool = True, progress: Progress | None = None) -> dict[str, LayerRecording]:
    """The recordings in `records_dir` when their stamp equals `identity`, else record (replacing them) and stamp."""
    status, diffs = check_stamp(records_dir, identity)
    recs = load_recordings(records_dir) if status == "reuse" else {}
    if status == "reuse" and set(recs) == set(layers):
        say(f"records {records_dir}: reused (same model, data and recording parameters)")
        if write_json:  # neurons asked for now but not when the records were written
            for name, rec in recs.items():
                for n in (neurons or {}).get(name, range(rec.n_neurons)):
                    path = record_path(records_dir, name, int(n))
                    if not path.exists():
                        save_neuron_record(neuron_record(rec, int(n), stream, token_strings), path)
        return recs
    if records_dir.exists():
        say(f"records {records_dir}: recording again ({describe(diffs) if diffs else 'incomplete'})")
        import shutil

        shutil.rmtree(records_dir)  # ours (its stamp, or a folder of ours without one): never a mix of two
    recs = record_activations(model, stream, spec, layers, progress=_recording_progress(progress) if progress else None)
    first = next(iter(recs.values()))
    meta = {"n_tokens": first.n_tokens, "seq_len": first.seq_len, "window": first.window,
            "layers": {k: r.hook for k, r in recs.items()}, "format": "neuron_explainer NeuronRecord JSON + cache.npz"}
    write_records(recs, stream, token_strings, records_dir, neurons=neurons, write_json=write_json,
                  meta=json.loads(json.dumps(meta, default=str)))
    write_stamp(records_dir, "records", identity)
    return recs


def _recording_progress(progress: Progress) -> Callable[[int, int, str], None]:
    """The recorder's progress callback. A pass reports after each batch, so its clock starts where the previous
    pass (or the recording) left off: its first batch counts in its rate."""
    last = time.perf_counter()

    def report(done: int, total: int, desc: str) -> None:
        nonlocal last
        progress.begin(f"recording {desc}", 0, total, "tokens", at=last)
        progress.update(f"recording {desc}", done, total, "tokens")
        last = time.perf_counter()

    return report


__all__ = ["recording_spec", "load_token_strings", "get_records"]
