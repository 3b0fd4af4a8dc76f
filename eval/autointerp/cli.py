"""`crate interpret`: record, explain, simulate and score neurons; heavy imports stay in the handler."""

from __future__ import annotations

import argparse
from typing import Any

from crate.argtypes import device, nonnegative_int, positive_int


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
    """all | sample:N | 0-99,200 -> None | N | [0, ..., 99, 200]; anything else is an error naming the syntax."""
    from crate.errors import CrateError

    if not text or text == "all":
        return None
    try:
        if text.startswith("sample:"):
            return int(text.split(":", 1)[1])
        out: list[int] = []
        for part in text.split(","):
            a, sep, b = part.partition("-")
            out += list(range(int(a), int(b) + 1)) if sep else [int(a)]
        return out
    except ValueError:
        raise CrateError(f"--neurons {text!r}: use all, sample:N, or indices and ranges such as 0-99,200") from None


def _in_process(spec: str) -> bool:
    """An LLM spec that loads a model in this process (what --quantize applies to)."""
    return spec == "smollm2" or spec.startswith("hf:")


def cmd_interpret(args: argparse.Namespace) -> int:
    from crate.errors import CrateError
    from crate.eval.autointerp.compare import run_compare
    from crate.eval.autointerp.config import InterpretConfig
    from crate.eval.autointerp.interpret import run_interpret
    from crate.eval.autointerp.summary import summary_markdown
    from crate.eval.models import checkpoint_names

    simulator = args.simulator or args.explainer
    if args.quantize and not any(_in_process(spec) for spec in (args.explainer, simulator)):
        raise CrateError(f"--quantize {args.quantize} loads an in-process LLM (smollm2, hf:...) in 4 bits, but "
                         f"--explainer {args.explainer} and --simulator {simulator} load none: drop --quantize, or "
                         f"give an hf: or smollm2 explainer or simulator")
    api_key_env = "OPENAI_API_KEY" if args.api_key_env is None else args.api_key_env
    llm_options: dict[str, Any] = {}
    if args.quantize:
        llm_options["quantize"] = args.quantize
    if api_key_env != "OPENAI_API_KEY" or args.no_api_key:
        llm_options["api_key_env"] = None if args.no_api_key else api_key_env
    if args.no_api_key:
        llm_options["require_key"] = False
    if args.requests_in_flight is not None:
        llm_options["concurrency"] = args.requests_in_flight
    cfg = InterpretConfig(
        protocol=args.protocol, explainer=args.explainer, simulator=simulator,
        layers=_layers(args.layers), neurons=_neurons(args.neurons), n_tokens=args.tokens, seq_len=args.seq_len,
        token_offset=args.token_offset, split=args.split, seed=args.seed, batch_size=args.batch_size, device=args.device,
        extra_scores=not args.no_extra_scores, llm_options=llm_options, cache=args.cache,
        control=args.control, exclude_last={"auto": "auto", "yes": True, "no": False}[args.exclude_last],
        write_json=not args.no_json, progress=True, schedule=args.schedule, neurons_in_flight=args.neurons_in_flight,
    )
    validate = None
    if args.validity:
        from crate.eval.validity.run import validate
    if len(args.checkpoint) == 1 and not args.controls and "=" not in args.checkpoint[0]:
        summary = run_interpret(args.checkpoint[0], args.data, args.out, cfg, overwrite=args.overwrite,
                                validate=validate)
        print(summary_markdown({summary["provenance"]["model"]["name"]: summary}))
    else:
        summary = run_compare(checkpoint_names(args.checkpoint), args.data, args.out, cfg, controls=args.controls,
                              overwrite=args.overwrite, validate=validate)
        print(summary_markdown(summary["models"], summary["comparison"]))
    written = f"records, scores/{cfg.protocol}/, summary.json, summary.md, provenance.json"
    print(f"wrote {args.out}/ ({written}{', validity/ (validity.md: is the scorer valid here?)' if validate else ''})")
    return 0


def add_interpret(p: argparse.ArgumentParser) -> None:
    p.description = "Neuron-level interpretability (SPEC.md section 6), offline and reproducible."
    p.add_argument("--checkpoint", "-c", nargs="+", required=True,
                   help="checkpoint dir or .pt; several (or NAME=PATH) to compare models; DIR+SAE[,SAE] scores "
                        "the latents of SAEs (crate sae train) on DIR's neurons")
    p.add_argument("--data", "-d", required=True, help="a prepared data directory (crate prepare)")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument("--protocol", default="tar", help="tar | random | short (top-and-random, random-only, short-context)")
    p.add_argument("--explainer", default="stats",
                   help="stats | smollm2 | hf:<hub id|dir|file.gguf> | http://host:port/v1#model (default stats)")
    p.add_argument("--simulator", default=None, help="as --explainer (default: the explainer's)")
    p.add_argument("--layers", default=None, help="e.g. 0,2-4 or hook names; default all")
    p.add_argument("--neurons", default=None, help="all | 0-99,200 | sample:N (a seeded sample per layer)")
    p.add_argument("--tokens", type=positive_int, default=None,
                   help="tokens of the split to record (default: the protocol's)")
    p.add_argument("--token-offset", type=nonnegative_int, default=0,
                   help="tokens of the split skipped before recording (default 0: from its start)")
    p.add_argument("--seq-len", type=positive_int, default=1024)
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass while recording")
    p.add_argument("--device", type=device, default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--quantize", choices=["4bit"], default=None, help="load the hf: LLM in 4 bits (bitsandbytes)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key-env", default=None,
                     help="environment variable holding the HTTP key (default OPENAI_API_KEY)")
    key.add_argument("--no-api-key", action="store_true", help="the HTTP endpoint needs no key")
    p.add_argument("--schedule", choices=["batched", "neuron"], default="batched",
                   help="batched: LLM calls of many neurons share batches (default); neuron: one neuron at a time")
    p.add_argument("--neurons-in-flight", type=int, default=64,
                   help="batched schedule: neurons whose LLM calls are batched together (default 64)")
    p.add_argument("--requests-in-flight", type=int, default=None,
                   help="HTTP LLM: concurrent requests (default 256; a vLLM server batches them)")
    p.add_argument("--cache", default=None, help="LLM call cache (default <out>/llm_cache.sqlite)")
    controls = p.add_mutually_exclusive_group()
    controls.add_argument("--control", action="store_true",
                          help="score a randomly initialised model of the same config (instead of the checkpoint)")
    controls.add_argument("--controls", action="store_true",
                          help="also score random-init controls of every checkpoint")
    p.add_argument("--exclude-last", choices=["auto", "yes", "no"], default="auto",
                   help="drop the last layer from the model aggregate (auto: for 6 and 12 layers, as the paper)")
    p.add_argument("--no-extra-scores", action="store_true", help="skip detection and fuzzing scores")
    p.add_argument("--validity", action="store_true",
                   help="check the scorer here: planted units of known behaviour through the same explainer and "
                        "simulator, ceilings and floors, NeuronEval's sanity checks, who each mean counts; flags "
                        "verdicts it cannot support (<out>/validity/)")
    p.add_argument("--no-json", action="store_true", help="write only the binary record cache, no per-neuron JSON")
    p.add_argument("--overwrite", action="store_true",
                   help="discard scores in --out that other inputs produced (otherwise such a rerun is refused)")
    p.set_defaults(func=cmd_interpret)
