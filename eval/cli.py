"""`crate interpret`: record, explain, simulate and score neurons; heavy imports stay in the handler."""

from __future__ import annotations

import argparse
import os
from typing import Any


def _layers(text: str | None) -> list[int | str] | None:
    if not text or text == "all":
        return None
    out: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part and part.replace("-", "").isdigit():
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        elif part.isdigit():
            out.append(int(part))
        elif part:
            out.append(part)
    return out


def _neurons(text: str | None) -> int | list[int] | None:
    if not text or text == "all":
        return None
    if text.startswith("sample:"):
        return int(text.split(":", 1)[1])
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def cmd_interpret(args: argparse.Namespace) -> int:
    from crate.eval.interpret import InterpretConfig, run_compare, run_interpret, summary_markdown

    llm_options: dict[str, Any] = {}
    if args.quantize:
        llm_options["quantize"] = args.quantize
    if args.api_key_env != "OPENAI_API_KEY" or args.no_api_key:
        llm_options["api_key_env"] = None if args.no_api_key else args.api_key_env
    if args.no_api_key:
        llm_options["require_key"] = False
    cfg = InterpretConfig(
        protocol=args.protocol, explainer=args.explainer, simulator=args.simulator or args.explainer,
        layers=_layers(args.layers), neurons=_neurons(args.neurons), n_tokens=args.tokens, seq_len=args.seq_len,
        split=args.split, seed=args.seed, batch_size=args.batch_size, device=args.device,
        extra_scores=not args.no_extra_scores, llm_options=llm_options, cache=args.cache,
        control=args.control, exclude_last={"auto": "auto", "yes": True, "no": False}[args.exclude_last],
        write_json=not args.no_json, progress=True,
    )
    if len(args.checkpoint) == 1 and not args.controls:
        summary = run_interpret(args.checkpoint[0], args.data, args.out, cfg)
        print(summary_markdown({os.path.basename(str(args.checkpoint[0]).rstrip("/")): summary}))
    else:
        names: dict[str, str] = {}
        for c in args.checkpoint:
            name, sep, path = c.partition("=")
            if not sep:
                name, path = os.path.basename(c.rstrip("/")), c
            names[name] = path
        summary = run_compare(names, args.data, args.out, cfg, controls=args.controls)
        print(summary_markdown(summary["models"], summary["comparison"]))
    print(f"wrote {args.out}/ (records, scores/{cfg.protocol}/, summary.json, summary.md, provenance.json)")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("interpret", help="record activations, explain / simulate / score neurons, summarise",
                       description="Neuron-level interpretability (SPEC.md section 6), offline and reproducible.")
    p.add_argument("--checkpoint", "-c", nargs="+", required=True,
                   help="checkpoint dir or .pt; several (or NAME=PATH) to compare models")
    p.add_argument("--data", "-d", required=True, help="a prepared data directory (crate prepare)")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument("--protocol", default="tar", help="tar | random | short (top-and-random, random-only, short-context)")
    p.add_argument("--explainer", default="stats",
                   help="stats | smollm2 | hf:<hub id|dir|file.gguf> | http://host:port/v1#model (default stats)")
    p.add_argument("--simulator", default=None, help="as --explainer (default: the explainer's)")
    p.add_argument("--layers", default=None, help="e.g. 0,2-4 or hook names; default all")
    p.add_argument("--neurons", default=None, help="all | 0-99,200 | sample:N (a seeded sample per layer)")
    p.add_argument("--tokens", type=int, default=None, help="tokens of the split to record (default: the protocol's)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--split", default="val")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass while recording")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--quantize", choices=["4bit"], default=None, help="load the hf: LLM in 4 bits (bitsandbytes)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the HTTP key")
    p.add_argument("--no-api-key", action="store_true", help="the HTTP endpoint needs no key")
    p.add_argument("--cache", default=None, help="LLM call cache (default <out>/llm_cache.sqlite)")
    p.add_argument("--control", action="store_true", help="score a randomly initialised model of the same config")
    p.add_argument("--controls", action="store_true", help="also score random-init controls of every checkpoint")
    p.add_argument("--exclude-last", choices=["auto", "yes", "no"], default="auto",
                   help="drop the last layer from the model aggregate (auto: for 6 and 12 layers, as the paper)")
    p.add_argument("--no-extra-scores", action="store_true", help="skip detection and fuzzing scores")
    p.add_argument("--no-json", action="store_true", help="write only the binary record cache, no per-neuron JSON")
    p.set_defaults(func=cmd_interpret)
