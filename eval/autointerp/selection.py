"""What a run scores: the layers and, per layer, the neurons (listed, all, or a seeded sample of the live ones)
and how many tokens of the stream the recording reads. Checked against the model before any work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from crate.errors import CrateError
from crate.eval.autointerp.config import InterpretConfig
from crate.eval.record.recorder import RecordingSpec, recorded_tokens, resolve_layers
from crate.eval.stats.neurons import sample_neurons


def select_neurons(model: Any, cfg: InterpretConfig) -> tuple[list[str], dict[str, list[int]]]:
    """The layers and, per layer, the neurons to score; out-of-range layers or neurons fail here, before any work."""
    import torch

    from crate.hooks import record

    named = resolve_layers(model, cfg.layers)
    widths = {name: model.n_neurons for name, _ in named if name.isdigit()}
    others = [(name, hook) for name, hook in named if not name.isdigit()]
    if others:  # hook points of any width: one short forward pass tells
        with torch.no_grad(), record(model, [h for _, h in others]) as cache:
            model(torch.zeros((1, 2), dtype=torch.long, device=next(model.parameters()).device))
        widths.update({name: int(cache[hook].shape[-1]) for name, hook in others})
    neurons: dict[str, list[int]] = {}
    for name, _ in named:
        if isinstance(cfg.neurons, (list, tuple)):
            chosen = sorted({int(n) for n in cfg.neurons})
            bad = [n for n in chosen if not 0 <= n < widths[name]]
            if bad:
                raise CrateError(f"neurons {bad[:5]}{'...' if len(bad) > 5 else ''} out of range: layer {name} has "
                                 f"{widths[name]} units (0-{widths[name] - 1}); fix --neurons")
            neurons[name] = chosen
        else:
            if cfg.neurons is not None and (not isinstance(cfg.neurons, int) or cfg.neurons <= 0):
                raise CrateError(f"--neurons sample:N needs N >= 1, got {cfg.neurons!r}")
            dead = set(_excluded_units(model, name))
            live = [i for i in range(widths[name]) if i not in dead]
            neurons[name] = [live[i] for i in sample_neurons(len(live), cfg.neurons, cfg.seed, name)]
    return [name for name, _ in named], neurons


def _excluded_units(model: Any, name: str) -> list[int]:
    """The units of layer `name` that a sampled (or whole) selection leaves out: an SAE's dead latents."""
    return list(getattr(model, "excluded_neurons", lambda _n: [])(name))


def excluded_count(model: Any, cfg: InterpretConfig) -> Callable[[str], int]:
    """How many units of a layer the selection was not drawn from: `_excluded_units`, none when neurons are listed."""
    listed = isinstance(cfg.neurons, (list, tuple))
    return lambda name: 0 if listed else len(_excluded_units(model, name))


def tokens_used(model: Any, stream: np.ndarray, spec: RecordingSpec) -> int:
    """How many tokens from the stream's start the recording reads (crate.eval.record.recorder.record_activations)."""
    T, n = recorded_tokens(len(stream), spec, model.config.block_size)
    if n <= 0:
        raise CrateError(f"the token stream has {len(stream)} tokens: fewer than one sequence of {T}; "
                         f"use a larger split or a smaller --seq-len")
    return n


def tokens_note(model: Any, stream: np.ndarray, spec: RecordingSpec, source: str, default_from: str | None) -> str:
    """Why the recording reads fewer tokens than `spec.n_tokens` (a split shorter than that, or whole sequences
    only), or "" when it reads them all. `source` names the stream ("the val split"); `default_from` the protocol
    whose budget was asked for when --tokens was not given."""
    T, n = recorded_tokens(len(stream), spec, model.config.block_size)
    asked = spec.n_tokens
    if asked is None or n >= asked:
        return ""
    what = f"the {default_from} protocol's default; --tokens" if default_from else "--tokens"
    cap = ", capped at the model's block size" if T < spec.seq_len else ""
    why = (f"{source} has only {len(stream):,} tokens, recorded in whole sequences of {T:,} (--seq-len{cap})"
           if len(stream) < asked else f"only whole sequences of {T:,} tokens are recorded (--seq-len{cap})")
    return f"tokens: {n:,} recorded of the {asked:,} asked ({what}): {why}"


__all__ = ["select_neurons", "excluded_count", "tokens_used", "tokens_note"]
