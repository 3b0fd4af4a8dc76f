"""Benchmark of the fused Triton ISTA kernels against eager PyTorch, torch.compile and the GEMM floor.

    python benchmarks/ista_kernels.py --out ista.csv     # a CUDA GPU: bf16, paper widths, 8K-64K tokens
    python benchmarks/ista_kernels.py --smoke            # CPU: tiny fp32 shapes through Triton's interpreter

For each shape and implementation: forward, backward and forward+backward times (medians with 20% and
80% quantiles of `triton.testing.do_bench`), the memory the forward leaves alive for backward (codes
included) and the peak of a forward+backward, both above the inputs. "triton" keeps the intermediate
codes and residuals for backward; "triton-recompute" keeps only the output codes and recomputes the rest
in backward (2n - 2 extra GEMMs). "gemm floor" is the summed time of the eager graph's GEMMs (2n - 1
forward, 4n - 2 backward) through torch.matmul, with none of the elementwise work: what a perfect fusion
without recomputation costs.
The smoke mode only checks that the harness runs (wall-clock timer, no compile, no memory).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from crate.kernels.ista import ista_codes, ista_reference

ETA, LMBDA = 0.1, 0.1
GPU_SHAPES = [(128, 512), (768, 3072)]
GPU_TOKENS = [8192, 16384, 65536]
SMOKE_SHAPES = [(32, 128)]
SMOKE_TOKENS = [64, 200]


@dataclass
class Row:
    d: int
    h: int
    tokens: int
    impl: str
    fwd_ms: float
    fwd_p20: float
    fwd_p80: float
    bwd_ms: float
    bwd_p20: float
    bwd_p80: float
    fwd_bwd_ms: float
    fwd_bwd_p20: float
    fwd_bwd_p80: float
    saved_mb: float | None
    peak_mb: float | None


def gemm_floor(v: Tensor, weight: Tensor, grad: Tensor, n_steps: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """The GEMMs of n ISTA steps on the same shapes: 2n - 1 forward, 4n - 2 backward (see kernels/ista.py)."""
    codes = torch.empty_like(grad)
    resid = torch.empty_like(v)

    def forward() -> None:
        torch.matmul(v, weight.t(), out=codes)
        for _ in range(n_steps - 1):
            torch.matmul(codes, weight, out=resid)
            torch.matmul(resid, weight.t(), out=codes)

    def backward() -> None:
        for _ in range(n_steps - 1):
            torch.matmul(grad, weight, out=resid)  # p_k = gz_k W
            torch.matmul(resid, weight.t(), out=codes)  # p_k W^T
        torch.matmul(grad, weight, out=resid)  # dL/dv
        for _ in range(2 * n_steps - 1):
            torch.matmul(grad.t(), v)  # dL/dW terms, one per (left, right) operand pair

    return forward, backward


def implementations(n_steps: int, smoke: bool) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    impls: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "triton": lambda v, w: ista_codes(v, w, ETA, LMBDA, n_steps, impl="triton"),
        "triton-recompute": lambda v, w: ista_codes(v, w, ETA, LMBDA, n_steps, impl="triton", recompute=True),
        "eager": lambda v, w: ista_reference(v, w, ETA, LMBDA, n_steps),
    }
    if not smoke:
        compiled = torch.compile(ista_reference)
        impls["compile"] = lambda v, w: compiled(v, w, ETA, LMBDA, n_steps)
    return impls


def make_timer(smoke: bool) -> Callable[[Callable[[], object], list[Tensor]], tuple[float, float, float]]:
    """(median, p20, p80) in ms: do_bench on a GPU, a few wall-clock repeats through the interpreter."""
    if not smoke:
        from triton.testing import do_bench

        def gpu(fn: Callable[[], object], grad_to_none: list[Tensor]) -> tuple[float, float, float]:
            median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
            return median, p20, p80

        return gpu

    def cpu(fn: Callable[[], object], grad_to_none: list[Tensor]) -> tuple[float, float, float]:
        times = []
        for _ in range(5):
            for t in grad_to_none:
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        q = statistics.quantiles(times, n=5, method="inclusive")
        return statistics.median(times), q[0], q[-1]

    return cpu


def memory_mb(fn: Callable[[Tensor, Tensor], Tensor], v: Tensor, w: Tensor, grad: Tensor) -> tuple[float, float]:
    """(alive after forward, peak of forward+backward), in MB above what was allocated before."""
    v.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(v, w)
    saved = torch.cuda.memory_allocated() - base
    out.backward(grad)
    del out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    v.grad = w.grad = None
    return saved / 2**20, peak / 2**20


def bench(d: int, h: int, tokens: int, n_steps: int, dtype: torch.dtype, smoke: bool) -> list[Row]:
    device = "cpu" if smoke else "cuda"
    v = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    w = ((torch.rand(h, d, device=device) * 2 - 1) * (6 / d) ** 0.5).to(dtype).requires_grad_()
    grad = torch.randn(tokens, h, device=device, dtype=dtype)
    timer = make_timer(smoke)
    rows = []
    for name, fn in implementations(n_steps, smoke).items():
        fn(v, w).backward(grad)  # compile, autotune and warm up outside the timings
        out = fn(v, w)
        fwd = timer(lambda: fn(v, w), [])
        bwd = timer(lambda: out.backward(grad, retain_graph=True), [v, w])
        both = timer(lambda: fn(v, w).backward(grad), [v, w])
        del out
        saved, peak = (None, None) if smoke else memory_mb(fn, v, w, grad)
        rows.append(Row(d, h, tokens, name, *fwd, *bwd, *both, saved, peak))
    with torch.no_grad():
        floor_fwd, floor_bwd = gemm_floor(v.detach(), w.detach(), grad, n_steps)
        fwd, bwd = timer(floor_fwd, []), timer(floor_bwd, [])
        both = timer(lambda: (floor_fwd(), floor_bwd()), [])
    rows.append(Row(d, h, tokens, "gemm floor", *fwd, *bwd, *both, None, None))
    return rows


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("d", "h", "tokens", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "x floor", "saved MB", "peak MB"):
        table.add_column(col, justify="left" if col == "impl" else "right")
    floors = {(r.d, r.h, r.tokens): r.fwd_bwd_ms for r in rows if r.impl == "gemm floor"}

    def cell(median: float, p20: float, p80: float) -> str:
        return f"{median:.3f} [{p20:.3f}, {p80:.3f}]"

    def mb(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    for r in rows:
        ratio = r.fwd_bwd_ms / floors[(r.d, r.h, r.tokens)]
        table.add_row(
            str(r.d), str(r.h), str(r.tokens), r.impl, cell(r.fwd_ms, r.fwd_p20, r.fwd_p80),
            cell(r.bwd_ms, r.bwd_p20, r.bwd_p80), cell(r.fwd_bwd_ms, r.fwd_bwd_p20, r.fwd_bwd_p80),
            f"{ratio:.2f}", mb(r.saved_mb), mb(r.peak_mb),
        )
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the rows to this CSV file")
    parser.add_argument("--steps", type=int, default=2, help="ISTA steps (default: the paper's 2)")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (default: 8192 16384 65536)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on CPU through Triton's interpreter")
    args = parser.parse_args(argv)

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first launch defines the kernels
        shapes, tokens, dtype = SMOKE_SHAPES, args.tokens or SMOKE_TOKENS, torch.float32
    elif not torch.cuda.is_available():
        sys.exit(
            "benchmarks/ista_kernels.py needs a CUDA GPU: do_bench, autotuning and bf16 kernels run only there. "
            "Run it with --smoke to check the harness on CPU through Triton's interpreter."
        )
    else:
        shapes, tokens = GPU_SHAPES, args.tokens or GPU_TOKENS
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    rows = [r for d, h in shapes for n in tokens for r in bench(d, h, n, args.steps, dtype, args.smoke)]
    device = "CPU, Triton interpreter (smoke)" if args.smoke else torch.cuda.get_device_name()
    print_table(rows, f"ISTA, {args.steps} steps, {dtype}, {device}")
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])) + ["dtype", "steps", "device"])
            writer.writeheader()
            for r in rows:
                writer.writerow({**asdict(r), "dtype": str(dtype), "steps": args.steps, "device": device})
        print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
