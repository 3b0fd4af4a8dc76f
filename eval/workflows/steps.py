"""The steps that the workflows (`crate demo`, `crate reproduce`, `crate study`) chain, for CRATE and GPT alike.

Each step's output carries its provenance (crate.provenance), so a rerun reuses exactly what matches its inputs,
says so, and resumes what was interrupted; an output of other inputs is refused with the differences named
(`--overwrite` discards it):

    data        crate.train.prepare.prepare(source, <out>/data/...)       reused when manifest.json has the same arguments
    train       crate.train.run.train(recipe, <out>/runs/<arch>-<size>)    reused when .provenance.json has the same
                                                                           recipe and data, resumed when unfinished
    interpret   crate.eval.autointerp.interpret.run_interpret(<run>/final, ...)       records and scores reused by their stamps
                (it resumes inside a layer too: finished neurons are skipped)
    report      crate.eval.report.reproduction.write_report(...)                   always rewritten (seconds)
    browser     crate.eval.report.browser.write_browser(...)                      always rewritten
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from crate.errors import CrateError, PipelineError

ARCHS = ("crate", "gpt")
# The GPT-SAE of the CPU-scale workflows (demo, study): the paper's ReLU + L1 kind, sized for seconds on a CPU
# (SPEC.md 6a's settings are for 1L-3L); 150 steps need a strong L1 to become sparse (1.0: L0 about 66 of 1,024
# latents, CE recovered 0.95). Each workflow adds its sequence length (seq_len).
CPU_SAE = dict(expansion=4, steps=150, batch_tokens=512, lm_batch=8, buffer_tokens=8192, lr=1e-3, l1=1.0,
               warmup_steps=10, resample_at=(75,), dead_window=25, eval_tokens=8192)


def log(msg: str, t0: float | None = None) -> None:
    """A workflow's progress line, stamped with the seconds since `t0`."""
    stamp = f"[{time.perf_counter() - t0:6.1f}s] " if t0 is not None else ""
    print(f"{stamp}{msg}", flush=True)


def quiet() -> None:
    """Lightning's start-up banners (GPU available, tips) and deprecation chatter would bury a workflow's log."""
    import warnings

    from crate.train.noise import quiet_lightning

    quiet_lightning(banners=False)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


# --- model sizes -----------------------------------------------------------------------------------------
def matched_overrides(preset: str, vocab_size: int, block_size: int, multiple: int = 64,
                      **shape: Any) -> tuple[dict, dict, int, int]:
    """Overrides for CRATE and GPT of `preset` (and `shape`, other config fields of both) with parameter counts
    within a few %: GPT keeps the preset, CRATE's dictionary width n_hidden is the multiple of `multiple` that brings
    its count closest to GPT's."""
    import torch

    from crate import build_model

    common = dict(vocab_size=vocab_size, block_size=block_size, **shape)
    with torch.device("meta"):
        gpt = build_model("gpt", preset, **common).num_params()
        base = build_model("crate", preset, **common)
        d = base.config.n_embd
        per_unit = d * base.config.n_layer  # each dictionary atom adds d weights per layer
        h = max(multiple, round((gpt - base.num_params() + base.config.n_hidden * per_unit) / per_unit / multiple) * multiple)
        crate_params = build_model("crate", preset, n_hidden=h, **common).num_params()
    return {**common, "n_hidden": h}, dict(common), crate_params, gpt


# --- the steps -------------------------------------------------------------------------------------------
def prepare_data(source: str, out: Path, tokenizer: str, vocab_size: int, t0: float, max_documents: int | None = None,
                 overwrite: bool = False) -> Path:
    """`crate prepare` into `out`: a folder prepared with the same inputs is reused, one of other inputs refused
    (crate.train.prepare.prepare compares the arguments its manifest records)."""
    from crate.datadir import MANIFEST
    from crate.train.prepare import prepare

    existed = (out / MANIFEST).is_file()
    if not existed:
        log(f"data: preparing {source} with the {tokenizer} tokenizer into {out}", t0)
    try:
        prepare(source, out, tokenizer=tokenizer, vocab_size=vocab_size, progress=False, max_documents=max_documents)
    except CrateError as e:  # other arguments than the folder's (or an unfinished prepare of them)
        if not (overwrite and existed):
            raise
        log(f"data: {out} was prepared otherwise, --overwrite: preparing again ({e})", t0)
        prepare(source, out, tokenizer=tokenizer, vocab_size=vocab_size, progress=False, max_documents=max_documents,
                overwrite=True)
        existed = False
    if existed:
        log(f"data: {out} reused (prepared with the same arguments)", t0)
    return out


def train_model(name: str, model: dict[str, Any], data: dict[str, Any], train: dict[str, Any], run_dir: Path,
                t0: float, system: dict[str, Any] | None = None, progress: bool | None = False,
                overwrite: bool = False) -> Path:
    """Train one model through crate.train (its recipe format); returns <run>/final. A run folder of the same recipe
    and data is reused (or resumed when unfinished); one of another recipe is refused, or discarded with `overwrite`."""
    import shutil

    from crate.provenance import OWNER, check_owned, check_stamp, claim, describe, refuse, write_stamp
    from crate.train.config import RunConfig
    from crate.datadir import read_manifest
    from crate.train.run import train as run_train

    raw = {"name": name, "model": model, "data": data, "train": train, "system": dict(system or {})}
    cfg = RunConfig.from_dict(raw)
    identity = {"stage": "train", "recipe": {k: raw[k] for k in ("model", "data", "train")},
                "data_manifest": _manifest_identity(read_manifest(data["path"])) if data.get("path") else None}
    final = run_dir / "final"
    check_owned(run_dir, "another run folder")  # a folder crate-lm did not write is never discarded, --overwrite or not
    status, diffs = check_stamp(run_dir, identity)
    if status == "new" and run_dir.exists() and any(p.name != OWNER for p in run_dir.iterdir()):
        status, diffs = "stale", ["a run folder without provenance"]
    if status == "stale":
        if not overwrite:
            refuse("a training run", run_dir, diffs, "--overwrite")
        log(f"train {name}: discarding {run_dir}, --overwrite ({describe(diffs, 3)})", t0)
        shutil.rmtree(run_dir)
    if status == "reuse" and (final / "config.json").is_file():
        log(f"train {name}: {final} reused (same recipe and data)", t0)
        return final
    write_stamp(claim(run_dir), "train", identity)
    log(f"train {name}: {train.get('max_steps')} steps into {run_dir}"
        f"{' (resuming)' if (run_dir / 'checkpoints' / 'last.ckpt').is_file() else ''}", t0)
    summary = run_train(cfg, out=run_dir, progress=progress)
    if not (final / "config.json").is_file():
        raise PipelineError(f"training {name} stopped at step {summary.get('step')} without a final checkpoint; "
                            f"run the same command again to resume it")
    log(f"train {name}: done, val loss {summary.get('val_loss', float('nan')):.3f}", t0)
    return final


def _manifest_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What identifies prepared data: its arguments, tokenizer and shards (names, sizes, maxima)."""
    return {k: manifest.get(k) for k in ("args", "tokenizer", "splits", "tokens")}


def interpret_model(name: str, checkpoint: Path, data_dir: Path, out: Path, protocol: str, t0: float,
                    overwrite: bool = False, validity: bool = False, **config: Any) -> Path:
    """`crate interpret` of one model (`--validity` with `validity`): what its provenance matches is reused
    (run_interpret says what)."""
    from crate.eval.autointerp.config import InterpretConfig
    from crate.eval.autointerp.interpret import run_interpret

    if "seq_len" not in config:  # the model's context, at most the paper's 1024
        from crate.loading import read_info

        from crate.eval.models import split_sae_spec

        config["seq_len"] = min(1024, int(read_info(split_sae_spec(checkpoint)[0])["model"]["block_size"]))
    cfg = InterpretConfig(protocol=protocol, **config)
    log(f"interpret {name}: {protocol} protocol, explainer {cfg.explainer}, simulator {cfg.simulator}"
        f"{', random-init control' if cfg.control else ''}", t0)
    validate = None
    if validity:
        from crate.eval.validity.run import validate
    run_interpret(checkpoint, data_dir, out, cfg, overwrite=overwrite, name=out.name, validate=validate)
    return out


def train_saes(final: Path, data_dir: Path, t0: float, overwrite: bool = False, **settings: Any) -> str:
    """An SAE on every layer's neurons (crate sae train, into <run>/sae/relu-l<L>); returns "FINAL+SAE,SAE", the
    checkpoint form `crate interpret` and `crate steer --sweep` take."""
    from crate.loading import read_info
    from crate.eval.sae.metrics import metrics_line
    from crate.eval.sae.train import SAETrainConfig, train_from_files

    outs = []
    for layer in range(int(read_info(final)["model"]["n_layer"])):
        cfg = SAETrainConfig(layer=layer, **settings)
        log(f"sae {final.parent.name} layer {layer}: {cfg.kind}, {cfg.expansion}x, {cfg.steps} steps", t0)
        out, metrics = train_from_files(final, data_dir, None, cfg, overwrite=overwrite)
        log(f"sae {out}: {metrics_line(metrics)}", t0)
        outs.append(str(out))
    return f"{final}+{','.join(outs)}"


def steering_sweep(checkpoints: dict[str, str], data_dir: Path, out: Path, t0: float, **settings: Any) -> Path:
    """`crate steer --sweep` over the systems (recomputed each time: seconds at these sizes)."""
    from crate.eval.steer.sweep import SweepConfig, sweep_files

    log(f"steering sweep: {', '.join(checkpoints)} -> {out}", t0)
    sweep_files({k: str(v) for k, v in checkpoints.items()}, data_dir, out, SweepConfig(**settings))
    return out


def print_main_table(out: Path, name: str = "main_table.md") -> None:
    table = out / name
    if table.is_file():
        text = table.read_text().split("\n\n", 2)[-1]
        print(_compact(text))


def print_verdict_flags(out: Path) -> None:
    """What the scorer's own checks say of the report's verdicts (index.md's "Verdicts:"), when it has them."""
    index = out / "index.md"
    if index.is_file() and "\nVerdicts:\n" in index.read_text():
        block = index.read_text().split("\nVerdicts:\n", 1)[1].split("\n## ", 1)[0].strip()
        print(f"\nThe scorer's checks on these verdicts (index.md, \"Is the scorer valid?\"):\n{block}")


def _compact(markdown: str) -> str:
    """The main table without the columns that are empty everywhere (e.g. the paper's, for the tiny models)."""
    lines = [line for line in markdown.strip().splitlines() if line.startswith("|")]
    if len(lines) < 3:
        return markdown
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    keep = [j for j in range(len(rows[0])) if any(r[j] not in ("-", "") for r in rows[2:])]
    out = []
    for i, r in enumerate(rows):
        cells = ["---" if i == 1 else r[j] for j in keep]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
