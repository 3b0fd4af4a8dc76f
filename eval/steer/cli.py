"""`crate steer`: clamp one neuron and show the next tokens, or (--sweep) measure steering over sampled units.

    crate steer --checkpoint DIR --layer L --neuron I --value V --prompt "1,2,3,4,5"
    crate steer --sweep -c crate=DIR gpt=DIR gpt-sae=DIR+SAE --data DIR [--out steer-sweep]   steering, measured
"""

from __future__ import annotations

import argparse

from crate.argtypes import finite_float, nonnegative_int, positive_int


def cmd_steer(args: argparse.Namespace) -> int:
    from crate.errors import CrateError
    from crate.loading import find_tokenizer
    from crate.eval.steer.clamp import parse_prompt, render, steer, zero_check

    if args.sweep:
        return cmd_steer_sweep(args)
    missing = [f"--{k}" for k in ("layer", "neuron", "value", "prompt") if getattr(args, k) is None]
    if missing or len(args.checkpoint) != 1:
        raise CrateError(f"crate steer needs one --checkpoint and {', '.join(missing) or 'its unit'} "
                         f"(or --sweep --data DIR for the steering measurement)")
    from crate.eval.models import load_model, split_sae_spec

    model, _ = load_model(args.checkpoint[0])  # DIR+SAE: steer a latent through the decoder
    args.checkpoint = split_sae_spec(args.checkpoint[0])[0]
    tokenizer = find_tokenizer(args.checkpoint, args.data)
    ids = parse_prompt(args.prompt, tokenizer)
    result = steer(model, ids, args.layer, args.neuron, args.value, k=args.k)
    check = None if args.no_zero_check else zero_check(model, ids, args.layer, args.neuron)
    render(result, check, tokenizer)
    return 0 if check is None or check.neuron is None or check.ok else 1


def cmd_steer_sweep(args: argparse.Namespace) -> int:
    from crate.errors import CrateError
    from crate.eval.models import checkpoint_names
    from crate.eval.steer.sweep import SweepConfig, parse_multiples, sweep_files, sweep_markdown

    if not args.data:
        raise CrateError("crate steer --sweep needs --data DIR: the held-out text the clamps are measured on")
    cfg = SweepConfig(units=args.units, multiples=parse_multiples(args.multiples), sequences=args.sequences,
                      seq_len=args.seq_len, top_tokens=args.top_tokens, seed=args.seed)
    result = sweep_files(checkpoint_names(args.checkpoint), args.data, args.out, cfg, split=args.split)
    print(sweep_markdown(result))
    print(f"wrote {args.out}/ (steer_sweep.json, steer_sweep.md, steer_sweep.png)")
    return 0


def add_steer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", nargs="+", required=True,
                   help="our checkpoint directory or an authors' .pt file; with --sweep several NAME=DIR[+SAE]")
    p.add_argument("--layer", type=int)
    p.add_argument("--neuron", type=int)
    p.add_argument("--value", type=finite_float, help="the constant written into the neuron")
    p.add_argument("--prompt", help='token ids ("1,2,3,4,5") or text (needs a tokenizer: --data)')
    p.add_argument("--sweep", action="store_true", help="measure intended effect and collateral cost (needs --data)")
    p.add_argument("--out", default="steer-sweep", help="--sweep: output folder (default steer-sweep)")
    p.add_argument("--units", type=positive_int, default=16, help="--sweep: units sampled per layer")
    p.add_argument("--multiples", default="0,1,2,4,8", help="--sweep: clamp values, x each unit's max activation")
    p.add_argument("--sequences", type=positive_int, default=16, help="--sweep: held-out sequences (half pick tokens)")
    p.add_argument("--seq-len", type=positive_int, default=128, help="--sweep: tokens per sequence")
    p.add_argument("--top-tokens", type=positive_int, default=5, help="--sweep: a unit's intended tokens")
    p.add_argument("--split", default="val", help="--sweep: the data split")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--data", help="a prepared data directory whose tokenizer.json decodes tokens and encodes text")
    p.add_argument("-k", type=positive_int, default=10, help="top tokens shown")
    p.add_argument("--no-zero-check", action="store_true", help="skip the check that 0 on an inactive unit changes nothing")
    p.set_defaults(func=cmd_steer)
