"""What the fused ISTA kernels compile to on A100 (sm80) and H100 (sm90), without either GPU.

    python benchmarks/ista_compile.py --out compile.csv                       # paper path: 2 steps, bf16 and fp32
    python benchmarks/ista_compile.py --steps 3 --learnable --dtype fp16 --arch sm90

Every kernel launch of one forward and backward (see `crate.kernels.ista_aot`) is compiled with every
autotuning config, as the autotuner would on the GPU, and reported: shared memory per block and whether
it fits the GPU (a config that does not is skipped by the autotuner), whether the K loop is
software-pipelined (asynchronous copies), whether the matmuls use tensor cores (mma.sync on sm80, wgmma
on sm90; fp32 uses them only with TF32, `--tf32`), and the compile time. Needs no GPU, only the ptxas of
the triton wheel. It says nothing about speed: `benchmarks/ista_kernels.py` measures that on a GPU.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: these are the compiled kernels

import torch  # noqa: E402
import triton  # noqa: E402

from crate.kernels import ista_aot  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FIELDS = ["arch", "dtype", "kernel", "variant", "config", "shared_kb", "fits", "pipelined", "tensor_cores",
          "compile_s"]


def build_rows(archs: list[str], dtypes: list[str], steps: int, learnable: bool) -> list[dict[str, object]]:
    rows = []
    for dtype in dtypes:
        for launch in ista_aot.launches(steps, DTYPES[dtype], scalar_grads=learnable):
            for arch in archs:
                for config in ista_aot.CONFIGS:
                    start = time.perf_counter()
                    b = ista_aot.compile_launch(launch, config, arch)
                    rows.append(dict(
                        arch=arch, dtype=dtype, kernel=launch.name, variant=launch.variant, config=b.config,
                        shared_kb=round(b.shared_bytes / 1024, 1), fits=b.fits, pipelined=b.pipelined,
                        tensor_cores=b.tensor_cores, compile_s=round(time.perf_counter() - start, 2),
                    ))
    return rows


def print_table(rows: list[dict[str, object]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in FIELDS:
        table.add_column(col, justify="right" if col in ("shared_kb", "compile_s") else "left")
    for r in rows:
        table.add_row(*(("yes" if r[c] else "NO") if isinstance(r[c], bool) else str(r[c]) for c in FIELDS))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the rows to this CSV file")
    parser.add_argument("--steps", type=int, default=2, help="ISTA steps (default: the paper's 2)")
    parser.add_argument("--learnable", action="store_true", help="learnable eta and lambda (their gradient sums)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--arch", nargs="+", choices=sorted(ista_aot.ARCHS), default=sorted(ista_aot.ARCHS))
    parser.add_argument("--tf32", action="store_true", help="fp32 matmuls in TF32, as torch 'high' precision")
    args = parser.parse_args(argv)
    if args.tf32:
        torch.set_float32_matmul_precision("high")

    rows = build_rows(args.arch, args.dtype, args.steps, args.learnable)
    print_table(rows, f"ISTA kernels compiled offline, {args.steps} steps, triton {triton.__version__}")
    launch = ("arch", "dtype", "kernel", "variant")
    fitting = {tuple(r[c] for c in launch) for r in rows if r["fits"]}
    for key in sorted({tuple(r[c] for c in launch) for r in rows} - fitting):
        print("NO config fits the shared memory of", " ".join(map(str, key)))
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
