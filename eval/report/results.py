"""The reproduction report's inputs, read from disk: interpretability results and training runs.

Inputs are found by walking the given paths (`discover`): an interpretability result is a folder with `scores/
<protocol>/<layer>.jsonl` (the layout of `crate.eval.autointerp.interpret`); a training run is a folder with a
metrics CSV that has a validation-loss column. The per-neuron score lines are the data (summary.json is only read
for the explanation-free measures and the controls), and one protocol folder never mixes provenances.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crate.config import PAPER_SIZES
from crate.errors import CrateError
from crate.eval.models import run_config, trained_size
from crate.eval.report.paper import canonical_protocol
from crate.eval.validity.report import VALIDITY


class ReportError(CrateError):
    """Inputs a report cannot be made from (no results found, malformed score files)."""


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
    # protocol -> <path>/validity/<protocol>/validity.json (crate.eval.validity.run), when made from these scores
    validity: dict[str, dict[str, Any]] = field(default_factory=dict)

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


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object; {} when it is missing or not JSON (the report's optional inputs)."""
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
    for preset, s in PAPER_SIZES.items():
        if shape == s and config.get("vocab_size", 50304) >= 50257:
            return preset
    n = config.get("n_layer")
    return f"{n}-layer" if n else "unknown"


def guess_arch(*texts: str) -> str:
    """The arch a name suggests (a folder's, a checkpoint's), when no config says it."""
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
    if checkpoint and entry.get("sae"):  # crate.eval.models.split_sae_spec's syntax, without its look at the disk
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
    provenance = read_json(path / "provenance.json")
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
    arch = entry.get("arch") or config.get("arch") or guess_arch(path.name, str(checkpoint or ""))
    if entry.get("sae") and not str(arch).endswith("-sae"):  # SAE latents scored as neurons (crate.eval.sae.attach)
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
    protocol_dir: dict[str, str] = {}
    for pdir in sorted(p for p in (path / "scores").iterdir() if p.is_dir()):
        protocol = canonical_protocol(pdir.name)
        protocol_dir[protocol] = pdir.name
        layers = {f.stem: read_scores(f) for f in sorted(pdir.glob("*.jsonl"))}
        check_one_provenance(pdir, [row for rows in layers.values() for row in rows])
        if layers:
            result.scores[protocol] = dict(sorted(layers.items(), key=lambda kv: layer_sort_key(kv[0])))
    for candidate in (path / "summary.json", path.parent / "summary.json"):
        summary = read_json(candidate)
        if summary:
            result.summary, result.summary_path = summary, candidate.resolve()
            break
    for protocol, layers in result.scores.items():
        v = read_json(path / VALIDITY / protocol_dir[protocol] / "validity.json")
        key = next((r.get("provenance") or {} for rows in layers.values() for r in rows), {}).get("key")
        if v and (v.get("provenance") or {}).get("key") == key:  # checks of other scores (replaced since): not these
            result.validity[protocol] = v
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
    # a step validated twice (the periodic validation at the last step, then the final one over the whole split):
    # the later row stands
    last = dict(zip(steps, losses))
    steps, losses = list(last), list(last.values())
    config, metadata = run_config(path)
    model = config.get("model") if isinstance(config.get("model"), dict) else config
    arch = str(model.get("arch") or config.get("arch") or guess_arch(path.name))
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
            if VALIDITY in d.relative_to(p).parts:
                continue  # an interpret run's scorer checks (its planted units' run), not a model's result
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
               "sae_metrics.csv", "sound_metrics.csv"}
RUN_CONFIGS = ("config.yaml", "config.yml", "resolved_config.yaml", "config.json")
