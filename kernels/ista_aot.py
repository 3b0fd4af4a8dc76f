"""Compile the fused ISTA kernels ahead of time for a GPU that is not here.

Triton builds a kernel for the GPU at its first launch, so a kernel that does not lower for that GPU,
or lowers badly (a K loop that is not software-pipelined, no tensor-core instruction, more shared
memory than the GPU has), would only show there; the interpreter that CI runs checks none of it.
`triton.compile` with an explicit target runs the same pipeline to a cubin on any machine, with the
ptxas that ships in the triton wheel. This module records the launches one forward and backward of
`ista_fused` makes (on CPU, nothing runs: the launcher only records), specialises them as Triton's
launcher would, and compiles them for sm_80 or sm_90. Used by `tests/test_ista_compile.py` and
`benchmarks/ista_compile.py`.

Triton fixes compiled or interpreted mode when `ista_triton` is first imported: run this in a process
without TRITON_INTERPRET.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from . import ista, ista_triton

# Shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin): Triton refuses to load
# a kernel above it, and the autotuner then drops that config.
ARCHS: dict[str, tuple[int, int]] = {"sm80": (80, 166_912), "sm90": (90, 232_448)}
CONFIGS: list[Any] = ista_triton._GPU_CONFIGS
_TENSOR_CORE_PTX = {80: "mma.sync.aligned", 90: "wgmma.mma_async"}


@dataclass(frozen=True)
class Launch:
    """One kernel launch of the fused op: the JIT kernel and its arguments, tile sizes left to a config."""

    fn: Any
    args: tuple[Any, ...]
    flags: dict[str, Any]

    @property
    def name(self) -> str:
        return self.fn.__name__.strip("_").removesuffix("_kernel")

    @property
    def variant(self) -> str:
        """The compile-time flags, which with the dtype and the tile make one specialization."""
        return " ".join(f"{k}={v}" for k, v in self.flags.items() if k != "PRECISION")


@dataclass(frozen=True)
class Build:
    """What one specialization compiled to, and whether it is fit to run fast on its GPU."""

    launch: Launch
    arch: str
    config: str
    shared_bytes: int
    fits: bool  # shared memory within the GPU's per-block limit
    pipelined: bool  # the K loop's loads are asynchronous copies overlapping the MMAs
    tensor_cores: bool  # the matmuls are mma.sync (sm_80) or wgmma (sm_90) instructions
    cubin_bytes: int


def launches(
    n_steps: int, dtype: torch.dtype, *, scalar_grads: bool = False, recompute: bool = False,
    tokens: int = 256, d: int = 128, h: int = 512,
) -> list[Launch]:
    """The distinct launches of one forward and backward of the fused op, in order of first use.

    Shapes only decide Triton's alignment specialization: multiples of 16 (as the paper's are) give
    the divisibility hints that a real launch at those sizes gets.
    """
    if ista_triton.INTERPRET:
        raise RuntimeError("ista_aot needs the compiled kernels: run it in a process without TRITON_INTERPRET=1")
    seen: dict[tuple, Launch] = {}

    def record(kernel: Any, rows: int, cols: int, *args: Any, **flags: Any) -> int:
        key = (kernel.fn.__name__, *(_arg_key(a) for a in args), *sorted(flags.items()))
        seen.setdefault(key, Launch(kernel.fn, args, flags))
        return ista_triton.max_programs(rows, cols)

    recorder = SimpleNamespace(
        INTERPRET=False, launch=record, max_programs=ista_triton.max_programs,
        encode_kernel=ista_triton.encode_kernel, decode_kernel=ista_triton.decode_kernel,
        code_grad_kernel=ista_triton.code_grad_kernel, weight_grad_kernel=ista_triton.weight_grad_kernel,
    )
    v, weight = torch.empty(tokens, d, dtype=dtype), torch.empty(h, d, dtype=dtype)
    scal = torch.empty(2, dtype=torch.float32)
    codes, code_hist, resid_hist = ista.forward_launches(recorder, v, weight, scal, n_steps, recompute)
    hist = (None, None) if recompute else (code_hist, resid_hist)
    ista.backward_launches(recorder, torch.empty_like(codes), v, weight, scal, codes, *hist, n_steps, scalar_grads)
    return list(seen.values())


def _arg_key(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return str(arg.dtype), arg.data_ptr() % 16 == 0
    return arg if arg is None or isinstance(arg, (bool, str)) else (type(arg).__name__, arg == 1, arg % 16 == 0)


def compile_launch(launch: Launch, config: Any, arch: str) -> Build:
    """Compile `launch` with one autotuning `config` for `arch` ("sm80" or "sm90"), as a launch there would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    capability, max_shared = ARCHS[arch]
    backend = make_backend(GPUTarget("cuda", capability, 32))
    fn = launch.fn
    # Triton's own launch-time binder: ints equal to 1 become constants, and pointers and ints that
    # are multiples of 16 carry divisibility hints, exactly as on the GPU.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(
        *launch.args, **launch.flags, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
    )
    options, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, None)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=backend.target,
                            options=options.__dict__)
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    shared = kernel.metadata.shared
    return Build(
        launch=launch, arch=arch, config=config_name(config), shared_bytes=shared, fits=shared <= max_shared,
        pipelined="async_copy_global_to_local" in ttgir or "async_tma_copy_global_to_local" in ttgir,
        tensor_cores=_TENSOR_CORE_PTX[capability] in ptx, cubin_bytes=len(kernel.asm["cubin"]),
    )


def config_name(config: Any) -> str:
    k = config.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{config.num_warps} s{config.num_stages}"
