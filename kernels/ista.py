"""The ISTA sparse-coding layer of CRATE: its pure-PyTorch reference and the one dispatch point.

SPEC.md section 1, with the dictionary D in R^{d x h} stored as `weight` of shape (h, d) = D^T:

    a0 = 0
    a_{k+1} = relu(a_k - eta * D^T (D a_k - v) - eta * lmbda)        k = 0 .. n_steps - 1

so that a1 = relu(eta * D^T v - eta * lmbda). The codes a_{n_steps} are CRATE's neurons; the block
decodes them itself (tied: D a, CRATE-alpha: D_out a), so that hooks and steering see the codes.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import torch
from torch import Tensor

Scalar = float | Tensor
Kernels = ModuleType | SimpleNamespace  # `ista_triton`, or the launch recorder of `ista_aot`


def ista_reference(v: Tensor, weight: Tensor, eta: Scalar, lmbda: Scalar, n_steps: int) -> Tensor:
    """Non-negative ISTA codes of `v` (..., d) against the dictionary `weight` (h, d), in eager PyTorch."""
    threshold = eta * lmbda
    a = torch.relu(eta * (v @ weight.t()) - threshold)
    for _ in range(n_steps - 1):
        residual = a @ weight - v
        a = torch.relu(a - eta * (residual @ weight.t()) - threshold)
    return a


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Map `auto|triton|torch` to the implementation that runs on `device` for inputs of `dtype` (`auto` takes the
    kernels only for a dtype they have, so a float64 model on a GPU runs the reference instead of failing)."""
    if impl == "auto":
        fused = device.type == "cuda" and triton_available() and (dtype is None or dtype in _DTYPES)
        return "triton" if fused else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"ista_impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    return impl


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def ista_codes(
    v: Tensor, weight: Tensor, eta: Scalar, lmbda: Scalar, n_steps: int, impl: str = "auto", *,
    recompute: bool = False,
) -> Tensor:
    """The dispatch point the model calls: ISTA codes through the chosen implementation.

    `recompute` only affects the fused path (see `ista_fused`); the eager reference ignores it.
    """
    autocast = torch.is_autocast_enabled(v.device.type)
    dtype = torch.get_autocast_dtype(v.device.type) if autocast else v.dtype  # what the kernels would compute in
    if resolve_impl(impl, v.device, dtype) == "torch":
        return ista_reference(v, weight, eta, lmbda, n_steps)
    return ista_fused(v, weight, eta, lmbda, n_steps, recompute=recompute)


# ----------------------------------------------------------------------------------------------
# The fused Triton path. With r_k = a_k W - v (N, d), q_k = r_k W^T and z_k the pre-activation:
#
#   forward   a_1 = relu(eta v W^T - eta lmbda)                           encode      (GEMM over d)
#             r_k = a_k W - v                                             decode      (GEMM over h)
#             a_{k+1} = relu(a_k - eta r_k W^T - eta lmbda)               encode      (GEMM over d)
#
#   backward  gz_k = dL/dz_k = dL/da_k * [a_k > 0]   (masks come from the saved codes, never stored)
#             p_k = gz_k W                                                decode      (GEMM over h)
#             gz_{k-1} = (gz_k - eta p_k W^T) * [a_{k-1} > 0]             code_grad   (GEMM over d)
#             dL/dv = eta sum_k p_k = eta (gz_1 W + sum_{k>=2} p_k)       decode      (GEMM over h)
#             dL/dW = eta (gz_1^T v - sum_{k>=2} (gz_k^T r_{k-1} + a_{k-1}^T p_k))   weight_grad (one pass)
#             dL/deta = sum_k sum(gz_k (a_k - a_{k-1})) / eta,  dL/dlmbda = -eta sum_k sum(gz_k)
#
# (on the support of gz_k, a_k - a_{k-1} = -eta q_{k-1} - eta lmbda, so the codes also give the
# eta gradient, summed in code_grad's epilogue.) Two modes:
#
#   store-all (default)  saved for backward: v, W, eta/lmbda, the codes a_1..a_n and the residuals
#                        r_1..r_{n-1}, all in the compute dtype; nothing is recomputed, so n steps cost
#                        2n - 1 GEMMs forward and 4n - 2 backward, exactly the GEMMs of the eager graph.
#   recompute=True       saved: only v, W, eta/lmbda and the output codes a_n, which the block holds
#                        anyway; backward first reruns the forward kernels for a_1..a_{n-1} and
#                        r_1..r_{n-1} (2n - 2 extra GEMMs: 2 for the paper's 2 steps, 9 -> 11 in all).
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def ista_fused(
    v: Tensor, weight: Tensor, eta: Scalar, lmbda: Scalar, n_steps: int, *, recompute: bool = False
) -> Tensor:
    """ISTA codes through the fused Triton kernels; same contract as `ista_reference`.

    Runs inside autograd and torch.compile as the opaque custom ops `crate::ista_forward` and
    `crate::ista_backward`. Under autocast it computes in the autocast dtype, like the matmuls of
    the reference would. With `recompute=True` the backward recomputes the intermediate codes and
    residuals instead of keeping them (less saved memory, 2n - 2 more GEMMs); results are the same.
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    if weight.dim() != 2 or v.shape[-1] != weight.shape[1]:
        raise ValueError(f"v (..., d) and weight (h, d) disagree: v {tuple(v.shape)}, weight {tuple(weight.shape)}")
    if torch.is_autocast_enabled(v.device.type):
        dtype = torch.get_autocast_dtype(v.device.type)
        v, weight = v.to(dtype), weight.to(dtype)
    if v.dtype != weight.dtype or v.dtype not in _DTYPES:
        raise ValueError(
            f"the Triton ISTA kernel needs v and weight in one of {_DTYPES}, got {v.dtype} and {weight.dtype}"
        )
    scal = torch.stack([_scalar(eta, v.device), _scalar(lmbda, v.device)])
    codes, _, _ = torch.ops.crate.ista_forward(
        v.reshape(-1, v.shape[-1]), weight.contiguous(), scal, n_steps, bool(recompute)
    )
    return codes.view(*v.shape[:-1], weight.shape[0])


def _scalar(x: Scalar, device: torch.device) -> Tensor:
    # torch.full, not torch.tensor: a fill kernel, no blocking host-to-device copy.
    if isinstance(x, Tensor):
        return x.reshape(()).to(device=device, dtype=torch.float32)
    return torch.full((), x, device=device, dtype=torch.float32)


def _triton_kernels(device: torch.device) -> ModuleType:
    """Import the kernels, or say exactly why they cannot run on `device`."""
    if not triton_available():
        raise RuntimeError("ista_impl='triton' needs the triton package (pip install triton); or use ista_impl='torch'")
    import triton

    from . import ista_triton

    if device.type != "cuda":
        if not triton.knobs.runtime.interpret:
            raise RuntimeError(
                f"ista_impl='triton' got tensors on {device.type}: Triton kernels run on CUDA, or on CPU only through "
                "Triton's interpreter, enabled by setting TRITON_INTERPRET=1 in the environment before the first "
                "call (slow; meant for tests). Otherwise use ista_impl='torch' or 'auto'."
            )
        if not ista_triton.INTERPRET:
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after crate.kernels.ista_triton was first imported, so its kernels "
                "were built for the GPU: set TRITON_INTERPRET=1 before the process starts."
            )
    return ista_triton


def _alloc(like: Tensor, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
    """Every buffer the kernels must fully overwrite comes from here, so tests can poison them all."""
    return like.new_empty(shape, dtype=dtype)


def _precision(dtype: torch.dtype, interpret: bool) -> str:
    """Follow PyTorch's own fp32 matmul setting (TF32 only when torch would use it too)."""
    if dtype == torch.float32 and not interpret and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _run_steps(kt: Kernels, v: Tensor, weight: Tensor, scal: Tensor, a: list[Tensor], r: list[Tensor],
               precision: str) -> None:
    """The forward kernels: a[0] = a_1, then r[k-1] = r_k and a[k] = a_{k+1} while there are buffers.

    The forward passes n code buffers and n - 1 residual buffers; the recomputing backward passes
    n - 1 of each, so it stops before the last encode (a_n is saved).
    """
    if not a:
        return
    (N, D), H = v.shape, weight.shape[0]
    kt.launch(kt.encode_kernel, N, H, v, weight, None, a[0], scal, N, H, D,
              SIGN=1, HAS_PREV=False, PRECISION=precision)
    for k in range(1, len(r) + 1):
        kt.launch(kt.decode_kernel, N, D, a[k - 1], None, weight, v, r[k - 1], scal, N, H, D,
                  HAS_MASK=False, HAS_Y=True, Y_SIGN=-1, SCALE_ETA=False, PRECISION=precision)
        if k < len(a):
            kt.launch(kt.encode_kernel, N, H, r[k - 1], weight, a[k - 1], a[k], scal, N, H, D,
                      SIGN=-1, HAS_PREV=True, PRECISION=precision)


def _history_shapes(N: int, H: int, D: int, n_steps: int, recompute: bool) -> tuple[tuple[int, ...], ...]:
    """Shapes of the code and residual histories the forward returns (empty when they are recomputed)."""
    m = 0 if recompute else n_steps - 1
    return (m, N, H), (m, N, D)


@torch.library.custom_op("crate::ista_forward", mutates_args=())
def _ista_forward(
    v: Tensor, weight: Tensor, scal: Tensor, n_steps: int, recompute: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Codes a_n (N, h), plus what backward needs: a_1..a_{n-1} (n-1, N, h) and r_1..r_{n-1} (n-1, N, d).

    With `recompute` both histories are returned empty (0, N, .): the backward rebuilds them.
    """
    kernels = _triton_kernels(v.device)
    if kernels.INTERPRET and v.dtype == torch.bfloat16:
        raise ValueError("Triton's interpreter computes bf16 tl.dot wrongly (codes off by orders of magnitude): on "
                         "CPU run the fused ISTA kernel in float32 or float16, or use ista_impl='torch' for bf16")
    return forward_launches(kernels, v, weight, scal, n_steps, recompute)


def forward_launches(
    kt: Kernels, v: Tensor, weight: Tensor, scal: Tensor, n_steps: int, recompute: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward op's body, launching through `kt` (the kernel module, or `ista_aot`'s recorder)."""
    v = v.contiguous()
    (N, D), H = v.shape, weight.shape[0]
    precision = _precision(v.dtype, kt.INTERPRET)
    codes = _alloc(v, N, H)
    code_hist, resid_hist = _alloc(v, n_steps - 1, N, H), _alloc(v, n_steps - 1, N, D)
    _run_steps(kt, v, weight, scal, [*code_hist.unbind(0), codes], list(resid_hist.unbind(0)), precision)
    if recompute:
        code_hist, resid_hist = (v.new_empty(s) for s in _history_shapes(N, H, D, n_steps, True))
    return codes, code_hist, resid_hist


@_ista_forward.register_fake
def _(v: Tensor, weight: Tensor, scal: Tensor, n_steps: int, recompute: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    (N, D), H = v.shape, weight.shape[0]
    hist, resid = _history_shapes(N, H, D, n_steps, recompute)
    return v.new_empty(N, H), v.new_empty(hist), v.new_empty(resid)


@torch.library.custom_op("crate::ista_backward", mutates_args=())
def _ista_backward(
    grad: Tensor, v: Tensor, weight: Tensor, scal: Tensor, codes: Tensor, code_hist: Tensor | None,
    resid_hist: Tensor | None, n_steps: int, scalar_grads: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dL/dv, dL/dweight and dL/d[eta, lmbda] (zeros unless `scalar_grads`) from dL/dcodes.

    The histories a_1..a_{n-1} and r_1..r_{n-1} come from the forward, or are None (recompute mode):
    then they are rebuilt here with the forward kernels, before the backward proper.
    """
    return backward_launches(_triton_kernels(grad.device), grad, v, weight, scal, codes, code_hist, resid_hist,
                             n_steps, scalar_grads)


def backward_launches(
    kt: Kernels, grad: Tensor, v: Tensor, weight: Tensor, scal: Tensor, codes: Tensor,
    code_hist: Tensor | None, resid_hist: Tensor | None, n_steps: int, scalar_grads: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward op's body, launching through `kt` like `forward_launches`."""
    grad, v = grad.contiguous(), v.contiguous()
    (N, D), H, n = v.shape, weight.shape[0], n_steps
    precision = _precision(v.dtype, kt.INTERPRET)
    if code_hist is None or resid_hist is None:
        code_hist, resid_hist = _alloc(v, n - 1, N, H), _alloc(v, n - 1, N, D)
        _run_steps(kt, v, weight, scal, list(code_hist.unbind(0)), list(resid_hist.unbind(0)), precision)
    if code_hist.shape[0] != n - 1 or resid_hist.shape[0] != n - 1:
        raise ValueError(f"{n} ISTA steps need {n - 1} saved codes and residuals, got {code_hist.shape[0]}")
    a = [*code_hist.unbind(0), codes]  # a[k - 1] is a_k
    g = [*([None] * (n - 1)), grad]  # g[k - 1] is gz_k; only gz_n (the incoming gradient) is still unmasked
    p = [None] * n  # p[k - 1] is p_k = gz_k W
    slots = kt.max_programs(N, H)
    partials = _alloc(v, n - 1, slots, 2, dtype=torch.float32) if scalar_grads else None
    sums = []
    for k in range(n, 1, -1):
        p[k - 1] = _alloc(v, N, D)
        kt.launch(kt.decode_kernel, N, D, g[k - 1], a[k - 1], weight, None, p[k - 1], scal, N, H, D,
                  HAS_MASK=k == n, HAS_Y=False, Y_SIGN=1, SCALE_ETA=False, PRECISION=precision)
        g[k - 2] = _alloc(v, N, H)
        part = partials[k - 2] if scalar_grads else None
        used = kt.launch(kt.code_grad_kernel, N, H, p[k - 1], weight, g[k - 1], a[k - 1], a[k - 2], g[k - 2], part,
                         scal, N, H, D, MASK_G=k == n, SCALAR_GRADS=scalar_grads, FIRST_STEP=k == 2,
                         PRECISION=precision)
        if scalar_grads:
            sums.append(part[:used].sum(0))

    grad_v = _alloc(v, N, D)
    p_sum = None if n == 1 else p[1] if n == 2 else torch.stack(p[1:]).float().sum(0)
    kt.launch(kt.decode_kernel, N, D, g[0], a[0], weight, p_sum, grad_v, scal, N, H, D,
              HAS_MASK=n == 1, HAS_Y=n > 1, Y_SIGN=1, SCALE_ETA=True, PRECISION=precision)

    # One launch for the default 2 steps; with more, one per step into an fp32 accumulator.
    grad_w = _alloc(weight, H, D, dtype=weight.dtype if n <= 2 else torch.float32)
    for k in [1] if n == 1 else range(n, 1, -1):
        has_neg, has_pos = k > 1, k <= 2
        kt.launch(kt.weight_grad_kernel, H, D, g[0], a[0], v,
                  g[k - 1] if has_neg else None, a[k - 1] if has_neg else None,
                  resid_hist[k - 2] if has_neg else None, a[k - 2] if has_neg else None,
                  p[k - 1] if has_neg else None, grad_w, scal, N, H, D,
                  HAS_POS=has_pos, MASK0=n == 1, HAS_NEG=has_neg, MASK1=has_neg and k == n, ACCUMULATE=k < n,
                  PRECISION=precision)

    if not scalar_grads:
        grad_scal = torch.zeros(2, device=v.device, dtype=torch.float32)
    else:
        if n == 1:
            gz = torch.where(codes > 0, grad, 0).float()
            sums.append(torch.stack([(gz * codes.float()).sum(), gz.sum()]))
        s_eta, s_lmbda = torch.stack(sums).sum(0).unbind()
        # d/d eta = s_eta / eta; at eta = 0 every pre-activation is 0, so is s_eta, and so is the gradient
        grad_scal = torch.stack([torch.where(scal[0] != 0, s_eta / scal[0], 0.0), -scal[0] * s_lmbda])
    return grad_v, grad_w.to(weight.dtype), grad_scal


@_ista_backward.register_fake
def _(
    grad: Tensor, v: Tensor, weight: Tensor, scal: Tensor, codes: Tensor, code_hist: Tensor | None,
    resid_hist: Tensor | None, n_steps: int, scalar_grads: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(v), torch.empty_like(weight), scal.new_empty(2)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    v, weight, scal, n_steps, recompute = inputs
    codes, code_hist, resid_hist = output
    ctx.n_steps, ctx.recompute = n_steps, recompute
    if recompute:  # only what the block holds anyway (v, weight, output) and the two scalars
        ctx.save_for_backward(v, weight, scal, codes)
    else:
        ctx.save_for_backward(v, weight, scal, codes, code_hist, resid_hist)
    ctx.mark_non_differentiable(code_hist, resid_hist)
    ctx.set_materialize_grads(False)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor | None, *_: Tensor | None) -> tuple:
    if grad is None:
        return None, None, None, None, None
    saved = ctx.saved_tensors
    v, weight, scal, codes = saved[:4]
    code_hist, resid_hist = (None, None) if ctx.recompute else saved[4:]
    grad_v, grad_w, grad_scal = torch.ops.crate.ista_backward(
        grad, v, weight, scal, codes, code_hist, resid_hist, ctx.n_steps, ctx.needs_input_grad[2]
    )
    return grad_v, grad_w, grad_scal, None, None


_ista_forward.register_autograd(_backward, setup_context=_setup_context)
