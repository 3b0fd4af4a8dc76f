"""LLM throughput of neuron scoring: one neuron at a time against LLM calls batched across neurons.

    python benchmarks/llm_throughput.py cpu -c crate-demo/runs/crate-tiny/final -d crate-demo/data --neurons 4
    python benchmarks/llm_throughput.py server --latency 0.2 --in-flight 1,8,32,128,256 --neurons 32

`cpu` scores the same neurons (a seeded sample of `--neurons` per layer of `--layers`, the tar protocol, detection
and fuzzing on) with the embedded SmolLM2 twice, uncached: the old path (`schedule="neuron"`, `batch_size` prompts
per forward pass, no prefix reuse, explanations generated to `max_new_tokens`) and the new one
(`schedule="batched"`, batches filled by token count, each shared prefix run once, generation stopped once the
explanation is complete). The records are recorded once beforehand and reused by both. It reports neurons per
hour (wall time: it depends on the machine and on what else runs), and, counted and so machine-independent, LLM
calls, prompt tokens computed (real and with padding) and generated tokens per neuron, and the largest score
difference between the two paths.

`server` starts an OpenAI-compatible `completions` server on loopback that answers every request after a fixed
`--latency` (as a remote GPU server would, without computing anything), and scores `--neurons` synthetic neurons
through the HTTP backend with each number of requests in flight: neurons per hour against the in-flight limit.

Each prints a Markdown table and one JSON line per measurement (append them to benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shutil
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def machine() -> str:
    import os

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{os.cpu_count()} x {cpu}, {platform.system()}"


class Counting:
    """An LLM wrapper that counts the prompts and generations it passes on (the LLM calls)."""

    def __init__(self, llm: Any):
        self.llm, self.identity, self.calls = llm, llm.identity, 0

    def generate(self, prompt: str, **kw: Any) -> str:
        self.calls += 1
        return self.llm.generate(prompt, **kw)

    def generate_many(self, prompts: Any, seeds: Any, **kw: Any) -> list[str]:
        from crate.eval.llm.base import generate_many

        self.calls += len(prompts)
        return generate_many(self.llm, prompts, seeds, **kw)

    def slot_probs(self, prompts: Any, candidates: Any) -> Any:
        self.calls += len(prompts)
        return self.llm.slot_probs(prompts, candidates)


def bench_cpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    from crate.eval.llm.gguf import smollm2_path
    from crate.eval.llm.hf import HFLLM
    from crate.eval.autointerp.config import InterpretConfig
    from crate.eval.autointerp.explainers import LLMExplainer
    from crate.eval.autointerp.interpret import run_interpret
    from crate.eval.autointerp.simulators import LLMSimulator

    layers = [int(x) for x in args.layers.split(",")]
    base = dict(protocol="tar", neurons=args.neurons, layers=layers, n_tokens=args.tokens, seq_len=args.seq_len,
                seed=args.seed, device="cpu", n_boot=200)
    work = Path(tempfile.mkdtemp(prefix="llm-throughput-"))
    run_interpret(args.checkpoint, args.data, work / "records-only", InterpretConfig(**base))  # stats: records once
    old = HFLLM(smollm2_path(), device="cpu", batch_size=8, batch_tokens=None, prefix_cache=False)
    new = HFLLM(model=old.model, tokenizer=old.tok, device="cpu", batch_tokens=args.batch_tokens)
    paths = {"old (one neuron at a time)": (old, {"schedule": "neuron"}, False),
             "new (batched, prefix reuse)": (new, {"schedule": "batched", "neurons_in_flight": args.in_flight}, True)}
    rows, lines = [], {}
    for name, (llm, sched, stop_early) in paths.items():
        out = work / name.split()[0]
        out.mkdir()
        shutil.copytree(work / "records-only" / "records", out / "records")
        counted = Counting(llm)
        t0 = time.perf_counter()
        summary = run_interpret(args.checkpoint, args.data, out, InterpretConfig(**base, **sched),
                                explainer=LLMExplainer(counted, stop_early=stop_early), simulator=LLMSimulator(counted))
        seconds = time.perf_counter() - t0
        lines[name] = [json.loads(x) for f in sorted((out / "scores" / "tar").glob("*.jsonl"))
                       for x in f.read_text().splitlines()]
        n = len(lines[name])
        rows.append({"path": name, "neurons": n, "seconds": round(seconds, 1),
                     "neurons_per_hour": round(n / seconds * 3600, 1), "llm_calls_per_neuron": round(counted.calls / n, 1),
                     "prompt_tokens_per_neuron": round(llm.tokens["prompt"] / n),
                     "padded_tokens_per_neuron": round(llm.tokens["padded"] / n),
                     "generated_tokens_per_neuron": round(llm.tokens["generated"] / n),
                     "mean_score": summary["aggregate"]["mean"], "machine": machine()})
    a, b = lines.values()
    rows[1]["same_explanations"] = all(x["explanation"] == y["explanation"] for x, y in zip(a, b))
    diffs = [abs(x["score"] - y["score"]) for x, y in zip(a, b) if x["score"] is not None and y["score"] is not None]
    rows[1]["max_score_difference"] = max(diffs, default=0.0)
    rows[1]["speedup"] = round(rows[1]["neurons_per_hour"] / rows[0]["neurons_per_hour"], 2)
    rows[1]["prompt_token_reduction"] = round(1 - rows[1]["prompt_tokens_per_neuron"] / rows[0]["prompt_tokens_per_neuron"], 3)
    shutil.rmtree(work, ignore_errors=True)
    return rows


class LatencyServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible `completions` endpoint that sleeps `latency` seconds per request, then answers with
    prompt log-probabilities (one token per word: p("7") = 1/2, p("3") = 1/4) or a short completion."""

    latency = 0.2
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connections
    disable_nagle_algorithm = True  # headers and body sent at once, not 40 ms apart (Nagle + delayed ACK)

    def log_message(self, *a: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._send({"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "bench"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(self.latency)
        prompt = body["prompt"]
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "text": " words of a kind.", "logprobs": None}
        if body.get("echo"):
            words = list(re.finditer(r"\S+\s*|\s+", prompt))
            top = {"7": math.log(0.5), "3": math.log(0.25), " Yes": math.log(0.6), " No": math.log(0.4)}
            choice["text"] = prompt
            choice["logprobs"] = {"tokens": [w.group() for w in words], "text_offset": [w.start() for w in words],
                                  "top_logprobs": [None] + [top] * (len(words) - 1),
                                  "token_logprobs": [None] + [-1.0] * (len(words) - 1)}
        self._send({"id": "x", "object": "text_completion", "created": 0, "model": "m", "choices": [choice]})

    def _send(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def synthetic_windows(n: int, width: int = 64) -> list[dict[str, Any]]:
    """`n` neurons' records for the tar protocol: 10 top records that fire on one word, 10 random ones."""
    from crate.eval.record.windows import Window

    words = ["the", " cat", " sat", " on", " a", " mat", ",", " and", " then", " slept", "."]
    out = []
    for k in range(n):
        toks = [words[(k + i) % len(words)] for i in range(width)]
        top = [Window(toks, [5.0 if t == words[k % len(words)] else 0.0 for t in toks], width // 2, f"top:{i}")
               for i in range(10)]
        rnd = [Window(toks, [0.0] * width, width // 2, f"random:{i}") for i in range(10)]
        out.append({"top": top, "random": rnd, "quantile": []})
    return out


def bench_server(args: argparse.Namespace) -> list[dict[str, Any]]:
    from crate.eval.llm.http import HTTPLLM
    from crate.eval.autointerp.explainers import LLMExplainer
    from crate.eval.autointerp.protocols import get_protocol
    from crate.eval.autointerp.schedule import score_many
    from crate.eval.autointerp.simulators import LLMSimulator
    from crate.eval.autointerp.steps import neuron_steps

    import multiprocessing as mp

    ready = mp.get_context("fork").Queue()
    server = mp.get_context("fork").Process(target=serve, args=(args.latency, ready), daemon=True)
    server.start()  # its own process: its JSON work does not share the client's interpreter lock
    url = f"http://127.0.0.1:{ready.get(timeout=30)}/v1"
    protocol, windows, rows = get_protocol("tar"), synthetic_windows(args.neurons), []
    try:
        for k in [int(x) for x in args.in_flight.split(",")]:
            llm = Counting(HTTPLLM(url, "m", require_key=False, api_key_env=None, concurrency=k))
            jobs = ((i, neuron_steps(w, protocol, seed=i)) for i, w in enumerate(windows))
            t0 = time.perf_counter()
            done = sum(1 for _ in score_many(jobs, LLMExplainer(llm), LLMSimulator(llm), in_flight=args.neurons))
            seconds = time.perf_counter() - t0
            rows.append({"requests_in_flight": k, "neurons": done, "latency_s": args.latency,
                         "requests": llm.calls, "seconds": round(seconds, 2),
                         "requests_per_s": round(llm.calls / seconds, 1),
                         "neurons_per_hour": round(done / seconds * 3600), "machine": machine()})
            ideal = k / args.latency
            rows[-1]["fraction_of_k_over_latency"] = round(llm.calls / seconds / ideal, 3)
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
    return rows


def serve(latency: float, ready: Any) -> None:
    """Run `LatencyServer` on a free loopback port (sent through `ready`) until terminated."""
    LatencyServer.latency = latency
    ThreadingHTTPServer.request_queue_size = 1024  # hundreds of clients connect at once (the default backlog is 5)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), LatencyServer)
    srv.daemon_threads = True
    ready.put(srv.server_address[1])
    srv.serve_forever()


def table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k != "machine"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cpu", help="SmolLM2 in-process: old path against new, same neurons")
    c.add_argument("--checkpoint", "-c", required=True)
    c.add_argument("--data", "-d", required=True)
    c.add_argument("--neurons", type=int, default=4, help="a seeded sample per layer")
    c.add_argument("--layers", default="0")
    c.add_argument("--tokens", type=int, default=16384)
    c.add_argument("--seq-len", type=int, default=128)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--in-flight", type=int, default=64, help="neurons in flight (new path)")
    c.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward pass (new path)")
    s = sub.add_parser("server", help="HTTP backend against a loopback server with a fixed latency")
    s.add_argument("--latency", type=float, default=0.2)
    s.add_argument("--in-flight", default="1,8,32,128,256")
    s.add_argument("--neurons", type=int, default=32)
    args = p.parse_args()
    rows = bench_cpu(args) if args.mode == "cpu" else bench_server(args)
    print(f"machine: {rows[0]['machine']}\n\n{table(rows)}\n")
    if args.mode == "cpu":  # the server mode printed each row as it came
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
