"""Raw Triton kernels of the fused ISTA layer; `kernels/ista.py` is the entry point that wires them.

Four tiled GEMMs with fused prologues/epilogues cover the forward and backward passes of every step
(see `ista.py` for the algebra). All tensors are contiguous and row-major; accumulation is fp32 and
stores round once to the output dtype. eta and lmbda are read from a 2-element fp32 tensor so that
learnable (or traced) values neither recompile the kernels nor force a host sync.

Whether Triton runs compiled or interpreted is fixed when this module is first imported (Triton
reads TRITON_INTERPRET when it decorates a kernel). The kernels call no @jit helper of triton.language
(tl.cdiv, tl.zeros, tl.sum): those were decorated when triton itself was imported, maybe before
TRITON_INTERPRET was set (by any module that imports triton), and would then break the interpreter. Autotuning needs
a GPU, so the interpreter gets one fixed, large tile that keeps the (slow, Python-level) programs few.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

INTERPRET: bool = bool(triton.knobs.runtime.interpret)

_INTERPRET_META = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4)
_GPU_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 5),
        (64, 64, 32, 4, 2),  # fits shared memory even for weight_grad's six fp32 operands
    ]
]


@triton.jit
def _total(x):
    """tl.sum's own reduction, called without tl.sum (a @jit helper); the interpreter runs it as numpy.sum."""
    return tl.reduce(tl.reduce(x, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine)


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-tiles share the same column-tiles while they are in L2."""
    grid_m = (M + BLOCK_M - 1) // BLOCK_M
    grid_n = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * grid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _encode_kernel(
    x_ptr, w_ptr, prev_ptr, out_ptr, scal_ptr, N, H, D,
    SIGN: tl.constexpr, HAS_PREV: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out (N, H) = relu(prev + SIGN * eta * x @ w^T - eta * lmbda): one ISTA step, x = v or r."""
    rows, cols = _tile(tl.program_id(0), N, H, BLOCK_M, BLOCK_N, GROUP_M)
    rows = rows.to(tl.int64)  # token offsets: N * H may pass 2**31
    ks = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + ks
        x = tl.load(x_ptr + rows[:, None] * D + k[None, :], mask=(rows[:, None] < N) & (k[None, :] < D), other=0.0)
        w = tl.load(w_ptr + cols[None, :] * D + k[:, None], mask=(cols[None, :] < H) & (k[:, None] < D), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    eta = tl.load(scal_ptr)
    lmbda = tl.load(scal_ptr + 1)
    offs = rows[:, None] * H + cols[None, :]
    inside = (rows[:, None] < N) & (cols[None, :] < H)
    z = SIGN * eta * acc - eta * lmbda
    if HAS_PREV:
        z += tl.load(prev_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, tl.maximum(z, 0.0).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _decode_kernel(
    x_ptr, m_ptr, w_ptr, y_ptr, out_ptr, scal_ptr, N, H, D,
    HAS_MASK: tl.constexpr, HAS_Y: tl.constexpr, Y_SIGN: tl.constexpr, SCALE_ETA: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out (N, D) = [eta *] ((x * [m > 0]) @ w + Y_SIGN * y): the residual a @ w - v and the dL/dv-side GEMMs."""
    rows, cols = _tile(tl.program_id(0), N, D, BLOCK_M, BLOCK_N, GROUP_M)
    rows = rows.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        in_x = (rows[:, None] < N) & (k[None, :] < H)
        x = tl.load(x_ptr + rows[:, None] * H + k[None, :], mask=in_x, other=0.0)
        if HAS_MASK:
            m = tl.load(m_ptr + rows[:, None] * H + k[None, :], mask=in_x, other=0.0)
            x = tl.where(m > 0, x, 0.0).to(x.dtype)
        w = tl.load(w_ptr + k[:, None] * D + cols[None, :], mask=(k[:, None] < H) & (cols[None, :] < D), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    offs = rows[:, None] * D + cols[None, :]
    inside = (rows[:, None] < N) & (cols[None, :] < D)
    if HAS_Y:
        acc += Y_SIGN * tl.load(y_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if SCALE_ETA:
        acc *= tl.load(scal_ptr)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _code_grad_kernel(
    p_ptr, w_ptr, g_ptr, a_ptr, a_prev_ptr, out_ptr, part_ptr, scal_ptr, N, H, D,
    MASK_G: tl.constexpr, SCALAR_GRADS: tl.constexpr, FIRST_STEP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Back through step k: out = (gz_k - eta * p_k @ w^T) * [a_{k-1} > 0] = gz_{k-1}, gz_k = g * [a_k > 0].

    With SCALAR_GRADS it also writes this tile's partial sums for dL/deta (times eta) and -dL/dlmbda / eta:
    sum(gz_k * (a_k - a_{k-1})) and sum(gz_k), plus sum(gz_1 * a_1) and sum(gz_1) when FIRST_STEP (k = 2).
    """
    pid = tl.program_id(0)
    rows, cols = _tile(pid, N, H, BLOCK_M, BLOCK_N, GROUP_M)
    rows = rows.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + ks
        p = tl.load(p_ptr + rows[:, None] * D + k[None, :], mask=(rows[:, None] < N) & (k[None, :] < D), other=0.0)
        w = tl.load(w_ptr + cols[None, :] * D + k[:, None], mask=(cols[None, :] < H) & (k[:, None] < D), other=0.0)
        acc = tl.dot(p, w, acc, input_precision=PRECISION)
    eta = tl.load(scal_ptr)
    offs = rows[:, None] * H + cols[None, :]
    inside = (rows[:, None] < N) & (cols[None, :] < H)
    gz = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    a_prev = tl.load(a_prev_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if MASK_G or SCALAR_GRADS:
        a = tl.load(a_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        if MASK_G:
            gz = tl.where(a > 0, gz, 0.0)
    out = tl.where(a_prev > 0, gz - eta * acc, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)
    if SCALAR_GRADS:
        s_eta = _total(gz * (a - a_prev))
        s_lmbda = _total(gz)
        if FIRST_STEP:
            s_eta += _total(out * a_prev)
            s_lmbda += _total(out)
        tl.store(part_ptr + 2 * pid, s_eta)
        tl.store(part_ptr + 2 * pid + 1, s_lmbda)


@triton.jit
def _weight_grad_kernel(
    x0_ptr, m0_ptr, v_ptr, x1_ptr, m1_ptr, r_ptr, a_ptr, p_ptr, out_ptr, scal_ptr, N, H, D,
    HAS_POS: tl.constexpr, MASK0: tl.constexpr, HAS_NEG: tl.constexpr, MASK1: tl.constexpr,
    ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out (H, D) [+]= eta * ((x0 * [m0 > 0])^T v - (x1 * [m1 > 0])^T r - a^T p), contracting the tokens.

    POS is step 1's term gz_1^T v; NEG holds step k's two terms gz_k^T r_{k-1} + a_{k-1}^T p_k. One
    launch adds them all into a single fp32 accumulator, so dL/dweight costs one pass over its operands.
    """
    rows, cols = _tile(tl.program_id(0), H, D, BLOCK_M, BLOCK_N, GROUP_M)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, N, BLOCK_K):
        k = (k0 + ks).to(tl.int64)  # tokens
        in_h = (k[:, None] < N) & (rows[None, :] < H)
        in_d = (k[:, None] < N) & (cols[None, :] < D)
        offs_h = k[:, None] * H + rows[None, :]
        offs_d = k[:, None] * D + cols[None, :]
        if HAS_POS:
            x0 = tl.load(x0_ptr + offs_h, mask=in_h, other=0.0)
            if MASK0:
                x0 = tl.where(tl.load(m0_ptr + offs_h, mask=in_h, other=0.0) > 0, x0, 0.0).to(x0.dtype)
            acc = tl.dot(tl.trans(x0), tl.load(v_ptr + offs_d, mask=in_d, other=0.0), acc, input_precision=PRECISION)
        if HAS_NEG:
            x1 = tl.load(x1_ptr + offs_h, mask=in_h, other=0.0)
            if MASK1:
                x1 = tl.where(tl.load(m1_ptr + offs_h, mask=in_h, other=0.0) > 0, x1, 0.0).to(x1.dtype)
            acc = tl.dot(tl.trans(-x1), tl.load(r_ptr + offs_d, mask=in_d, other=0.0), acc, input_precision=PRECISION)
            a = tl.load(a_ptr + offs_h, mask=in_h, other=0.0)
            acc = tl.dot(tl.trans(-a), tl.load(p_ptr + offs_d, mask=in_d, other=0.0), acc, input_precision=PRECISION)
    offs = rows[:, None] * D + cols[None, :]
    inside = (rows[:, None] < H) & (cols[None, :] < D)
    acc *= tl.load(scal_ptr)
    if ACCUMULATE:
        acc += tl.load(out_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


def _tuned(kernel: Any, *, restore: tuple[str, ...] = ()) -> Any:
    """Autotune on GPUs only; `restore` names the buffers a kernel accumulates into (tuning reruns it)."""
    if INTERPRET:
        return kernel
    return triton.autotune(_GPU_CONFIGS, key=["N", "H", "D"], restore_value=list(restore))(kernel)


encode_kernel = _tuned(_encode_kernel)
decode_kernel = _tuned(_decode_kernel)
code_grad_kernel = _tuned(_code_grad_kernel)
weight_grad_kernel = _tuned(_weight_grad_kernel, restore=("out_ptr",))


def launch(kernel: Any, rows: int, cols: int, *args: Any, **flags: Any) -> int:
    """Run `kernel` over a (rows, cols) output and return its program count (the partial-sum slots).

    Under the interpreter the tile is fixed; on a GPU the autotuner picks it, so the grid is a callable.
    """
    if INTERPRET:
        kernel[(_programs(rows, cols, _INTERPRET_META),)](*args, **flags, **_INTERPRET_META)
        return _programs(rows, cols, _INTERPRET_META)

    used: dict[str, Any] = {}

    def grid(meta: dict[str, Any]) -> tuple[int]:
        used.clear()
        used.update(meta)  # the last call is the launch itself (after any benchmarking of the configs)
        return (_programs(rows, cols, meta),)

    kernel[grid](*args, **flags)
    # the tile of this launch, not `kernel.best_config`: the autotuner keeps that per kernel, not per call, so
    # a launch of another shape from another thread could change it in between
    return _programs(rows, cols, used)


def max_programs(rows: int, cols: int) -> int:
    """Upper bound of `launch`'s program count over every tile it may pick (to size partial sums)."""
    metas = [_INTERPRET_META] if INTERPRET else [c.kwargs for c in _GPU_CONFIGS]
    return max(_programs(rows, cols, m) for m in metas)


def _programs(rows: int, cols: int, meta: dict[str, Any]) -> int:
    return triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"])
