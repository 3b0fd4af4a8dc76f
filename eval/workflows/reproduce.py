"""`crate reproduce`: the paper's pipeline at its sizes (1L-3L, S, B), on the Pile with the paper's LLMs.

The whole plan is checked before step 1 (`preflight`) and can be printed with each step's state (`--dry-run`);
every step is one of crate.eval.workflows.steps, so a rerun reuses what matches its inputs and resumes the rest.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crate.errors import CrateError, PipelineError
from crate.provenance import check_owned, claim
from crate.eval.workflows.steps import (
    ARCHS, interpret_model, log, prepare_data, print_main_table, print_verdict_flags, steering_sweep, train_model,
    train_saes,
)

SAE_SIZES = ("1L", "2L", "3L")  # the paper's GPT-SAE rows (SPEC.md 6a)
# SPEC.md section 4: AdamW (0.9, 0.95), wd 0.1, clip 1.0, lr 6e-4 -> 6e-5, 2,000 warm-up, cosine to 600,000
# steps, 12 x 1024 x 40 sequences-tokens per step (480 sequences of 1024 tokens), bf16 autocast on GPUs.
PAPER_TRAIN = {
    "max_steps": 600_000, "batch_size": 480, "micro_batch_size": 12, "context": 1024, "lr": 6e-4, "min_lr": 6e-5,
    "warmup_steps": 2000, "lr_decay_steps": 600_000, "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0,
    "precision": "auto", "val_every": 2000, "val_batches": 200, "ckpt_every": 5000,
}
PILE = "hf:monology/pile-uncopyrighted"


@dataclass
class ReproduceOptions:
    out: Path = Path("runs/reproduce")
    sizes: list[str] = field(default_factory=lambda: ["2L"])
    source: str = "pile"
    tokenizer: str = "gpt2"
    explainer: str = "hf:mistralai/Mistral-7B-Instruct-v0.2"
    simulator: str = "hf:meta-llama/Llama-2-7b-hf"
    protocols: list[str] = field(default_factory=lambda: ["tar", "random", "short"])
    neurons: int | None = None
    max_steps: int | None = None
    train_overrides: list[str] = field(default_factory=list)
    random_init: bool = False
    dry_run: bool = False
    seed: int = 0
    llm_options: dict[str, Any] | None = None  # None: 4-bit for hf: models on a GPU (the paper's), else none
    overwrite: bool = False  # discard outputs of other inputs (otherwise refused)
    sae_steps: int | None = None  # GPT-SAE optimiser steps at 1L-3L (None: SAETrainConfig's 120,000)


def _llm_options(opts: ReproduceOptions) -> dict[str, Any]:
    if opts.llm_options is not None:
        return dict(opts.llm_options)
    import torch

    hf = all(b.startswith("hf:") for b in (opts.explainer, opts.simulator))
    return {"quantize": "4bit"} if hf and torch.cuda.is_available() else {}


def _source(source: str) -> str:
    return PILE if source == "pile" else source


def _recipes(opts: ReproduceOptions, data_dir: Path, source: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The training recipe of every (size, arch), overrides applied and every key checked (RunConfig)."""
    from crate.train.config import RunConfig, apply_overrides

    recipes = {}
    for size in opts.sizes:
        for arch in ARCHS:
            train = dict(PAPER_TRAIN)
            if opts.max_steps:
                train.update(max_steps=opts.max_steps, lr_decay_steps=opts.max_steps,
                             warmup_steps=min(train["warmup_steps"], max(1, opts.max_steps // 10)),
                             val_every=min(train["val_every"], opts.max_steps), ckpt_every=min(train["ckpt_every"], opts.max_steps))
            raw = apply_overrides({"model": {"arch": arch, "preset": size, "vocab_size": None},
                                   "data": {"path": str(data_dir), "source": source, "tokenizer": opts.tokenizer},
                                   "train": train}, opts.train_overrides)
            RunConfig.from_dict({"name": f"{arch}-{size}", **raw})
            recipes[(size, arch)] = raw
    return recipes


def preflight(opts: ReproduceOptions, data_dir: Path, source: str) -> list[str]:
    """Every problem of the whole plan that can be found before step 1 (recipes, protocols, source, explainer and
    simulator: names, packages, files in the local cache, keys, endpoints), as messages; [] when there is none."""
    from crate.eval.llm.registry import check_llm
    from crate.eval.autointerp.protocols import get_protocol

    problems: list[str] = []

    def check(what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except CrateError as e:
            problems.append(f"{what}: {e}")

    check("--out", check_owned, Path(opts.out), "another --out")
    check("recipes", _recipes, opts, data_dir, source)
    for p in opts.protocols:
        check(f"protocol {p!r}", get_protocol, p)
    checked: set[str] = set()
    for role, spec in (("explainer", opts.explainer), ("simulator", opts.simulator)):
        if spec not in checked:
            checked.add(spec)
            check(f"{role} {spec}", check_llm, spec, **_llm_options(opts))
    if source not in ("embedded",) and not source.startswith("hf:") and not Path(source).exists():
        problems.append(f"source {source!r}: no such file or folder (use 'pile', 'embedded', hf:<dataset> or a path)")
    if source.startswith("hf:") and importlib.util.find_spec("datasets") is None:
        problems.append(f"source {source}: streaming a Hugging Face dataset needs the datasets package")
    return problems


def reproduce(opts: ReproduceOptions) -> Path:
    """Prepare, train, record, score and report every size in `opts.sizes` for CRATE and GPT. The whole plan is
    checked first (`preflight`); `dry_run` prints it with its problems and the state of each step."""
    t0 = time.perf_counter()
    out = Path(opts.out)
    source = _source(opts.source)
    slug = source.split("/")[-1].replace(":", "-")
    data_dir = out / "data" / f"{slug}-{opts.tokenizer}"
    log(f"crate reproduce: sizes {', '.join(opts.sizes)}; data {source}; explainer {opts.explainer}; "
        f"simulator {opts.simulator}; protocols {', '.join(opts.protocols)}; output {out}", t0)
    problems = preflight(opts, data_dir, source)
    if not problems:
        for step, state in _plan(opts, data_dir, _recipes(opts, data_dir, source)):
            print(f"  [{state}] {step}")
    if problems:
        raise PipelineError("the plan cannot run; nothing was done:\n  - " + "\n  - ".join(problems))
    if opts.dry_run:
        return out
    claim(out)
    recipes = _recipes(opts, data_dir, source)
    data_dir = prepare_data(source, data_dir, opts.tokenizer, 512, t0, overwrite=opts.overwrite)
    for size in opts.sizes:
        _run_size(opts, size, recipes, data_dir, t0)
    from crate.eval.report.reproduction import write_report

    sweeps = [out / "steer-sweep"] if (out / "steer-sweep").is_dir() else []
    index = write_report([out / "runs", out / "interpret", *sweeps], out / "report", seed=opts.seed)
    from crate.eval.report.browser import write_browser

    browser = write_browser([out / "interpret"], out / "browser")
    print_main_table(out / "report")
    print_verdict_flags(out / "report")
    print(f"report:         {index.resolve()}\nneuron browser: {browser.resolve()}")
    return index


def _run_size(opts: ReproduceOptions, size: str, recipes: dict[tuple[str, str], dict[str, Any]], data_dir: Path,
              t0: float) -> None:
    """One size: CRATE and GPT trained, GPT's SAEs (1L-3L), every system scored per protocol, the steering sweep."""
    out = Path(opts.out)
    systems: dict[str, str] = {}
    for arch in ARCHS:
        name, raw = f"{arch}-{size}", recipes[(size, arch)]
        final = train_model(name, raw["model"], raw["data"], raw["train"], out / "runs" / name, t0, raw.get("system"),
                            progress=None, overwrite=opts.overwrite)
        systems[arch] = str(final)
    if size in SAE_SIZES:  # the paper's GPT-SAE, with its settings (SAETrainConfig's defaults)
        steps = {"steps": opts.sae_steps} if opts.sae_steps else {}
        systems["gpt-sae"] = train_saes(Path(systems["gpt"]), data_dir, t0, opts.overwrite, seed=opts.seed, **steps)
    for arch, ckpt in systems.items():
        for protocol in opts.protocols:
            common = dict(explainer=opts.explainer, simulator=opts.simulator, neurons=opts.neurons, seed=opts.seed,
                          llm_options=_llm_options(opts), overwrite=opts.overwrite)
            interpret_model(f"{arch}-{size}", ckpt, data_dir, out / "interpret" / size / arch, protocol, t0, **common)
            if opts.random_init:
                interpret_model(f"{arch}-{size} (random init)", ckpt, data_dir,
                                out / "interpret" / size / f"{arch}-control", protocol, t0, control=True, **common)
    if size in SAE_SIZES:
        steering_sweep(systems, data_dir, out / "steer-sweep" / size, t0, seed=opts.seed)


def _plan(opts: ReproduceOptions, data_dir: Path, recipes: dict[tuple[str, str], dict[str, Any]]) -> list[tuple[str, str]]:
    """(step, state): done / todo / resumable / stale (other inputs: refused when run) for each step."""
    from crate.provenance import differences, read_stamp

    out = Path(opts.out)
    steps = [(f"prepare {_source(opts.source)} -> {data_dir}", "done" if (data_dir / "manifest.json").is_file() else "todo")]
    for size in opts.sizes:
        for arch in ARCHS:
            run = out / "runs" / f"{arch}-{size}"
            stamp = read_stamp(run)
            recipe = {k: recipes[(size, arch)][k] for k in ("model", "data", "train")}
            if stamp is None:
                state = "todo" if not run.exists() else "stale"
            elif differences((stamp.get("identity") or {}).get("recipe"), recipe):
                state = "stale (other recipe: refused unless --overwrite)"
            else:
                state = "done" if (run / "final" / "config.json").is_file() else "resumable"
            steps.append((f"train {arch}-{size} -> {run}", state))
            for p in opts.protocols:
                target = out / "interpret" / size / arch
                scored = read_stamp(target / "scores" / p) is not None
                steps.append((f"record + explain + simulate + score {arch}-{size} ({p}) -> {target}",
                              "scored before: reused where its provenance matches" if scored else "todo"))
        if size in SAE_SIZES:
            steps.append((f"sae train gpt-{size} (every layer) -> {out / 'runs' / f'gpt-{size}' / 'sae'}; interpret "
                          f"gpt-sae -> {out / 'interpret' / size / 'gpt-sae'}; steering sweep -> "
                          f"{out / 'steer-sweep' / size}", "reused where its provenance matches, else todo"))
    steps.append((f"report -> {out / 'report'}, browser -> {out / 'browser'}", "todo"))
    return steps
