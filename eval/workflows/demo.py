"""`crate demo`: tiny CRATE against tiny GPT, end to end, offline, in minutes on a CPU.

The demo trains a tiny CRATE and a tiny GPT with matched parameter counts on the embedded Shakespeare corpus
(CRATE's dictionary is widened until its count meets GPT's: the paper compares at equal width instead, which
gives GPT more parameters), records their neurons, scores a seeded sample of them with the token-statistics
explainer/simulator (and SmolLM2-135M with --llm), checks that scorer on each trained system (planted units of
known behaviour, sanity checks, who the means count: crate.eval.validity), scores random-initialised controls,
and writes <out>/index.md and <out>/browser/index.html. Every step is one of crate.eval.workflows.steps, so a rerun reuses
what matches its inputs.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crate.eval.workflows.steps import (
    ARCHS, CPU_SAE, interpret_model, log, matched_overrides, prepare_data, print_main_table, print_verdict_flags,
    quiet, steering_sweep, train_model, train_saes,
)

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


DEMO_SAE = {**CPU_SAE, "seq_len": 128}


def demo(opts: DemoOptions) -> dict[str, Path]:
    """Train tiny CRATE and GPT, interpret, report and browse; returns the paths written."""
    t0 = time.perf_counter()
    out = Path(opts.out)
    steps = DEMO_STEPS if opts.steps is None else opts.steps
    n_neurons = DEMO_NEURONS if opts.neurons is None else opts.neurons
    _start(opts, out, steps, t0)
    data_dir, finals = _train(opts, out, steps, t0)
    _interpret(opts, out, data_dir, finals, n_neurons, t0)
    paths = _report(opts, out, t0)
    _summary(paths, out, t0)
    return paths


def _start(opts: DemoOptions, out: Path, steps: int, t0: float) -> None:
    """Refuse a foreign --out and a missing LLM before any work; quiet Lightning; say what is coming."""
    import torch

    from crate.provenance import check_owned, claim

    check_owned(out, "another --out")
    if opts.llm:  # before any training: a missing LLM must not cost the whole run
        from crate.eval.llm.registry import check_llm

        check_llm("smollm2")
    claim(out)
    quiet()
    log(f"crate demo: tiny CRATE vs tiny GPT on the embedded Shakespeare corpus, {steps} steps each, "
        f"{torch.get_num_threads()} CPU threads, output in {out}", t0)


def _train(opts: DemoOptions, out: Path, steps: int, t0: float) -> tuple[Path, dict[str, Path]]:
    """Prepare the corpus and train CRATE and GPT with matched parameter counts: (data dir, {arch: final})."""
    from crate.tokenizer import padded_vocab
    from crate.datadir import read_manifest

    data_dir = prepare_data("embedded", out / "data", "bpe", opts.vocab_size, t0, opts.max_documents, opts.overwrite)
    vocab = padded_vocab(read_manifest(data_dir)["vocab_size"])
    crate_over, gpt_over, n_crate, n_gpt = matched_overrides(opts.preset, vocab, opts.block_size)
    log(f"parameters: CRATE {n_crate:,} (n_hidden={crate_over['n_hidden']}) vs GPT {n_gpt:,} "
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
    return data_dir, finals


def _interpret(opts: DemoOptions, out: Path, data_dir: Path, finals: dict[str, Path], n_neurons: int,
               t0: float) -> None:
    """GPT's SAEs (when SAELens is there), every system scored with its random-init control, the steering sweep,
    and with --llm a SmolLM2-scored sample."""
    common = dict(neurons=n_neurons, seq_len=opts.block_size, n_tokens=opts.n_tokens, seed=opts.seed, batch_size=32,
                  overwrite=opts.overwrite)
    interp = out / "interpret"
    systems: dict[str, Any] = dict(finals)
    if importlib.util.find_spec("sae_lens"):
        systems["gpt-sae"] = train_saes(finals["gpt"], data_dir, t0, opts.overwrite, seed=opts.seed, **DEMO_SAE)
    else:
        log('GPT-SAE skipped: SAELens is not installed (pip install -e ".[sae]")', t0)
    for arch, ckpt in systems.items():
        interpret_model(arch, ckpt, data_dir, interp / arch, "tar", t0, explainer="stats", simulator="stats",
                        validity=True, **common)
        if opts.controls:
            interpret_model(f"{arch} (random init)", ckpt, data_dir, interp / f"{arch}-control", "tar", t0,
                            explainer="stats", simulator="stats", control=True, **common)
    steering_sweep(systems, data_dir, out / "steer-sweep", t0, units=8, sequences=8, seq_len=opts.block_size,
                   seed=opts.seed)
    if opts.llm:
        llm_common = {**common, "neurons": min(n_neurons, DEMO_LLM_NEURONS)}
        for arch in ARCHS:
            interpret_model(f"{arch} (SmolLM2)", finals[arch], data_dir, out / "interpret-smollm2" / arch, "tar", t0,
                            explainer="smollm2", simulator="smollm2", validity=True, **llm_common)


def _report(opts: DemoOptions, out: Path, t0: float) -> dict[str, Path]:
    """<out>/index.md and (unless --no-browser) the neuron browser: {"report": ..., "browser": ...}."""
    from crate.eval.report.reproduction import write_report

    interp = out / "interpret"
    log("report: tables and plots", t0)
    index = write_report([out / "runs", interp, out / "steer-sweep"] + ([out / "interpret-smollm2"] if opts.llm else []),
                         out, seed=opts.seed)
    paths = {"report": index.resolve()}
    if opts.browser:
        from crate.eval.report.browser import write_browser

        log("browser: static site", t0)
        paths["browser"] = write_browser([interp] + ([out / "interpret-smollm2"] if opts.llm else []), out / "browser").resolve()
    return paths


def _summary(paths: dict[str, Path], out: Path, t0: float) -> None:
    """The main tables, the time taken and where the report and browser are."""
    print()
    print_main_table(out)
    print_main_table(out, "gpt_sae.md")
    print_verdict_flags(out)
    print()
    log(f"done in {time.perf_counter() - t0:.0f}s", t0)
    print(f"report:         {paths['report']}")
    if "browser" in paths:
        print(f"neuron browser: {paths['browser']}  (open it in a web browser; no server needed)")
