"""The comparison's output folder:

    compare.json        every number, the settings and each model's identity
    index.md            what was compared, the pairs (same architecture or not) and the reading against the noise floor
    cka.md, cka.csv     CKA of every pair of layers, both estimators; cka-<A>-vs-<B>.png heatmaps
    stitch.md, .csv     stitching penalties (unless --no-stitch)
    trajectory.md, .csv, .png   CKA against the final state along training (with --trajectory)
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from crate.eval.compare.tables import (
    KIND_LABELS, cka_csv, cka_markdown, number, pairs_markdown, same_depth, stitch_csv, stitch_markdown,
    trajectory_csv, trajectory_markdown,
)

RESULT = "compare.json"


def heatmap_name(a: str, b: str) -> str:
    safe = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "_", s)  # noqa: E731
    return f"cka-{safe(a)}-vs-{safe(b)}.png"


def _mean(vals: list[float]) -> float:
    vals = [v for v in vals if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def noise_floor(result: dict[str, Any]) -> list[str]:
    """Same-depth CKA of pairs of one architecture (seed vs seed: the floor) beside pairs across architectures."""
    lines = []
    for kind, label in KIND_LABELS.items():
        groups = {s: [same_depth(p[kind]["unbiased"]) for p in result["cka"] if p["same_arch"] == s]
                  for s in (True, False)}
        if groups[True] and groups[False]:
            lines.append(f"- {label}: same-architecture pairs {number(_mean(groups[True]))} (n={len(groups[True])}), "
                         f"across architectures {number(_mean(groups[False]))} (n={len(groups[False])})")
    if not lines:
        return ["No noise floor: give two checkpoints of one architecture (two training seeds) as well, e.g. "
                "`-c crate=A crate2=B gpt=C gpt2=D`, to read CRATE-vs-GPT against seed-vs-seed."]
    return ["Mean same-depth CKA (unbiased). A cross-architecture value within the same-architecture one means the "
            "architectures differ no more than two seeds of one do:", *lines]


def stitch_summary(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["source"], r["target"]), []).append(r["penalty"])
    lines = ["| kind | source -> target | mean penalty over layers (nats/token) |", "|---|---|---|"]
    lines += [f"| {k} | {s} -> {t} | {number(_mean(v), 4)} |" for (k, s, t), v in groups.items()]
    return "\n".join(lines)


def index_markdown(result: dict[str, Any], files: list[str]) -> str:
    st = result["settings"]
    out = ["# crate compare\n"]
    if result["models"]:
        out += ["| model | arch | layers | width | neurons/layer | checkpoint |", "|---|---|---|---|---|---|"]
        out += [f"| {n} | {m['arch']} | {m['n_layer']} | {m['n_embd']} | {m['n_neurons']} | `{m['checkpoint']}` |"
                for n, m in result["models"].items()]
    out.append(f"\nHeld-out tokens: {st['n_tokens']:,} of `{result['data']['dir']}` (val), sequences of "
               f"{st['seq_len']}, CKA over {st['n_minibatches']} minibatches of {st['minibatch_tokens']} tokens.\n")
    if result["cka"]:
        out += ["## Do they learn the same thing?\n", pairs_markdown(result), *noise_floor(result), ""]
    if result.get("stitch"):
        out += ["## Stitching\n", stitch_summary(result["stitch"]), ""]
    if result.get("trajectory"):
        out += ["## Along training\n", f"CKA of each layer against `{result['trajectory']['final']}` at "
                f"{len(result['trajectory']['steps'])} grid checkpoints: trajectory.md, trajectory.png\n"]
    out += ["## Files\n", *[f"- [{f}]({f})" for f in files]]
    return "\n".join(out) + "\n"


def write_outputs(result: dict[str, Any], out: Path) -> list[str]:
    """Every file of the folder (index.md and compare.json last); the names written, also kept in compare.json."""
    from crate.atomic import write_bytes
    from crate.eval.compare.plots import cka_heatmap, trajectory_plot
    from crate.provenance import canonical

    files = []

    def text(name: str, body: str) -> None:
        write_bytes(out / name, body.encode())
        files.append(name)

    if result["cka"]:
        text("cka.md", cka_markdown(result))
        text("cka.csv", cka_csv(result))
        for p in result["cka"]:
            files.append(cka_heatmap(p, out / heatmap_name(p["a"], p["b"])).name)
    if result.get("stitch"):
        text("stitch.md", stitch_markdown(result["stitch"]))
        text("stitch.csv", stitch_csv(result["stitch"]))
    if result.get("trajectory"):
        text("trajectory.md", trajectory_markdown(result["trajectory"]))
        text("trajectory.csv", trajectory_csv(result["trajectory"]))
        files.append(trajectory_plot(result["trajectory"], out / "trajectory.png").name)
    files += ["index.md", RESULT]
    result["files"] = files
    write_bytes(out / "index.md", index_markdown(result, files).encode())
    write_bytes(out / RESULT, json.dumps(canonical(result), indent=1).encode())
    return files


__all__ = ["RESULT", "heatmap_name", "noise_floor", "index_markdown", "write_outputs"]
