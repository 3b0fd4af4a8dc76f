"""Subcommands `crate prepare`, `crate train` and `crate export` (heavy imports stay in the handlers)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

SIGINT_EXIT = 128 + signal.SIGINT  # 130, what a shell reports for a command stopped by Ctrl-C


def cmd_prepare(args: argparse.Namespace) -> int:
    from crate.datadir import MANIFEST, read_manifest
    from crate.train.prepare import prepare

    reused = (Path(args.out) / MANIFEST).is_file() and not args.overwrite
    try:
        out = prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                      val_fraction=args.val_fraction, seed=args.seed, num_proc=args.num_proc,
                      text_field=args.text_field, hf_split=args.hf_split, hf_config=args.hf_config,
                      max_documents=args.max_documents, shard_tokens=args.shard_tokens, encoding=args.encoding,
                      overwrite=args.overwrite)
    except KeyboardInterrupt:
        print("crate prepare: interrupted; run the same command again to resume (it finishes with the same "
              "shards as an uninterrupted run)", file=sys.stderr)
        return SIGINT_EXIT
    m = read_manifest(out)
    print(f"{'reused' if reused else 'wrote'} {out}: {m['tokens']['train']:,} train + {m['tokens']['val']:,} val "
          f"tokens ({m['dtype']}), tokenizer {m['tokenizer']['name']} (V={m['vocab_size']}), {m['documents']:,} documents"
          + (" (prepared earlier from the same inputs)" if reused else ""))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Exit status: 0 when finished, 128 + the signal number when a signal stopped it (130 Ctrl-C,
    143 SIGTERM, 138 SIGUSR1), and 0 when the job was requeued under SLURM (its next run continues)."""
    from crate.train.run import global_rank, run_from_cli

    try:
        summary = run_from_cli(args.config, args.overrides, args.out, args.resume)
    except KeyboardInterrupt:  # outside the trainer's handlers (data preparation, start-up, export)
        print("crate train: interrupted; `crate train --resume <run dir>` continues from its last checkpoint "
              "(run the same command again if none was written yet)", file=sys.stderr)
        return SIGINT_EXIT
    if not summary.get("signal"):
        if global_rank() == 0 and "val_loss" in summary:  # rank 0 reports for all
            print(f"done: {summary['step']} steps, val loss {summary['val_loss']:.4f} (ppl {summary['val_ppl']:.2f}); "
                  f"model in {summary.get('final', summary['run_dir'])}")
        return 0
    name = signal.Signals(summary["signal"]).name
    if global_rank() == 0:
        if summary.get("requeued"):
            print(f"{name} at step {summary['step']}: the SLURM job is requeued and resumes from "
                  f"{summary['run_dir']}/checkpoints/last.ckpt")
        else:
            print(f"stopped by {name} at step {summary['step']}: resume with "
                  f"`crate train --resume {summary['run_dir']}`", file=sys.stderr)
    return 0 if summary.get("requeued") else 128 + summary["signal"]


def cmd_export(args: argparse.Namespace) -> int:
    from crate.train.export import export_checkpoint

    path = export_checkpoint(args.ckpt, args.out, data_dir=args.data)
    print(f"wrote {path}")
    return 0


def add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", default="embedded",
                   help="'embedded' (Shakespeare, offline), 'hf:<dataset>' (streamed), or .txt/.jsonl/.parquet file(s) or a folder")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", choices=["gpt2", "bpe"], default="bpe", help="GPT-2 BPE, or a byte-level BPE trained on the data")
    p.add_argument("--vocab-size", type=int, default=512, help="vocabulary of the trained BPE (default 512)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-proc", type=int, default=None, help="tokenizer processes (default: CPU count, at most 8)")
    p.add_argument("--text-field", default="text", help="field of .jsonl/.parquet/HF records holding the text")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-config", default=None)
    p.add_argument("--max-documents", type=int, default=None, help="stop after this many documents")
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file")
    p.add_argument("--encoding", default="utf-8", help="text encoding of .txt/.jsonl files (default utf-8; e.g. latin-1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what an earlier `crate prepare` wrote into --out (never other files)")
    p.set_defaults(func=cmd_prepare)


def add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="a recipe: configs/<name>.yaml or just <name>")
    p.add_argument("--out", default=None, help="run directory (default runs/<name>-<time>)")
    p.add_argument("--resume", default=None, help="a run directory or a .ckpt file to continue exactly")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=100 model.n_layer=4")
    p.set_defaults(func=cmd_train)


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--data", default=None, help="data directory whose tokenizer to embed (default: the run's)")
    p.set_defaults(func=cmd_export)
