"""Subcommands `crate prepare`, `crate train`, `crate eval` and `crate export` (heavy imports stay in the handlers)."""

from __future__ import annotations

import argparse
import json


def cmd_prepare(args: argparse.Namespace) -> int:
    from crate.train.data import prepare, read_manifest

    out = prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                  val_fraction=args.val_fraction, seed=args.seed, num_proc=args.num_proc, text_field=args.text_field,
                  hf_split=args.hf_split, hf_config=args.hf_config, max_documents=args.max_documents,
                  shard_tokens=args.shard_tokens, overwrite=args.overwrite)
    m = read_manifest(out)
    print(f"wrote {out}: {m['tokens']['train']:,} train + {m['tokens']['val']:,} val tokens ({m['dtype']}), "
          f"tokenizer {m['tokenizer']['name']} (V={m['vocab_size']}), {m['documents']:,} documents")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from crate.train.run import global_rank, run_from_cli

    summary = run_from_cli(args.config, args.overrides, args.out, args.resume)
    if global_rank() != 0:  # rank 0 reports for all
        return 0
    if summary.get("preempted"):
        print(f"preempted at step {summary['step']}: resume with `crate train --resume {summary['run_dir']}`")
    elif "val_loss" in summary:
        print(f"done: {summary['step']} steps, val loss {summary['val_loss']:.4f} (ppl {summary['val_ppl']:.2f}); "
              f"model in {summary.get('final', summary['run_dir'])}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from crate.train.evaluate import evaluate

    r = evaluate(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size, context=args.context,
                 max_batches=args.max_batches, device=args.device)
    print(json.dumps(r) if args.json else
          f"{args.split} loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}  ({r['tokens']:,} tokens, context {r['context']})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from crate.train.run import export_checkpoint

    path = export_checkpoint(args.ckpt, args.out, data_dir=args.data)
    print(f"wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a text source into memmap shards with a train/val split")
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
    p.add_argument("--overwrite", action="store_true", help="discard what --out holds")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train from a YAML recipe (default: tiny CRATE on the embedded corpus)")
    p.add_argument("--config", "-c", default=None, help="a recipe: configs/<name>.yaml or just <name>")
    p.add_argument("--out", default=None, help="run directory (default runs/<name>-<time>)")
    p.add_argument("--resume", default=None, help="a run directory or a .ckpt file to continue exactly")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=100 model.n_layer=4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint on a prepared split")
    p.add_argument("--checkpoint", required=True, help="our checkpoint dir, an authors'/nanoGPT .pt, or a training .ckpt")
    p.add_argument("--data", required=True, help="a prepared data directory (same tokenizer as the model)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context", type=int, default=None, help="window length (default: the model's block_size)")
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a training checkpoint (.ckpt) to our checkpoint directory")
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--data", default=None, help="data directory whose tokenizer to embed (default: the run's)")
    p.set_defaults(func=cmd_export)
