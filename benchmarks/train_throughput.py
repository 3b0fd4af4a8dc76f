"""Training throughput and MFU of CRATE and GPT at the S and B presets, bf16, with and without torch.compile.

    python benchmarks/train_throughput.py                       # all: {crate, gpt} x {S, B} x {eager, compile}
    python benchmarks/train_throughput.py --arch crate --preset B --compile on --micro-batch 16
    python benchmarks/train_throughput.py --csv out.csv --results benchmarks/RESULTS.md

One training step is what `crate train` runs per micro-batch: forward, fp32 cross-entropy, backward,
gradient clipping and a fused AdamW step with the paper's decay groups, under bf16 autocast.
FLOPs come from `crate.train.flops.flops_per_token` (the trainer's own count: CRATE's ISTA runs its
dictionary four times); MFU divides by the dense bf16 peak of the GPU from `crate.train.flops.PEAK_FLOPS_BF16`.
Anchors: llm.c trains GPT-2 124M at about 50-60% MFU on H100; nanoGPT's GPT-2 takes about 135 ms per
12 x 1024 batch on an A100 with compile. Target: CRATE-B and GPT-B each >= 50% MFU on one H100.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time

import torch
import torch.nn.functional as F


def bench(arch: str, preset: str, compile_: bool, micro_batch: int, context: int, steps: int, warmup: int,
          device: str) -> dict[str, object]:
    from crate import build_model
    from crate.train.flops import flops_per_token, peak_flops
    from crate.train.module import param_groups

    torch.manual_seed(0)
    model = build_model(arch, preset, block_size=context).to(device)
    V = model.config.vocab_size
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95),
                            fused=device == "cuda")
    net = torch.compile(model) if compile_ else model
    x = torch.randint(0, min(V, 50257), (micro_batch, context + 1), device=device)
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> None:
        with amp:
            logits = net(inp)
        loss = F.cross_entropy(logits.float().view(-1, V), tgt.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tokens = micro_batch * context
    fpt = flops_per_token(model.config, context)["train"]
    peak = peak_flops() if device == "cuda" else None
    tps = tokens / dt
    return {
        "arch": arch, "preset": preset, "compile": compile_, "micro_batch": micro_batch, "context": context,
        "params": model.num_params(), "ms_per_step": dt * 1e3, "tokens_per_s": tps,
        "tflops": tps * fpt / 1e12, "mfu": (tps * fpt / peak) if peak else None,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=["crate", "gpt", "all"], default="all")
    p.add_argument("--preset", default="all", help="S, B, any preset, or all (S and B)")
    p.add_argument("--compile", choices=["on", "off", "both"], default="both")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--csv", default=None, help="write the rows to this CSV file")
    p.add_argument("--results", default=None, help="append a markdown table to this file (benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        print("no GPU: this benchmark measures bf16 GPU throughput; running a small fp32 CPU smoke test instead",
              file=sys.stderr)
        args.preset, args.compile, args.micro_batch, args.context, args.steps, args.warmup = "tiny", "off", 4, 128, 3, 1
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    archs = ["crate", "gpt"] if args.arch == "all" else [args.arch]
    presets = ["S", "B"] if args.preset == "all" else [args.preset]
    compiles = {"on": [True], "off": [False], "both": [False, True]}[args.compile]
    rows = []
    for preset in presets:
        for arch in archs:
            for c in compiles:
                r = bench(arch, preset, c, args.micro_batch, args.context, args.steps, args.warmup, args.device)
                rows.append(r)
                mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
                print(f"{arch:5s} {preset:4s} compile={str(c):5s}  {r['ms_per_step']:8.1f} ms/step  "
                      f"{r['tokens_per_s']:>12,.0f} tok/s  {r['tflops']:7.1f} TFLOP/s  MFU {mfu}", flush=True)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if args.results:
        lines = [f"\n### train_throughput.py on {rows[0]['gpu']} (micro-batch {args.micro_batch} x {args.context}, "
                 f"torch {torch.__version__})\n", "| model | compile | ms/step | tokens/s | TFLOP/s | MFU |",
                 "|---|---|---|---|---|---|"]
        for r in rows:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            lines.append(f"| {r['arch']}-{r['preset']} | {r['compile']} | {r['ms_per_step']:.1f} | "
                         f"{r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {mfu} |")
        with open(args.results, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
