"""Whole pipelines: `crate demo` (tiny, offline, minutes on a CPU) and `crate reproduce` (the paper's sizes).

Both run the same steps for CRATE and GPT, each skipped when its output is already complete, so an
interrupted run picks up where it stopped:

    data        crate.train.data.prepare(source, <out>/data/...)          done: manifest.json
    train       crate.train.run.train(recipe, <out>/runs/<arch>-<size>)    done: <run>/final/config.json
    interpret   crate.eval.interpret.run_interpret(<run>/final, ...)       done: <out>/interpret/.../.done-<protocol>
                (it resumes inside a layer too: finished neurons are skipped)
    report      crate.eval.report.write_report(...)                        always rewritten (seconds)
    browser     crate.eval.browser.write_browser(...)                      always rewritten

The demo trains a tiny CRATE and a tiny GPT with matched parameter counts on the embedded Shakespeare corpus
(CRATE's dictionary is widened until its count meets GPT's: the paper compares at equal width instead, which
gives GPT more parameters), records their neurons, scores a seeded sample of them with the token-statistics
explainer/simulator (and SmolLM2-135M with --llm), scores random-initialised controls, and writes
<out>/index.md and <out>/browser/index.html.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crate.errors import CrateError

ARCHS = ("crate", "gpt")


class PipelineError(CrateError):
    """A pipeline step that cannot run (a missing subsystem, a failed step)."""


def _log(msg: str, t0: float | None = None) -> None:
    stamp = f"[{time.perf_counter() - t0:6.1f}s] " if t0 is not None else ""
    print(f"{stamp}{msg}", flush=True)


def _done(marker: Path) -> bool:
    return marker.is_file()


def _mark(marker: Path, info: dict[str, Any] | None = None) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(info or {}, default=str) + "\n")


# --- model sizes -----------------------------------------------------------------------------------------
def matched_overrides(preset: str, vocab_size: int, block_size: int, multiple: int = 64) -> tuple[dict, dict, int, int]:
    """Overrides for CRATE and GPT of `preset` with parameter counts within a few %: GPT keeps the preset, CRATE's
    dictionary width n_hidden is the multiple of `multiple` that brings its count closest to GPT's."""
    import torch

    from crate import build_model

    common = dict(vocab_size=vocab_size, block_size=block_size)
    with torch.device("meta"):
        gpt = build_model("gpt", preset, **common).num_params()
        base = build_model("crate", preset, **common)
        d = base.config.n_embd
        per_unit = d * base.config.n_layer  # each dictionary atom adds d weights per layer
        h = max(multiple, round((gpt - base.num_params() + base.config.n_hidden * per_unit) / per_unit / multiple) * multiple)
        crate_params = build_model("crate", preset, n_hidden=h, **common).num_params()
    return {**common, "n_hidden": h}, dict(common), crate_params, gpt


# --- the steps -------------------------------------------------------------------------------------------
def prepare_data(source: str, out: Path, tokenizer: str, vocab_size: int, t0: float, max_documents: int | None = None) -> Path:
    from crate.train.data import MANIFEST, prepare

    if (out / MANIFEST).is_file():
        _log(f"data: {out} is prepared (skipped)", t0)
        return out
    _log(f"data: preparing {source} with the {tokenizer} tokenizer into {out}", t0)
    prepare(source, out, tokenizer=tokenizer, vocab_size=vocab_size, progress=False, max_documents=max_documents)
    return out


def train_model(name: str, model: dict[str, Any], data: dict[str, Any], train: dict[str, Any], run_dir: Path,
                t0: float, system: dict[str, Any] | None = None, progress: bool | None = False) -> Path:
    """Train one model through crate.train (its recipe format); returns <run>/final."""
    final = run_dir / "final"
    if (final / "config.json").is_file():
        _log(f"train {name}: {final} exists (skipped)", t0)
        return final
    from crate.train.config import RunConfig
    from crate.train.run import train as run_train

    raw = {"name": name, "model": model, "data": data, "train": train, "system": dict(system or {})}
    cfg = RunConfig.from_dict(raw)
    _log(f"train {name}: {train.get('max_steps')} steps into {run_dir}", t0)
    summary = run_train(cfg, out=run_dir, progress=progress)
    if not (final / "config.json").is_file():
        raise PipelineError(f"training {name} stopped at step {summary.get('step')} without a final checkpoint; "
                            f"run the same command again to resume it")
    _log(f"train {name}: done, val loss {summary.get('val_loss', float('nan')):.3f}", t0)
    return final


def interpret_model(name: str, checkpoint: Path, data_dir: Path, out: Path, protocol: str, t0: float,
                    **config: Any) -> Path:
    from crate.eval.interpret import InterpretConfig, run_interpret

    marker = out / f".done-{protocol}"
    if _done(marker):
        _log(f"interpret {name} ({protocol}, {config.get('explainer', 'stats')}): done (skipped)", t0)
        return out
    if "seq_len" not in config:  # the model's context, at most the paper's 1024
        from crate.checkpoint import read_info

        config["seq_len"] = min(1024, int(read_info(checkpoint)["model"]["block_size"]))
    cfg = InterpretConfig(protocol=protocol, **config)
    _log(f"interpret {name}: {protocol} protocol, explainer {cfg.explainer}, simulator {cfg.simulator}"
         f"{', random-init control' if cfg.control else ''}", t0)
    summary = run_interpret(checkpoint, data_dir, out, cfg)
    _mark(marker, {"protocol": protocol, "seconds": summary.get("seconds")})
    return out


def print_main_table(out: Path) -> None:
    table = out / "main_table.md"
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


def demo(opts: DemoOptions) -> dict[str, Path]:
    """Train tiny CRATE and GPT, interpret, report and browse; returns the paths written."""
    import torch

    t0 = time.perf_counter()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    _quiet()
    steps = opts.steps or DEMO_STEPS
    n_neurons = opts.neurons or DEMO_NEURONS
    _log(f"crate demo: tiny CRATE vs tiny GPT on the embedded Shakespeare corpus, {steps} steps each, "
         f"{torch.get_num_threads()} CPU threads, output in {out}", t0)

    data_dir = prepare_data("embedded", out / "data", "bpe", opts.vocab_size, t0, opts.max_documents)
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
                                   system={"devices": 1, "wandb": "off", "progress_bar": False})

    common = dict(neurons=n_neurons, seq_len=opts.block_size, n_tokens=opts.n_tokens, seed=opts.seed, batch_size=32)
    interp = out / "interpret"
    for arch in ARCHS:
        interpret_model(arch, finals[arch], data_dir, interp / arch, "tar", t0, explainer="stats", simulator="stats", **common)
        if opts.controls:
            interpret_model(f"{arch} (random init)", finals[arch], data_dir, interp / f"{arch}-control", "tar", t0,
                            explainer="stats", simulator="stats", control=True, **common)
    if opts.llm:
        llm_common = {**common, "neurons": min(n_neurons, DEMO_LLM_NEURONS)}
        for arch in ARCHS:
            interpret_model(f"{arch} (SmolLM2)", finals[arch], data_dir, out / "interpret-smollm2" / arch, "tar", t0,
                            explainer="smollm2", simulator="smollm2", **llm_common)

    from crate.eval.report import write_report

    _log("report: tables and plots", t0)
    index = write_report([out / "runs", interp] + ([out / "interpret-smollm2"] if opts.llm else []), out, seed=opts.seed)
    paths = {"report": index.resolve()}
    if opts.browser:
        from crate.eval.browser import write_browser

        _log("browser: static site", t0)
        paths["browser"] = write_browser([interp] + ([out / "interpret-smollm2"] if opts.llm else []), out / "browser").resolve()
    print()
    print_main_table(out)
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
        from crate.train.tokenizer import padded_vocab

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


def _llm_options(opts: ReproduceOptions) -> dict[str, Any]:
    if opts.llm_options is not None:
        return dict(opts.llm_options)
    import torch

    hf = all(b.startswith("hf:") for b in (opts.explainer, opts.simulator))
    return {"quantize": "4bit"} if hf and torch.cuda.is_available() else {}


def _source(source: str) -> str:
    return PILE if source == "pile" else source


def reproduce(opts: ReproduceOptions) -> Path:
    """Prepare, train, record, score and report every size in `opts.sizes` for CRATE and GPT."""
    t0 = time.perf_counter()
    out = Path(opts.out)
    source = _source(opts.source)
    slug = source.split("/")[-1].replace(":", "-")
    data_dir = out / "data" / f"{slug}-{opts.tokenizer}"
    plan = _plan(opts, data_dir)
    _log(f"crate reproduce: sizes {', '.join(opts.sizes)}; data {source}; explainer {opts.explainer}; "
         f"simulator {opts.simulator}; protocols {', '.join(opts.protocols)}; output {out}", t0)
    for step, done in plan:
        print(f"  [{'done' if done else 'todo'}] {step}")
    if opts.dry_run:
        return out
    data_dir = prepare_data(source, data_dir, opts.tokenizer, 512, t0)
    from crate.train.config import apply_overrides

    for size in opts.sizes:
        for arch in ARCHS:
            name = f"{arch}-{size}"
            train = dict(PAPER_TRAIN)
            if opts.max_steps:
                train.update(max_steps=opts.max_steps, lr_decay_steps=opts.max_steps,
                             warmup_steps=min(train["warmup_steps"], max(1, opts.max_steps // 10)),
                             val_every=min(train["val_every"], opts.max_steps), ckpt_every=min(train["ckpt_every"], opts.max_steps))
            raw = apply_overrides({"model": {"arch": arch, "preset": size, "vocab_size": None},
                                   "data": {"path": str(data_dir), "source": source, "tokenizer": opts.tokenizer},
                                   "train": train}, opts.train_overrides)
            final = train_model(name, raw["model"], raw["data"], raw["train"], out / "runs" / name, t0, raw.get("system"),
                                progress=None)
            for protocol in opts.protocols:
                common = dict(explainer=opts.explainer, simulator=opts.simulator, neurons=opts.neurons, seed=opts.seed,
                              llm_options=_llm_options(opts))
                interpret_model(name, final, data_dir, out / "interpret" / size / arch, PROTOCOL_NAMES.get(protocol, protocol), t0, **common)
                if opts.random_init:
                    interpret_model(f"{name} (random init)", final, data_dir, out / "interpret" / size / f"{arch}-control",
                                    PROTOCOL_NAMES.get(protocol, protocol), t0, control=True, **common)
    from crate.eval.report import write_report

    index = write_report([out / "runs", out / "interpret"], out / "report", seed=opts.seed)
    from crate.eval.browser import write_browser

    browser = write_browser([out / "interpret"], out / "browser")
    print_main_table(out / "report")
    print(f"report:         {index.resolve()}\nneuron browser: {browser.resolve()}")
    return index


def _plan(opts: ReproduceOptions, data_dir: Path) -> list[tuple[str, bool]]:
    out = Path(opts.out)
    steps = [(f"prepare {_source(opts.source)} -> {data_dir}", (data_dir / "manifest.json").is_file())]
    for size in opts.sizes:
        for arch in ARCHS:
            run = out / "runs" / f"{arch}-{size}"
            steps.append((f"train {arch}-{size} -> {run}", (run / "final" / "config.json").is_file()))
            for p in opts.protocols:
                target = out / "interpret" / size / arch
                steps.append((f"record + explain + simulate + score {arch}-{size} ({p}) -> {target}",
                              (target / f".done-{PROTOCOL_NAMES.get(p, p)}").is_file()))
    steps.append((f"report -> {out / 'report'}, browser -> {out / 'browser'}", False))
    return steps
