"""The data model, after OpenAI's automated-interpretability: plain dataclasses serialised to JSON.

Field names and `dataclass_name` tags equal `neuron_explainer`'s (`NeuronId`, `ActivationRecord`,
`NeuronRecord`, `ScoredSimulation`, ...), so a record we write loads there with
`neuron_explainer.fast_dataclasses.loads` and vice versa. Our extras (positions, higher moments) live in
the binary cache beside the JSON, never as extra JSON keys (their loader rejects unknown fields).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_REGISTRY: dict[str, type] = {}


def _register(cls: type) -> type:
    _REGISTRY[cls.__name__] = cls
    return cls


@_register
@dataclass
class NeuronId:
    layer_index: int
    neuron_index: int


@_register
@dataclass
class ActivationRecord:
    tokens: list[str]
    activations: list[float]


@_register
@dataclass
class NeuronRecord:
    neuron_id: NeuronId
    random_sample: list[ActivationRecord] = field(default_factory=list)
    random_sample_by_quantile: list[list[ActivationRecord]] | None = None
    quantile_boundaries: list[float] | None = None
    mean: float | None = math.nan
    stdev: float | None = math.nan
    most_positive_activation_records: list[ActivationRecord] = field(default_factory=list)

    @property
    def max_activation(self) -> float:
        acts = [a for r in self.most_positive_activation_records for a in r.activations]
        return max(acts) if acts else 0.0


@_register
@dataclass
class ActivationScale:  # neuron_explainer's is an enum; we store its value string
    value: str = "neuron_activations"


@_register
@dataclass
class SequenceSimulation:
    tokens: list[str]
    expected_activations: list[float]
    activation_scale: str = "neuron_activations"
    distribution_values: list[list[float]] = field(default_factory=list)
    distribution_probabilities: list[list[float]] = field(default_factory=list)


@_register
@dataclass
class ScoredSequenceSimulation:
    simulation: SequenceSimulation
    true_activations: list[float]
    ev_correlation_score: float
    rsquared_score: float | None = None
    absolute_dev_explained_score: float | None = None


@_register
@dataclass
class ScoredSimulation:
    scored_sequence_simulations: list[ScoredSequenceSimulation]
    ev_correlation_score: float | None = None
    rsquared_score: float | None = None
    absolute_dev_explained_score: float | None = None


def to_dict(obj: Any) -> Any:
    """Dataclasses -> dicts tagged with `dataclass_name` (neuron_explainer's convention), recursively."""
    if type(obj) is ActivationRecord:  # the bulk of a NeuronRecord: no generic recursion
        return {"dataclass_name": "ActivationRecord", "tokens": obj.tokens,
                "activations": [a if math.isfinite(a) else None for a in obj.activations]}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        d = {"dataclass_name": type(obj).__name__}
        for f in dataclasses.fields(obj):
            d[f.name] = to_dict(getattr(obj, f.name))
        return d
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN; neuron_explainer's orjson writes null too
    if hasattr(obj, "item"):  # numpy / torch scalars
        return to_dict(obj.item())
    return obj


def from_dict(d: Any) -> Any:
    """The inverse of `to_dict`: dicts with a known `dataclass_name` become dataclasses."""
    if isinstance(d, list):
        return [from_dict(x) for x in d]
    if not isinstance(d, dict):
        return d
    name = d.get("dataclass_name")
    values = {k: from_dict(v) for k, v in d.items() if k != "dataclass_name"}
    if name in _REGISTRY:
        cls = _REGISTRY[name]
        if cls is NeuronRecord:
            for key in ("mean", "stdev"):
                if values.get(key) is None:
                    values[key] = math.nan
        return cls(**values)
    return values


def dumps(obj: Any) -> str:
    return json.dumps(to_dict(obj), ensure_ascii=False, allow_nan=False)


def loads(s: str | bytes) -> Any:
    return from_dict(json.loads(s))


def save_neuron_record(record: NeuronRecord, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(record), encoding="utf-8")


def load_neuron_record(path: str | Path) -> NeuronRecord:
    rec = loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(rec, NeuronRecord):
        raise ValueError(f"{path} does not hold a NeuronRecord")
    return rec


def record_path(records_dir: str | Path, layer: int | str, neuron: int) -> Path:
    return Path(records_dir) / str(layer) / f"{neuron}.json"


__all__ = [
    "NeuronId", "ActivationRecord", "NeuronRecord", "SequenceSimulation", "ScoredSequenceSimulation",
    "ScoredSimulation", "to_dict", "from_dict", "dumps", "loads", "save_neuron_record", "load_neuron_record",
    "record_path",
]
