"""Reproduction reports: the paper's tables and figures, from interpretability results and training logs.

    write_report(paths, out)   ->  <out>/index.md linking everything below

    <out>/main_table.{md,csv,tex}     per size and protocol: mean over layers x100 and the variance of the
                                      per-layer means (in x100 units), CRATE vs GPT, bootstrap 95% CIs,
                                      CRATE - GPT with its CI, and the paper's numbers (SPEC.md section 6)
    <out>/layers.{md,csv,tex}         every model's per-layer mean x100 with its CI (the paper's figure, as numbers)
    <out>/scores_<size>_<protocol>.png  per-layer scores with intervals, CRATE vs GPT (the paper's figure)
    <out>/val_loss.{md,csv,tex,png}   final validation loss per run beside the paper's (SPEC.md section 4), curves
    <out>/measures.{md,csv,tex}       explanation-free measures per model and layer (sparsity, selectivity, ...)
    <out>/controls.{md,csv,tex}       random-initialisation controls beside the trained models

Inputs are found by walking the given paths: an interpretability result is a folder with `scores/<protocol>/
<layer>.jsonl` (the layout of `crate.eval.autointerp.interpret`); a training run is a folder with a metrics CSV that has a
validation-loss column. Scores are recomputed from the per-neuron lines (they are the data; summary.json is
only read for the explanation-free measures and the controls), so the tables hold for any subset of sizes,
protocols and layers that was run.

Statistics, all computed by crate.eval.stats.neurons (the module `crate interpret` uses; the report only scales by 100):
a layer's score is the mean over its scored neurons (NaN scores dropped and counted; `layer_summary`); a model's
score is the mean of its per-layer means over the layers used, its variance the population variance of those
per-layer means (`model_aggregate`). The layers used are the numbered layers with a finite score less the last
layer of 6- and 12-layer models, as in the paper (`used_layers`, exclude_last="auto"; the depth is the config's,
else one past the highest scored layer). Intervals are percentile bootstraps over neurons, resampled within each
layer and seeded (`bootstrap_ci`, `aggregate_ci`); CRATE - GPT (`compare_models`) resamples the same neuron
indices in both models when both scored the same neurons (paired), else each model independently.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crate.eval.models import run_config, trained_size
from crate.errors import CrateError
from crate.eval.stats import neurons as neuron_stats

# --- the paper's numbers (SPEC.md sections 4 and 6) --------------------------------------------------------
PROTOCOLS = ("TaR", "Random-only", "short-context")
PROTOCOL_ALIASES = {
    "tar": "TaR", "top_and_random": "TaR", "top-and-random": "TaR", "topandrandom": "TaR",
    "random": "Random-only", "random_only": "Random-only", "random-only": "Random-only", "randomonly": "Random-only",
    "short": "short-context", "short_context": "short-context", "short-context": "short-context",
    "shortcontext": "short-context", "anthropic": "short-context",
}
# Rows of the paper's table; our presets S and B are its 6L and 12L models.
PAPER_ROW = {"1L": "1L", "2L": "2L", "3L": "3L", "S": "6L", "B": "12L"}
PAPER_SCORES: dict[tuple[str, str], tuple[float, float]] = {  # (row, protocol) -> (CRATE, GPT), mean x100
    ("1L", "TaR"): (3.9, 8.8), ("1L", "Random-only"): (4.8, 8.9), ("1L", "short-context"): (10.1, 14.2),
    ("2L", "TaR"): (8.05, 4.2), ("2L", "Random-only"): (6.95, 1.95), ("2L", "short-context"): (11.35, 10.2),
    ("3L", "TaR"): (9.1, 3.57), ("3L", "Random-only"): (8.43, 1.37), ("3L", "short-context"): (11.23, 9.2),
    ("6L", "TaR"): (7.96, 5.4), ("6L", "Random-only"): (6.36, 3.14), ("6L", "short-context"): (10.4, 8.52),
    ("12L", "TaR"): (6.8, 6.34), ("12L", "Random-only"): (5.12, 2.67), ("12L", "short-context"): (8.88, 8.65),
}
PAPER_VARIANCE: dict[tuple[str, str], tuple[float, float]] = {("6L", "TaR"): (2.29, 20.85), ("12L", "TaR"): (7.09, 11.35)}
PAPER_VAL_LOSS: dict[str, tuple[float, float]] = {  # preset -> (CRATE, GPT), read off the paper's figure
    "1L": (4.06, 3.83), "2L": (3.55, 3.23), "3L": (3.46, 3.11), "S": (2.36, 2.16), "B": (2.27, 2.13),
}
PAPER_SHAPES = {  # preset -> (n_layer, n_head, n_embd) (crate.config.PAPER_SIZES, repeated to keep this module light)
    "1L": (1, 4, 128), "2L": (2, 4, 128), "3L": (3, 4, 128), "S": (6, 12, 768), "B": (12, 12, 768),
}
ARCH_ORDER = ("crate", "gpt", "gpt-sae")
PAPER_ARCHS = ("crate", "gpt")  # the order of PAPER_SCORES' pairs
# GPT-SAE per-layer scores (x100, layer 0 first) that the paper plots (SPEC.md 6a; Random-only and some others are
# read off a figure, +-0.1)
PAPER_SAE_LAYERS: dict[tuple[str, str], tuple[float, ...]] = {
    ("1L", "TaR"): (5.5,), ("2L", "TaR"): (7.6, 3.5), ("3L", "TaR"): (9.4, 4.9, 3.5),
    ("1L", "Random-only"): (2.5,), ("2L", "Random-only"): (2.6, 1.9), ("3L", "Random-only"): (2.8, 2.4, 1.8),
    ("1L", "short-context"): (15.4,), ("2L", "short-context"): (21.7, 10.7), ("3L", "short-context"): (25.5, 15.1, 10.1),
}
N_BOOT = 2000


class ReportError(CrateError):
    """Inputs a report cannot be made from (no results found, malformed score files)."""


def canonical_protocol(name: str) -> str:
    return PROTOCOL_ALIASES.get(name.lower(), name)


def paper_row(size: str) -> str | None:
    return PAPER_ROW.get(size)


# --- inputs ----------------------------------------------------------------------------------------------
@dataclass
class ModelResult:
    """One model's interpretability results: scores[protocol][layer] = the per-neuron JSON lines."""

    name: str
    path: Path
    arch: str
    size: str
    n_layer: int | None
    random_init: bool = False
    scorer: str = "-"  # the explainer/simulator that produced the scores ("stats", an LLM's name)
    scores: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    measures: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> measure -> value
    summary: dict[str, Any] = field(default_factory=dict)
    summary_path: Path | None = None  # the summary.json read (its own, else its folder's: run_compare's)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.arch}, {self.size}{', random init' if self.random_init else ''})"


@dataclass
class TrainRun:
    name: str
    path: Path
    arch: str
    size: str
    steps: list[float]
    val_loss: list[float]

    @property
    def final(self) -> float:
        return self.val_loss[-1]


def layer_sort_key(layer: str) -> tuple[int, int, str]:
    return (0, int(layer), "") if layer.isdigit() else (1, 0, layer)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def read_scores(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{i} is not a JSON line ({e}); re-run the scoring step for this layer") from e
        if "neuron" not in row:
            raise ReportError(f"{path}:{i} has no 'neuron' field: not a score file of crate.eval.autointerp.interpret")
        rows.append(row)
    return rows


def check_one_provenance(scores_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Every score line of a protocol folder must come from the same inputs (and match the folder's stamp):
    results of different provenance are never averaged together."""
    from crate.provenance import describe, differences, digest, read_stamp

    def key(row: dict[str, Any]) -> str:
        prov = row.get("provenance") or {}
        return prov.get("key") or "unkeyed:" + digest({k: v for k, v in prov.items() if k != "config"})

    by_key: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_key.setdefault(key(row), row.get("provenance") or {})
    stamp = read_stamp(scores_dir)
    if stamp and by_key and set(by_key) != {stamp.get("key")}:
        by_key.setdefault(str(stamp.get("key")), {"stamp": stamp.get("identity")})
    if len(by_key) > 1:
        a, b = list(by_key.values())[:2]
        raise ReportError(
            f"{scores_dir} mixes scores of {len(by_key)} different provenances ({describe(differences(a, b), 4)}): "
            f"they are never averaged together. Re-run `crate interpret` into a new --out folder, or with --overwrite")


def score_value(row: dict[str, Any]) -> float:
    v = row.get("score")
    if v is None and row.get("score_x100") is not None:
        v = row["score_x100"] / 100
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def _model_entry(provenance: dict[str, Any], name: str) -> dict[str, Any]:
    """The provenance's description of this model: `models` may be a dict by name, a list, or one dict."""
    models = provenance.get("models") or provenance.get("model") or {}
    if isinstance(models, dict) and ("arch" in models or "config" in models):
        return models
    if isinstance(models, dict):
        if name in models and isinstance(models[name], dict):
            return models[name]
        values = [v for v in models.values() if isinstance(v, dict)]
        return values[0] if len(values) == 1 else {}
    if isinstance(models, list):
        named = [m for m in models if isinstance(m, dict) and m.get("name") == name]
        dicts = [m for m in models if isinstance(m, dict)]
        return (named or dicts or [{}])[0]
    return {}


def size_label(config: dict[str, Any], metadata: dict[str, Any] | None = None) -> str:
    """A model's size: `size` or `preset` from its metadata, the paper preset its shape matches, else 'NL'-free
    '<n>-layer' (so that a tiny model is never mistaken for one of the paper's)."""
    metadata = metadata or {}
    for key in ("size", "preset"):
        if metadata.get(key):
            return str(metadata[key])
        if config.get(key):
            return str(config[key])
    shape = (config.get("n_layer"), config.get("n_head"), config.get("n_embd"))
    for preset, s in PAPER_SHAPES.items():
        if shape == s and config.get("vocab_size", 50304) >= 50257:
            return preset
    n = config.get("n_layer")
    return f"{n}-layer" if n else "unknown"


def _guess_arch(*texts: str) -> str:
    for t in texts:
        t = t.lower()
        if "crate" in t:
            return "crate"
        if "gpt" in t:
            return "gpt-sae" if "sae" in t else "gpt"
    return "unknown"


def _base_checkpoint(entry: dict[str, Any]) -> str | None:
    """The checkpoint a result's model was loaded from; for "CKPT+SAE,..." (GPT-SAE) the CKPT part."""
    checkpoint = entry.get("checkpoint") or entry.get("path")
    if checkpoint and entry.get("sae"):  # crate.eval.sae.train.split_sae_spec's syntax, without its look at the disk
        checkpoint = str(checkpoint).partition("+")[0]
    return checkpoint


def _recorded_size(entry: dict[str, Any], checkpoint: str | None, folder: Path) -> str | None:
    """The size `crate interpret` recorded; for older results, read from the checkpoint, a relative path found
    from the result folder's ancestors (it was relative to wherever interpret ran), never from the working
    directory, so that the label does not depend on where `crate report` runs."""
    if "size" in entry:
        return entry["size"]
    if not checkpoint:
        return None
    path = Path(checkpoint)
    if not path.is_absolute():
        found = (base / path for base in [folder.resolve(), *folder.resolve().parents])
        path = next((p for p in found if p.exists()), None)
    return trained_size(path) if path else None


def load_model_result(path: Path) -> ModelResult:
    """One interpretability result folder (it has `scores/`)."""
    provenance = _read_json(path / "provenance.json")
    entry = _model_entry(provenance, path.name)
    config = entry.get("config") or {}
    if not isinstance(config, dict):
        config = {}
    metadata = {**(provenance.get("metadata") or {}), **(entry.get("metadata") or {})}
    checkpoint = _base_checkpoint(entry)
    if "size" not in metadata and "preset" not in metadata:
        size = _recorded_size(entry, checkpoint, path)
        if size:
            metadata["size"] = size
    arch = entry.get("arch") or config.get("arch") or _guess_arch(path.name, str(checkpoint or ""))
    if entry.get("sae") and not str(arch).endswith("-sae"):  # SAE latents scored as neurons (crate.eval.sae.train)
        arch = f"{arch}-sae"
    random_init = bool(
        entry.get("random_init") or entry.get("control_random_init") or provenance.get("random_init")
        or entry.get("init") == "random"
        or metadata.get("random_init") or re.search(r"rand(om)?[-_]?init", path.name.lower())
    )
    result = ModelResult(
        name=entry.get("name") or path.name, path=path, arch=str(arch), size=size_label(config, metadata),
        n_layer=config.get("n_layer"), random_init=random_init, scorer=scorer_label(provenance),
    )
    for pdir in sorted(p for p in (path / "scores").iterdir() if p.is_dir()):
        protocol = canonical_protocol(pdir.name)
        layers = {f.stem: read_scores(f) for f in sorted(pdir.glob("*.jsonl"))}
        check_one_provenance(pdir, [row for rows in layers.values() for row in rows])
        if layers:
            result.scores[protocol] = dict(sorted(layers.items(), key=lambda kv: layer_sort_key(kv[0])))
    for candidate in (path / "summary.json", path.parent / "summary.json"):
        summary = _read_json(candidate)
        if summary:
            result.summary, result.summary_path = summary, candidate.resolve()
            break
    model_summary = _summary_for(result.summary, result.name, path.name)
    for layer, info in (model_summary.get("layers") or {}).items():
        flat = _flatten_numbers(info.get("measures") or {}) if isinstance(info, dict) else {}
        flat = {k: v for k, v in flat.items() if k not in MEASURES_HIDDEN}
        flat = dict(sorted(flat.items(), key=lambda kv: MEASURES_ORDER.index(kv[0]) if kv[0] in MEASURES_ORDER else len(MEASURES_ORDER)))
        if flat:
            result.measures[str(layer)] = flat
    return result


# crate.eval.record.measures' names, most telling first; thresholds and token counts are parameters, not measures.
MEASURES_ORDER = [
    "l0_per_token", "l0_fraction", "dead", "always_on", "activation_frequency_median", "token_top10_share_median",
    "token_effective_types_median", "top_random_ratio_median", "kurtosis_median", "skewness_median",
]
MEASURES_HIDDEN = {"always_on_threshold", "n_tokens", "l0_per_token_std", "top_random_ratio_inf", "n_units"}


def _backend_name(identity: Any) -> str:
    if not isinstance(identity, dict):
        return ""
    if identity.get("kind") == "stats" or identity.get("backend") == "stats":
        return "stats"
    name = str(identity.get("model") or identity.get("name") or identity.get("backend") or "")
    return name.split(":")[-1].split("/")[-1].removesuffix(".gguf")


def scorer_label(provenance: dict[str, Any]) -> str:
    """'stats', or the LLM(s) that explained and simulated ('A' when both are A, else 'A / B')."""
    e, s = _backend_name(provenance.get("explainer")), _backend_name(provenance.get("simulator"))
    if not e and not s:
        return "-"
    return e if e == s or not s else (s if not e else f"{e} / {s}")


def _summary_for(summary: dict[str, Any], *names: str) -> dict[str, Any]:
    if isinstance(summary.get("layers"), dict):  # one model's summary.json
        return summary
    models = summary.get("models") or {}
    for n in names:
        if isinstance(models.get(n), dict):
            return models[n]
    values = [v for v in models.values() if isinstance(v, dict)]
    return values[0] if len(values) == 1 else {}


def _flatten_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            out[key] = v  # counts stay counts
        elif isinstance(v, float):
            out[key] = v
        elif isinstance(v, dict):
            out.update(_flatten_numbers(v, key + "."))
    return out


VAL_COLUMNS = ("val_loss", "val/loss", "valid_loss", "validation_loss", "loss/val", "val_loss_epoch")
STEP_COLUMNS = ("step", "iter", "iteration", "trainer/global_step", "global_step")


def load_train_run(path: Path, csv_file: Path) -> TrainRun | None:
    """A training run: its metrics CSV (rows with a validation loss) and its resolved config or checkpoint."""
    with open(csv_file, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    cols = rows[0].keys()
    val_col = next((c for c in VAL_COLUMNS if c in cols), None) or next(
        (c for c in cols if "val" in c.lower() and "loss" in c.lower()), None)
    step_col = next((c for c in STEP_COLUMNS if c in cols), None)
    if val_col is None:
        return None
    final_col = next((c for c in ("final/val_loss", "final_val_loss") if c in cols), None)
    steps, losses = [], []
    for i, r in enumerate(rows):
        if final_col and r.get(final_col) not in (None, ""):
            r = {**r, val_col: r[final_col]}  # the full-split evaluation at the end of training
        try:
            loss = float(r[val_col])
        except (TypeError, ValueError):
            continue
        if not math.isfinite(loss):
            continue
        try:
            step = float(r[step_col]) if step_col else float(i)
        except (TypeError, ValueError):
            step = float(i)
        steps.append(step)
        losses.append(loss)
    if not losses:
        return None
    config, metadata = run_config(path)
    model = config.get("model") if isinstance(config.get("model"), dict) else config
    arch = str(model.get("arch") or config.get("arch") or _guess_arch(path.name))
    merged = {**config, **model}
    return TrainRun(name=path.name, path=path, arch=arch, size=size_label(merged, metadata), steps=steps, val_loss=losses)


def discover(paths: list[str | Path]) -> tuple[list[ModelResult], list[TrainRun]]:
    """Every interpretability result and training run under `paths` (each counted once)."""
    results: dict[Path, ModelResult] = {}
    runs: dict[Path, TrainRun] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        dirs = [p] + sorted(d for d in p.rglob("*") if d.is_dir())
        for d in dirs:
            if d.name == "scores" and d.is_dir() and any(d.glob("*/*.jsonl")):
                r = d.parent.resolve()
                if r not in results:
                    results[r] = load_model_result(d.parent)
        for f in ([p] if p.is_file() else sorted(p.rglob("*.csv"))):
            if f.suffix != ".csv" or f.parent.resolve() in results:
                continue
            if f.name in REPORT_CSVS and (f.parent / "index.md").is_file():
                continue  # an earlier report's own tables
            run_dir = _run_dir(f, p)
            if run_dir.resolve() in runs:
                continue
            run = load_train_run(run_dir, f)
            if run is not None:
                runs[run_dir.resolve()] = run
    return list(results.values()), list(runs.values())


def _run_dir(csv_file: Path, root: Path) -> Path:
    """The run folder of a metrics CSV: the nearest ancestor (up to `root`) with a config, else the CSV's folder
    (Lightning's CSVLogger writes <run>/lightning_logs/version_0/metrics.csv)."""
    d = csv_file.parent
    while True:
        if any((d / n).is_file() for n in RUN_CONFIGS):
            return d
        if d == root or d.parent == d or root not in d.parents:
            return csv_file.parent
        d = d.parent


REPORT_CSVS = {"main_table.csv", "layers.csv", "measures.csv", "controls.csv", "val_loss.csv", "gpt_sae.csv",
               "sae_metrics.csv"}
RUN_CONFIGS = ("config.yaml", "config.yml", "resolved_config.yaml", "config.json")


# --- statistics ------------------------------------------------------------------------------------------
@dataclass
class LayerStat:
    layer: str
    mean: float  # x100
    lo: float
    hi: float
    n: int
    n_nan: int


@dataclass
class Aggregate:
    mean: float  # x100, mean over the layers used of the per-layer means
    var: float  # population variance of the x100 per-layer means: (x100)^2 units, the paper's convention
    lo: float
    hi: float
    layers_used: list[str]
    layers: list[LayerStat]
    n_neurons: int


def layer_scores(result: ModelResult, protocol: str) -> dict[str, dict[Any, float]]:
    """{layer: {neuron: score}} of one protocol, the input of crate.eval.stats.neurons (a neuron scored twice: the last
    line counts, as when `crate interpret` resumes)."""
    def key(n: Any) -> Any:
        try:
            return int(n)
        except (TypeError, ValueError):
            return n

    return {layer: {key(r["neuron"]): score_value(r) for r in rows} for layer, rows in result.scores[protocol].items()}


def _model_layers(scores: dict[str, dict[Any, float]]) -> list[str]:
    """The layers that can enter a model's score: the numbered ones (all, if none is numbered)."""
    return [k for k in scores if k.isdigit()] or list(scores)


def _n_layer(result: ModelResult, layers: list[str]) -> int | None:
    """The model's depth: its config's, else one past its highest scored layer."""
    numeric = [int(k) for k in layers if k.isdigit()]
    return result.n_layer if result.n_layer is not None else (max(numeric) + 1 if numeric else None)


def aggregate(result: ModelResult, protocol: str, seed: int = 0, n_boot: int = N_BOOT) -> Aggregate:
    """Per-layer means and intervals (neurons.layer_summary) and the model's score (neurons.model_aggregate over
    neurons.used_layers, interval neurons.aggregate_ci), all x100; layers without a finite score are not used."""
    scores = layer_scores(result, protocol)
    layers = []
    for layer, by_neuron in scores.items():
        s = neuron_stats.layer_summary(list(by_neuron.values()), n_boot=n_boot, seed=seed)
        layers.append(LayerStat(layer, s["mean"] * 100, s["ci95"][0] * 100, s["ci95"][1] * 100, s["n"], s["n_nan"]))
    n = {s.layer: s.n for s in layers}
    candidates = _model_layers(scores)
    agg = neuron_stats.model_aggregate({s.layer: s.mean for s in layers if s.layer in candidates and s.n > 0},
                                _n_layer(result, candidates), exclude_last="auto")
    used = agg["layers_used"]
    if not used:
        nan = math.nan
        return Aggregate(nan, nan, nan, nan, [], layers, 0)
    lo, hi = neuron_stats.aggregate_ci(scores, used, n_boot=n_boot, seed=seed)
    return Aggregate(mean=agg["mean"], var=agg["var_pop"], lo=lo * 100, hi=hi * 100, layers_used=used, layers=layers,
                     n_neurons=sum(n[k] for k in used))


def difference(a: ModelResult, b: ModelResult, protocol: str, seed: int = 0, n_boot: int = N_BOOT) -> dict[str, Any]:
    """neurons.compare_models for a - b on one protocol, x100: paired when both scored the same neuron indices."""
    sa, sb = layer_scores(a, protocol), layer_scores(b, protocol)
    la, lb = _model_layers(sa), _model_layers(sb)
    c = neuron_stats.compare_models({k: sa[k] for k in la}, {k: sb[k] for k in lb}, _n_layer(a, la), _n_layer(b, lb),
                             exclude_last="auto", n_boot=n_boot, seed=seed)
    return {**c, "difference": c["difference"] * 100, "ci95": [x * 100 for x in c["ci95"]]}


# --- tables ----------------------------------------------------------------------------------------------
@dataclass
class Table:
    """Rows of plain values; `columns` fixes their order. Written as Markdown, CSV and LaTeX."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    note: str = ""

    def cell(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for r in self.rows:
            lines.append("| " + " | ".join(self.cell(r.get(c)).replace("|", "\\|") for c in self.columns) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({c: ("" if r.get(c) is None or (isinstance(r.get(c), float) and math.isnan(r[c])) else
                            (round(r[c], 6) if isinstance(r.get(c), float) else r.get(c))) for c in self.columns})
        return buf.getvalue()

    def to_latex(self) -> str:
        lines = [r"\begin{tabular}{" + "l" * len(self.columns) + "}", r"\toprule",
                 " & ".join(latex_escape(c) for c in self.columns) + r" \\", r"\midrule"]
        for r in self.rows:
            lines.append(" & ".join(latex_escape(self.cell(r.get(c))) for c in self.columns) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"

    def write(self, out: Path, stem: str) -> list[Path]:
        files = [out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.tex"]
        md = f"# {self.title}\n\n" + (f"{self.note}\n\n" if self.note else "") + self.to_markdown()
        files[0].write_text(md, encoding="utf-8")
        files[1].write_text(self.to_csv(), encoding="utf-8")
        files[2].write_text(self.to_latex(), encoding="utf-8")
        return files


def latex_escape(s: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(repl.get(ch, ch) for ch in s)


def fmt_ci(lo: float, hi: float) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "-"
    return f"[{round(lo, 2) + 0.0:.2f}, {round(hi, 2) + 0.0:.2f}]"  # + 0.0: never "-0.00"


def _groups(results: list[ModelResult]) -> dict[tuple[str, str, str], dict[str, ModelResult]]:
    """(size, protocol, scorer) -> arch -> the trained model's result. Two of one arch are refused: the tables
    compare one model per system, and picking one of them would change the headline without saying so."""
    groups: dict[tuple[str, str, str], dict[str, ModelResult]] = {}
    for r in results:
        if r.random_init:
            continue
        for protocol in r.scores:
            other = groups.setdefault((r.size, protocol, r.scorer), {}).setdefault(r.arch, r)
            if other is not r:
                raise ReportError(
                    f"two trained {r.arch} results for {r.size}, {protocol}, scorer {r.scorer}: {other.path} and "
                    f"{r.path}. The report compares one model per system: point `crate report` at the result "
                    f"folders to use (e.g. one of these two and the other systems'), or move the other away; "
                    f"several training seeds are `crate study`'s (intervals over seeds)")
    return dict(sorted(groups.items(), key=lambda kv: (_size_key(kv[0][0]), _protocol_key(kv[0][1]), kv[0][2])))


def _size_key(size: str) -> tuple[int, str]:
    order = list(PAPER_ROW)
    return (order.index(size), "") if size in order else (len(order), size)


def _protocol_key(p: str) -> tuple[int, str]:
    return (PROTOCOLS.index(p), "") if p in PROTOCOLS else (len(PROTOCOLS), p)


MAIN_COLUMNS = [
    "size", "protocol", "scorer", "CRATE", "CRATE 95% CI", "GPT", "GPT 95% CI", "CRATE-GPT", "CRATE-GPT 95% CI",
    "CRATE var", "GPT var", "paper CRATE", "paper GPT", "paper CRATE var", "paper GPT var", "layers", "neurons",
]


def main_table(results: list[ModelResult], seed: int = 0, n_boot: int = N_BOOT) -> Table:
    rows = []
    for (size, protocol, scorer), by_arch in _groups(results).items():
        aggs = {arch: aggregate(r, protocol, seed, n_boot) for arch, r in by_arch.items() if arch != "gpt-sae"}
        if not aggs:
            continue
        c, g = aggs.get("crate"), aggs.get("gpt")
        row: dict[str, Any] = {"size": size, "protocol": protocol, "scorer": scorer}
        if c:
            row.update({"CRATE": c.mean, "CRATE 95% CI": fmt_ci(c.lo, c.hi), "CRATE var": c.var})
        if g:
            row.update({"GPT": g.mean, "GPT 95% CI": fmt_ci(g.lo, g.hi), "GPT var": g.var})
        if c and g:
            d = (difference(by_arch["crate"], by_arch["gpt"], protocol, seed, n_boot)
                 if c.layers_used and g.layers_used else {"difference": math.nan, "ci95": [math.nan, math.nan]})
            row.update({"CRATE-GPT": d["difference"], "CRATE-GPT 95% CI": fmt_ci(*d["ci95"])})
        key = (paper_row(size) or "", protocol)
        if key in PAPER_SCORES:
            row["paper CRATE"], row["paper GPT"] = PAPER_SCORES[key]
        if key in PAPER_VARIANCE:
            row["paper CRATE var"], row["paper GPT var"] = PAPER_VARIANCE[key]
        ordered = [a for _, a in sorted(aggs.items(), key=lambda kv: _arch_key(kv[0]))]  # CRATE / GPT, as the columns
        row["layers"] = " / ".join(dict.fromkeys(",".join(a.layers_used) for a in ordered))  # once when equal
        row["neurons"] = " / ".join(f"{a.n_neurons}" for a in ordered)
        rows.append(row)
    note = (
        "Scores are Pearson correlations x100: the mean over layers of the per-layer mean over neurons; `var` is "
        "the population variance of the x100 per-layer means, in (x100)^2 units as in the paper (layer means 7.8 "
        "and 8.3 give 0.06). 95% CIs: percentile bootstrap over neurons "
        f"({n_boot} resamples, seed {seed}); CRATE-GPT resamples the same neurons in both models when both scored "
        "the same neuron indices (paired), else each independently. The last layer of 6- and 12-layer models (only "
        "those) is excluded, as in the paper. `paper` columns: Bai & Ma (arXiv 2410.16443), "
        "SPEC.md section 6 (its S and B are the paper's 6L and 12L); `-` where the paper has no number or the "
        "size is not one of the paper's."
    )
    return Table("Neuron interpretability scores: ours beside the paper's", MAIN_COLUMNS, rows, note)


SAE_COLUMNS = ["size", "protocol", "scorer", "GPT-SAE", "GPT-SAE 95% CI", "GPT-SAE var", "GPT-SAE layers",
               "paper GPT-SAE", "paper GPT-SAE layers", "GPT-SAE-GPT", "GPT-SAE-GPT 95% CI", "CRATE-GPT-SAE",
               "CRATE-GPT-SAE 95% CI", "control GPT-SAE", "neurons"]


def sae_table(results: list[ModelResult], seed: int = 0, n_boot: int = N_BOOT) -> Table:
    """The paper's third system: GPT-SAE latents scored as neurons, beside the paper's numbers, GPT and CRATE
    (paired differences as in the main table) and its random-init control."""
    controls = {(r.size, p, r.scorer): r for r in results if r.random_init and r.arch == "gpt-sae" for p in r.scores}
    rows = []
    for (size, protocol, scorer), by_arch in _groups(results).items():
        if "gpt-sae" not in by_arch:
            continue
        sae = by_arch["gpt-sae"]
        a = aggregate(sae, protocol, seed, n_boot)
        row: dict[str, Any] = {"size": size, "protocol": protocol, "scorer": scorer, "GPT-SAE": a.mean,
                               "GPT-SAE 95% CI": fmt_ci(a.lo, a.hi), "GPT-SAE var": a.var, "neurons": a.n_neurons,
                               "GPT-SAE layers": ", ".join(f"{s.mean:.2f}" for s in a.layers)}
        paper = PAPER_SAE_LAYERS.get((paper_row(size) or "", protocol))
        if paper:
            row["paper GPT-SAE"], row["paper GPT-SAE layers"] = float(np.mean(paper)), ", ".join(f"{v:g}" for v in paper)
        for other, col in (("gpt", "GPT-SAE-GPT"), ("crate", "CRATE-GPT-SAE")):
            if other in by_arch and a.layers_used:
                pair = (sae, by_arch[other]) if other == "gpt" else (by_arch[other], sae)
                d = difference(*pair, protocol, seed, n_boot)
                row.update({col: d["difference"], f"{col} 95% CI": fmt_ci(*d["ci95"])})
        if (size, protocol, scorer) in controls:
            row["control GPT-SAE"] = aggregate(controls[(size, protocol, scorer)], protocol, seed, n_boot).mean
        rows.append(row)
    note = ("GPT-SAE: a sparse autoencoder on the GPT's MLP neurons (`crate sae train`), its latents scored as "
            "neurons (dead latents left out); means x100 over layers as in the main table. `paper GPT-SAE`: the "
            "per-layer scores the paper plots (SPEC.md 6a; Random-only and some others read off a figure, +-0.1) "
            "and their mean. Differences: paired bootstrap over neurons when both scored the same indices.")
    return Table("GPT-SAE, the paper's third system", SAE_COLUMNS, rows, note)


def sae_metrics_table(paths: list[str | Path]) -> Table:
    """Every SAE folder (SAELens's cfg.json beside our metrics.json) under `paths`, with its metrics."""
    rows = []
    folders = sorted({f.parent for p in paths for f in Path(p).rglob("metrics.json") if (f.parent / "cfg.json").is_file()})
    for folder in folders:
        m = _read_json(folder / "metrics.json")
        ce = m.get("ce_loss") or {}
        rows.append({"SAE": str(folder), "hook": m.get("hook"), "kind": m.get("architecture"), "d_sae": m.get("d_sae"),
                     "L0": m.get("l0"), "dead": m.get("dead_fraction"), "dense": m.get("dense_fraction"),
                     "explained var": m.get("explained_variance"), "cosine": m.get("cosine_similarity"),
                     "CE clean": ce.get("clean"), "CE SAE": ce.get("sae"),
                     "CE recovered vs zero": m.get("ce_recovered_vs_zero"),
                     "CE recovered vs mean": m.get("ce_recovered_vs_mean"), "tokens": m.get("n_tokens")})
    cols = ["SAE", "hook", "kind", "d_sae", "L0", "dead", "dense", "explained var", "cosine", "CE clean", "CE SAE",
            "CE recovered vs zero", "CE recovered vs mean", "tokens"]
    rule = next((_read_json(f / "metrics.json").get("dead_rule") for f in folders), "")
    return Table("SAE metrics", cols, rows,
                 "On validation tokens. L0: active latents per token; dead: " + (rule or "15 per 2M tokens, scaled")
                 + "; dense: active on more than 10% of tokens; explained variance about the mean; CE recovered: "
                 "(CE ablated - CE with the reconstruction spliced in) / (CE ablated - CE clean), zero- and "
                 "mean-ablation.")


def steering_section(paths: list[str | Path], out: Path) -> list[str]:
    """The steering measurement (`crate steer --sweep`): its table and plot, copied into the report."""
    import shutil

    from crate.eval.steer.sweep import RESULT, sweep_markdown

    lines: list[str] = []
    for i, f in enumerate(sorted({f for p in paths for f in Path(p).rglob(RESULT)})):
        result = _read_json(f)
        png = f.parent / "steer_sweep.png"
        lines += [f"From `{f.parent}`:", "", sweep_markdown(result)]
        if png.is_file():
            shutil.copyfile(png, out / f"steer_sweep_{i}.png")
            lines += [f"![steering: effect against cost](steer_sweep_{i}.png)", ""]
    return lines


def _arch_key(arch: str) -> tuple[int, str]:
    return (ARCH_ORDER.index(arch), "") if arch in ARCH_ORDER else (len(ARCH_ORDER), arch)


def layers_table(results: list[ModelResult], seed: int = 0, n_boot: int = N_BOOT) -> Table:
    rows = []
    for r in sorted(results, key=lambda r: (_size_key(r.size), r.random_init, _arch_key(r.arch), r.name)):
        for protocol in sorted(r.scores, key=_protocol_key):
            agg = aggregate(r, protocol, seed, n_boot)
            for s in agg.layers:
                rows.append({
                    "model": r.name, "arch": r.arch, "size": r.size, "random init": "yes" if r.random_init else "no",
                    "protocol": protocol, "scorer": r.scorer, "layer": s.layer, "mean x100": s.mean, "95% CI": fmt_ci(s.lo, s.hi),
                    "neurons": s.n, "NaN scores": s.n_nan, "used": "yes" if s.layer in agg.layers_used else "no",
                })
    cols = ["model", "arch", "size", "random init", "protocol", "scorer", "layer", "mean x100", "95% CI", "neurons", "NaN scores", "used"]
    return Table("Per-layer scores", cols, rows, "Mean over the scored neurons of each layer, x100, with bootstrap 95% CIs.")


def measures_table(results: list[ModelResult]) -> Table:
    names: list[str] = []
    for r in results:
        for m in r.measures.values():
            names += [k for k in m if k not in names]
    rows = []
    for r in sorted(results, key=lambda r: (_size_key(r.size), r.random_init, _arch_key(r.arch), r.name)):
        for layer in sorted(r.measures, key=layer_sort_key):
            rows.append({"model": r.name, "arch": r.arch, "size": r.size,
                         "random init": "yes" if r.random_init else "no", "layer": layer, **r.measures[layer]})
    return Table(
        "Explanation-free measures", ["model", "arch", "size", "random init", "layer", *names], rows,
        "Per-layer measures computed from the activations alone (no explainer, no simulator), as written by "
        "`crate interpret` into summary.json.",
    )


def controls_table(results: list[ModelResult], seed: int = 0, n_boot: int = N_BOOT) -> Table:
    """Trained models beside random-initialised ones of the same size and arch (from result folders flagged as
    random-init, and from the `controls` section of summary.json files)."""
    rows = []
    for r in sorted(results, key=lambda r: (_size_key(r.size), _arch_key(r.arch), r.random_init, r.name)):
        for protocol in sorted(r.scores, key=_protocol_key):
            a = aggregate(r, protocol, seed, n_boot)
            rows.append({"size": r.size, "arch": r.arch, "model": r.name, "init": "random" if r.random_init else "trained",
                         "protocol": protocol, "scorer": r.scorer, "mean x100": a.mean, "95% CI": fmt_ci(a.lo, a.hi),
                         "source": "scores"})
    scored = {r.path.resolve() for r in results if r.random_init}
    seen: set[Path] = set()
    for r in results:
        controls = r.summary.get("controls") or {}
        if not isinstance(controls, dict) or r.summary_path is None or r.summary_path in seen:
            continue
        seen.add(r.summary_path)  # one summary.json is read by every result of its folder (run_compare's)
        for name, c in controls.items():
            if not isinstance(c, dict) or r.summary_path.parent / f"{name}-control" in scored:
                continue  # run_compare scored this control into <folder>/<name>-control: its row is above
            agg = c.get("aggregate") if isinstance(c.get("aggregate"), dict) else c
            mean = agg.get("mean")
            ci = agg.get("ci95") or [None, None]
            if mean is None:
                continue
            scale = 100 if abs(float(mean)) <= 1 and not c.get("x100") else 1
            lo, hi = ((float(ci[0]) * scale, float(ci[1]) * scale) if ci[0] is not None else (math.nan, math.nan))
            rows.append({"size": c.get("size", r.size), "arch": c.get("arch", _guess_arch(name)), "model": name,
                         "init": "random", "protocol": canonical_protocol(str(c.get("protocol", ""))) or "-",
                         "mean x100": float(mean) * scale, "95% CI": fmt_ci(lo, hi), "source": "summary.json"})
    cols = ["size", "arch", "model", "init", "protocol", "scorer", "mean x100", "95% CI", "source"]
    has_control = any(row["init"] == "random" for row in rows)
    return Table(
        "Random-initialisation controls", cols, rows if has_control else [],
        "Scores of untrained (randomly initialised) models measure what the protocol finds without learning: a "
        "trained model's score is only meaningful above its control's." + ("" if has_control else
        " No random-init results were found (run `crate interpret --random-init` to add them)."),
    )


def val_loss_table(runs: list[TrainRun]) -> Table:
    rows = []
    for run in sorted(runs, key=lambda r: (_size_key(r.size), _arch_key(r.arch), r.name)):
        paper = PAPER_VAL_LOSS.get(run.size)
        paper_value = (paper[0] if run.arch == "crate" else paper[1]) if paper and run.arch in PAPER_ARCHS else None
        rows.append({"run": run.name, "arch": run.arch, "size": run.size, "steps": int(run.steps[-1]),
                     "final val loss": run.final, "best val loss": min(run.val_loss), "paper val loss": paper_value})
    return Table("Validation loss", ["run", "arch", "size", "steps", "final val loss", "best val loss", "paper val loss"],
                 rows, "Paper: validation loss on the Pile read off the paper's figure (+-0.01), SPEC.md section 4.")


# --- plots -----------------------------------------------------------------------------------------------
COLORS = {"crate": "tab:blue", "gpt": "tab:orange", "gpt-sae": "tab:green"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_scores(by_arch: dict[str, ModelResult], size: str, protocol: str, path: Path, seed: int = 0,
                      scorer: str = "-") -> Path:
    """Each system's per-layer means with intervals, on one axis of every layer any of them scored (a system
    scored on fewer layers is drawn at its own)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    aggs = {arch: aggregate(r, protocol, seed) for arch, r in sorted(by_arch.items(), key=lambda kv: _arch_key(kv[0]))}
    layers = sorted({s.layer for agg in aggs.values() for s in agg.layers}, key=layer_sort_key)
    position = {layer: i for i, layer in enumerate(layers)}
    for i, (arch, agg) in enumerate(aggs.items()):
        x = np.array([position[s.layer] for s in agg.layers]) + (i - (len(aggs) - 1) / 2) * 0.12
        m = np.array([s.mean for s in agg.layers])
        err = np.array([[s.mean - s.lo for s in agg.layers], [s.hi - s.mean for s in agg.layers]])
        ax.errorbar(x, m, yerr=np.nan_to_num(err), marker="o", capsize=3, color=COLORS.get(arch),
                    label=f"{arch.upper()} (mean {agg.mean:.2f})")
        key = (paper_row(size) or "", protocol)
        if key in PAPER_SCORES and arch in PAPER_ARCHS:
            ax.axhline(PAPER_SCORES[key][PAPER_ARCHS.index(arch)], color=COLORS.get(arch), ls="--", lw=1,
                       label=f"paper {arch.upper()} mean")
    ax.set_xticks(np.arange(len(layers)), layers)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("score (correlation x100)")
    ax.set_title(f"{size}, {protocol}{'' if scorer == '-' else ', ' + scorer}: per-layer scores, 95% CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_val_loss(runs: list[TrainRun], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run in sorted(runs, key=lambda r: (_size_key(r.size), _arch_key(r.arch), r.name)):
        ax.plot(run.steps, run.val_loss, marker="." if len(run.steps) < 50 else None,
                color=COLORS.get(run.arch), alpha=0.9, label=f"{run.name} ({run.arch}, {run.size})")
        paper = PAPER_VAL_LOSS.get(run.size)
        if paper and run.arch in ARCH_ORDER:
            ax.axhline(paper[PAPER_ARCHS.index(run.arch)], color=COLORS.get(run.arch), ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss (dashed: the paper's final values)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the report ------------------------------------------------------------------------------------------
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "x"


def write_report(paths: list[str | Path], out: str | Path, seed: int = 0, n_boot: int = N_BOOT,
                 owned: bool = False) -> Path:
    """Write every table and plot for the results and runs found under `paths` into `out`; returns index.md.
    `out` must be new, empty or an earlier report (`owned`: a pipeline's own folder, checked by its caller)."""
    results, runs = discover(paths)
    if not results and not runs:
        raise ReportError(
            f"no interpretability results (folders with scores/<protocol>/<layer>.jsonl) and no training runs "
            f"(metrics CSV with a validation-loss column) under {', '.join(map(str, paths))}: "
            f"run `crate interpret` / `crate train` first, or point at their output folders"
        )
    out = Path(out)
    if not owned:
        from crate.provenance import check_owned

        check_owned(out, ("index.md", *REPORT_CSVS), "another --out")
    out.mkdir(parents=True, exist_ok=True)
    index = ["# crate-lm reproduction report", ""]
    index.append(f"Inputs: {len(results)} interpretability result(s), {len(runs)} training run(s).")
    index.append("")
    if results:
        main = main_table(results, seed, n_boot)
        main.write(out, "main_table")
        index += ["## Interpretability scores (the paper's main table)", "", main.note, "", main.to_markdown(),
                  "Files: [main_table.md](main_table.md), [main_table.csv](main_table.csv), [main_table.tex](main_table.tex)", ""]
        index += ["## Per-layer scores (the paper's figure)", ""]
        for (size, protocol, scorer), by_arch in _groups(results).items():
            tag = "" if scorer in ("-", "stats") else f"_{_slug(scorer)}"
            name = f"scores_{_slug(size)}_{_slug(protocol)}{tag}.png"
            plot_layer_scores(by_arch, size, protocol, out / name, seed, scorer)
            index.append(f"![{size} {protocol} {scorer}]({name})")
            index.append("")
        layers = layers_table(results, seed, n_boot)
        layers.write(out, "layers")
        index += ["Per-layer numbers: [layers.md](layers.md), [layers.csv](layers.csv), [layers.tex](layers.tex)", ""]
        measures = measures_table(results)
        measures.write(out, "measures")
        index += ["## Explanation-free measures", "", measures.note, ""]
        index += [measures.to_markdown() if measures.rows else "No measures in the results' summary.json.", ""]
        index += ["Files: [measures.md](measures.md), [measures.csv](measures.csv), [measures.tex](measures.tex)", ""]
        controls = controls_table(results, seed, n_boot)
        controls.write(out, "controls")
        index += ["## Random-initialisation controls", "", controls.note, ""]
        if controls.rows:
            index += [controls.to_markdown()]
        index += ["Files: [controls.md](controls.md), [controls.csv](controls.csv), [controls.tex](controls.tex)", ""]
        sae = sae_table(results, seed, n_boot)
        if sae.rows:
            sae.write(out, "gpt_sae")
            index += ["## GPT-SAE (the paper's third system)", "", sae.note, "", sae.to_markdown(),
                      "Files: [gpt_sae.md](gpt_sae.md), [gpt_sae.csv](gpt_sae.csv), [gpt_sae.tex](gpt_sae.tex)", ""]
    sae_m = sae_metrics_table(paths)
    if sae_m.rows:
        sae_m.write(out, "sae_metrics")
        index += ["## SAE metrics", "", sae_m.note, "", sae_m.to_markdown(), ""]
    steering = steering_section(paths, out)
    if steering:
        index += ["## Steering, measured", "", "Intended effect: the mean log-probability rise of each unit's top "
                  "output tokens (chosen on half the sequences, measured on the other half); collateral: KL of the "
                  "next-token distribution over the other tokens, and the loss rise where the next token is not one "
                  "of them; means over units with bootstrap 95% intervals (crate.eval.steer.sweep).", "", *steering]
    if runs:
        vt = val_loss_table(runs)
        vt.write(out, "val_loss")
        plot_val_loss(runs, out / "val_loss.png")
        index += ["## Validation loss", "", vt.note, "", vt.to_markdown(), "![validation loss](val_loss.png)", "",
                  "Files: [val_loss.md](val_loss.md), [val_loss.csv](val_loss.csv), [val_loss.tex](val_loss.tex)", ""]
    index += ["## Inputs", ""]
    index += [f"- interpretability: `{r.path}`: {r.label}, protocols {', '.join(r.scores)}" for r in results]
    index += [f"- training: `{run.path}`: {run.arch}, {run.size}, {len(run.steps)} validation points" for run in runs]
    (out / "index.md").write_text("\n".join(index) + "\n", encoding="utf-8")
    return out / "index.md"
