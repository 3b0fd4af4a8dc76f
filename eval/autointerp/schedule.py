"""When each neuron's LLM calls are made: one neuron after the other ("neuron"), or the calls of many neurons
gathered into shared batches ("batched"); and the scores stage that drives it over every selected neuron of every
layer, appending each neuron's line as soon as it completes."""

from __future__ import annotations

import json
import math
from collections.abc import Generator, Iterable, Iterator
from typing import Any

from crate.errors import CrateError
from crate.eval.autointerp.config import InterpretConfig, InterpretPlan
from crate.eval.autointerp.explainers import Explainer
from crate.eval.autointerp.scores_io import done_neurons, write_layer_scores
from crate.eval.autointerp.simulators import Simulator, ask
from crate.eval.autointerp.steps import Request, neuron_seed, neuron_steps, score_neuron
from crate.eval.progress import Progress, say
from crate.eval.record.recorder import LayerRecording
from crate.eval.record.windows import layer_window_ids, neuron_windows
from crate.provenance import canonical


SCHEDULES = ("batched", "neuron")


def check_schedule(cfg: InterpretConfig) -> None:
    """The scheduling options, checked with the rest of the plan (before any recording)."""
    if cfg.schedule not in SCHEDULES:
        raise CrateError(f"unknown schedule {cfg.schedule!r}: use one of {', '.join(SCHEDULES)} (--schedule)")
    if not isinstance(cfg.neurons_in_flight, int) or cfg.neurons_in_flight < 1:
        raise CrateError(f"neurons in flight must be an integer >= 1, got {cfg.neurons_in_flight!r} (--neurons-in-flight)")


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
            results = ask(obj, [(m, a) for _, _, m, a in calls])
            answers.update({(key, i): res for (key, i, _, _), res in zip(calls, results)})
        for key in list(pending):
            steps, reqs = pending[key]
            try:
                pending[key] = (steps, steps.send([answers[(key, i)] for i in range(len(reqs))]))
            except StopIteration as done:
                del pending[key]
                yield key, done.value


def score_layers(recs: dict[str, LayerRecording], plan: InterpretPlan, progress: Progress) -> dict[str, dict[int, float]]:
    """Score every selected neuron not already scored with this key; each layer's JSONL ends up holding exactly
    the selection, in order (earlier lines of the same key are reused, cut lines and unselected neurons dropped).
    Each neuron's line is appended (and flushed) as soon as its last LLM call is answered, so an interruption loses
    at most the neurons in flight. `cfg.schedule`: "batched" gathers the LLM calls of `cfg.neurons_in_flight`
    neurons, of every layer, into shared batches; "neuron" scores one neuron after the other."""
    neurons, key, protocol = plan.neurons, plan.key, plan.protocol
    scores_dir = plan.out / "scores" / protocol.name
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    lines: dict[str, dict[int, str]] = {}
    todo: list[tuple[str, int]] = []
    for name in recs:
        path = scores_dir / f"{name}.jsonl"
        done = done_neurons(path, key)
        rows[name] = {n: done[n][0] for n in neurons[name] if n in done}
        lines[name] = {n: done[n][1] for n in neurons[name] if n in done}
        write_layer_scores(path, [lines[name][n] for n in neurons[name] if n in lines[name]])
        todo += [(name, n) for n in neurons[name] if n not in rows[name]]
    total = sum(len(neurons[name]) for name in recs)
    reused = total - len(todo)
    files = {name: (scores_dir / f"{name}.jsonl").open("a", encoding="utf-8") for name in {n for n, _ in todo}}
    completed: dict[str, list[int]] = {name: [] for name in files}
    desc = f"scoring {protocol.name}"
    if todo:  # the clock starts before the first neuron: with batched LLM calls, neurons complete in bursts
        progress.begin(desc, reused, total, "neurons")
    try:
        done_count = reused
        for (name, n), res in _score_todo(recs, plan, todo):
            rows[name][n] = canonical({"layer": name, "neuron": int(n), **res, "provenance": plan.provenance})
            lines[name][n] = json.dumps(rows[name][n], ensure_ascii=False)
            files[name].write(lines[name][n] + "\n")
            files[name].flush()
            completed[name].append(n)
            done_count += 1
            progress.update(desc, done_count, total, "neurons", note=cache_note(plan))
    finally:
        for f in files.values():
            f.close()
    per_layer: dict[str, dict[int, float]] = {}
    for name in recs:
        # the appended file already holds the selection in order when nothing was reused and neurons completed in
        # order (the stats backend); otherwise it is rewritten in the selection's order
        if name in files and completed[name] != list(neurons[name]):
            write_layer_scores(scores_dir / f"{name}.jsonl", [lines[name][n] for n in neurons[name]])
        per_layer[name] = {n: (rows[name][n].get("score") if rows[name][n].get("score") is not None else math.nan)
                           for n in neurons[name]}
    say(f"scores {scores_dir}: {reused} of {total} neurons reused (same provenance), {total - reused} scored")
    return per_layer


def _score_todo(recs: dict[str, LayerRecording], plan: InterpretPlan,
                todo: list[tuple[str, int]]) -> Iterator[tuple[tuple[str, int], dict[str, Any]]]:
    """((layer, neuron), result) for every neuron of `todo`, as each completes (see `score_layers`)."""
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


def cache_note(plan: InterpretPlan) -> str:
    """"cache hits 12/40": the LLM calls answered from the disk cache (explainer and simulator), or ""."""
    caches = {id(c): c for c in (getattr(plan.explainer, "llm", None), getattr(plan.simulator, "llm", None))
              if hasattr(c, "hits")}
    hits = sum(c.hits for c in caches.values())
    calls = hits + sum(c.misses for c in caches.values())
    return f"cache hits {hits:,}/{calls:,}" if calls else ""


__all__ = ["SCHEDULES", "check_schedule", "score_many", "score_layers", "cache_note"]
