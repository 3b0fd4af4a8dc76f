"""Hand-made interpretability results and training runs in the layout of `crate.eval.autointerp.interpret` / `crate train`.

The numbers are chosen so the report's statistics can be checked by hand (see tests/test_report.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

PAPER_2L = dict(n_layer=2, n_head=4, n_embd=128, vocab_size=50304, block_size=1024)
PAPER_S = dict(n_layer=6, n_head=12, n_embd=768, vocab_size=50304, block_size=1024)
NASTY = ["<script>alert('x')</script>", " &amp;", ' "q"', "\n", "é", "</td>"]


def record_json(layer: int, neuron: int, scale: float = 1.0, nasty: bool = False) -> dict:
    def rec(k: int, peak: float) -> dict:
        tokens = [f" t{k}_{j}" for j in range(8)]
        if nasty:
            tokens[:len(NASTY)] = NASTY
        acts = [0.0] * 8
        acts[4] = peak
        acts[5] = peak / 2
        return {"dataclass_name": "ActivationRecord", "tokens": tokens, "activations": acts}

    return {
        "dataclass_name": "NeuronRecord",
        "neuron_id": {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": neuron},
        "random_sample": [rec(100 + k, 0.0 if k % 2 else 0.1 * scale) for k in range(4)],
        "random_sample_by_quantile": [[rec(200 + b, 0.2 * b * scale)] for b in range(3)],
        "quantile_boundaries": [0.0, 0.2, 0.4, 1.0],
        "mean": 0.05 * scale, "variance": 0.01 * scale ** 2, "skewness": 1.5, "kurtosis": 2.0,
        "most_positive_activation_records": [rec(k, scale * (10 - k) / 10) for k in range(10)],
    }


def score_line(layer: int, neuron: int, score: float, explanation: str) -> dict:
    true = [[0.0, 0.0, 0.0, 0.0, 10.0, 5.0, 0.0, 0.0], [0.0] * 8]
    expected = [[0.1, 0.0, 0.2, 0.0, 6.0, 2.0, 0.0, 0.1], [0.5] * 8]
    return {
        "layer": layer, "neuron": neuron, "explanation": explanation, "true_activations": true,
        "expected_activations": expected, "record_ids": ["top:1", "random:0"],
        "score": None if math.isnan(score) else score, "score_x100": None if math.isnan(score) else 100 * score,
        "rsquared": 0.1, "absolute_dev_explained": 0.1, "detection": None, "fuzzing": None,
        "provenance": {"protocol": "tar"},
    }


def make_result(root: Path, name: str, arch: str, config: dict, scores: dict[str, dict[int, list[float]]],
                random_init: bool = False, measures: dict | None = None, controls: dict | None = None,
                nasty: bool = False) -> Path:
    """scores: protocol -> layer -> per-neuron scores (NaN allowed). Writes provenance, records, scores, summary."""
    out = root / name
    (out / "scores").mkdir(parents=True, exist_ok=True)
    prov = {"models": {name: {"path": f"runs/{name}/final", "arch": arch, "config": {"arch": arch, **config},
                              "random_init": random_init}}, "protocol": list(scores)}
    (out / "provenance.json").write_text(json.dumps(prov))
    for protocol, layers in scores.items():
        (out / "scores" / protocol).mkdir(parents=True, exist_ok=True)
        for layer, vals in layers.items():
            lines = [json.dumps(score_line(layer, i, v, f"{arch} layer {layer} neuron {i}: " + ("commas and periods" if i % 2 else "names of people")))
                     for i, v in enumerate(vals)]
            (out / "scores" / protocol / f"{layer}.jsonl").write_text("\n".join(lines) + "\n")
            for i in range(len(vals)):
                p = out / "records" / str(layer) / f"{i}.json"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(json.dumps(record_json(layer, i, 1.0 + i, nasty)))
    summary = {"provenance": prov, "models": {name: {"layers": {str(k): {"measures": v} for k, v in (measures or {}).items()}}}}
    if controls:
        summary["controls"] = controls
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def make_run(root: Path, name: str, arch: str, preset: str, val: list[tuple[int, float]]) -> Path:
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(f"name: {name}\nmodel:\n  arch: {arch}\n  preset: {preset}\n")
    lines = ["step,train_loss,val_loss"]
    for step, v in val:
        lines.append(f"{step - 5},{v + 0.3},")
        lines.append(f"{step},{v + 0.2},{v}")
    (out / "metrics.csv").write_text("\n".join(lines) + "\n")
    return out


def make_paper_like(root: Path) -> Path:
    """Results of the 2L and S sizes for both archs, a random-init control, and two training runs."""
    nan = float("nan")
    res = root / "interpret"
    make_result(res, "crate-2L", "crate", PAPER_2L, {"tar": {0: [0.1, 0.2, 0.3, nan], 1: [0.0, 0.1]}},
                measures={0: {"sparsity": 0.9, "selectivity": {"token": 0.3}}, 1: {"sparsity": 0.8, "selectivity": {"token": 0.25}}},
                nasty=True)
    make_result(res, "gpt-2L", "gpt", PAPER_2L, {"tar": {0: [0.05, 0.05], 1: [0.1, 0.1, 0.1]}},
                measures={0: {"sparsity": 0.5}, 1: {"sparsity": 0.4}})
    make_result(res, "crate-2L-random-init", "crate", PAPER_2L, {"tar": {0: [0.01, 0.03], 1: [0.0]}}, random_init=True)
    make_result(res, "crate-S", "crate", PAPER_S, {"tar": {k: [k / 100, k / 100] for k in range(6)},
                                                   "random": {k: [0.02] for k in range(6)}})
    make_result(res, "gpt-S", "gpt", PAPER_S, {"tar": {k: [0.05, 0.07] for k in range(6)}})
    runs = root / "runs"
    make_run(runs, "crate-2L", "crate", "2L", [(100, 5.0), (200, 4.5), (300, 4.2)])
    make_run(runs, "gpt-2L", "gpt", "2L", [(100, 4.8), (200, 4.1), (300, 3.9)])
    return root
