"""The whole interpretability pipeline for one checkpoint: record -> explain -> simulate -> score -> summarise.

Entry points (Python)
---------------------
    from crate.eval.autointerp.interpret import run_interpret, run_compare, InterpretConfig
    summary = run_interpret(checkpoint, data_dir, out_dir, InterpretConfig(protocol="tar", explainer="stats",
                            simulator="stats", layers=None, neurons=None))   # -> dict (what summary.json holds)
    summary = run_compare({"crate": dir1, "gpt": dir2}, data_dir, out_dir, cfg, controls=True)
    run_interpret(None, None, out, cfg, model=model, stream=np_tokens, token_strings=strings)   # no files needed

    crate.eval.record.recorder.record_activations(model, stream, RecordingSpec(...), layers) -> {layer: LayerRecording}
    crate.eval.record.recorder.neuron_windows(rec, neuron, stream, token_strings) / neuron_record(...) (a NeuronRecord)
    crate.eval.record.neuron_record.load_neuron_record(path) / save_neuron_record(rec, path)   (neuron_explainer JSON)
    crate.eval.autointerp.interpret.score_neuron(windows, protocol, explainer, simulator)   -> one JSONL line's fields
    crate.eval.autointerp.interpret.score_many(jobs, explainer, simulator, in_flight)      many neurons' LLM calls batched
    crate.eval.autointerp.simulate.make_explainer(spec) / make_simulator(spec)   spec: "stats", "smollm2",
                                             "hf:<hub id|dir|file.gguf>", "http(s)://host:port/v1#model"
    crate.eval.stats.neurons.layer_summary / model_aggregate / aggregate_ci / compare_models; crate.eval.record.measures.layer_measures

Output layout (everything is plain JSON / JSONL / NPZ)
-----------------------------------------------------
    <out>/provenance.json                    key (digest of the scores' identity), model (arch, config, n_params,
                                             weights_fingerprint = sha256 of every tensor, control_random_init,
                                             checkpoint (absolute paths), size (the preset it was trained as, or
                                             null), name), data (tokens_sha256 of the tokens read, n_tokens, split,
                                             tokenizer sha256, dir, manifest), protocol, prompt_version, seed, records
                                             dir and key, explainer / simulator identity (never keys), config,
                                             crate_version
    <out>/records/.provenance.json           the records' stamp: model, data and recording parameters (crate.provenance)
    <out>/records/meta.json                  {"n_tokens", "seq_len", "window", "layers": {<layer>: hook name}}
                                             [64-token windows]
    <out>/records/<layer>/<neuron>.json      one NeuronRecord per neuron, loadable by OpenAI's neuron_explainer
                                             (`loads` with `dataclass_name` tags): most_positive_activation_records
                                             (top 50, strongest first), random_sample (50, seeded, same positions for
                                             every model), random_sample_by_quantile (11 bins x 4), quantile_boundaries
                                             (12 values, rank quantiles of the positive activations), mean, variance
                                             (population), skewness, kurtosis (excess), over every recorded token.
                                             Windows are clipped at sequence edges (shorter records there). Written for
                                             the neurons being scored (all of them when --neurons is all).
    <out>/records/<layer>/cache.npz          the binary cache (LayerRecording.load): top_vals/top_pos (K,N),
                                             top_win (K,N,W), rand_pos (R,N), rand_win (R,N,W), q_pos (Q,P,N), q_win
                                             (Q,P,N,W), boundaries (N,Q+1), mean/var/skew/kurt (excess)/max/min/
                                             active_count/token_top10_share/token_effective_types (N), l0_sum, l0_sq_sum,
                                             layer, hook, n_tokens, seq_len, window, left. Positions are flattened
                                             (sequence * seq_len + t); windows NaN-padded outside the sequence; token
                                             ids come back with activations.window_token_ids(stream, pos, ...).
    <out>/records-short/...                  the same for the short-context protocol (8-token windows, 800x1024 tokens)
    <out>/scores/<protocol>/.provenance.json the scores' stamp: the records' identity, protocol, explainer, simulator,
                                             prompt version, seed, scoring version; every line's provenance.key is its
                                             digest. A layer file holds exactly the neurons of the last run's selection.
    <out>/scores/<protocol>/<layer>.jsonl    one JSON line per neuron: layer, neuron, explanation, explanation_records,
                                             tokens, true_activations and expected_activations (lists per scoring
                                             record, same order), record_ids ("top:1", "random:0", "quantile:3:2",
                                             "top3:25" = top #25 cut to 3 tokens), max_activation, score (= pooled
                                             Pearson correlation, NaN with `score_note` when undefined), score_x100,
                                             rsquared, absolute_dev_explained, detection, fuzzing (balanced accuracy,
                                             null when not run), provenance (dict, the same in every line)
    <out>/summary.json                       {"protocol", "layers": {<layer>: {"mean", "ci95": [lo, hi] (bootstrap over
                                             neurons), "ci95_fpc" (finite-population corrected when neurons are a
                                             sample), "n", "n_nan", "n_scored", "n_total", "std", "measures": {l0_per_token,
                                             l0_per_token_std, l0_fraction, dead, always_on, always_on_threshold,
                                             activation_frequency_mean/median, token_top10_share_median,
                                             token_effective_types_median, top_random_ratio_median, top_random_ratio_inf,
                                             kurtosis_median, skewness_median, n_units, n_tokens}}},
                                             "aggregate": {"mean", "var_pop" (population variance of the layer means,
                                             in correlation units; summary.md and reports print it for the x100 means,
                                             the paper's (x100)^2 units),
                                             "ci95", "layers_used", "exclude_last", "n_layer"},
                                             "scores": {<layer>: {<neuron>: score}}, "provenance", "seconds"}
                                             (scores are correlations, NOT x100; NaN is written as null)
    <out>/summary.md                         the same as a Markdown table (x100)
    <out>/llm_cache.sqlite                   disk cache of every LLM call (key: model identity, prompt, parameters)

Several models (run_compare, or `crate interpret -c crate=DIR gpt=DIR [--controls]`): each model gets
<out>/<name>/ with the layout above (random-init controls: <out>/<name>-control/), and <out>/summary.json is
{"models": {<name>: {"layers", "aggregate", "protocol"}}, "comparison": {"<a> - <b>": {"difference", "ci95",
"paired", "relative", "layers_a", "layers_b", "exclude_last"}}, "controls": {<name>: {"aggregate", "layers"}},
"provenance": {<name>: ...}}.

<layer> is the layer index in decimal ("0", "1", ...) for neuron hooks, or the hook name for any other hook point.
A checkpoint "DIR+SAE[,SAE...]" scores the latents of SAEs on DIR's neurons (crate.eval.sae.train: GPT-SAE); their layers
are named as the neurons' and their dead latents are left out of the selection.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crate.eval.models import checkpoint_fields, load_model, model_label, reset_weights
from crate.errors import CrateError
from crate.eval.record.recorder import (
    LayerRecording, RecordingSpec, layer_window_ids, load_recordings, neuron_windows, record_activations,
    token_strings_from, write_records,
)
from crate.eval.record.measures import layer_measures
from crate.eval.autointerp.prompts import PROMPT_VERSION, normalise
from crate.eval.autointerp.protocols import Protocol, get_protocol
from crate.eval.autointerp.scoring import balanced_accuracy, score_simulation
from crate.eval.autointerp.simulate import Explainer, Simulator, make_explainer, make_simulator, max_activation
from crate.eval.stats.neurons import aggregate_ci, compare_models, layer_summary, model_aggregate, sample_neurons

# 2: a constant prediction of a varying neuron scores 0 (was NaN); fuzzing's wrong marks only on inactive tokens
RESULTS_VERSION = 2


@dataclass
class InterpretConfig:
    protocol: str = "tar"
    explainer: str = "stats"  # "stats", "smollm2", "hf:<id|dir|file.gguf>", "http://host:port/v1#model"
    simulator: str = "stats"
    layers: list[int | str] | None = None  # None: every layer's neurons
    neurons: int | list[int] | None = None  # None: all; int: a seeded sample of that many per layer; list: these
    n_tokens: int | None = None  # None: the protocol's (8000 x 1024 or 800 x 1024), capped by the split
    seq_len: int = 1024
    split: str = "val"
    seed: int = 0
    batch_size: int = 8
    device: str | None = None
    extra_scores: bool = True  # detection and fuzzing (balanced accuracy)
    llm_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"quantize": "4bit"} or {"api_key_env": ...}
    max_new_tokens: int = 60
    temperature: float = 1.0
    cache: str | None = None  # None: <out>/llm_cache.sqlite
    control: bool = False  # a randomly initialised model of the checkpoint's config instead of its weights
    exclude_last: bool | str = "auto"
    write_json: bool = True
    n_boot: int = 2000
    progress: bool = False
    schedule: str = "batched"  # "batched": LLM calls of many neurons batched together; "neuron": one at a time
    neurons_in_flight: int = 64  # batched: neurons whose LLM calls are gathered into the same batches
    per_bin: int = 4
    top_k: int = 50
    n_random: int = 50

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def neuron_seed(seed: int, layer: str, neuron: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{layer}:{neuron}".encode()).digest()[:4], "little")


def model_identity(model: Any, control: bool, seed: int) -> dict[str, Any]:
    """What the recorded activations depend on: every weight (content hash), the config, the random-init control.
    The checkpoint's path is not part of it (moving a checkpoint changes nothing); it goes in the provenance."""
    from crate.config import IMPLEMENTATION_KEYS
    from crate.provenance import weights_hash

    config = {k: v for k, v in model.config.to_dict().items() if k not in IMPLEMENTATION_KEYS}
    return {"arch": model.config.arch, "config": config, "n_params": int(model.num_params()),
            "weights_fingerprint": weights_hash(model), "control_random_init": control,
            "control_seed": seed if control else None,
            **({"sae": model.sae_identity} if hasattr(model, "sae_identity") else {})}


def _token_strings(data_dir: str | Path | None, vocab_size: int) -> list[str]:
    if data_dir is None:
        return [f"<{i}>" for i in range(vocab_size)]
    from crate.train.data import load_tokenizer

    tok = load_tokenizer(data_dir)

    def dec(i: int) -> str:
        try:
            s = tok.decode([i])
        except Exception:  # noqa: BLE001 - ids past the tokenizer's vocabulary (padded embedding)
            s = None
        return s if s else (tok.id_to_token(i) or f"<{i}>")

    return token_strings_from(dec, vocab_size)


class _Progress:
    """A rich progress bar with items/s and an ETA, or nothing."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), TextColumn("{task.fields[note]}"), transient=False)
            self.bar.start()
        self.tasks: dict[str, Any] = {}
        self.start: dict[str, tuple[float, int]] = {}

    def update(self, desc: str, done: int, total: int, unit: str, note: str = "") -> None:
        """`done` of `total`; the rate counts only what this run computed (not items reused from disk); `note`
        is shown after the ETA (e.g. the LLM cache hits)."""
        if self.bar is None:
            return
        now = time.perf_counter()
        if desc not in self.tasks:
            self.tasks[desc] = self.bar.add_task(desc, total=total, rate="", note="")
            self.start[desc] = (now, done)  # the first item's start is unknown: the rate counts from its end
        t0, done0 = self.start[desc]
        self.bar.update(self.tasks[desc], completed=done, rate=rate_text(done - done0, now - t0, unit), note=note)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def rate_text(count: int, seconds: float, unit: str) -> str:
    """"12.5 neurons/s", or per hour when slower than one a second ("340 neurons/h"); "" before any timing."""
    if seconds <= 0 or count <= 0:
        return ""
    rate = count / seconds
    return f"{rate:,.1f} {unit}/s" if rate >= 1 else f"{rate * 3600:,.0f} {unit}/h"


# Recording parameters that choose how, not what: they may differ between a run and its reuse.
_SPEC_IMPLEMENTATION = ("batch_size", "device", "selectivity_max_gb")


def records_identity(model_id: dict[str, Any], data_id: dict[str, Any], spec: RecordingSpec,
                     layers: list[str]) -> dict[str, Any]:
    return {"stage": "records", "model": model_id, "data": data_id, "layers": layers,
            "spec": {k: v for k, v in spec.to_dict().items() if k not in _SPEC_IMPLEMENTATION}}


def recording_spec(cfg: InterpretConfig, protocol: Protocol) -> RecordingSpec:
    return RecordingSpec(n_tokens=cfg.n_tokens or protocol.n_tokens, seq_len=cfg.seq_len, window=protocol.window,
                         top_k=cfg.top_k, n_random=cfg.n_random, per_bin=cfg.per_bin, seed=cfg.seed,
                         batch_size=cfg.batch_size, device=cfg.device)


def get_records(model: Any, stream: np.ndarray, token_strings: Sequence[str], records_dir: Path, spec: RecordingSpec,
                identity: dict[str, Any], layers: list[str], neurons: dict[str, list[int]] | None = None,
                write_json: bool = True, progress: _Progress | None = None) -> dict[str, LayerRecording]:
    """The recordings in `records_dir` when their stamp equals `identity`, else record (replacing them) and stamp."""
    from crate.eval.record.recorder import neuron_record
    from crate.eval.record.neuron_record import record_path, save_neuron_record
    from crate.provenance import check_stamp, describe, write_stamp

    status, diffs = check_stamp(records_dir, identity)
    recs = load_recordings(records_dir) if status == "reuse" else {}
    if status == "reuse" and set(recs) == set(layers):
        _say(f"records {records_dir}: reused (same model, data and recording parameters)")
        if write_json:  # neurons asked for now but not when the records were written
            for name, rec in recs.items():
                for n in (neurons or {}).get(name, range(rec.n_neurons)):
                    path = record_path(records_dir, name, int(n))
                    if not path.exists():
                        save_neuron_record(neuron_record(rec, int(n), stream, token_strings), path)
        return recs
    if records_dir.exists():
        _say(f"records {records_dir}: recording again ({describe(diffs) if diffs else 'incomplete'})")
        import shutil

        shutil.rmtree(records_dir)  # ours (its stamp, or a folder of ours without one): never a mix of two
    cb = (lambda d, t, desc: progress.update(f"recording {desc}", d, t, "tokens")) if progress else None
    recs = record_activations(model, stream, spec, layers, progress=cb)
    first = next(iter(recs.values()))
    meta = {"n_tokens": first.n_tokens, "seq_len": first.seq_len, "window": first.window,
            "layers": {k: r.hook for k, r in recs.items()}, "format": "neuron_explainer NeuronRecord JSON + cache.npz"}
    write_records(recs, stream, token_strings, records_dir, neurons=neurons, write_json=write_json,
                  meta=json.loads(json.dumps(meta, default=str)))
    write_stamp(records_dir, "records", identity)
    return recs


def _say(msg: str) -> None:
    print(msg, flush=True)


def score_neuron(windows: dict[str, Any], protocol: Protocol, explainer: Explainer, simulator: Simulator,
                 seed: int = 0, extra_scores: bool = True) -> dict[str, Any]:
    """Explain, simulate and score one neuron from its windows (see `neuron_windows`)."""
    roles = {"explainer": explainer, "simulator": simulator}
    steps = neuron_steps(windows, protocol, seed, extra_scores)
    try:
        requests = next(steps)
        while True:
            requests = steps.send([getattr(roles[role], method)(*args) for role, method, args in requests])
    except StopIteration as done:
        return done.value


Request = tuple[str, str, tuple]  # (role: "explainer" | "simulator", method, args)


def neuron_steps(windows: dict[str, Any], protocol: Protocol, seed: int = 0,
                 extra_scores: bool = True) -> Generator[list[Request], list[Any], dict[str, Any]]:
    """`score_neuron` as a generator: it yields the LLM calls it needs next (the explanation, then simulation,
    detection and fuzzing together), receives their results, and returns the JSONL line's fields. Whoever drives
    it decides how calls are batched: one neuron at a time (`score_neuron`) or many at once (`score_many`)."""
    explain_recs, score_recs = protocol.split(windows)
    m = max_activation(explain_recs)
    if not explain_recs or not m > 0:
        explanation = "(no activating records: the neuron is dead on this data)"
    else:
        (explanation,) = yield [("explainer", "explain", (explain_recs, seed))]
    tokens = [r.tokens for r in score_recs]
    true = [r.activations for r in score_recs]
    requests: list[Request] = [("simulator", "simulate", (explanation, tokens))] if score_recs else []
    labels: list[bool] = []
    fuzz_labels: list[bool] = []
    if extra_scores and score_recs and m > 0:
        labels = [max(normalise(a, m), default=0) >= 1 for a in true]
        requests.append(("simulator", "detect", (explanation, tokens)))
        act = [i for i, y in enumerate(labels) if y]
        if act:
            rng = random.Random(seed)
            marks_true = [[v >= 1 for v in normalise(true[i], m)] for i in act]
            # the wrong marks fall on as many inactive tokens (as delphi draws them): marks that could land on active
            # tokens would be, in part or wholly, right ones labelled wrong; a record with no inactive token has none
            marks_false, wrong_of = [], []
            for i, mk in zip(act, marks_true):
                quiet = [j for j, on in enumerate(mk) if not on]
                if quiet:
                    wrong = set(rng.sample(quiet, k=min(sum(mk), len(quiet))))
                    marks_false.append([j in wrong for j in range(len(mk))])
                    wrong_of.append(i)
            requests.append(("simulator", "fuzz", (explanation, [tokens[i] for i in act + wrong_of],
                                                   marks_true + marks_false)))
            fuzz_labels = [True] * len(act) + [False] * len(wrong_of)
    results = (yield requests) if requests else []
    expected = results[0] if score_recs else []
    out: dict[str, Any] = {
        "explanation": explanation,
        "explanation_records": [r.id for r in explain_recs],
        "record_ids": [r.id for r in score_recs],
        "tokens": tokens,
        "true_activations": true,
        "expected_activations": expected,
        "max_activation": m,
    }
    out.update(score_simulation(true, expected, m))
    out["detection"] = out["fuzzing"] = None
    if labels:
        out["detection"] = balanced_accuracy(labels, [x > 0.5 for x in results[1]])
    if fuzz_labels:
        out["fuzzing"] = balanced_accuracy(fuzz_labels, [x > 0.5 for x in results[2]])
    return out


def score_many(jobs: Iterable[tuple[Any, Generator[list[Request], list[Any], dict[str, Any]]]], explainer: Explainer,
               simulator: Simulator, in_flight: int = 64) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Drive many `neuron_steps` generators, `in_flight` neurons at a time: each round gathers every pending call
    of every neuron in flight into one `call_many` per role (one loop of calls for objects without it) and yields
    (key, result) for each neuron as soon as its last call is answered, in the order neurons complete."""
    roles = {"explainer": explainer, "simulator": simulator}
    pending: dict[Any, tuple[Generator, list[Request]]] = {}
    queue = iter(jobs)
    exhausted = False
    while True:
        finished = []
        while not exhausted and len(pending) < in_flight:
            job = next(queue, None)
            if job is None:
                exhausted = True
                break
            key, steps = job
            try:
                pending[key] = (steps, next(steps))
            except StopIteration as done:
                finished.append((key, done.value))
        yield from finished
        if not pending:
            if exhausted:
                return
            continue
        answers: dict[tuple[Any, int], Any] = {}
        for role, obj in roles.items():
            calls = [(key, i, method, args) for key, (_, reqs) in pending.items()
                     for i, (r, method, args) in enumerate(reqs) if r == role]
            if not calls:
                continue
            many = getattr(obj, "call_many", None)
            results = many([(m, a) for _, _, m, a in calls]) if many else [getattr(obj, m)(*a) for _, _, m, a in calls]
            answers.update({(key, i): res for (key, i, _, _), res in zip(calls, results)})
        for key in list(pending):
            steps, reqs = pending[key]
            try:
                pending[key] = (steps, steps.send([answers[(key, i)] for i in range(len(reqs))]))
            except StopIteration as done:
                del pending[key]
                yield key, done.value


def _done_neurons(path: Path, key: str) -> dict[int, tuple[dict[str, Any], str]]:
    """Results already in a layer's JSONL, each with its line; a line cut by an interruption is dropped (the file is
    rewritten). A line of other inputs than `key` is never reused: the caller refuses before that (`_check_scores`)."""
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


def _check_scores(scores_dir: Path, identity: dict[str, Any], overwrite: bool) -> list[Path]:
    """Scores of other inputs in `scores_dir` are results the user may want: refuse, or (with `overwrite`) return
    the folder to discard."""
    from crate.provenance import check_stamp, refuse

    status, diffs = check_stamp(scores_dir, identity)
    if status == "new" and scores_dir.exists() and any(scores_dir.glob("*.jsonl")):
        status, diffs = "stale", ["scores written without provenance (an older crate-lm)"]
    if status != "stale":
        return []
    if not overwrite:
        refuse("scores", scores_dir, diffs, "--overwrite")
    _say(f"scores {scores_dir}: will be discarded, --overwrite ({diffs[0]}{'...' if len(diffs) > 1 else ''})")
    return [scores_dir]


def _write_layer_scores(path: Path, lines: list[str]) -> None:
    from crate.atomic import write_bytes

    write_bytes(path, "".join(line + "\n" for line in lines).encode("utf-8"))


def _clean(x: Any) -> Any:
    """JSON-ready: NaN and infinities become null, numpy scalars Python numbers. Lists of floats (the activations,
    most of a score line) take one comprehension instead of a call per element."""
    if type(x) is float:
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        if all(type(v) is float for v in x):
            return [v if math.isfinite(v) else None for v in x]
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        return _clean(x.item())
    return x


# What a result folder holds that we wrote: anything else in a non-empty --out folder means it is not ours.
OUTPUTS = ("provenance.json", "summary.json", "summary.md", "scores", "records", "records-short", "llm_cache.sqlite")


def _selection(model: Any, cfg: InterpretConfig) -> tuple[list[str], dict[str, list[int]]]:
    """The layers and, per layer, the neurons to score; out-of-range layers or neurons fail here, before any work."""
    import torch

    from crate.eval.record.recorder import resolve_layers
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


def _tokens_used(model: Any, stream: np.ndarray, spec: RecordingSpec) -> int:
    """How many tokens from the stream's start the recording reads (crate.eval.record.recorder.record_activations)."""
    T = min(spec.seq_len, model.config.block_size)
    n = (len(stream) // T) * T if spec.n_tokens is None else (min(spec.n_tokens, len(stream)) // T) * T
    if n <= 0:
        raise CrateError(f"the token stream has {len(stream)} tokens: fewer than one sequence of {T}; "
                         f"use a larger split or a smaller --seq-len")
    return n


def data_identity(stream: np.ndarray, n_used: int, token_strings: Sequence[str], split: str,
                  manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The tokens read (content hash), their strings and the tokenizer: what the records depend on."""
    from crate.provenance import digest

    tokens = np.ascontiguousarray(np.asarray(stream[:n_used]).astype(np.int64, copy=False))
    return {"tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(), "n_tokens": int(n_used), "split": split,
            "token_strings": digest(list(token_strings)),
            "tokenizer": ((manifest or {}).get("tokenizer") or {}).get("sha256")}


def scores_identity(records: dict[str, Any], protocol: Protocol, explainer: Explainer, simulator: Simulator,
                    cfg: InterpretConfig) -> dict[str, Any]:
    return {"stage": "scores", "results_version": RESULTS_VERSION, "records": records, "protocol": protocol.name,
            "explainer": explainer.identity, "simulator": simulator.identity, "prompt_version": PROMPT_VERSION,
            "seed": cfg.seed, "extra_scores": cfg.extra_scores}


def _check_dependents(out: Path, records_dir: Path, rec_id: dict[str, Any], protocol: Protocol,
                      overwrite: bool) -> list[Path]:
    """Re-recording `records_dir` would orphan other protocols' scores made from it: refuse, or return them to
    discard (with `overwrite`)."""
    from crate.provenance import differences, read_stamp, refuse

    discard = []
    for pdir in sorted((out / "scores").glob("*")):
        stamp = read_stamp(pdir)
        if pdir.name == protocol.name or not stamp or get_protocol(pdir.name).records != records_dir.name:
            continue
        diffs = differences((stamp.get("identity") or {}).get("records"), rec_id)
        if diffs:
            if not overwrite:
                refuse(f"{pdir.name} scores made from the records that this run must record again", pdir, diffs,
                       "--overwrite")
            _say(f"scores {pdir}: will be discarded, --overwrite (its records are recorded again)")
            discard.append(pdir)
    return discard


@dataclass
class InterpretPlan:
    """Everything one model's run needs, validated and identified before any recording (see `plan_interpret`)."""

    cfg: InterpretConfig
    protocol: Protocol
    out: Path
    model: Any
    stream: np.ndarray
    token_strings: Sequence[str]
    neurons: dict[str, list[int]]
    spec: RecordingSpec
    explainer: Explainer
    simulator: Simulator
    records_identity: dict[str, Any]
    scores_identity: dict[str, Any]
    provenance: dict[str, Any]
    discard: list[Path]
    t_start: float

    @property
    def key(self) -> str:
        return self.provenance["key"]


def plan_interpret(checkpoint: str | Path | None, data_dir: str | Path | None, out_dir: str | Path,
                   config: InterpretConfig | None = None, *, model: Any = None, stream: np.ndarray | None = None,
                   token_strings: Sequence[str] | None = None, explainer: Explainer | None = None,
                   simulator: Simulator | None = None, overwrite: bool = False,
                   name: str | None = None) -> InterpretPlan:
    """Load and check every input (checkpoint, data and tokenizer, layers and neurons, explainer and simulator:
    names, keys, endpoints, files), compute the provenance, and refuse outputs of other inputs in `out_dir`;
    nothing is recorded or written yet."""
    from crate.provenance import check_owned, check_stamp, check_tokenizers, digest

    t_start = time.perf_counter()
    cfg = config or InterpretConfig()
    protocol = get_protocol(cfg.protocol)
    check_schedule(cfg)
    out = Path(out_dir)
    check_owned(out, OUTPUTS)
    model_tok, manifest = None, None
    if model is None:
        if checkpoint is None:
            raise CrateError("give a checkpoint (or a model)")
        model, model_tok = load_model(checkpoint, cfg.control, cfg.seed)
    elif cfg.control:
        reset_weights(model, cfg.seed)
    if stream is None:
        if data_dir is None:
            raise CrateError("give a prepared data directory (or a token stream)")
        from crate.train.data import open_split, read_manifest

        manifest = read_manifest(data_dir)
        check_tokenizers(model_tok, manifest, str(checkpoint), str(data_dir))
        if manifest["vocab_size"] > model.config.vocab_size:
            from crate.errors import DataError

            raise DataError(f"{data_dir} has {manifest['vocab_size']} token ids, the model only "
                            f"{model.config.vocab_size}: it was tokenized for another model")
        stream = open_split(data_dir, cfg.split)
    if token_strings is None:
        token_strings = _token_strings(data_dir, int(model.config.vocab_size))
    layer_names, neurons = _selection(model, cfg)
    spec = recording_spec(cfg, protocol)
    n_used = _tokens_used(model, stream, spec)
    cache = cfg.cache or str(out / "llm_cache.sqlite")
    opts = dict(cfg.llm_options)
    if explainer is None:
        explainer = make_explainer(cfg.explainer, cache=cache, **opts)
        if hasattr(explainer, "max_new_tokens"):
            explainer.max_new_tokens, explainer.temperature = cfg.max_new_tokens, cfg.temperature  # type: ignore[attr-defined]
            explainer.identity.update(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    if simulator is None:
        simulator = make_simulator(cfg.simulator, cache=cache, **opts)

    model_id = model_identity(model, cfg.control, cfg.seed)
    data_id = data_identity(stream, n_used, token_strings, cfg.split, manifest)
    records_dir = out / protocol.records
    rec_id = records_identity(model_id, data_id, spec, layer_names)
    score_id = scores_identity(rec_id, protocol, explainer, simulator, cfg)
    scores_dir = out / "scores" / protocol.name
    discard = _check_scores(scores_dir, score_id, overwrite)
    if check_stamp(records_dir, rec_id)[0] != "reuse":
        discard += _check_dependents(out, records_dir, rec_id, protocol, overwrite)
    from crate import __version__

    provenance = _clean({
        "key": digest(score_id), "results_version": RESULTS_VERSION,
        "model": {**model_id, **checkpoint_fields(checkpoint),
                  "name": name or (model_label(checkpoint) if checkpoint else None)},
        "data": {**data_id, "dir": str(data_dir) if data_dir else None, "manifest": manifest,
                 "stream_tokens": int(len(stream))},
        "protocol": protocol.name, "prompt_version": PROMPT_VERSION, "seed": cfg.seed, "records": str(records_dir),
        "records_key": digest(rec_id), "explainer": explainer.identity, "simulator": simulator.identity,
        "config": {k: v for k, v in cfg.to_dict().items() if k != "llm_options"},
        "llm_options": {k: v for k, v in opts.items() if "key" not in k.lower() or k == "api_key_env"},
        "crate_version": __version__,
    })
    return InterpretPlan(cfg, protocol, out, model, stream, token_strings, neurons, spec, explainer, simulator,
                         rec_id, score_id, provenance, discard, t_start)


def execute_plan(plan: InterpretPlan) -> dict[str, Any]:
    """Record (or reuse the records), score what is not scored yet, summarise; write the module's layout."""
    import shutil

    from crate.provenance import write_stamp

    cfg, out = plan.cfg, plan.out
    for path in plan.discard:
        shutil.rmtree(path, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    records_dir = out / plan.protocol.records
    scores_dir = out / "scores" / plan.protocol.name
    progress = _Progress(cfg.progress)
    try:
        recs = get_records(plan.model, plan.stream, plan.token_strings, records_dir, plan.spec, plan.records_identity,
                           list(plan.neurons), neurons=plan.neurons, write_json=cfg.write_json, progress=progress)
        scores_dir.mkdir(parents=True, exist_ok=True)
        write_stamp(scores_dir, "scores", plan.scores_identity)
        per_layer = _score_layers(recs, plan, progress)
    finally:
        progress.close()
    summary = summarise(recs, per_layer, plan.model.config.n_layer, cfg, plan.neurons, _excluded(plan.model, cfg))
    summary["provenance"] = plan.provenance
    summary["seconds"] = time.perf_counter() - plan.t_start
    _write_json(out / "summary.json", summary)
    _write_json(out / "provenance.json", plan.provenance)
    (out / "summary.md").write_text(summary_markdown({plan.provenance["model"]["name"] or "model": summary}))
    return summary


def run_interpret(checkpoint: str | Path | None, data_dir: str | Path | None, out_dir: str | Path,
                  config: InterpretConfig | None = None, *, model: Any = None, stream: np.ndarray | None = None,
                  token_strings: Sequence[str] | None = None, explainer: Explainer | None = None,
                  simulator: Simulator | None = None, overwrite: bool = False, name: str | None = None) -> dict[str, Any]:
    """Record, explain, simulate and score one model; write the layout of this module's docstring; return the summary.

    `model`, `stream` and `token_strings` may be given directly (tests, notebooks); otherwise they come from
    `checkpoint` (crate.load) and `data_dir` (crate.train.data: the `config.split` split and its tokenizer).
    Everything is checked before any recording (`plan_interpret`). Outputs already in `out_dir` are reused when
    their provenance matches exactly; scores of other inputs are refused (`overwrite=True` discards them)."""
    return execute_plan(plan_interpret(checkpoint, data_dir, out_dir, config, model=model, stream=stream,
                                       token_strings=token_strings, explainer=explainer, simulator=simulator,
                                       overwrite=overwrite, name=name))


def _score_layers(recs: dict[str, LayerRecording], plan: InterpretPlan, progress: _Progress) -> dict[str, dict[int, float]]:
    """Score every selected neuron not already scored with this key; each layer's JSONL ends up holding exactly
    the selection, in order (earlier lines of the same key are reused, cut lines and unselected neurons dropped).
    Each neuron's line is appended (and flushed) as soon as its last LLM call is answered, so an interruption loses
    at most the neurons in flight. `cfg.schedule`: "batched" gathers the LLM calls of `cfg.neurons_in_flight`
    neurons, of every layer, into shared batches; "neuron" scores one neuron after the other."""
    neurons, key, protocol, cfg = plan.neurons, plan.key, plan.protocol, plan.cfg
    scores_dir = plan.out / "scores" / protocol.name
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    lines: dict[str, dict[int, str]] = {}
    todo: list[tuple[str, int]] = []
    for name in recs:
        path = scores_dir / f"{name}.jsonl"
        done = _done_neurons(path, key)
        rows[name] = {n: done[n][0] for n in neurons[name] if n in done}
        lines[name] = {n: done[n][1] for n in neurons[name] if n in done}
        _write_layer_scores(path, [lines[name][n] for n in neurons[name] if n in lines[name]])
        todo += [(name, n) for n in neurons[name] if n not in rows[name]]
    total = sum(len(neurons[name]) for name in recs)
    reused = total - len(todo)
    files = {name: (scores_dir / f"{name}.jsonl").open("a", encoding="utf-8") for name in {n for n, _ in todo}}
    completed: dict[str, list[int]] = {name: [] for name in files}
    try:
        done_count = reused
        for (name, n), res in _score_todo(recs, plan, todo):
            rows[name][n] = _clean({"layer": name, "neuron": int(n), **res, "provenance": plan.provenance})
            lines[name][n] = json.dumps(rows[name][n], ensure_ascii=False)
            files[name].write(lines[name][n] + "\n")
            files[name].flush()
            completed[name].append(n)
            done_count += 1
            progress.update(f"scoring {protocol.name}", done_count, total, "neurons", note=_cache_note(plan))
    finally:
        for f in files.values():
            f.close()
    per_layer: dict[str, dict[int, float]] = {}
    for name in recs:
        # the appended file already holds the selection in order when nothing was reused and neurons completed in
        # order (the stats backend); otherwise it is rewritten in the selection's order
        if name in files and completed[name] != list(neurons[name]):
            _write_layer_scores(scores_dir / f"{name}.jsonl", [lines[name][n] for n in neurons[name]])
        per_layer[name] = {n: (rows[name][n].get("score") if rows[name][n].get("score") is not None else math.nan)
                           for n in neurons[name]}
    _say(f"scores {scores_dir}: {reused} of {total} neurons reused (same provenance), {total - reused} scored")
    return per_layer


SCHEDULES = ("batched", "neuron")


def check_schedule(cfg: InterpretConfig) -> None:
    """The scheduling options, checked with the rest of the plan (before any recording)."""
    if cfg.schedule not in SCHEDULES:
        raise CrateError(f"unknown schedule {cfg.schedule!r}: use one of {', '.join(SCHEDULES)} (--schedule)")
    if not isinstance(cfg.neurons_in_flight, int) or cfg.neurons_in_flight < 1:
        raise CrateError(f"neurons in flight must be an integer >= 1, got {cfg.neurons_in_flight!r} (--neurons-in-flight)")


def _score_todo(recs: dict[str, LayerRecording], plan: InterpretPlan,
                todo: list[tuple[str, int]]) -> Iterator[tuple[tuple[str, int], dict[str, Any]]]:
    """((layer, neuron), result) for every neuron of `todo`, as each completes (see `_score_layers`)."""
    cfg = plan.cfg
    ids: dict[str, Any] = {}

    def windows(name: str, n: int) -> dict[str, Any]:
        if name not in ids:  # each layer's window token ids, once, when its first neuron starts
            ids[name] = layer_window_ids(recs[name], plan.stream)
        return neuron_windows(recs[name], n, plan.stream, plan.token_strings, ids=ids[name])

    if cfg.schedule == "neuron":
        for name, n in todo:
            yield (name, n), score_neuron(windows(name, n), plan.protocol, plan.explainer, plan.simulator,
                                          seed=neuron_seed(cfg.seed, name, n), extra_scores=cfg.extra_scores)
        return
    jobs = (((name, n), neuron_steps(windows(name, n), plan.protocol, neuron_seed(cfg.seed, name, n), cfg.extra_scores))
            for name, n in todo)
    yield from score_many(jobs, plan.explainer, plan.simulator, cfg.neurons_in_flight)


def _cache_note(plan: InterpretPlan) -> str:
    """"cache hits 12/40": the LLM calls answered from the disk cache (explainer and simulator), or ""."""
    caches = {id(c): c for c in (getattr(plan.explainer, "llm", None), getattr(plan.simulator, "llm", None))
              if hasattr(c, "hits")}
    hits = sum(c.hits for c in caches.values())
    calls = hits + sum(c.misses for c in caches.values())
    return f"cache hits {hits:,}/{calls:,}" if calls else ""



def _excluded_units(model: Any, name: str) -> list[int]:
    """The units of layer `name` that a sampled (or whole) selection leaves out: an SAE's dead latents."""
    return list(getattr(model, "excluded_neurons", lambda _n: [])(name))


def _excluded(model: Any, cfg: InterpretConfig) -> Callable[[str], int]:
    """How many units of a layer the selection was not drawn from: `_excluded_units`, none when neurons are listed."""
    listed = isinstance(cfg.neurons, (list, tuple))
    return lambda name: 0 if listed else len(_excluded_units(model, name))


def summarise(recs: dict[str, LayerRecording], per_layer: dict[str, dict[int, float]], n_layer: int,
              cfg: InterpretConfig, neurons: dict[str, list[int]],
              excluded: Callable[[str], int] = lambda _name: 0) -> dict[str, Any]:
    """Per layer the scores' summary over the units the selection was drawn from (`excluded` left out, so the
    finite-population correction collapses when every live SAE latent is scored); per model the aggregate."""
    layers: dict[str, Any] = {}
    for name, rec in recs.items():
        scores = [per_layer.get(name, {}).get(n, math.nan) for n in neurons[name]]
        s = layer_summary(scores, n_total=rec.n_neurons - excluded(name), n_boot=cfg.n_boot, seed=cfg.seed)
        s["measures"] = layer_measures(rec)
        layers[name] = s
    agg = model_aggregate({k: v["mean"] for k, v in layers.items() if k.isdigit()}, n_layer, cfg.exclude_last)
    agg["ci95"] = aggregate_ci(per_layer, agg["layers_used"], n_boot=cfg.n_boot, seed=cfg.seed)
    return _clean({"protocol": get_protocol(cfg.protocol).name, "layers": layers, "aggregate": agg,
                   "scores": {k: {str(n): s for n, s in v.items()} for k, v in per_layer.items()}})


def summary_markdown(models: dict[str, dict[str, Any]], comparison: dict[str, Any] | None = None) -> str:
    f = lambda x, s=100: "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x * s:.2f}"  # noqa: E731
    lines = ["| model | layer | mean x100 | 95% CI x100 | n (NaN) | L0/token | dead | top/random | top-10 token share |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mname, s in models.items():
        for layer, v in s["layers"].items():
            m = v.get("measures", {})
            ci = v.get("ci95") or [None, None]
            lines.append(f"| {mname} | {layer} | {f(v['mean'])} | [{f(ci[0])}, {f(ci[1])}] | {v['n']} ({v['n_nan']}) "
                         f"| {f(m.get('l0_per_token'), 1)} | {m.get('dead')} | {f(m.get('top_random_ratio_median'), 1)} "
                         f"| {f(m.get('token_top10_share_median'), 1)} |")
        a = s["aggregate"]
        lines.append(f"| {mname} | mean of layers {','.join(a['layers_used'])} | {f(a['mean'])} | variance of the "
                     f"x100 layer means {f(a['var_pop'], 100 ** 2)} | | | | | |")
    if comparison:
        for k, c in comparison.items():
            lines.append(f"\n{k}: difference x100 {f(c['difference'])} [{f(c['ci95'][0])}, {f(c['ci95'][1])}] "
                         f"({'paired' if c['paired'] else 'unpaired'} bootstrap over neurons)")
    return "\n".join(lines) + "\n"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(_clean(obj), indent=1, default=str))


def run_compare(checkpoints: dict[str, str | Path], data_dir: str | Path, out_dir: str | Path,
                config: InterpretConfig | None = None, controls: bool = False,
                overwrite: bool = False) -> dict[str, Any]:
    """Interpret several models (e.g. {"crate": ..., "gpt": ...}) into <out>/<name>/, optionally with
    random-init controls (<out>/<name>-control/), and write the paired comparison to <out>/summary.json.
    Every model is planned (and so checked) before the first one is recorded; all must read the same tokens."""
    from crate.provenance import check_owned

    cfg = config or InterpretConfig()
    out = Path(out_dir)
    runs = {name: (ckpt, cfg) for name, ckpt in checkpoints.items()}
    if controls:
        runs.update({f"{name}-control": (ckpt, InterpretConfig(**{**cfg.to_dict(), "control": True}))
                     for name, ckpt in checkpoints.items()})
    check_owned(out, (*OUTPUTS, *runs))
    plans = {name: plan_interpret(ckpt, data_dir, out / name, c, overwrite=overwrite, name=name)
             for name, (ckpt, c) in runs.items()}
    tokens = {name: p.provenance["data"]["tokens_sha256"] for name, p in plans.items()}
    if len(set(tokens.values())) > 1:
        raise CrateError(f"the models would be recorded on different tokens ({tokens}): a paired comparison needs "
                         f"one data directory and one --tokens / --seq-len for all")
    results = {name: execute_plan(plan) for name, plan in plans.items()}
    comparison = {}
    names = [n for n in results if not n.endswith("-control")] + [n for n in results if n.endswith("-control")]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa, sb = results[a], results[b]
            scores = lambda s: {k: {int(n): v for n, v in d.items()} for k, d in s["scores"].items() if k.isdigit()}  # noqa: E731
            comparison[f"{a} - {b}"] = compare_models(
                scores(sa), scores(sb), sa["aggregate"]["n_layer"], sb["aggregate"]["n_layer"], cfg.exclude_last,
                n_boot=cfg.n_boot, seed=cfg.seed)
    summary = {"models": {k: {kk: v[kk] for kk in ("layers", "aggregate", "protocol")} for k, v in results.items()},
               "comparison": comparison, "provenance": {k: v["provenance"] for k, v in results.items()},
               "controls": {k[: -len("-control")]: {"aggregate": v["aggregate"], "layers": v["layers"]}
                            for k, v in results.items() if k.endswith("-control")}}
    _write_json(out / "summary.json", summary)
    _write_json(out / "provenance.json", summary["provenance"])
    (out / "summary.md").write_text(summary_markdown(summary["models"], comparison))
    return _clean(summary)


__all__ = ["InterpretConfig", "InterpretPlan", "plan_interpret", "execute_plan", "run_interpret", "run_compare",
           "score_neuron", "neuron_steps", "score_many", "get_records", "summarise", "summary_markdown", "neuron_seed"]
