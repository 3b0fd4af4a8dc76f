"""The whole interpretability pipeline for one checkpoint: record -> explain -> simulate -> score -> summarise.

Entry points (Python)
---------------------
    from crate.eval.interpret import run_interpret, run_compare, InterpretConfig
    summary = run_interpret(checkpoint, data_dir, out_dir, InterpretConfig(protocol="tar", explainer="stats",
                            simulator="stats", layers=None, neurons=None))   # -> dict (what summary.json holds)
    summary = run_compare({"crate": dir1, "gpt": dir2}, data_dir, out_dir, cfg, controls=True)
    run_interpret(None, None, out, cfg, model=model, stream=np_tokens, token_strings=strings)   # no files needed

    crate.eval.activations.record_activations(model, stream, RecordingSpec(...), layers) -> {layer: LayerRecording}
    crate.eval.activations.neuron_windows(rec, neuron, stream, token_strings) / neuron_record(...) (a NeuronRecord)
    crate.eval.records.load_neuron_record(path) / save_neuron_record(rec, path)   (neuron_explainer JSON)
    crate.eval.interpret.score_neuron(windows, protocol, explainer, simulator)   -> one JSONL line's fields
    crate.eval.simulate.make_explainer(spec) / make_simulator(spec)   spec: "stats", "smollm2",
                                             "hf:<hub id|dir|file.gguf>", "http(s)://host:port/v1#model"
    crate.eval.stats.layer_summary / model_aggregate / aggregate_ci / compare_models; crate.eval.measures.layer_measures

Output layout (everything is plain JSON / JSONL / NPZ)
-----------------------------------------------------
    <out>/provenance.json                    model (checkpoint, arch, config, n_params, weights_fingerprint,
                                             control_random_init), data (dir, split, manifest, stream_tokens), protocol,
                                             prompt_version, seed, records dir, explainer / simulator identity (never
                                             keys), config, crate_version
    <out>/records/meta.json                  {"key": {model identity, RecordingSpec, stream length, layers}, "n_tokens",
                                             "seq_len", "window", "layers": {<layer>: hook name}}   [64-token windows]
    <out>/records/<layer>/<neuron>.json      one NeuronRecord per neuron, loadable by OpenAI's neuron_explainer
                                             (`loads` with `dataclass_name` tags): most_positive_activation_records
                                             (top 50, strongest first), random_sample (50, seeded, same positions for
                                             every model), random_sample_by_quantile (11 bins x 4), quantile_boundaries
                                             (12 values, rank quantiles of the positive activations), mean, stdev.
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
                                             "aggregate": {"mean", "var_pop" (population variance of layer means),
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
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crate.errors import CrateError
from crate.eval.activations import (
    LayerRecording, RecordingSpec, layer_window_ids, load_recordings, neuron_windows, record_activations,
    token_strings_from, write_records,
)
from crate.eval.measures import layer_measures
from crate.eval.prompts import PROMPT_VERSION, normalise
from crate.eval.protocols import Protocol, get_protocol
from crate.eval.scoring import balanced_accuracy, score_simulation
from crate.eval.simulate import Explainer, Simulator, make_explainer, make_simulator, max_activation
from crate.eval.stats import aggregate_ci, compare_models, layer_summary, model_aggregate, sample_neurons

RESULTS_VERSION = 1


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
    per_bin: int = 4
    top_k: int = 50
    n_random: int = 50

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def neuron_seed(seed: int, layer: str, neuron: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{layer}:{neuron}".encode()).digest()[:4], "little")


def model_identity(model: Any, checkpoint: str | None, control: bool) -> dict[str, Any]:
    params = list(model.parameters())
    fp = hashlib.sha256()
    for p in params[:3] + params[-3:]:
        fp.update(p.detach().float().cpu().numpy().tobytes()[:65536])
    return {"checkpoint": str(checkpoint) if checkpoint else None, "arch": model.config.arch,
            "config": model.config.to_dict(), "n_params": int(model.num_params()), "weights_fingerprint": fp.hexdigest()[:16],
            "control_random_init": control}


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
                                TimeRemainingColumn(), transient=False)
            self.bar.start()
        self.tasks: dict[str, Any] = {}
        self.t0: dict[str, float] = {}

    def update(self, desc: str, done: int, total: int, unit: str) -> None:
        if self.bar is None:
            return
        if desc not in self.tasks:
            self.tasks[desc] = self.bar.add_task(desc, total=total, rate="")
            self.t0[desc] = time.perf_counter()
        rate = done / max(time.perf_counter() - self.t0[desc], 1e-9)
        self.bar.update(self.tasks[desc], completed=done, rate=f"{rate:,.1f} {unit}/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _load_model(checkpoint: str | Path, cfg: InterpretConfig):
    import torch

    import crate

    model = crate.load(checkpoint)
    if cfg.control:
        torch.manual_seed(cfg.seed)
        model.reset_parameters()
    return model.eval()


def get_records(model: Any, stream: np.ndarray, token_strings: Sequence[str], records_dir: Path, cfg: InterpretConfig,
                protocol: Protocol, identity: dict[str, Any], neurons: dict[str, list[int]] | None = None,
                progress: _Progress | None = None) -> dict[str, LayerRecording]:
    """Load the recordings in `records_dir` when they match (model, data, parameters), else record and write them."""
    spec = RecordingSpec(n_tokens=cfg.n_tokens or protocol.n_tokens, seq_len=cfg.seq_len, window=protocol.window,
                         top_k=cfg.top_k, n_random=cfg.n_random, per_bin=cfg.per_bin, seed=cfg.seed,
                         batch_size=cfg.batch_size, device=cfg.device)
    key = {"model": identity, "spec": spec.to_dict(), "stream_len": int(len(stream)), "layers": cfg.layers}
    meta_path = records_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == json.loads(json.dumps(key, default=str)):
            recs = load_recordings(records_dir)
            if recs:
                if cfg.write_json:  # neurons asked for now but not when the records were written
                    from crate.eval.activations import neuron_record
                    from crate.eval.records import record_path, save_neuron_record

                    for name, rec in recs.items():
                        for n in (neurons or {}).get(name, range(rec.n_neurons)):
                            path = record_path(records_dir, name, int(n))
                            if not path.exists() and 0 <= int(n) < rec.n_neurons:
                                save_neuron_record(neuron_record(rec, int(n), stream, token_strings), path)
                return recs
    cb = (lambda d, t, desc: progress.update(f"recording {desc}", d, t, "tokens")) if progress else None
    recs = record_activations(model, stream, spec, cfg.layers, progress=cb)
    first = next(iter(recs.values()))
    meta = {"key": key, "n_tokens": first.n_tokens, "seq_len": first.seq_len, "window": first.window,
            "layers": {k: r.hook for k, r in recs.items()}, "format": "neuron_explainer NeuronRecord JSON + cache.npz"}
    write_records(recs, stream, token_strings, records_dir, neurons=neurons, write_json=cfg.write_json,
                  meta=json.loads(json.dumps(meta, default=str)))
    return recs


def score_neuron(windows: dict[str, Any], protocol: Protocol, explainer: Explainer, simulator: Simulator,
                 seed: int = 0, extra_scores: bool = True) -> dict[str, Any]:
    """Explain, simulate and score one neuron from its windows (see `neuron_windows`)."""
    explain_recs, score_recs = protocol.split(windows)
    m = max_activation(explain_recs)
    if not explain_recs or not m > 0:
        explanation = "(no activating records: the neuron is dead on this data)"
    else:
        explanation = explainer.explain(explain_recs, seed=seed)
    tokens = [r.tokens for r in score_recs]
    true = [r.activations for r in score_recs]
    expected = simulator.simulate(explanation, tokens) if score_recs else []
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
    if extra_scores and score_recs and m > 0:
        labels = [max(normalise(a, m), default=0) >= 1 for a in true]
        p = simulator.detect(explanation, tokens)
        out["detection"] = balanced_accuracy(labels, [x > 0.5 for x in p])
        act = [i for i, y in enumerate(labels) if y]
        if act:
            rng = random.Random(seed)
            marks_true = [[v >= 1 for v in normalise(true[i], m)] for i in act]
            marks_false = []
            for mk in marks_true:
                k = sum(mk)
                wrong = set(rng.sample(range(len(mk)), k=min(k, len(mk))))
                marks_false.append([j in wrong for j in range(len(mk))])
            toks = [tokens[i] for i in act] * 2
            q = simulator.fuzz(explanation, toks, marks_true + marks_false)
            fl = [True] * len(act) + [False] * len(act)
            out["fuzzing"] = balanced_accuracy(fl, [x > 0.5 for x in q])
    return out


def _done_neurons(path: Path) -> dict[int, dict[str, Any]]:
    """Results already in a layer's JSONL; a line cut by an interruption is dropped (the file is rewritten)."""
    done: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return done
    text = path.read_text(encoding="utf-8")
    good, bad = [], False
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad = True
            continue
        done[int(row["neuron"])] = row
        good.append(line)
    if bad or (text and not text.endswith("\n")):
        path.write_text("".join(line + "\n" for line in good), encoding="utf-8")
    return done


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        return _clean(x.item())
    return x


def run_interpret(checkpoint: str | Path | None, data_dir: str | Path | None, out_dir: str | Path,
                  config: InterpretConfig | None = None, *, model: Any = None, stream: np.ndarray | None = None,
                  token_strings: Sequence[str] | None = None, explainer: Explainer | None = None,
                  simulator: Simulator | None = None) -> dict[str, Any]:
    """Record, explain, simulate and score one model; write the layout of this module's docstring; return the summary.

    `model`, `stream` and `token_strings` may be given directly (tests, notebooks); otherwise they come from
    `checkpoint` (crate.load) and `data_dir` (crate.train.data: the `config.split` split and its tokenizer)."""
    cfg = config or InterpretConfig()
    protocol = get_protocol(cfg.protocol)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if model is None:
        if checkpoint is None:
            raise CrateError("give a checkpoint (or a model)")
        model = _load_model(checkpoint, cfg)
    elif cfg.control:
        import torch

        torch.manual_seed(cfg.seed)
        model.reset_parameters()
    if stream is None:
        if data_dir is None:
            raise CrateError("give a prepared data directory (or a token stream)")
        from crate.train.data import open_split

        stream = open_split(data_dir, cfg.split)
    vocab = int(model.config.vocab_size)
    if token_strings is None:
        token_strings = _token_strings(data_dir, vocab)
    identity = model_identity(model, str(checkpoint) if checkpoint else None, cfg.control)
    manifest = None
    if data_dir is not None:
        try:
            from crate.train.data import read_manifest

            manifest = read_manifest(data_dir)
        except Exception:  # noqa: BLE001 - provenance only
            manifest = None
    progress = _Progress(cfg.progress)
    try:
        from crate.eval.activations import resolve_layers

        layer_names = [name for name, _ in resolve_layers(model, cfg.layers)]
        n_units = {name: (model.n_neurons if name.isdigit() else None) for name in layer_names}
        neurons: dict[str, list[int]] = {}
        for name in layer_names:
            n_total = n_units[name]
            if isinstance(cfg.neurons, (list, tuple)):
                neurons[name] = [int(n) for n in cfg.neurons]
            elif n_total is not None:
                neurons[name] = sample_neurons(n_total, cfg.neurons, cfg.seed, name)
        records_dir = out / protocol.records
        recs = get_records(model, stream, token_strings, records_dir, cfg, protocol, identity,
                           neurons=neurons or None, progress=progress)
        for name, rec in recs.items():
            if name not in neurons:
                neurons[name] = sample_neurons(rec.n_neurons, cfg.neurons, cfg.seed, name)
            bad = [n for n in neurons[name] if not 0 <= n < rec.n_neurons]
            if bad:
                raise CrateError(f"neurons {bad[:5]} out of range: layer {name} has {rec.n_neurons} units")
        cache = cfg.cache or str(out / "llm_cache.sqlite")
        opts = dict(cfg.llm_options)
        if explainer is None:
            explainer = make_explainer(cfg.explainer, cache=cache, **opts)
            if hasattr(explainer, "max_new_tokens"):
                explainer.max_new_tokens, explainer.temperature = cfg.max_new_tokens, cfg.temperature  # type: ignore[attr-defined]
                explainer.identity.update(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
        if simulator is None:
            simulator = make_simulator(cfg.simulator, cache=cache, **opts)
        provenance = _clean({
            "results_version": RESULTS_VERSION, "model": identity, "data": {"dir": str(data_dir) if data_dir else None,
            "split": cfg.split, "manifest": manifest, "stream_tokens": int(len(stream))}, "protocol": protocol.name,
            "prompt_version": PROMPT_VERSION, "seed": cfg.seed, "records": str(records_dir),
            "explainer": explainer.identity, "simulator": simulator.identity,
            "config": {k: v for k, v in cfg.to_dict().items() if k != "llm_options"},
            "llm_options": {k: v for k, v in opts.items() if "key" not in k.lower() or k == "api_key_env"},
        })
        from crate import __version__

        provenance["crate_version"] = __version__
        scores_dir = out / "scores" / protocol.name
        scores_dir.mkdir(parents=True, exist_ok=True)
        per_layer: dict[str, dict[int, float]] = {}
        total = sum(len(v) for v in neurons.values())
        done_count = 0
        for name, rec in recs.items():
            path = scores_dir / f"{name}.jsonl"
            done = _done_neurons(path)
            if done and any(r.get("provenance", {}).get("model", {}).get("weights_fingerprint")
                            != identity["weights_fingerprint"] for r in done.values()):
                raise CrateError(f"{path} holds results of another model: use another --out or delete it")
            per_layer[name] = {n: (r.get("score") if r.get("score") is not None else math.nan) for n, r in done.items()}
            ids = layer_window_ids(rec, stream) if any(n not in done for n in neurons[name]) else None
            with path.open("a", encoding="utf-8") as f:
                for n in neurons[name]:
                    if n in done:
                        done_count += 1
                        continue
                    w = neuron_windows(rec, n, stream, token_strings, ids=ids)
                    res = score_neuron(w, protocol, explainer, simulator, seed=neuron_seed(cfg.seed, name, n),
                                       extra_scores=cfg.extra_scores)
                    row = {"layer": name, "neuron": int(n), **res, "provenance": provenance}
                    f.write(json.dumps(_clean(row), ensure_ascii=False) + "\n")
                    f.flush()
                    per_layer[name][n] = res["score"]
                    done_count += 1
                    progress.update(f"scoring {protocol.name}", done_count, total, "neurons")
            per_layer[name] = {n: per_layer[name].get(n, math.nan) for n in neurons[name]}
    finally:
        progress.close()
    summary = summarise(recs, per_layer, model.config.n_layer, cfg, neurons)
    summary["provenance"] = provenance
    summary["seconds"] = time.perf_counter() - t_start
    _write_json(out / "summary.json", summary)
    _write_json(out / "provenance.json", provenance)
    (out / "summary.md").write_text(summary_markdown({"model": summary}))
    return summary


def summarise(recs: dict[str, LayerRecording], per_layer: dict[str, dict[int, float]], n_layer: int,
              cfg: InterpretConfig, neurons: dict[str, list[int]]) -> dict[str, Any]:
    layers: dict[str, Any] = {}
    for name, rec in recs.items():
        scores = [per_layer.get(name, {}).get(n, math.nan) for n in neurons[name]]
        s = layer_summary(scores, n_total=rec.n_neurons, n_boot=cfg.n_boot, seed=cfg.seed)
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
        lines.append(f"| {mname} | mean of layers {','.join(a['layers_used'])} | {f(a['mean'])} | var_pop x100 "
                     f"{f(a['var_pop'])} | | | | | |")
    if comparison:
        for k, c in comparison.items():
            lines.append(f"\n{k}: difference x100 {f(c['difference'])} [{f(c['ci95'][0])}, {f(c['ci95'][1])}] "
                         f"({'paired' if c['paired'] else 'unpaired'} bootstrap over neurons)")
    return "\n".join(lines) + "\n"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(_clean(obj), indent=1, default=str))


def run_compare(checkpoints: dict[str, str | Path], data_dir: str | Path, out_dir: str | Path,
                config: InterpretConfig | None = None, controls: bool = False) -> dict[str, Any]:
    """Interpret several models (e.g. {"crate": ..., "gpt": ...}) into <out>/<name>/, optionally with
    random-init controls (<out>/<name>-control/), and write the paired comparison to <out>/summary.json."""
    cfg = config or InterpretConfig()
    out = Path(out_dir)
    results: dict[str, dict[str, Any]] = {}
    for name, ckpt in checkpoints.items():
        results[name] = run_interpret(ckpt, data_dir, out / name, cfg)
        if controls:
            results[f"{name}-control"] = run_interpret(ckpt, data_dir, out / f"{name}-control",
                                                       InterpretConfig(**{**cfg.to_dict(), "control": True}))
    comparison = {}
    names = list(results)
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


__all__ = ["InterpretConfig", "run_interpret", "run_compare", "score_neuron", "get_records", "summarise",
           "summary_markdown", "neuron_seed"]
