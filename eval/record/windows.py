"""One neuron's records from a layer's recording: flattened positions -> windows of (token, activation), and
neuron_explainer's NeuronRecord. Apart from the recorder: this is what explanation and scoring read, per neuron,
long after (and without) the recording pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from crate.eval.record.neuron_record import ActivationRecord, NeuronId, NeuronRecord
from crate.eval.record.recorder import LayerRecording


@dataclass
class Window:
    """A record with where it came from: tokens, activations, the index of its centre and an id."""

    tokens: list[str]
    activations: list[float]
    center: int
    id: str
    position: int = -1


def window_token_ids(stream: np.ndarray, pos: np.ndarray, seq_len: int, window: int, left: int) -> np.ndarray:
    """Token ids of the windows around flattened positions `pos` (any shape) -> (..., W), -1 outside."""
    pos = np.asarray(pos, dtype=np.int64)
    t = pos % seq_len
    off = np.arange(window) - left
    tt = t[..., None] + off
    valid = (tt >= 0) & (tt < seq_len) & (pos[..., None] >= 0)
    idx = np.where(valid, pos[..., None] + off, 0)
    ids = np.asarray(stream[idx.ravel()], dtype=np.int64).reshape(idx.shape)
    return np.where(valid, ids, -1)


def layer_window_ids(rec: LayerRecording, stream: np.ndarray) -> dict[str, np.ndarray]:
    """Token ids of every window of a layer at once (int32, -1 outside the sequence): top, random, quantile."""
    f = lambda pos: window_token_ids(stream, pos, rec.seq_len, rec.window, rec.left).astype(np.int32)  # noqa: E731
    return {"top": f(rec.top_pos), "random": f(rec.rand_pos), "quantile": f(rec.q_pos)}


def _record_windows(ids: np.ndarray, acts: np.ndarray, pos: np.ndarray, left: int, token_strings: Sequence[str],
             rids: Sequence[str]) -> list[Window | None]:
    """Windows of rows of (token ids, activations, position); None where the position is -1 (no record). The rows
    go to Python lists at once: per-row numpy calls cost more than the windows' few dozen tokens."""
    out: list[Window | None] = []
    for row_ids, row_acts, p, rid in zip(ids.tolist(), acts.astype(np.float64).tolist(), pos.tolist(), rids):
        if p < 0:
            out.append(None)
            continue
        keep = [j for j, i in enumerate(row_ids) if i >= 0]
        out.append(Window(tokens=[token_strings[row_ids[j]] for j in keep], activations=[row_acts[j] for j in keep],
                          center=left - (keep[0] if keep else 0), id=rid, position=int(p)))
    return out


def neuron_windows(rec: LayerRecording, neuron: int, stream: np.ndarray, token_strings: Sequence[str],
                   ids: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """{"top": [Window], "random": [Window], "quantile": [[Window]] per bin} for one neuron.

    `ids` (from `layer_window_ids`) saves recomputing the token ids when going through many neurons."""
    n, L, ts = neuron, rec.left, token_strings
    if ids is None:
        f = lambda pos: window_token_ids(stream, pos, rec.seq_len, rec.window, rec.left)  # noqa: E731
        ids = {"top": f(rec.top_pos[:, n : n + 1]), "random": f(rec.rand_pos[:, n : n + 1]),
               "quantile": f(rec.q_pos[:, :, n : n + 1])}
        col = 0
    else:
        col = n
    K, R = rec.top_pos.shape[0], rec.rand_pos.shape[0]
    Q, P = rec.q_pos.shape[:2]
    top = _record_windows(ids["top"][:, col], rec.top_win[:, n], rec.top_pos[:, n], L, ts,
                          [f"top:{k}" for k in range(K)])
    rnd = _record_windows(ids["random"][:, col], rec.rand_win[:, n], rec.rand_pos[:, n], L, ts,
                   [f"random:{r}" for r in range(R)])
    W = rec.q_win.shape[-1]
    flat = _record_windows(ids["quantile"][:, :, col].reshape(Q * P, W), rec.q_win[:, :, n].reshape(Q * P, W),
                    rec.q_pos[:, :, n].reshape(-1), L, ts, [f"quantile:{q}:{p}" for q in range(Q) for p in range(P)])
    return {
        "top": [w for w in top if w is not None],
        "random": [w for w in rnd if w is not None],
        "quantile": [[w for w in flat[q * P:(q + 1) * P] if w is not None] for q in range(Q)],
    }


def neuron_record(rec: LayerRecording, neuron: int, stream: np.ndarray, token_strings: Sequence[str],
                  layer_index: int | None = None, ids: dict[str, np.ndarray] | None = None) -> NeuronRecord:
    """The neuron_explainer `NeuronRecord` of one neuron; its moments are over every recorded token
    (population variance, excess kurtosis: see crate.eval.record.neuron_record)."""
    w = neuron_windows(rec, neuron, stream, token_strings, ids=ids)
    ar = lambda x: ActivationRecord(tokens=x.tokens, activations=x.activations)  # noqa: E731
    li = layer_index if layer_index is not None else (int(rec.layer) if rec.layer.isdigit() else -1)
    return NeuronRecord(
        neuron_id=NeuronId(layer_index=li, neuron_index=int(neuron)),
        random_sample=[ar(x) for x in w["random"]],
        random_sample_by_quantile=[[ar(x) for x in ws] for ws in w["quantile"]],
        quantile_boundaries=[float(b) for b in rec.boundaries[neuron]],
        mean=float(rec.mean[neuron]), variance=float(rec.var[neuron]),
        skewness=float(rec.skew[neuron]), kurtosis=float(rec.kurt[neuron]),
        most_positive_activation_records=[ar(x) for x in w["top"]],
    )


def token_strings_from(decode: Callable[[int], str] | Sequence[str], vocab_size: int) -> list[str]:
    """A list of token strings for ids 0..vocab_size-1 from a decoder function or a ready list."""
    if callable(decode):
        return [decode(i) for i in range(vocab_size)]
    strings = list(decode)
    if len(strings) < vocab_size:
        strings += [f"<{i}>" for i in range(len(strings), vocab_size)]
    return strings


__all__ = ["Window", "window_token_ids", "layer_window_ids", "neuron_windows", "neuron_record", "token_strings_from"]
