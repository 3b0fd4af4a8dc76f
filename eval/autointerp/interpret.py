"""The whole interpretability pipeline for one checkpoint: record -> explain -> simulate -> score -> summarise.

Entry points (Python)
---------------------
    from crate.eval.autointerp.interpret import run_interpret
    from crate.eval.autointerp.config import InterpretConfig
    summary = run_interpret(checkpoint, data_dir, out_dir, InterpretConfig(protocol="tar", explainer="stats",
                            simulator="stats", layers=None, neurons=None))   # -> dict (what summary.json holds)
    summary = crate.eval.autointerp.compare.run_compare({"crate": dir1, "gpt": dir2}, data_dir, out_dir, cfg, controls=True)
    run_interpret(None, None, out, cfg, model=model, stream=np_tokens, token_strings=strings)   # no files needed

    crate.eval.record.recorder.record_activations(model, stream, RecordingSpec(...), layers) -> {layer: LayerRecording}
    crate.eval.record.windows.neuron_windows(rec, neuron, stream, token_strings) / neuron_record(...) (a NeuronRecord)
    crate.eval.record.neuron_record.load_neuron_record(path) / save_neuron_record(rec, path)   (neuron_explainer JSON)
    crate.eval.autointerp.steps.score_neuron(windows, protocol, explainer, simulator)   -> one JSONL line's fields
    crate.eval.autointerp.schedule.score_many(jobs, explainer, simulator, in_flight)  many neurons' LLM calls batched
    crate.eval.autointerp.explainers.make_explainer(spec) / simulators.make_simulator(spec)   spec: "stats", "smollm2",
                                             "hf:<hub id|dir|file.gguf>", "http(s)://host:port/v1#model"
    crate.eval.stats.neurons.layer_summary / model_aggregate / aggregate_ci / compare_models; crate.eval.record.measures.layer_measures

The stages, in order: crate.eval.autointerp.selection (layers, neurons, tokens), identity (what each output
depends on), records (record or reuse), schedule (explain, simulate and score every neuron: steps, scores_io),
summary; this module plans them (every input checked before any work) and runs them.

Output layout (everything is plain JSON / JSONL / NPZ)
-----------------------------------------------------
    <out>/provenance.json                    key (digest of the scores' identity), model (arch, config, n_params,
                                             weights_fingerprint = sha256 of every tensor, control_random_init,
                                             checkpoint (absolute paths), size (the preset it was trained as, or
                                             null), name), data (tokens_sha256 of the tokens read, n_tokens, split,
                                             offset (tokens of the split skipped before them, --token-offset; absent
                                             at 0), tokenizer sha256, dir, manifest), protocol, prompt_version, seed, records
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
                                             (sequence * seq_len + t, from the offset on); windows NaN-padded outside the sequence; token
                                             ids come back with crate.eval.record.windows.window_token_ids(stream, pos, ...).
    <out>/records-short/...                  the same for the short-context protocol (8-token windows, 800x1024 tokens)
    <out>/scores/<protocol>/.provenance.json the scores' stamp: the records' identity, protocol, explainer, simulator,
                                             prompt version, seed, scoring version; every line's provenance.key is its
                                             digest. A layer file holds exactly the neurons of the last run's selection.
    <out>/scores/<protocol>/<layer>.jsonl    one JSON line per neuron: layer, neuron, explanation, explanation_records,
                                             tokens, true_activations and expected_activations (lists per scoring
                                             record, same order), record_ids ("top:1", "random:0", "quantile:3:2",
                                             "top3:25" = top #25 cut to 3 tokens), max_activation, score (= pooled
                                             Pearson correlation, NaN with `score_note` when undefined), score_x100,
                                             rsquared, absolute_dev_explained, auprc (average precision of
                                             expected_activations ranked against the unit being active, normalised
                                             activation >= 1; NaN with auprc_note when no scoring token is active),
                                             auprc_chance (the active share of the scoring tokens: AUPRC's chance
                                             level), auprc_lift ((auprc - chance) / (1 - chance): 0 at chance),
                                             random_score (the pooled correlation over the random:* records only; NaN
                                             with random_score_note, "never sampled" when the unit is zero on all of
                                             them), intruder (delphi's intruder score: the judge's accuracy at
                                             naming an inactive random record among active ones, no explanation;
                                             NaN without such records: crate.eval.autointerp.intruder) and
                                             intruder_chance (1/5), detection, fuzzing (balanced accuracy,
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
    <out>/validity/<protocol>/               with a `validate` (crate interpret --validity): the scorer's checks on
                                             this run, crate.eval.validity.run's layout (its summary goes with its scores)

Several models (crate.eval.autointerp.compare.run_compare, or `crate interpret -c crate=DIR gpt=DIR [--controls]`):
each model gets <out>/<name>/ with the layout above (random-init controls: <out>/<name>-control/), and
<out>/summary.json holds their comparison (see that module).

<layer> is the layer index in decimal ("0", "1", ...) for neuron hooks, or the hook name for any other hook point.
A checkpoint "DIR+SAE[,SAE...]" scores the latents of SAEs on DIR's neurons (crate.eval.sae.attach: GPT-SAE); their layers
are named as the neurons' and their dead latents are left out of the selection.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crate.errors import CrateError
from crate.eval.autointerp.config import InterpretConfig, InterpretPlan
from crate.eval.autointerp.explainers import Explainer, make_explainer
from crate.eval.autointerp.identity import (
    RESULTS_VERSION, data_identity, model_identity, records_identity, scores_identity,
)
from crate.eval.autointerp.prompts import PROMPT_VERSION
from crate.eval.autointerp.protocols import Protocol, get_protocol
from crate.eval.autointerp.records import get_records, load_token_strings, recording_spec
from crate.eval.autointerp.schedule import check_schedule, score_layers
from crate.eval.autointerp.scores_io import check_scores
from crate.eval.autointerp.selection import excluded_count, select_neurons, tokens_note, tokens_used
from crate.eval.autointerp.simulators import Simulator, make_simulator
from crate.eval.autointerp.summary import summarise_layers, summary_markdown, write_json
from crate.eval.models import checkpoint_fields, load_model, model_label, reset_weights
from crate.eval.progress import Progress, say
from crate.provenance import (
    canonical, check_owned, check_stamp, check_tokenizers, claim, differences, digest, read_stamp, refuse, write_stamp,
)


def _check_dependents(out: Path, records_dir: Path, rec_id: dict[str, Any], protocol: Protocol,
                      overwrite: bool) -> list[Path]:
    """Re-recording `records_dir` would orphan other protocols' scores made from it: refuse, or return them to
    discard (with `overwrite`)."""
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
            say(f"scores {pdir}: will be discarded, --overwrite (its records are recorded again)")
            discard.append(pdir)
    return discard


def _load_inputs(checkpoint: str | Path | None, data_dir: str | Path | None, cfg: InterpretConfig, model: Any,
                 stream: np.ndarray | None, token_strings: Sequence[str] | None
                 ) -> tuple[Any, np.ndarray, Sequence[str], dict[str, Any] | None]:
    """(model, stream, token strings, data manifest): those not given, loaded from `checkpoint` (or its random-init
    control) and `data_dir` (the `cfg.split` split, checked against the model's tokenizer and vocabulary)."""
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
        from crate.datadir import read_manifest
        from crate.train.data import open_split

        manifest = read_manifest(data_dir)
        check_tokenizers(model_tok, manifest, str(checkpoint), str(data_dir))
        if manifest["vocab_size"] > model.config.vocab_size:
            from crate.errors import DataError

            raise DataError(f"{data_dir} has {manifest['vocab_size']} token ids, the model only "
                            f"{model.config.vocab_size}: it was tokenized for another model")
        stream = skip_tokens(open_split(data_dir, cfg.split), cfg.token_offset, min(cfg.seq_len, model.config.block_size),
                             f"the {cfg.split} split of {data_dir}")
    if token_strings is None:
        token_strings = load_token_strings(data_dir, int(model.config.vocab_size))
    return model, stream, token_strings, manifest


def skip_tokens(stream: np.ndarray, offset: int, seq_len: int, source: str) -> np.ndarray:
    """`stream` from token `offset` on (a view); an offset that leaves less than one sequence is an error."""
    if not isinstance(offset, int) or offset < 0:
        raise CrateError(f"token offset {offset!r}: give an integer >= 0")
    if offset and len(stream) - offset < seq_len:
        raise CrateError(f"token offset {offset:,} leaves {max(0, len(stream) - offset):,} tokens of {source} "
                         f"({len(stream):,} in all): fewer than one sequence of {seq_len:,}; use an offset of at "
                         f"most {max(0, len(stream) - seq_len):,}")
    return stream[offset:]


def _roles(cfg: InterpretConfig, cache: str, explainer: Explainer | None,
           simulator: Simulator | None) -> tuple[Explainer, Simulator]:
    """The explainer and simulator of `cfg` (LLM calls cached in `cache`), those not given."""
    opts = dict(cfg.llm_options)
    if explainer is None:
        explainer = make_explainer(cfg.explainer, cache=cache, **opts)
        if hasattr(explainer, "max_new_tokens"):
            explainer.max_new_tokens, explainer.temperature = cfg.max_new_tokens, cfg.temperature  # type: ignore[attr-defined]
            explainer.identity.update(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    if simulator is None:
        simulator = make_simulator(cfg.simulator, cache=cache, **opts)
    return explainer, simulator


def plan_interpret(checkpoint: str | Path | None, data_dir: str | Path | None, out_dir: str | Path,
                   config: InterpretConfig | None = None, *, model: Any = None, stream: np.ndarray | None = None,
                   token_strings: Sequence[str] | None = None, explainer: Explainer | None = None,
                   simulator: Simulator | None = None, overwrite: bool = False,
                   name: str | None = None, say_tokens: bool = True) -> InterpretPlan:
    """Load and check every input (checkpoint, data and tokenizer, layers and neurons, explainer and simulator:
    names, keys, endpoints, files), compute the provenance, and refuse outputs of other inputs in `out_dir`;
    nothing is recorded or written yet. `say_tokens`: say when the stream gives fewer tokens than asked for."""
    t_start = time.perf_counter()
    cfg = config or InterpretConfig()
    protocol = get_protocol(cfg.protocol)
    check_schedule(cfg)
    out = Path(out_dir)
    check_owned(out)
    model, stream, token_strings, manifest = _load_inputs(checkpoint, data_dir, cfg, model, stream, token_strings)
    layer_names, neurons = select_neurons(model, cfg)
    spec = recording_spec(cfg, protocol)
    n_used = tokens_used(model, stream, spec)
    source = f"the {cfg.split} split" + (f" from token {cfg.token_offset:,}" if cfg.token_offset else "")
    note = tokens_note(model, stream, spec, source if manifest is not None else "the token stream",
                       None if cfg.n_tokens else protocol.name)
    explainer, simulator = _roles(cfg, cfg.cache or str(out / "llm_cache.sqlite"), explainer, simulator)

    model_id = model_identity(model, cfg.control, cfg.seed)
    data_id = data_identity(stream, n_used, token_strings, cfg.split, manifest)
    if cfg.token_offset and manifest is not None:  # absent at 0: records made before offsets existed stay valid
        data_id["offset"] = cfg.token_offset
    records_dir = out / protocol.records
    rec_id = records_identity(model_id, data_id, spec, layer_names)
    score_id = scores_identity(rec_id, protocol, explainer, simulator, cfg)
    scores_dir = out / "scores" / protocol.name
    discard = check_scores(scores_dir, score_id, overwrite)
    if check_stamp(records_dir, rec_id)[0] != "reuse":
        discard += _check_dependents(out, records_dir, rec_id, protocol, overwrite)
    from crate import __version__

    provenance = canonical({
        "key": digest(score_id), "results_version": RESULTS_VERSION,
        "model": {**model_id, **checkpoint_fields(checkpoint),
                  "name": name or (model_label(checkpoint) if checkpoint else None)},
        "data": {**data_id, "dir": str(data_dir) if data_dir else None, "manifest": manifest,
                 "stream_tokens": int(len(stream))},
        "protocol": protocol.name, "prompt_version": PROMPT_VERSION, "seed": cfg.seed, "records": str(records_dir),
        "records_key": digest(rec_id), "explainer": explainer.identity, "simulator": simulator.identity,
        "config": {k: v for k, v in cfg.to_dict().items() if k != "llm_options"},
        "llm_options": {k: v for k, v in cfg.llm_options.items() if "key" not in k.lower() or k == "api_key_env"},
        "crate_version": __version__,
    })
    if note and say_tokens:
        say(note)
    return InterpretPlan(cfg, protocol, out, model, stream, token_strings, neurons, spec, explainer, simulator,
                         rec_id, score_id, provenance, discard, t_start)


Validate = Callable[[InterpretPlan, dict[str, Any]], dict[str, Any]]


def execute_plan(plan: InterpretPlan, validate: Validate | None = None) -> dict[str, Any]:
    """Record (or reuse the records), score what is not scored yet, summarise; write the module's layout.
    `validate(plan, recordings)`, when given, checks the scorer on this run (crate.eval.validity.run.validate,
    passed in by the callers above this package) and its summary goes into summary.json's "validity"."""
    import shutil

    cfg, out = plan.cfg, plan.out
    for path in plan.discard:
        shutil.rmtree(path, ignore_errors=True)
        if path.parent == out / "scores":  # the scorer's checks made from those scores go with them (the planted
            for name in ("validity.json", "validity.md"):  # units' run stays: its own provenance decides its reuse)
                (out / "validity" / path.name / name).unlink(missing_ok=True)
    claim(out)
    records_dir = out / plan.protocol.records
    scores_dir = out / "scores" / plan.protocol.name
    progress = Progress(cfg.progress)
    try:
        recs = get_records(plan.model, plan.stream, plan.token_strings, records_dir, plan.spec, plan.records_identity,
                           list(plan.neurons), neurons=plan.neurons, write_json=cfg.write_json, progress=progress)
        scores_dir.mkdir(parents=True, exist_ok=True)
        write_stamp(scores_dir, "scores", plan.scores_identity)
        per_layer = score_layers(recs, plan, progress)
    finally:
        progress.close()
    summary = summarise_layers(recs, per_layer, plan.model.config.n_layer, cfg, plan.neurons, excluded_count(plan.model, cfg))
    if validate is not None:
        summary["validity"] = validate(plan, recs)
    summary["provenance"] = plan.provenance
    summary["seconds"] = time.perf_counter() - plan.t_start
    write_json(out / "summary.json", summary)
    write_json(out / "provenance.json", plan.provenance)
    (out / "summary.md").write_text(summary_markdown({plan.provenance["model"]["name"] or "model": summary}))
    return summary


def run_interpret(checkpoint: str | Path | None, data_dir: str | Path | None, out_dir: str | Path,
                  config: InterpretConfig | None = None, *, model: Any = None, stream: np.ndarray | None = None,
                  token_strings: Sequence[str] | None = None, explainer: Explainer | None = None,
                  simulator: Simulator | None = None, overwrite: bool = False, name: str | None = None,
                  validate: Validate | None = None) -> dict[str, Any]:
    """Record, explain, simulate and score one model; write the layout of this module's docstring; return the summary.

    `model`, `stream` and `token_strings` may be given directly (tests, notebooks); otherwise they come from
    `checkpoint` (crate.load) and `data_dir` (crate.train.data: the `config.split` split and its tokenizer).
    Everything is checked before any recording (`plan_interpret`). Outputs already in `out_dir` are reused when
    their provenance matches exactly; scores of other inputs are refused (`overwrite=True` discards them)."""
    return execute_plan(plan_interpret(checkpoint, data_dir, out_dir, config, model=model, stream=stream,
                                       token_strings=token_strings, explainer=explainer, simulator=simulator,
                                       overwrite=overwrite, name=name), validate)


__all__ = ["Validate", "plan_interpret", "execute_plan", "run_interpret"]
