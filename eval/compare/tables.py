"""The comparison's numbers as Markdown (to read) and CSV (to load elsewhere), from the result dict of
crate.eval.compare.run: CKA of every pair of layers, stitching penalties, CKA along training."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

KIND_LABELS = {"resid": "residual stream", "neurons": "neurons"}


def number(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def same_depth(matrix: list[list[float]]) -> float:
    """Mean CKA of layer i against layer i, over the layers both models have (NaN left out)."""
    vals = [matrix[i][i] for i in range(min(len(matrix), len(matrix[0]) if matrix else 0))]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([["" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v for v in r] for r in rows])
    return buf.getvalue()


def cka_csv(result: dict[str, Any]) -> str:
    rows = []
    for p in result["cka"]:
        for kind in KIND_LABELS:
            ub, b = p[kind]["unbiased"], p[kind]["biased"]
            rows += [[p["a"], p["b"], p["same_arch"], kind, i, j, ub[i][j], b[i][j]]
                     for i in range(len(ub)) for j in range(len(ub[i]))]
    return _csv(["model_a", "model_b", "same_arch", "kind", "layer_a", "layer_b", "cka_unbiased", "cka_biased"], rows)


def pairs_markdown(result: dict[str, Any]) -> str:
    """One line per pair: same architecture or not, and the mean same-depth CKA of each kind and estimator."""
    lines = ["| model A | model B | same architecture | residual CKA, same depth (unbiased / biased) | "
             "neuron CKA, same depth (unbiased / biased) |", "|---|---|---|---|---|"]
    for p in result["cka"]:
        cells = [f"{number(same_depth(p[k]['unbiased']))} / {number(same_depth(p[k]['biased']))}" for k in KIND_LABELS]
        lines.append(f"| {p['a']} | {p['b']} | {'yes' if p['same_arch'] else 'no'} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def cka_markdown(result: dict[str, Any]) -> str:
    """The pairs' summary, then for each pair and kind the matrix of every layer of A (rows) against every layer of
    B (columns): unbiased CKA, the biased one in brackets."""
    out = ["# CKA between layers\n", "Linear CKA on the same held-out tokens; unbiased HSIC (Nguyen et al. 2021), the "
           "biased estimator (Kornblith et al. 2019) in brackets. Same depth: layer i of A against layer i of B.\n",
           pairs_markdown(result)]
    for p in result["cka"]:
        for kind, label in KIND_LABELS.items():
            ub, b = p[kind]["unbiased"], p[kind]["biased"]
            out.append(f"\n## {p['a']} (rows) vs {p['b']} (columns): {label}\n")
            out.append("| layer | " + " | ".join(str(j) for j in range(len(ub[0]))) + " |")
            out.append("|---|" + "---|" * len(ub[0]))
            out += [f"| {i} | " + " | ".join(f"{number(ub[i][j])} [{number(b[i][j])}]" for j in range(len(ub[i])))
                    + " |" for i in range(len(ub))]
    return "\n".join(out) + "\n"


STITCH_COLUMNS = ["kind", "source", "target", "layer_source", "layer_target", "loss_target", "loss_stitched", "penalty",
                  "train_loss_first", "train_loss_last"]


def stitch_csv(rows: list[dict[str, Any]]) -> str:
    return _csv(STITCH_COLUMNS, [[r[c] for c in STITCH_COLUMNS] for r in rows])


def stitch_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Stitching penalties\n", "A's residual stream after block i, an affine map, B from block i+1 on; both "
             "frozen. Penalty: the stitched model's held-out loss minus B's own (nats/token). self: a model into "
             "itself (the floor); control: a random-initialised copy of the source (what the map alone recovers).\n",
             "| kind | source -> target | layer | B's loss | stitched loss | penalty |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['source']} -> {r['target']} | {r['layer_source']} | {number(r['loss_target'], 4)} | "
              f"{number(r['loss_stitched'], 4)} | {number(r['penalty'], 4)} |" for r in rows]
    return "\n".join(lines) + "\n"


def trajectory_csv(traj: dict[str, Any]) -> str:
    rows = []
    for s, step in enumerate(traj["steps"]):
        for kind in KIND_LABELS:
            rows += [[step, kind, layer, v, traj[kind]["biased"][s][layer]]
                     for layer, v in enumerate(traj[kind]["unbiased"][s])]
    return _csv(["step", "kind", "layer", "cka_unbiased", "cka_biased"], rows)


def trajectory_markdown(traj: dict[str, Any]) -> str:
    out = ["# CKA against the final state, along training\n", f"Final state: `{traj['final']}`. Each layer at each "
           "grid checkpoint against the same layer of the final state (unbiased; biased in brackets).\n"]
    for kind, label in KIND_LABELS.items():
        n = len(traj[kind]["unbiased"][0]) if traj["steps"] else 0
        out += [f"\n## {label}\n", "| step | " + " | ".join(f"layer {i}" for i in range(n)) + " |",
                "|---|" + "---|" * n]
        out += [f"| {step} | " + " | ".join(f"{number(u)} [{number(b)}]" for u, b in
                                           zip(traj[kind]["unbiased"][s], traj[kind]["biased"][s])) + " |"
                for s, step in enumerate(traj["steps"])]
    return "\n".join(out) + "\n"


__all__ = ["KIND_LABELS", "number", "same_depth", "cka_csv", "pairs_markdown", "cka_markdown", "stitch_csv",
           "stitch_markdown", "trajectory_csv", "trajectory_markdown"]
