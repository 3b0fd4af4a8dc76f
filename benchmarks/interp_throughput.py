"""Interpretability throughput: activation recording and simulator records/s.

    python benchmarks/interp_throughput.py record   [--arch crate --preset B --tokens 8200000 --batch-size 8]
    python benchmarks/interp_throughput.py simulate [--llm smollm2 --records 32 --batch-size 8]

`record` streams a token stream (a np.memmap on disk, like a prepared split; random ids unless --data names a
prepared directory) through a randomly initialised model of the preset (or --checkpoint) and records every
neuron of every layer (top 50, 50 random, 11 x 4 quantile samples, moments, selectivity): it reports tokens/s,
wall time, the time extrapolated to 8.2M tokens, peak host RSS and peak GPU memory. The issue's target: CRATE-B,
3,072 x 12 neurons over 8.2M tokens in under 10 minutes on one H100 with under 4 GB of host memory.

`simulate` times the in-process backend's simulator on 64-token records, batched vs one at a time (records/s).
Results are printed as one JSON line each (append them to benchmarks/RESULTS.md by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import torch


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def bench_record(args: argparse.Namespace) -> dict:
    from crate import build_model
    from crate.eval.record.recorder import RecordingSpec, record_activations

    if args.checkpoint:
        import crate

        model = crate.load(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = build_model(args.arch, args.preset, **({"block_size": args.seq_len} if args.seq_len else {}))
    T = min(args.seq_len or model.config.block_size, model.config.block_size)
    n_tokens = (args.tokens // T) * T
    if args.data:
        from crate.train.data import open_split

        stream = open_split(args.data, "val")
    else:
        tmp = tempfile.NamedTemporaryFile(suffix=".bin", delete=False)
        tmp.close()
        mm = np.memmap(tmp.name, dtype=np.uint16, mode="w+", shape=(n_tokens,))
        rng = np.random.default_rng(0)
        for s in range(0, n_tokens, 1 << 22):
            e = min(n_tokens, s + (1 << 22))
            mm[s:e] = rng.integers(0, min(model.config.vocab_size, 50257), size=e - s)
        mm.flush()
        stream = np.memmap(tmp.name, dtype=np.uint16, mode="r", shape=(n_tokens,))
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    spec = RecordingSpec(n_tokens=n_tokens, seq_len=T, batch_size=args.batch_size,
                         selectivity=False if args.no_selectivity else None,
                         per_bin=0 if args.no_quantiles else 4, autocast_bf16=args.bf16, device=args.device)
    last = [time.perf_counter()]

    def progress(done: int, total: int, desc: str) -> None:
        if time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            print(f"  {desc}: {done:,}/{total:,} tokens", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    recs = record_activations(model, stream, spec, layers=None, progress=progress)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    n_layers = len(recs)
    n_neurons = next(iter(recs.values())).n_neurons
    out = {
        "bench": "record", "arch": model.config.arch, "preset": args.preset if not args.checkpoint else args.checkpoint,
        "layers": n_layers, "neurons_per_layer": n_neurons, "tokens": n_tokens, "seq_len": T,
        "batch_size": args.batch_size, "quantile_pass": not args.no_quantiles, "selectivity": bool(np.isfinite(next(iter(recs.values())).token_top10_share).any()),
        "bf16": args.bf16, "wall_s": round(wall, 2), "tokens_per_s": round(n_tokens / wall, 1),
        "extrapolated_8.2M_tokens_s": round(8.2e6 / (n_tokens / wall), 1),
        "peak_host_rss_gb": round(_peak_rss_gb(), 2),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 2) if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__, "python": platform.python_version(),
    }
    return out


def bench_simulate(args: argparse.Namespace) -> dict:
    from crate.eval.llm.registry import make_llm
    from crate.eval.autointerp.simulators import LLMSimulator

    llm = make_llm(args.llm, **({"device": args.device} if args.device else {}))
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and a dog ran to the red house while birds sang".split()
    records = [[" " + words[i] for i in rng.integers(0, len(words), size=args.window)] for _ in range(args.records)]
    out = {"bench": "simulate", "llm": args.llm, "records": args.records, "tokens_per_record": args.window,
           "device": llm.device if hasattr(llm, "device") else None}
    for bs in (args.batch_size, 1):
        llm.batch_size = bs  # type: ignore[attr-defined]
        sim = LLMSimulator(llm)
        sim.simulate("animals", records[:2])  # warm-up
        t0 = time.perf_counter()
        sim.simulate("animals, especially cats", records)
        dt = time.perf_counter() - t0
        out[f"records_per_s_batch{bs}"] = round(args.records / dt, 2)
    out["speedup"] = round(out[f"records_per_s_batch{args.batch_size}"] / out["records_per_s_batch1"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("record")
    r.add_argument("--arch", default="crate")
    r.add_argument("--preset", default="B")
    r.add_argument("--checkpoint", default=None)
    r.add_argument("--data", default=None)
    r.add_argument("--tokens", type=int, default=8_200_000)
    r.add_argument("--seq-len", type=int, default=None)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--bf16", action="store_true")
    r.add_argument("--no-quantiles", action="store_true")
    r.add_argument("--no-selectivity", action="store_true")
    r.add_argument("--device", default=None)
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a busy machine)")
    s = sub.add_parser("simulate")
    s.add_argument("--llm", default="smollm2")
    s.add_argument("--records", type=int, default=32)
    s.add_argument("--window", type=int, default=64)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", default=None)
    s.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = bench_record(args) if args.what == "record" else bench_simulate(args)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
