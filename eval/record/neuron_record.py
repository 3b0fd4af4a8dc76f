"""The data model, after OpenAI's automated-interpretability: plain dataclasses serialised to JSON.

Field names and `dataclass_name` tags equal `neuron_explainer`'s (`NeuronId`, `ActivationRecord`,
`NeuronRecord`), so a record we write loads there with
`neuron_explainer.fast_dataclasses.loads` and vice versa: that loader passes every JSON key to the dataclass
constructor, so one extra key makes the whole file unreadable. Our extras (positions, activation frequency,
selectivity) live in the binary cache beside the JSON, never as JSON keys.

A NeuronRecord's moments are over every recorded token (all positions of the recorded stream): `mean`,
`variance` (population: divided by n), `skewness` (m3 / m2^1.5) and `kurtosis` (excess: m4 / m2^2 - 3, 0 for
a normal distribution), with m_k the central moments divided by n; null when undefined (a constant neuron).
neuron_explainer declares these fields (default NaN) but does not compute them, so its code fixes no convention;
ours is scipy.stats' default (`bias=True`, `fisher=True`).
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
    variance: float | None = math.nan
    skewness: float | None = math.nan
    kurtosis: float | None = math.nan
    most_positive_activation_records: list[ActivationRecord] = field(default_factory=list)

    @property
    def max_activation(self) -> float:
        acts = [a for r in self.most_positive_activation_records for a in r.activations]
        return max(acts) if acts else 0.0


MOMENTS = ("mean", "variance", "skewness", "kurtosis")  # NeuronRecord's statistics: JSON null <-> NaN


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
            for key in MOMENTS:
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
    "NeuronId", "ActivationRecord", "NeuronRecord", "to_dict", "from_dict", "dumps", "loads", "save_neuron_record",
    "load_neuron_record", "record_path",
]
