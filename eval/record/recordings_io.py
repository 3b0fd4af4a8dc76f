"""A records folder on disk: `<dir>/<layer>/cache.npz` (LayerRecording) and `<dir>/<layer>/<neuron>.json`
(NeuronRecord), written in parallel for wide layers, and read back. Apart from the recorder so that recording
needs no file format and reading needs no model."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crate.eval.record.neuron_record import record_path, save_neuron_record
from crate.eval.record.recorder import LayerRecording
from crate.eval.record.windows import layer_window_ids, neuron_record


def write_records(recordings: dict[str, LayerRecording], stream: np.ndarray, token_strings: Sequence[str],
                  records_dir: str | Path, neurons: dict[str, Sequence[int]] | None = None,
                  write_json: bool = True, meta: dict[str, Any] | None = None) -> Path:
    """Write `<records_dir>/<layer>/cache.npz` and (optionally) `<records_dir>/<layer>/<neuron>.json`."""
    records_dir = Path(records_dir)
    records_dir.mkdir(parents=True, exist_ok=True)
    for name, rec in recordings.items():
        rec.save(records_dir / name / "cache.npz")
        if write_json:
            todo = [int(n) for n in (neurons or {}).get(name, range(rec.n_neurons))]
            _JSON_JOB.update(rec=rec, stream=stream, strings=token_strings, ids=layer_window_ids(rec, stream),
                             dir=records_dir, layer=name)
            workers = min(os.cpu_count() or 1, 16)
            if len(todo) >= 256 and workers > 2 and "fork" in mp.get_all_start_methods():
                chunks = [todo[i::workers] for i in range(workers)]
                with mp.get_context("fork").Pool(workers) as pool:  # the job is inherited, not pickled
                    pool.map(_write_json_chunk, chunks)
            else:
                _write_json_chunk(todo)
            _JSON_JOB.clear()
    if meta is not None:
        (records_dir / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return records_dir


_JSON_JOB: dict[str, Any] = {}


def _write_json_chunk(neurons: list[int]) -> None:
    j = _JSON_JOB
    for n in neurons:
        save_neuron_record(neuron_record(j["rec"], n, j["stream"], j["strings"], ids=j["ids"]),
                           record_path(j["dir"], j["layer"], n))


def load_recordings(records_dir: str | Path) -> dict[str, LayerRecording]:
    out = {}
    for p in sorted(Path(records_dir).glob("*/cache.npz")):
        out[p.parent.name] = LayerRecording.load(p)
    return out


__all__ = ["write_records", "load_recordings"]
