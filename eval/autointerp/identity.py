"""The identities of an interpret run's outputs: what the records and the scores depend on (weights, config,
tokens, recording parameters, protocol, explainer, simulator, prompts, seed). Each is stamped beside its output
and hashed into its key (crate.provenance): a change to any of them here changes which outputs are reused."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from crate.eval.autointerp.config import InterpretConfig
from crate.eval.autointerp.explainers import Explainer
from crate.eval.autointerp.prompts import PROMPT_VERSION
from crate.eval.autointerp.protocols import Protocol
from crate.eval.autointerp.simulators import Simulator
from crate.eval.record.recorder import RecordingSpec


# 2: a constant prediction of a varying neuron scores 0 (was NaN); fuzzing's wrong marks only on inactive tokens
# 3: the lines gain auprc and random_score (with their notes), the scores that pass NeuronEval's sanity checks
# 4: and intruder, intruder_chance (EleutherAI delphi's intruder score: crate.eval.autointerp.intruder)
RESULTS_VERSION = 4


def model_identity(model: Any, control: bool, seed: int) -> dict[str, Any]:
    """What the recorded activations depend on: every weight (content hash), the config, the random-init control.
    The checkpoint's path is not part of it (moving a checkpoint changes nothing); it goes in the provenance."""
    from crate.config import IMPLEMENTATION_KEYS
    from crate.provenance import weights_hash

    config = {k: v for k, v in model.config.to_dict().items() if k not in IMPLEMENTATION_KEYS}
    return {"arch": model.config.arch, "config": config, "n_params": int(model.num_params()),
            "weights_fingerprint": weights_hash(model), "control_random_init": control,
            "control_seed": seed if control else None,
            **({"sae": model.sae_identity} if hasattr(model, "sae_identity") else {}),
            **({"planted": model.planted_identity} if hasattr(model, "planted_identity") else {})}


def data_identity(stream: np.ndarray, n_used: int, token_strings: Sequence[str], split: str,
                  manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The tokens read (content hash), their strings and the tokenizer: what the records depend on."""
    from crate.provenance import digest

    tokens = np.ascontiguousarray(np.asarray(stream[:n_used]).astype(np.int64, copy=False))
    return {"tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(), "n_tokens": int(n_used), "split": split,
            "token_strings": digest(list(token_strings)),
            "tokenizer": ((manifest or {}).get("tokenizer") or {}).get("sha256")}


# Recording parameters that choose how, not what: they may differ between a run and its reuse.
_SPEC_IMPLEMENTATION = ("batch_size", "device", "selectivity_max_gb")


def records_identity(model_id: dict[str, Any], data_id: dict[str, Any], spec: RecordingSpec,
                     layers: list[str]) -> dict[str, Any]:
    return {"stage": "records", "model": model_id, "data": data_id, "layers": layers,
            "spec": {k: v for k, v in spec.to_dict().items() if k not in _SPEC_IMPLEMENTATION}}


def scores_identity(records: dict[str, Any], protocol: Protocol, explainer: Explainer, simulator: Simulator,
                    cfg: InterpretConfig) -> dict[str, Any]:
    return {"stage": "scores", "results_version": RESULTS_VERSION, "records": records, "protocol": protocol.name,
            "explainer": explainer.identity, "simulator": simulator.identity, "prompt_version": PROMPT_VERSION,
            "seed": cfg.seed, "extra_scores": cfg.extra_scores}


__all__ = ["RESULTS_VERSION", "model_identity", "data_identity", "records_identity", "scores_identity"]
