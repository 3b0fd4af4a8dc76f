"""Named hook points: identity modules where interpretability code reads or overwrites activations.

Every block owns `hook_resid_pre`, `hook_resid_mid`, `hook_neurons` and `hook_resid_post`, so a hook
point is addressed by its module name, e.g. `transformer.h.0.hook_neurons` (TransformerLens style).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import Tensor, nn

HookFn = Callable[[Tensor], Tensor | None]


class HookPoint(nn.Module):
    """Identity; forward hooks registered on it see (and may replace) the activation."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    return {name: m for name, m in model.named_modules() if isinstance(m, HookPoint)}


@contextlib.contextmanager
def hooks(model: nn.Module, fns: dict[str, HookFn]) -> Iterator[None]:
    """Run `fns[name](activation)` at each named hook point while the context is open.

    A function that returns a tensor replaces the activation (steering, ablation)."""
    points = hook_points(model)
    unknown = sorted(set(fns) - set(points))
    if unknown:
        raise KeyError(f"unknown hook points {unknown}; available: {sorted(points)}")
    handles = [points[name].register_forward_hook(lambda _m, _i, out, fn=fn: fn(out)) for name, fn in fns.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record(model: nn.Module, names: list[str], detach: bool = True) -> Iterator[dict[str, Tensor]]:
    """Collect the activations at `names` into the yielded dict during the forward passes inside."""
    cache: dict[str, Tensor] = {}

    def saver(name: str) -> HookFn:
        def fn(x: Tensor) -> None:
            cache[name] = x.detach() if detach else x

        return fn

    with hooks(model, {n: saver(n) for n in names}):
        yield cache


def clamp_neuron(index: int, value: float) -> HookFn:
    """A hook that overwrites neuron `index` with `value` at every position (the paper's steering)."""

    def fn(x: Tensor) -> Tensor:
        x = x.clone()
        x[..., index] = value
        return x

    return fn


def neuron_hook_name(layer: int) -> str:
    return f"transformer.h.{layer}.hook_neurons"


def resid_hook_name(layer: int, where: str = "post") -> str:
    if where not in ("pre", "mid", "post"):
        raise ValueError(f"where must be 'pre', 'mid' or 'post', got {where!r}")
    return f"transformer.h.{layer}.hook_resid_{where}"


__all__ = ["HookPoint", "hook_points", "hooks", "record", "clamp_neuron", "neuron_hook_name", "resid_hook_name"]
