"""`crate demo | reproduce | study`: the workflows that chain prepare, train, interpret and report.

    crate demo [--out crate-demo] [--steps N] [--neurons N] [--llm]       tiny CRATE vs tiny GPT, end to end, offline
    crate reproduce --size 1L|2L|3L|S|B | --all [--out runs/reproduce]   the paper's pipeline, resumable per step
    crate study [--sizes 1L,2L,3L] [--seeds 3] [--out crate-study]       the paper's claim at CPU scale, seed-aware

Heavy imports (torch, matplotlib, the pipeline) stay inside the handlers so that `crate --help` is instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crate.argtypes import nonnegative_int, positive_float, positive_int


def cmd_reproduce(args: argparse.Namespace) -> int:
    from crate.eval.workflows.reproduce import ReproduceOptions, reproduce

    sizes = ["1L", "2L", "3L", "S", "B"] if args.all else [args.size]
    opts = ReproduceOptions(
        out=Path(args.out), sizes=sizes, source=args.source, tokenizer=args.tokenizer, explainer=args.explainer,
        simulator=args.simulator, protocols=args.protocols.split(","), neurons=args.neurons, max_steps=args.steps,
        train_overrides=args.set or [], random_init=args.random_init, dry_run=args.dry_run, seed=args.seed,
        overwrite=args.overwrite, sae_steps=args.sae_steps,
    )
    reproduce(opts)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from crate.eval.workflows.demo import DemoOptions, demo

    opts = DemoOptions(out=Path(args.out), steps=args.steps, neurons=args.neurons, llm=args.llm, seed=args.seed,
                       browser=not args.no_browser, controls=not args.no_controls, max_documents=args.documents,
                       overwrite=args.overwrite)
    if args.tokens is not None:
        opts.n_tokens = args.tokens
    demo(opts)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from crate.eval.workflows.study import StudyOptions, study

    def count(text: str | None) -> int | None:
        return None if text in (None, "all") else int(text)

    opts = StudyOptions(out=Path(args.out), sizes=args.sizes.split(","), seeds=args.seeds, steps=args.steps,
                        protocols=args.protocols.split(","), context=args.context, vocab_size=args.vocab_size,
                        match=args.match, sae=not args.no_sae,
                        neurons=count(args.neurons), control_neurons=count(args.control_neurons),
                        llm_neurons=args.llm_neurons, n_tokens=args.tokens, interpret_seed=args.seed,
                        overrides=args.overrides, max_documents=args.documents, overwrite=args.overwrite,
                        jobs=args.jobs, grid=args.grid, curve_neurons=args.curve_neurons, margin=args.margin)
    study(opts, command="crate " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["study"] else None)
    return 0


def _count_arg(text: str) -> str:
    if text != "all" and not (text.isdigit() and int(text) >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of neurons or 'all', got {text!r}")
    return text


def add_study(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="crate-study", help="output folder (default: crate-study)")
    p.add_argument("--sizes", default="1L,2L,3L", help="comma-separated presets (default: 1L,2L,3L)")
    p.add_argument("--seeds", type=positive_int, default=3, help="training seeds per size and arch (default 3)")
    p.add_argument("--steps", type=positive_int, default=200, help="training steps per run (default 200)")
    p.add_argument("--protocols", default="tar", help="comma-separated: tar, random, short (default: tar)")
    p.add_argument("--context", type=positive_int, default=64, help="context length of training and records (default 64)")
    p.add_argument("--vocab-size", type=positive_int, default=512,
                   help="BPE vocabulary trained on the embedded corpus (default 512)")
    p.add_argument("--match", choices=["params", "width"], default="params",
                   help="params: CRATE's dictionary widened to GPT's parameter count (default); width: h = 4d for both")
    p.add_argument("--no-sae", action="store_true", help="leave out GPT-SAE")
    p.add_argument("--neurons", type=_count_arg, default="all", help="neurons scored per layer (default: all)")
    p.add_argument("--control-neurons", type=_count_arg, default="64",
                   help="random-init control neurons per layer (default 64; 0: no controls; all)")
    p.add_argument("--llm-neurons", type=nonnegative_int, default=4,
                   help="neurons per layer through SmolLM2, first seed only: the scorer-agreement units (default 4; "
                        "0: none)")
    p.add_argument("--tokens", type=positive_int, default=16 * 1024,
                   help="validation tokens recorded per model, training seed k's from token k x --tokens (default 16384)")
    p.add_argument("--documents", type=positive_int, default=None, help="use only the first N plays of the corpus (quick runs)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the neuron samples and random records (default 0)")
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="(seed, size) runs at once, in processes sharing the cores (default: 2 on 2 cores or more)")
    p.add_argument("--grid", type=nonnegative_int, default=None,
                   help="checkpoints kept per run, every steps/grid steps, for the matched-loss reading (default: the "
                        "largest number up to 8 that divides --steps; 0: none)")
    p.add_argument("--curve-neurons", type=positive_int, default=32,
                   help="neurons per layer scored at every grid checkpoint (default 32)")
    p.add_argument("--margin", type=positive_float, default=5.0,
                   help="equivalence margin of the mean-score claims, in x100 score points (default 5)")
    p.add_argument("--overwrite", action="store_true", help="discard outputs of other inputs (otherwise refused)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="model.* / train.* overrides for every run, e.g. train.lr=1e-3 model.n_embd=64")
    p.set_defaults(func=cmd_study)


def add_reproduce(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--size", choices=["1L", "2L", "3L", "S", "B"])
    g.add_argument("--all", action="store_true", help="every size of the paper")
    p.add_argument("--out", default="runs/reproduce", help="folder of the whole reproduction (default: runs/reproduce)")
    p.add_argument("--source", default="pile", help="dataset: 'pile' (monology/pile-uncopyrighted), 'embedded', "
                   "a local file/folder, or hf:<dataset> (default: pile)")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 (the paper's) or bpe (trained on the source)")
    p.add_argument("--explainer", default="hf:mistralai/Mistral-7B-Instruct-v0.2",
                   help="explainer backend: hf:<id|dir|gguf>, http://host/v1 (OpenAI-compatible), smollm2, stats")
    p.add_argument("--simulator", default="hf:meta-llama/Llama-2-7b-hf", help="simulator backend (same forms)")
    p.add_argument("--protocols", default="tar,random,short", help="comma-separated: tar, random, short")
    p.add_argument("--neurons", type=positive_int, default=None, help="neurons sampled per layer (default: all, as the paper)")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the recipe's, 600000)")
    p.add_argument("--random-init", action="store_true", help="also score random-initialised controls")
    p.add_argument("--sae-steps", type=positive_int, default=None, help="GPT-SAE steps at 1L-3L (default 120000)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="training override, e.g. train.batch_size=96")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--dry-run", action="store_true",
                   help="check the whole plan and print its steps and whether each is done; run nothing")
    p.add_argument("--overwrite", action="store_true", help="discard outputs of other inputs (otherwise refused)")
    p.set_defaults(func=cmd_reproduce)


def add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="crate-demo", help="output folder (default: crate-demo)")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps per model (default: the demo's)")
    p.add_argument("--neurons", type=positive_int, default=None, help="neurons sampled per layer (default: the demo's)")
    p.add_argument("--llm", action="store_true", help="also explain and simulate with the embedded SmolLM2-135M")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--tokens", type=positive_int, default=None, help="validation tokens recorded per model (default 16384)")
    p.add_argument("--documents", type=positive_int, default=None, help="use only the first N plays of the corpus (quick runs)")
    p.add_argument("--no-controls", action="store_true", help="skip the random-init controls")
    p.add_argument("--no-browser", action="store_true", help="skip the neuron browser")
    p.add_argument("--overwrite", action="store_true",
                   help="discard what --out holds from other settings (otherwise such a rerun is refused)")
    p.set_defaults(func=cmd_demo)
