"""Whole pipelines: `crate demo` (tiny, offline, minutes on a CPU) and `crate reproduce` (the paper's sizes).

Both run the same steps for CRATE and GPT. Each step's output carries its provenance (crate.provenance), so a
rerun reuses exactly what matches its inputs, says so, and resumes what was interrupted; an output of other
inputs is refused with the differences named (`--overwrite` discards it):

    data        crate.train.data.prepare(source, <out>/data/...)          reused when manifest.json has the same arguments
    train       crate.train.run.train(recipe, <out>/runs/<arch>-<size>)    reused when .provenance.json has the same
                                                                           recipe and data, resumed when unfinished
    interpret   crate.eval.autointerp.interpret.run_interpret(<run>/final, ...)       records and scores reused by their stamps
                (it resumes inside a layer too: finished neurons are skipped)
    report      crate.eval.report.results.write_report(...)                        always rewritten (seconds)
    browser     crate.eval.report.browser.write_browser(...)                      always rewritten

The demo trains a tiny CRATE and a tiny GPT with matched parameter counts on the embedded Shakespeare corpus
(CRATE's dictionary is widened until its count meets GPT's: the paper compares at equal width instead, which
gives GPT more parameters), records their neurons, scores a seeded sample of them with the token-statistics
explainer/simulator (and SmolLM2-135M with --llm), scores random-initialised controls, and writes
<out>/index.md and <out>/browser/index.html.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crate.errors import CrateError

ARCHS = ("crate", "gpt")
SAE_SIZES = ("1L", "2L", "3L")  # the paper's GPT-SAE rows (SPEC.md 6a)


class PipelineError(CrateError):
    """A pipeline step that cannot run (a missing subsystem, a failed step)."""


def _log(msg: str, t0: float | None = None) -> None:
    stamp = f"[{time.perf_counter() - t0:6.1f}s] " if t0 is not None else ""
    print(f"{stamp}{msg}", flush=True)


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
    (crate.train.data.prepare compares the arguments its manifest records)."""
    from crate.train.data import MANIFEST, prepare

    existed = (out / MANIFEST).is_file()
    if not existed:
        _log(f"data: preparing {source} with the {tokenizer} tokenizer into {out}", t0)
    try:
        prepare(source, out, tokenizer=tokenizer, vocab_size=vocab_size, progress=False, max_documents=max_documents)
    except CrateError as e:  # other arguments than the folder's (or an unfinished prepare of them)
        if not (overwrite and existed):
            raise
        _log(f"data: {out} was prepared otherwise, --overwrite: preparing again ({e})", t0)
        prepare(source, out, tokenizer=tokenizer, vocab_size=vocab_size, progress=False, max_documents=max_documents,
                overwrite=True)
        existed = False
    if existed:
        _log(f"data: {out} reused (prepared with the same arguments)", t0)
    return out


def train_model(name: str, model: dict[str, Any], data: dict[str, Any], train: dict[str, Any], run_dir: Path,
                t0: float, system: dict[str, Any] | None = None, progress: bool | None = False,
                overwrite: bool = False) -> Path:
    """Train one model through crate.train (its recipe format); returns <run>/final. A run folder of the same recipe
    and data is reused (or resumed when unfinished); one of another recipe is refused, or discarded with `overwrite`."""
    import shutil

    from crate.provenance import check_stamp, describe, refuse, write_stamp
    from crate.train.config import RunConfig
    from crate.train.data import read_manifest
    from crate.train.run import train as run_train

    raw = {"name": name, "model": model, "data": data, "train": train, "system": dict(system or {})}
    cfg = RunConfig.from_dict(raw)
    identity = {"stage": "train", "recipe": {k: raw[k] for k in ("model", "data", "train")},
                "data_manifest": _manifest_identity(read_manifest(data["path"])) if data.get("path") else None}
    final = run_dir / "final"
    status, diffs = check_stamp(run_dir, identity)
    if status == "new" and run_dir.exists() and any(run_dir.iterdir()):
        status, diffs = "stale", ["a run folder without provenance (an older crate-lm, or not ours)"]
    if status == "stale":
        if not overwrite:
            refuse("a training run", run_dir, diffs, "--overwrite")
        _log(f"train {name}: discarding {run_dir}, --overwrite ({describe(diffs, 3)})", t0)
        shutil.rmtree(run_dir)
    if status == "reuse" and (final / "config.json").is_file():
        _log(f"train {name}: {final} reused (same recipe and data)", t0)
        return final
    run_dir.mkdir(parents=True, exist_ok=True)
    write_stamp(run_dir, "train", identity)
    _log(f"train {name}: {train.get('max_steps')} steps into {run_dir}"
         f"{' (resuming)' if (run_dir / 'checkpoints' / 'last.ckpt').is_file() else ''}", t0)
    summary = run_train(cfg, out=run_dir, progress=progress)
    if not (final / "config.json").is_file():
        raise PipelineError(f"training {name} stopped at step {summary.get('step')} without a final checkpoint; "
                            f"run the same command again to resume it")
    _log(f"train {name}: done, val loss {summary.get('val_loss', float('nan')):.3f}", t0)
    return final


def _manifest_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What identifies prepared data: its arguments, tokenizer and shards (names, sizes, maxima)."""
    return {k: manifest.get(k) for k in ("args", "tokenizer", "splits", "tokens")}


def interpret_model(name: str, checkpoint: Path, data_dir: Path, out: Path, protocol: str, t0: float,
                    overwrite: bool = False, **config: Any) -> Path:
    """`crate interpret` of one model: what its provenance matches is reused (run_interpret says what)."""
    from crate.eval.autointerp.interpret import InterpretConfig, run_interpret

    if "seq_len" not in config:  # the model's context, at most the paper's 1024
        from crate.loading import read_info

        from crate.eval.models import split_sae_spec

        config["seq_len"] = min(1024, int(read_info(split_sae_spec(checkpoint)[0])["model"]["block_size"]))
    cfg = InterpretConfig(protocol=protocol, **config)
    _log(f"interpret {name}: {protocol} protocol, explainer {cfg.explainer}, simulator {cfg.simulator}"
         f"{', random-init control' if cfg.control else ''}", t0)
    run_interpret(checkpoint, data_dir, out, cfg, overwrite=overwrite, name=out.name)
    return out


def train_saes(final: Path, data_dir: Path, t0: float, overwrite: bool = False, **settings: Any) -> str:
    """An SAE on every layer's neurons (crate sae train, into <run>/sae/relu-l<L>); returns "FINAL+SAE,SAE", the
    checkpoint form `crate interpret` and `crate steer --sweep` take."""
    from crate.loading import read_info
    from crate.eval.sae.train import SAETrainConfig, metrics_line, train_from_files

    outs = []
    for layer in range(int(read_info(final)["model"]["n_layer"])):
        cfg = SAETrainConfig(layer=layer, **settings)
        _log(f"sae {final.parent.name} layer {layer}: {cfg.kind}, {cfg.expansion}x, {cfg.steps} steps", t0)
        out, metrics = train_from_files(final, data_dir, None, cfg, overwrite=overwrite)
        _log(f"sae {out}: {metrics_line(metrics)}", t0)
        outs.append(str(out))
    return f"{final}+{','.join(outs)}"


def steering_sweep(checkpoints: dict[str, str], data_dir: Path, out: Path, t0: float, **settings: Any) -> Path:
    """`crate steer --sweep` over the systems (recomputed each time: seconds at these sizes)."""
    from crate.eval.steer.sweep import SweepConfig, sweep_files

    _log(f"steering sweep: {', '.join(checkpoints)} -> {out}", t0)
    sweep_files({k: str(v) for k, v in checkpoints.items()}, data_dir, out, SweepConfig(**settings))
    return out


def print_main_table(out: Path, name: str = "main_table.md") -> None:
    table = out / name
    if table.is_file():
        text = table.read_text().split("\n\n", 2)[-1]
        print(_compact(text))


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


# --- the demo --------------------------------------------------------------------------------------------
DEMO_STEPS = 300
DEMO_NEURONS = 32
DEMO_LLM_NEURONS = 4


@dataclass
class DemoOptions:
    out: Path = Path("crate-demo")
    steps: int | None = None
    neurons: int | None = None
    llm: bool = False
    seed: int = 0
    browser: bool = True
    preset: str = "tiny"
    block_size: int = 128
    vocab_size: int = 512
    batch_size: int = 16
    controls: bool = True
    n_tokens: int | None = 16 * 1024  # validation tokens recorded per model (128 sequences of 128)
    max_documents: int | None = None  # of the corpus (tests use fewer plays)
    overwrite: bool = False  # discard outputs in `out` that other settings produced (otherwise refused)


DEMO_OUTPUTS = ("data", "runs", "interpret", "interpret-smollm2", "index.md", "browser", "steer-sweep")
# The demo's GPT-SAE: the paper's ReLU + L1 kind, sized for seconds on a CPU (SPEC.md 6a's settings are for 1L-3L);
# 150 steps need a strong L1 to become sparse (1.0: L0 about 66 of 1,024 latents, CE recovered 0.95)
DEMO_SAE = dict(expansion=4, steps=150, batch_tokens=512, lm_batch=8, seq_len=128, buffer_tokens=8192, lr=1e-3,
                l1=1.0, warmup_steps=10, resample_at=(75,), dead_window=25, eval_tokens=8192)


def demo(opts: DemoOptions) -> dict[str, Path]:
    """Train tiny CRATE and GPT, interpret, report and browse; returns the paths written."""
    import torch

    from crate.provenance import check_owned

    t0 = time.perf_counter()
    out = Path(opts.out)
    check_owned(out, DEMO_OUTPUTS, "another --out")
    if opts.llm:  # before any training: a missing LLM must not cost the whole run
        from crate.eval.llm.backends import check_llm

        check_llm("smollm2")
    out.mkdir(parents=True, exist_ok=True)
    _quiet()
    steps = opts.steps or DEMO_STEPS
    n_neurons = opts.neurons or DEMO_NEURONS
    _log(f"crate demo: tiny CRATE vs tiny GPT on the embedded Shakespeare corpus, {steps} steps each, "
         f"{torch.get_num_threads()} CPU threads, output in {out}", t0)

    data_dir = prepare_data("embedded", out / "data", "bpe", opts.vocab_size, t0, opts.max_documents, opts.overwrite)
    from crate.train.data import read_manifest

    vocab = _padded(read_manifest(data_dir)["vocab_size"])
    crate_over, gpt_over, n_crate, n_gpt = matched_overrides(opts.preset, vocab, opts.block_size)
    _log(f"parameters: CRATE {n_crate:,} (n_hidden={crate_over['n_hidden']}) vs GPT {n_gpt:,} "
         f"({100 * (n_crate - n_gpt) / n_gpt:+.1f}%)", t0)

    data = {"path": str(data_dir), "source": "embedded", "tokenizer": "bpe", "vocab_size": opts.vocab_size}
    if opts.max_documents:
        data["max_documents"] = opts.max_documents
    train = {"max_steps": steps, "batch_size": opts.batch_size, "micro_batch_size": opts.batch_size,
             "context": opts.block_size, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": max(1, min(50, steps // 10)),
             "val_every": max(1, steps // 4), "val_batches": 4, "final_val_batches": 8,
             "ckpt_every": steps, "seed": 1337 + opts.seed}
    finals = {}
    for arch, over in (("crate", crate_over), ("gpt", gpt_over)):
        model = {"arch": arch, "preset": opts.preset, **over}
        finals[arch] = train_model(f"{arch}-{opts.preset}", model, data, train, out / "runs" / f"{arch}-{opts.preset}", t0,
                                   system={"devices": 1, "wandb": "off", "progress_bar": False},
                                   overwrite=opts.overwrite)

    common = dict(neurons=n_neurons, seq_len=opts.block_size, n_tokens=opts.n_tokens, seed=opts.seed, batch_size=32,
                  overwrite=opts.overwrite)
    interp = out / "interpret"
    systems: dict[str, Any] = dict(finals)
    if importlib.util.find_spec("sae_lens"):
        systems["gpt-sae"] = train_saes(finals["gpt"], data_dir, t0, opts.overwrite, seed=opts.seed, **DEMO_SAE)
    else:
        _log('GPT-SAE skipped: SAELens is not installed (pip install -e ".[sae]")', t0)
    for arch, ckpt in systems.items():
        interpret_model(arch, ckpt, data_dir, interp / arch, "tar", t0, explainer="stats", simulator="stats", **common)
        if opts.controls:
            interpret_model(f"{arch} (random init)", ckpt, data_dir, interp / f"{arch}-control", "tar", t0,
                            explainer="stats", simulator="stats", control=True, **common)
    steering_sweep(systems, data_dir, out / "steer-sweep", t0, units=8, sequences=8, seq_len=opts.block_size,
                   seed=opts.seed)
    if opts.llm:
        llm_common = {**common, "neurons": min(n_neurons, DEMO_LLM_NEURONS)}
        for arch in ARCHS:
            interpret_model(f"{arch} (SmolLM2)", finals[arch], data_dir, out / "interpret-smollm2" / arch, "tar", t0,
                            explainer="smollm2", simulator="smollm2", **llm_common)

    from crate.eval.report.results import write_report

    _log("report: tables and plots", t0)
    index = write_report([out / "runs", interp, out / "steer-sweep"] + ([out / "interpret-smollm2"] if opts.llm else []),
                         out, seed=opts.seed, owned=True)
    paths = {"report": index.resolve()}
    if opts.browser:
        from crate.eval.report.browser import write_browser

        _log("browser: static site", t0)
        paths["browser"] = write_browser([interp] + ([out / "interpret-smollm2"] if opts.llm else []), out / "browser").resolve()
    print()
    print_main_table(out)
    print_main_table(out, "gpt_sae.md")
    print()
    _log(f"done in {time.perf_counter() - t0:.0f}s", t0)
    print(f"report:         {paths['report']}")
    if "browser" in paths:
        print(f"neuron browser: {paths['browser']}  (open it in a web browser; no server needed)")
    return paths


def _quiet() -> None:
    """Lightning's start-up banners (GPU available, tips) and deprecation chatter would bury the demo's log."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels on import: import first, then lower them)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _padded(n: int, multiple: int = 64) -> int:
    try:
        from crate.tokenizer import padded_vocab

        return padded_vocab(n)
    except ImportError:  # pragma: no cover - the training package always has it
        return -(-n // multiple) * multiple


# --- the paper's pipeline --------------------------------------------------------------------------------
# SPEC.md section 4: AdamW (0.9, 0.95), wd 0.1, clip 1.0, lr 6e-4 -> 6e-5, 2,000 warm-up, cosine to 600,000
# steps, 12 x 1024 x 40 sequences-tokens per step (480 sequences of 1024 tokens), bf16 autocast on GPUs.
PAPER_TRAIN = {
    "max_steps": 600_000, "batch_size": 480, "micro_batch_size": 12, "context": 1024, "lr": 6e-4, "min_lr": 6e-5,
    "warmup_steps": 2000, "lr_decay_steps": 600_000, "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0,
    "precision": "auto", "val_every": 2000, "val_batches": 200, "ckpt_every": 5000,
}
PILE = "hf:monology/pile-uncopyrighted"
PROTOCOL_NAMES = {"tar": "tar", "random": "random", "short": "short"}


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
    from crate.eval.llm.backends import check_llm
    from crate.eval.autointerp.protocols import get_protocol

    problems: list[str] = []

    def check(what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except CrateError as e:
            problems.append(f"{what}: {e}")

    check("recipes", _recipes, opts, data_dir, source)
    for p in opts.protocols:
        check(f"protocol {p!r}", get_protocol, PROTOCOL_NAMES.get(p, p))
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
    _log(f"crate reproduce: sizes {', '.join(opts.sizes)}; data {source}; explainer {opts.explainer}; "
         f"simulator {opts.simulator}; protocols {', '.join(opts.protocols)}; output {out}", t0)
    problems = preflight(opts, data_dir, source)
    if not problems:
        for step, state in _plan(opts, data_dir, _recipes(opts, data_dir, source)):
            print(f"  [{state}] {step}")
    if problems:
        raise PipelineError("the plan cannot run; nothing was done:\n  - " + "\n  - ".join(problems))
    if opts.dry_run:
        return out
    recipes = _recipes(opts, data_dir, source)
    data_dir = prepare_data(source, data_dir, opts.tokenizer, 512, t0, overwrite=opts.overwrite)
    for size in opts.sizes:
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
                interpret_model(f"{arch}-{size}", ckpt, data_dir, out / "interpret" / size / arch,
                                PROTOCOL_NAMES.get(protocol, protocol), t0, **common)
                if opts.random_init:
                    interpret_model(f"{arch}-{size} (random init)", ckpt, data_dir,
                                    out / "interpret" / size / f"{arch}-control", PROTOCOL_NAMES.get(protocol, protocol),
                                    t0, control=True, **common)
        if size in SAE_SIZES:
            steering_sweep(systems, data_dir, out / "steer-sweep" / size, t0, seed=opts.seed)
    from crate.eval.report.results import write_report

    sweeps = [out / "steer-sweep"] if (out / "steer-sweep").is_dir() else []
    index = write_report([out / "runs", out / "interpret", *sweeps], out / "report", seed=opts.seed)
    from crate.eval.report.browser import write_browser

    browser = write_browser([out / "interpret"], out / "browser")
    print_main_table(out / "report")
    print(f"report:         {index.resolve()}\nneuron browser: {browser.resolve()}")
    return index


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
                scored = read_stamp(target / "scores" / PROTOCOL_NAMES.get(p, p)) is not None
                steps.append((f"record + explain + simulate + score {arch}-{size} ({p}) -> {target}",
                              "scored before: reused where its provenance matches" if scored else "todo"))
        if size in SAE_SIZES:
            steps.append((f"sae train gpt-{size} (every layer) -> {out / 'runs' / f'gpt-{size}' / 'sae'}; interpret "
                          f"gpt-sae -> {out / 'interpret' / size / 'gpt-sae'}; steering sweep -> "
                          f"{out / 'steer-sweep' / size}", "reused where its provenance matches, else todo"))
    steps.append((f"report -> {out / 'report'}, browser -> {out / 'browser'}", "todo"))
    return steps
