"""`crate eval`: validation loss and perplexity on a prepared split, or lm-evaluation-harness tasks (--tasks)."""

from __future__ import annotations

import argparse
import json

from crate.argtypes import device, positive_int


def cmd_eval(args: argparse.Namespace) -> int:
    if args.tasks:
        return _eval_harness(args)
    if args.data is None:
        from crate.errors import ConfigError

        raise ConfigError("crate eval needs --data DIR (loss and perplexity on a prepared split) or --tasks (lm-eval)")
    from crate.eval.evaluate.loss import evaluate

    r = evaluate(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size, context=args.context,
                 max_batches=args.max_batches, device=args.device)
    print(json.dumps(r) if args.json else
          f"{args.split} loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}  ({r['tokens']:,} tokens, context {r['context']})")
    return 0


def _eval_harness(args: argparse.Namespace) -> int:
    from crate.eval.evaluate.harness import results_table, run_harness

    if args.log_samples and not args.out:
        from crate.errors import ConfigError

        raise ConfigError("--log-samples writes the per-sample files beside the results JSON: give --out FILE.json")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = run_harness(args.checkpoint, tasks, args.out, data=args.data, include_path=args.include_path,
                          batch_size=args.batch_size, device=args.device, limit=args.limit, num_fewshot=args.num_fewshot,
                          log_samples=args.log_samples)
    print(json.dumps(results["results"]) if args.json else results_table(results))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="our checkpoint dir, an authors'/nanoGPT .pt, or a training .ckpt")
    p.add_argument("--data", default=None, help="a prepared data directory (same tokenizer as the model); "
                   "with --tasks, where the tokenizer comes from if the checkpoint has none")
    p.add_argument("--tasks", default=None, help="lm-evaluation-harness tasks, e.g. lambada_openai,wikitext")
    p.add_argument("--out", default=None, help="with --tasks: write the harness's results JSON here")
    p.add_argument("--include-path", default=None, help="with --tasks: a folder of task YAMLs of your own")
    p.add_argument("--log-samples", action="store_true",
                   help="with --tasks --out: also write the harness's samples_<task>_<date>.jsonl beside the results")
    p.add_argument("--limit", type=float, default=None, help="with --tasks: documents per task (or a fraction)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--context", type=positive_int, default=None, help="window length (default: the model's block_size)")
    p.add_argument("--max-batches", type=positive_int, default=None)
    p.add_argument("--device", type=device, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
