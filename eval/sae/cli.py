"""`crate sae train | metrics`: sparse autoencoders on a model's neurons (crate.eval.sae); heavy imports stay in
the handlers."""

from __future__ import annotations

import argparse

from crate.argtypes import device, nonnegative_float, nonnegative_int, positive_float, positive_int


def _steps(text: str) -> tuple[int, ...]:
    """Steps separated by commas, each >= 1 (empty: none)."""
    try:
        steps = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"give steps separated by commas, e.g. 10000,20000; got {text!r}") from None
    if any(s < 1 for s in steps):
        raise argparse.ArgumentTypeError(f"steps count from 1, got {text!r}")
    return steps


def cmd_sae_train(args: argparse.Namespace) -> int:
    from crate.eval.sae.metrics import metrics_line
    from crate.eval.sae.train import SAETrainConfig, train_from_files

    cfg = SAETrainConfig(kind=args.kind, layer=args.layer, expansion=args.expansion, l1=args.l1, k=args.k, lr=args.lr,
                         steps=args.steps, batch_tokens=args.batch_tokens, lm_batch=args.lm_batch,
                         seq_len=args.seq_len, buffer_tokens=args.buffer_tokens, warmup_steps=args.warmup_steps,
                         resample_at=args.resample_at, dead_window=args.dead_window,
                         eval_tokens=args.eval_tokens, seed=args.seed, device=args.device)
    out, metrics = train_from_files(args.checkpoint, args.data, args.out, cfg, split=args.split,
                                    overwrite=args.overwrite)
    print(f"SAE {out}: {metrics_line(metrics)}")
    return 0


def cmd_sae_metrics(args: argparse.Namespace) -> int:
    from crate.eval.sae.attach import check_sae_fits, load_sae
    from crate.eval.sae.metrics import metrics_line, sae_metrics
    from crate.provenance import weights_hash
    from crate.train.data import open_split
    from crate.loading import load_any

    model, _ = load_any(args.checkpoint)
    sae = load_sae(args.sae)
    check_sae_fits(sae, model, args.sae, weights_hash(model))  # another model's SAE: refused, as when attached
    m = sae_metrics(model.eval(), sae, open_split(args.data, args.split), args.tokens, args.seq_len)
    print(f"SAE {args.sae} on {args.data} ({args.split}, {m['n_tokens']} tokens): {metrics_line(m)}")
    return 0


def add_sae(p: argparse.ArgumentParser) -> None:
    s = p.add_subparsers(dest="sae_command", metavar="SUBCOMMAND", required=True)
    t = s.add_parser("train", help="train an SAE (SAELens) on one layer's neurons; save in SAELens's format",
                     description="Defaults are the paper's (SPEC.md 6a): ReLU + L1 8e-5, 16x, lr 4e-4, Adam "
                                 "(0.9, 0.999), 4x1024-token LM batches into a 2^19 shuffled buffer, warm-up + "
                                 "cosine, dead-latent resampling at 10k/20k/50k/75k/100k.")
    t.add_argument("--checkpoint", "-c", required=True, help="the model whose neurons the SAE reads")
    t.add_argument("--data", "-d", required=True, help="a prepared data directory (crate prepare)")
    t.add_argument("--layer", type=nonnegative_int, required=True, help="the layer whose neuron hook the SAE reads")
    t.add_argument("--out", "-o", default=None, help="SAE folder (default: <run>/sae/<kind>-l<layer>)")
    t.add_argument("--kind", choices=["relu", "topk"], default="relu", help="relu (ReLU + L1, the paper's) | topk")
    t.add_argument("--expansion", type=positive_int, default=16, help="d_sae / d_in")
    t.add_argument("--l1", type=nonnegative_float, default=8e-5, help="L1 coefficient (relu)")
    t.add_argument("-k", "--k", type=positive_int, default=32, help="latents kept per token (topk)")
    t.add_argument("--lr", type=positive_float, default=4e-4)
    t.add_argument("--steps", type=positive_int, default=120_000, help="SAE optimiser steps")
    t.add_argument("--batch-tokens", type=positive_int, default=4096, help="activations per SAE step")
    t.add_argument("--lm-batch", type=positive_int, default=4, help="sequences per model forward")
    t.add_argument("--seq-len", type=positive_int, default=1024)
    t.add_argument("--buffer-tokens", type=positive_int, default=2**19, help="shuffled activation buffer")
    t.add_argument("--warmup-steps", type=nonnegative_int, default=None, help="LR warm-up (default 5%% of the steps)")
    t.add_argument("--resample-at", type=_steps, default="10000,20000,50000,75000,100000",
                   help="steps at which dead latents are resampled (empty: never)")
    t.add_argument("--dead-window", type=positive_int, default=1000, help="steps without firing that count as dead")
    t.add_argument("--eval-tokens", type=positive_int, default=2**20, help="validation tokens for the metrics")
    t.add_argument("--split", default="train", choices=["train", "val"], help="split the SAE trains on (metrics use val)")
    t.add_argument("--seed", type=nonnegative_int, default=0)
    t.add_argument("--device", type=device, default=None, help="cuda / cpu (default: cuda when available)")
    t.add_argument("--overwrite", action="store_true", help="replace an SAE of other inputs in --out")
    t.set_defaults(func=cmd_sae_train)
    m = s.add_parser("metrics", help="an SAE's metrics on a data split")
    m.add_argument("sae", help="an SAE folder (SAELens format)")
    m.add_argument("--checkpoint", "-c", required=True)
    m.add_argument("--data", "-d", required=True)
    m.add_argument("--split", default="val", choices=["train", "val"])
    m.add_argument("--tokens", type=positive_int, default=2**20)
    m.add_argument("--seq-len", type=positive_int, default=1024)
    m.set_defaults(func=cmd_sae_metrics)
