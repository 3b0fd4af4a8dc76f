"""crate-lm: train, evaluate and interpret CRATE language models against a GPT-2 baseline.

`COMMANDS` is the one table of subcommands: each names the module that holds its handler and options
(`add_<command>(parser)`, beside the package it runs), so the handlers live with their packages and this file
says what exists. Those modules import only argparse-level code at the top, so `crate --help` is instant.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
import threading
from collections.abc import Sequence

from crate.config import ACTIVATIONS

# command -> (the module with `add_<command>(parser)`, one line of help), in the order `crate --help` lists them
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("crate.cli", "versions, devices and the presets with their parameter counts"),
    "prepare": ("crate.train.cli", "tokenize a text source into memmap shards with a train/val split"),
    "train": ("crate.train.cli", "train from a YAML recipe (default: tiny CRATE on the embedded corpus)"),
    "export": ("crate.train.cli", "export a training checkpoint (.ckpt) to our checkpoint directory"),
    "convert": ("crate.cli", "convert an authors'/nanoGPT .pt checkpoint into our format"),
    "export-hf": ("crate.cli", "export a checkpoint to transformers (CRATE: CrateForCausalLM, GPT: GPT2LMHeadModel)"),
    "eval": ("crate.eval.evaluate.cli",
             "validation loss and perplexity on a prepared split, or lm-eval tasks (--tasks)"),
    "interpret": ("crate.eval.autointerp.cli", "record activations, explain / simulate / score neurons, summarise"),
    "sae": ("crate.eval.sae.cli", "sparse autoencoders on a model's neurons (GPT-SAE): train, metrics"),
    "steer": ("crate.eval.steer.cli", "clamp one neuron at every position; top next tokens before and after "
              "(--sweep: the steering measurement over sampled units and clamp values)"),
    "compare": ("crate.eval.compare.cli", "CKA and model stitching between checkpoints (CRATE vs GPT, seed vs seed)"),
    "report": ("crate.eval.report.cli", "the paper's tables and figures from interpret results and training runs"),
    "browse": ("crate.eval.report.cli", "write a static HTML neuron browser for interpret results"),
    "demo": ("crate.eval.workflows.cli",
             "tiny CRATE vs tiny GPT on the embedded corpus: train, interpret, report, browse"),
    "reproduce": ("crate.eval.workflows.cli",
                  "the paper's pipeline for both archs: prepare, train, record, score, report"),
    "study": ("crate.eval.workflows.cli", "the paper's claim at CPU scale: 1L/2L/3L CRATE vs GPT (and GPT-SAE), "
              "several training seeds, seed-aware intervals and a verdict per claim"),
}


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch
    from rich.console import Console
    from rich.table import Table

    from crate import __version__, build_model
    from crate.config import PAPER_SIZES
    from crate.kernels.ista import triton_available

    console = Console()
    console.print(f"crate-lm {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    cuda = torch.cuda.is_available()
    devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "none"
    console.print(f"CUDA: {devices}   triton: {'yes' if triton_available() else 'no'}   CPU threads: {torch.get_num_threads()}")
    table = Table(title="Presets (parameters counted as the authors do: tied embedding once, no wpe)")
    for col in ("preset", "n_layer", "n_head", "n_embd", "n_hidden", "CRATE params", "GPT params"):
        table.add_column(col, justify="right")
    with torch.device("meta"):
        for preset in (*PAPER_SIZES, "tiny", "micro"):
            c, g = build_model("crate", preset), build_model("gpt", preset)
            cfg = c.config
            table.add_row(preset, str(cfg.n_layer), str(cfg.n_head), str(cfg.n_embd), str(cfg.n_hidden),
                          f"{c.num_params():,}", f"{g.num_params():,}")
    console.print(table)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from crate.checkpoint import check_replaceable, save
    from crate.loading import load

    check_replaceable(Path(args.dst))  # before reading the source
    model = load(args.src, **({"activation": args.activation} if args.activation else {}))
    save(model, args.dst)
    print(f"wrote {args.dst} ({model.config.arch}, {model.num_params():,} parameters)")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from crate.checkpoint import check_replaceable
    from crate.hf import export_hf
    from crate.loading import checkpoint_tokenizer, load

    check_replaceable(Path(args.out))  # before reading the checkpoint
    model = load(args.checkpoint)
    tok, identity = checkpoint_tokenizer(args.checkpoint, args.data)
    export_hf(model, args.out, tokenizer=tok, tokenizer_identity=identity)
    kind = "CrateForCausalLM (with modeling_crate.py)" if model.config.arch == "crate" else "GPT2LMHeadModel"
    print(f"wrote a transformers {kind} directory to {args.out}"
          + ("" if tok is not None else "; no tokenizer found (pass --data DIR to export one)"))
    return 0


def add_info(p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=cmd_info)


def add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a .pt file (authors' release or nanoGPT) or one of our checkpoint directories")
    p.add_argument("dst", help="output checkpoint directory")
    p.add_argument("--activation", choices=ACTIVATIONS,
                   help="GPT only: the MLP activation, if the file does not say (gelu: tanh approximation, as GPT-2; "
                        "gelu_exact: erf, as nanoGPT's nn.GELU())")
    p.set_defaults(func=cmd_convert)


def add_export_hf(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--data", default=None, help="a prepared data directory whose tokenizer to export (default: the checkpoint's)")
    p.set_defaults(func=cmd_export_hf)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        try:
            handlers = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        getattr(handlers, "add_" + name.replace("-", "_"))(sub.add_parser(name, help=help_text))
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with KEY=VALUE overrides accepted wherever they stand: argparse takes a positional list only
    as one run, so overrides on both sides of the options (`crate train a=1 --out x b=2`) left the second group
    "unrecognized"; they join the first. Anything else unknown is still a usage error."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
        return args
    return parser.parse_args(argv)  # argparse's own result, or its usage error for anything else unknown


def main(argv: Sequence[str] | None = None) -> int:
    from crate.errors import CrateError

    args = parse(argv)
    terminated: list[int] = []
    previous = _stop_on_sigterm(terminated) if args.command != "train" else None  # train handles its own signals
    try:
        return int(args.func(args) or 0)
    except (CrateError, FileNotFoundError) as e:
        # Errors of ours name the problem and the fix; a traceback would only bury them.
        print(f"crate {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a write outside crate.atomic (a log line, a library's file): what was finished is kept, as on Ctrl-C
        print(f"crate {args.command}: error: the disk is full ({e.filename or e.strerror}): free space there, then "
              f"{RESUME.get(args.command, 'run the same command again to resume')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # every command keeps what it finished (shards, checkpoints, scored neurons) and resumes from it
        how = "stopped by SIGTERM" if terminated else "interrupted"
        print(f"\ncrate {args.command}: {how}; {RESUME.get(args.command, 'run the same command again to resume')}",
              file=sys.stderr)
        return 128 + (terminated[0] if terminated else signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm(terminated: list[int]) -> object | None:
    """SIGTERM (a scheduler's or `kill`'s stop) unwinds like Ctrl-C, so a command keeps what it finished and says how
    to resume, instead of dying silently; returns the handler it replaced (None off the main thread).

    A forked child (lm-eval's bootstrap pool, a tokenizer pool, a data loader) gets the replaced handler back the
    moment it is forked: a Python handler only runs between bytecodes, so a child that deadlocks in C after the fork
    (a lock another thread held) would ignore `Pool.terminate()`'s SIGTERM and hang its parent forever."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, frame: object) -> None:
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    _OURS.update(handler=stop, previous=previous)
    return previous


_OURS: dict[str, object] = {}  # our SIGTERM handler and the one it replaced, for the fork hook below


def _restore_sigterm_after_fork() -> None:
    if _OURS and signal.getsignal(signal.SIGTERM) is _OURS["handler"]:
        signal.signal(signal.SIGTERM, _OURS["previous"] or signal.SIG_DFL)  # None: a handler set outside Python


os.register_at_fork(after_in_child=_restore_sigterm_after_fork)


RESUME = {
    "train": "resume with `crate train --resume <run dir>`",
    "prepare": "run the same command again: it resumes from the last shard and gives identical shards",
    "interpret": "run the same command again: records and scored neurons are kept and reused, and the LLM's answers "
                 "are cached (llm_cache.sqlite), so the neurons that were in flight are finished from the cache",
    "sae": "run the same command again: an interrupted SAE training saved nothing and starts over (SAELens's "
           "trainer keeps no checkpoint to resume from); a finished SAE is reused",
    "demo": "run the same command again: finished steps are reused",
    "reproduce": "run the same command again: finished steps are reused",
    "study": "run the same command again: finished runs and scored neurons are reused",
}


if __name__ == "__main__":
    sys.exit(main())
