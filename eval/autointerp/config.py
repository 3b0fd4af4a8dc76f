"""What one interpret run is asked to do (InterpretConfig, the options of `crate interpret`) and what it was
resolved to before any work (InterpretPlan: the loaded inputs, the selection and the identities). Apart from the
stages so that every stage can take them without importing another stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crate.eval.autointerp.explainers import Explainer
from crate.eval.autointerp.protocols import Protocol
from crate.eval.autointerp.simulators import Simulator
from crate.eval.record.recorder import RecordingSpec


@dataclass
class InterpretConfig:
    protocol: str = "tar"
    explainer: str = "stats"  # "stats", "smollm2", "hf:<id|dir|file.gguf>", "http://host:port/v1#model"
    simulator: str = "stats"
    layers: list[int | str] | None = None  # None: every layer's neurons
    neurons: int | list[int] | None = None  # None: all; int: a seeded sample of that many per layer; list: these
    n_tokens: int | None = None  # None: the protocol's (8000 x 1024 or 800 x 1024), capped by the split
    token_offset: int = 0  # tokens of the split skipped before recording (a stream given directly is read as given)
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


__all__ = ["InterpretConfig", "InterpretPlan"]
