"""`crate compare`: representation comparison of CRATE and GPT (or any checkpoints sharing a tokenizer).

    crate compare -c crate=runs/crate/final gpt=runs/gpt/final -d data/pile --out compare
    crate compare -c crate=A crate2=B gpt=C gpt2=D -d DATA         every pair: seed-vs-seed is the noise floor
    crate compare --trajectory runs/crate -d DATA --out compare-traj   each layer along training vs its final state
"""

from __future__ import annotations

import argparse

from crate.argtypes import device, nonnegative_int, positive_float, positive_int


def cmd_compare(args: argparse.Namespace) -> int:
    from crate.eval.compare.run import CompareConfig, compare_files
    from crate.eval.compare.stitch import StitchConfig
    from crate.eval.compare.tables import pairs_markdown
    from crate.eval.models import checkpoint_names

    stitch = None if args.no_stitch else StitchConfig(steps=args.stitch_steps, batch=args.stitch_batch,
                                                      lr=args.stitch_lr)
    cfg = CompareConfig(tokens=args.tokens, seq_len=args.seq_len, cka_batch=args.cka_batch, stitch=stitch,
                        seed=args.seed, device=args.device)
    result, _ = compare_files(checkpoint_names(args.checkpoint or []), args.data, args.out, cfg,
                              trajectory=args.trajectory, overwrite=args.overwrite)
    if result["cka"]:
        print(pairs_markdown(result))
    print(f"see {args.out}/index.md")
    return 0


def add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", nargs="+", metavar="NAME=CKPT",
                   help="two or more checkpoints, named (crate=DIR gpt=DIR); every pair is compared")
    p.add_argument("--data", "-d", required=True, help="a prepared data directory: its val split is the held-out "
                   "text, its train split what stitches train on")
    p.add_argument("--out", "-o", default="compare", help="output folder (default compare)")
    p.add_argument("--tokens", type=positive_int, default=8192, help="held-out tokens from the val split (8192)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence (256; at most the smallest "
                   "model's context)")
    p.add_argument("--cka-batch", type=positive_int, default=1024,
                   help="tokens per CKA minibatch: the memory bound, one n x n float64 Gram per layer (1024)")
    p.add_argument("--stitch-steps", type=positive_int, default=200, help="Adam steps per stitch (200)")
    p.add_argument("--stitch-batch", type=positive_int, default=8, help="sequences per stitching step (8)")
    p.add_argument("--stitch-lr", type=positive_float, default=1e-3, help="stitching's Adam learning rate (1e-3)")
    p.add_argument("--no-stitch", action="store_true", help="CKA only")
    p.add_argument("--trajectory", metavar="RUN", help="a run folder with grid/step-<N>/ checkpoints: CKA of each "
                   "layer at each against its final state")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="stitching's training windows and random-init control")
    p.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="discard the results of other inputs in --out")
    p.set_defaults(func=cmd_compare)
