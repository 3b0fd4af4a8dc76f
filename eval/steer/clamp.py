"""Steering, the paper's experiment: clamp one neuron (a CRATE code unit a2[i], or a GPT MLP hidden unit) to a
constant at every position and compare the next-token distribution before and after.

    result = steer(model, ids, layer, neuron, value, k=10)     # SteerResult: top-k before/after with probabilities
    check = zero_check(model, ids, layer, neuron)             # ZeroCheck: value 0 on a unit inactive on the
                                                              # prompt must leave the logits exactly unchanged

The zero check needs no loss and no data: a unit that is 0 at every position of the prompt, overwritten with 0,
is the same forward pass, so any difference means the hook point or the clamp is wired wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crate.errors import CrateError


class SteerError(CrateError):
    """A steering request that cannot run (bad prompt, token ids out of range, no tokenizer for text)."""


@dataclass
class SteerResult:
    layer: int
    neuron: int
    value: float
    prompt_ids: list[int]
    before: list[tuple[int, float]]  # top-k (token id, probability) of the last position
    after: list[tuple[int, float]]
    p_before: Tensor  # full next-token distributions (V,)
    p_after: Tensor
    activation: float  # the neuron's activation at the last position, unsteered
    n_cut: int = 0  # tokens cut from the front of the prompt to fit the model's context (prompt_ids: the rest)

    def delta(self, token: int) -> float:
        return float(self.p_after[token] - self.p_before[token])

    def biggest_changes(self, k: int = 5) -> list[tuple[int, float, float]]:
        """Tokens whose probability rose most: (id, p before, p after)."""
        d = self.p_after - self.p_before
        idx = torch.topk(d, k).indices.tolist()
        return [(i, float(self.p_before[i]), float(self.p_after[i])) for i in idx]


@dataclass
class ZeroCheck:
    layer: int
    neuron: int | None  # None: no unit is inactive on the whole prompt
    max_abs_diff: float
    n_inactive: int

    @property
    def ok(self) -> bool:
        return self.neuron is not None and self.max_abs_diff == 0.0


def parse_prompt(prompt: str, tokenizer: Any | None = None) -> list[int]:
    """"1,2,3,4,5" (token ids, commas or spaces) as is; other text through the tokenizer. Negative ids are kept
    as ids, so that the range check names them rather than the tokenizer turning "-1" into text."""
    text = prompt.strip()
    if re.fullmatch(r"-?\d+([\s,]+-?\d+)*", text):
        return [int(t) for t in re.split(r"[\s,]+", text)]
    if tokenizer is None:
        raise SteerError(
            f"prompt {prompt!r} is not a list of token ids and no tokenizer was found: give ids like \"1,2,3,4,5\", "
            f"or pass --data DIR (a prepared data directory with tokenizer.json)"
        )
    ids = tokenizer.encode(text).ids
    if not ids:
        raise SteerError(f"prompt {prompt!r} encodes to no tokens")
    return ids


def check_unit(model: torch.nn.Module, layer: int, neuron: int | None = None) -> None:
    """A SteerError naming the valid range when `layer` or `neuron` does not exist (before any forward pass)."""
    n_layer, n = model.config.n_layer, model.n_neurons
    if not 0 <= layer < n_layer:
        raise SteerError(f"layer {layer} does not exist: this {n_layer}-layer model has layers 0..{n_layer - 1}")
    if neuron is not None and not 0 <= neuron < n:
        raise SteerError(f"neuron {neuron} does not exist: layer {layer} has {n} neurons, 0..{n - 1}")


def _ids_used(model: torch.nn.Module, ids: list[int]) -> list[int]:
    """The prompt's ids the model reads: checked against the vocabulary, the last block_size of them."""
    V, T = model.config.vocab_size, model.config.block_size
    if not ids:
        raise SteerError("the prompt has no tokens: give at least one token id, e.g. \"1,2,3\"")
    bad = [i for i in ids if not 0 <= i < V]
    if bad:
        raise SteerError(f"token ids {bad[:5]} are outside the model's vocabulary: valid ids are 0..{V - 1}")
    return list(ids[-T:])


def _ids_tensor(model: torch.nn.Module, ids: list[int]) -> Tensor:
    return torch.tensor([_ids_used(model, ids)], dtype=torch.long, device=next(model.parameters()).device)


@torch.no_grad()
def steer(model: torch.nn.Module, ids: list[int], layer: int, neuron: int, value: float, k: int = 10) -> SteerResult:
    """Top-k next tokens (after the last prompt token) before and after clamping `neuron` of `layer` to `value`."""
    check_unit(model, layer, neuron)
    if k < 1:
        raise SteerError(f"k={k}: the number of top tokens shown must be at least 1")
    model.eval()
    used = _ids_used(model, ids)
    idx = torch.tensor([used], dtype=torch.long, device=next(model.parameters()).device)
    hook = model.neuron_hook(layer)
    logits, cache = model.run_with_cache(idx, [hook])
    with model.steer(layer, neuron, value):
        steered = model(idx)
    p0 = torch.softmax(logits[0, -1].float(), -1).cpu()
    p1 = torch.softmax(steered[0, -1].float(), -1).cpu()
    k = min(k, p0.numel())

    def top(p: Tensor) -> list[tuple[int, float]]:
        v, i = torch.topk(p, k)
        return list(zip(i.tolist(), v.tolist()))

    return SteerResult(layer, neuron, float(value), used, top(p0), top(p1), p0, p1,
                       float(cache[hook][0, -1, neuron]), n_cut=len(ids) - len(used))


@torch.no_grad()
def zero_check(model: torch.nn.Module, ids: list[int], layer: int, neuron: int | None = None) -> ZeroCheck:
    """Clamp to 0 a unit that is 0 at every prompt position (`neuron` if it is, else the first such unit):
    the logits must not change at all."""
    check_unit(model, layer, neuron)
    model.eval()
    idx = _ids_tensor(model, ids)
    hook = model.neuron_hook(layer)
    logits, cache = model.run_with_cache(idx, [hook])
    acts = cache[hook][0]  # (T, n)
    inactive = (acts == 0).all(dim=0)
    n_inactive = int(inactive.sum())
    if neuron is None or not bool(inactive[neuron]):
        neuron = int(inactive.nonzero()[0, 0]) if n_inactive else None
    if neuron is None:
        return ZeroCheck(layer, None, float("nan"), 0)
    with model.steer(layer, neuron, 0.0):
        steered = model(idx)
    return ZeroCheck(layer, neuron, float((steered - logits).abs().max()), n_inactive)


def _tok(tokenizer: Any | None, i: int) -> str:
    if tokenizer is None:
        return str(i)
    return repr(tokenizer.decode([i], skip_special_tokens=False))


def render(result: SteerResult, check: ZeroCheck | None = None, tokenizer: Any | None = None) -> None:
    """Print the before/after table (rich) and the zero check."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    prompt = " ".join(_tok(tokenizer, i) for i in result.prompt_ids[-16:])
    n = len(result.prompt_ids)
    cut = f", the last of {n + result.n_cut}: {result.n_cut} cut to fit the model's context" if result.n_cut else ""
    console.print(f"prompt ({n} tokens{cut}): {prompt}")
    console.print(f"layer {result.layer} neuron {result.neuron}: activation at the last position "
                  f"{result.activation:.4f}; clamped to {result.value:g} at every position")
    table = Table(title="Top next tokens before and after steering")
    for col in ("rank", "before", "p", "after", "p "):
        table.add_column(col, justify="right" if col.strip() in ("rank", "p") else "left")
    for r, ((b, pb), (a, pa)) in enumerate(zip(result.before, result.after), 1):
        table.add_row(str(r), _tok(tokenizer, b), f"{pb:.4f}", _tok(tokenizer, a), f"{pa:.4f}")
    console.print(table)
    rises = ", ".join(f"{_tok(tokenizer, i)} {b:.4f}->{a:.4f}" for i, b, a in result.biggest_changes(5))
    console.print(f"largest increases: {rises}")
    if check is not None:
        if check.neuron is None:
            console.print(f"zero check: no unit of layer {check.layer} is inactive on the whole prompt; skipped")
        else:
            verdict = "[green]OK[/green]" if check.ok else "[red]FAILED[/red]"
            console.print(f"zero check: unit {check.neuron} (one of {check.n_inactive} inactive on the prompt) "
                          f"clamped to 0 changes the logits by at most {check.max_abs_diff:.3g}: {verdict}")
