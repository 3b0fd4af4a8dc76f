"""The ISTA sparse-coding layer of CRATE: its pure-PyTorch reference and the one dispatch point.

SPEC.md section 1, with the dictionary D in R^{d x h} stored as `weight` of shape (h, d) = D^T:

    a0 = 0
    a_{k+1} = relu(a_k - eta * D^T (D a_k - v) - eta * lmbda)        k = 0 .. n_steps - 1

so that a1 = relu(eta * D^T v - eta * lmbda). The codes a_{n_steps} are CRATE's neurons; the block
decodes them itself (tied: D a, CRATE-alpha: D_out a), so that hooks and steering see the codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

Scalar = float | Tensor


def ista_reference(v: Tensor, weight: Tensor, eta: Scalar, lmbda: Scalar, n_steps: int) -> Tensor:
    """Non-negative ISTA codes of `v` (..., d) against the dictionary `weight` (h, d), in eager PyTorch."""
    threshold = eta * lmbda
    a = torch.relu(eta * (v @ weight.t()) - threshold)
    for _ in range(n_steps - 1):
        residual = a @ weight - v
        a = torch.relu(a - eta * (residual @ weight.t()) - threshold)
    return a


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map `auto|triton|torch` to the implementation that runs on `device`."""
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
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
    v: Tensor, weight: Tensor, eta: Scalar, lmbda: Scalar, n_steps: int, impl: str = "auto"
) -> Tensor:
    """The dispatch point the model calls: ISTA codes through the chosen implementation."""
    if resolve_impl(impl, v.device) == "torch":
        return ista_reference(v, weight, eta, lmbda, n_steps)
    raise NotImplementedError("the fused Triton ISTA kernel is not built yet: use ista_impl='torch'")
