"""Planted units: neurons of known behaviour written at a real model's neuron hook, on the real tokens, so that the
unchanged record -> explain -> simulate -> score pipeline (crate.eval.autointerp.interpret.run_interpret) shows
what the scorer gives a unit whose truth we know.

    planted = plant_units(model, stream, token_strings, n_tokens, seq_len)       # a PlantedModel
    run_interpret(None, None, out, InterpretConfig(layers=[0], neurons=None, ...), model=planted, stream=stream,
                  token_strings=token_strings)                                   # scores the planted units only
    family_table(lines, planted.units)                                           # per family: mean, ci95, n, n_nan

Families (FAMILIES, in display order), `replicates` units each with their own seeded draws:

- indicator-1/4/16: 1.0 on the tokens of 1/4/16 token keys (crate.eval.autointerp.explainers.token_key), 0
  elsewhere; keys drawn among those occurring 10+ times and on at most 2% of the recorded tokens.
- lookup-2%/18%/49%: token-determined, one value uniform(0.2, 1.0) per chosen key, 0 elsewhere; keys taken in a
  seeded order while their summed frequency stays within the target density.
- previous-token: 1.0 where the previous token of the sequence has a key of a seeded set covering ~10% of tokens.
- position: t / (T - 1) at position t of a T-token sequence (dense, token-independent).
- lookup-own (with `own_density`): a lookup unit at the density given, the scored model's own (crate.eval.validity.run
  plants it at the median activation density of the units it scored).
- noise-dense: uniform(0, 1) per token; noise-sparse: 1.0 on ~5% of tokens. The noise is a hash of (the unit's
  seed, the whole sequence's token ids, the position): the recorder's two passes see the same values. The hash
  is lowbias32 (C. Wellons' hash prospector) in int64 arithmetic with 16-bit split products, so it never
  overflows and is the same on every device and in numpy.

Everything a unit's values depend on is a buffer, so crate.provenance.weights_hash (the records' identity) changes
with the seed, the families or the replicates: records of another plant are never reused.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from crate.errors import CrateError
from crate.eval.autointerp.explainers import token_key
from crate.eval.record.recorder import RecordingSpec, recorded_tokens
from crate.eval.stats.neurons import layer_summary
from crate.eval.validity.flags import OWN_DENSITY

INDICATOR_KEYS = {"indicator-1": 1, "indicator-4": 4, "indicator-16": 16}
LOOKUP_DENSITY = {"lookup-2%": 0.02, "lookup-18%": 0.18, "lookup-49%": 0.49}
PREVIOUS_DENSITY = 0.10
SPARSE_RATE = 0.05
FAMILIES: tuple[str, ...] = (*INDICATOR_KEYS, *LOOKUP_DENSITY, "previous-token", "position", "noise-dense",
                             "noise-sparse")
# an indicator key shows in every top record TaR uses (10) and is not dense
INDICATOR_MIN_COUNT, INDICATOR_MAX_FREQ = 10, 0.02

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) without int64 overflow: c split in 16-bit halves."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """lowbias32: a bijective 32-bit integer hash."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_uniform(ids: Tensor, seeds: Tensor) -> Tensor:
    """(B, T, K) uniforms in [0, 1) (24 bits, exact in float32) from token ids (B, T) and K seeds in [0, 2^32):
    a hash of (seed, every token id of the row's sequence, position), so the same sequence gives the same noise."""
    t = torch.arange(ids.shape[1], device=ids.device)
    seq = _mix32(_mix32((_mix32(t) + ids.long()) & _M32).sum(1) & _M32)  # (B,)
    h = _mix32(seq[:, None] ^ seeds[None, :])  # (B, K)
    u = _mix32((h[:, None, :] + t[None, :, None]) & _M32)
    return (u >> 8).float() / float(1 << 24)


@dataclass(frozen=True)
class PlantedUnit:
    """One planted unit and what it is: enough to recompute its values from token ids (keys, seed)."""

    neuron: int
    family: str
    replicate: int
    density: float  # fraction of the recorded tokens where the unit is > 0
    describe: str
    keys: tuple[tuple[str, float], ...] = ()  # (token key, value) of token-determined and previous-token units
    seed: int = 0  # the noise hash seed of noise units


class PlantedModel(nn.Module):
    """A model whose layer-`layer` neurons 0..K-1 are planted units (the rest, and every other layer, as the base
    computes them). It looks like a crate model to the interpret pipeline; its neurons past K are left out of
    sampled or "all" selections (`excluded_neurons`), so `neurons=None` scores exactly the planted units."""

    def __init__(self, base: nn.Module, layer: int, token_table: Tensor, prev_table: Tensor, pos_weight: Tensor,
                 noise_seed: Tensor, noise_dense: Tensor, noise_rate: Tensor, identity: dict[str, Any]):
        super().__init__()
        self.base, self.config, self.layer = base, base.config, layer
        self.register_buffer("token_table", token_table)  # (V, K) value by token id
        self.register_buffer("prev_table", prev_table)  # (V, K) value by the previous token's id
        self.register_buffer("pos_weight", pos_weight)  # (K,) weight of t / (T - 1)
        self.register_buffer("noise_seed", noise_seed)  # (K,) int64 hash seeds
        self.register_buffer("noise_dense", noise_dense)  # (K,) weight of the uniform noise
        self.register_buffer("noise_rate", noise_rate)  # (K,) rate of the sparse 0/1 noise
        self.planted_identity = identity
        self.skipped: dict[str, str] = dict(identity.get("skipped") or {})  # family -> why it was not planted
        self.units: list[PlantedUnit] = []

    @property
    def n_units(self) -> int:
        return int(self.pos_weight.numel())

    def planted_values(self, ids: Tensor) -> Tensor:
        """(B, T, K) float32: the planted units' values on token ids (B, T)."""
        ids = ids.long()
        T = ids.shape[1]
        v = self.token_table[ids]
        v[:, 1:] += self.prev_table[ids[:, :-1]]
        t = torch.arange(T, device=ids.device, dtype=torch.float32) / max(T - 1, 1)
        v += t[None, :, None] * self.pos_weight
        u = hash_uniform(ids, self.noise_seed)
        return v + self.noise_dense * u + (u < self.noise_rate).float()

    @contextlib.contextmanager
    def _planted(self, ids: Tensor) -> Iterator[None]:
        """The plant as the first forward hook of the base's neuron hook: every hook the caller registered there
        before the forward (crate.hooks.record, the recorder's stop, steering) sees, or overwrites, planted values
        (crate.hooks.hooks would append it after them: they would read the base's values)."""
        K = self.n_units

        def plant(_m: nn.Module, _i: Any, x: Tensor) -> Tensor:
            x = x.clone()
            x[..., :K] = self.planted_values(ids).to(x.dtype)
            return x

        point = self.base.get_submodule(self.base.neuron_hook(self.layer))
        handle = point.register_forward_hook(plant, prepend=True)
        try:
            yield
        finally:
            handle.remove()

    def forward(self, ids: Tensor) -> Tensor:
        with self._planted(ids):
            return self.base(ids)

    def hook_names(self) -> list[str]:
        return [f"base.{n}" for n in self.base.hook_names()]

    def neuron_hook(self, layer: int) -> str:
        return f"base.{self.base.neuron_hook(layer)}"

    @property
    def n_neurons(self) -> int:
        """The hook's width, as for the base (SAE training, steering and selection size by it)."""
        return int(self.base.n_neurons)

    def excluded_neurons(self, layer: str) -> list[int]:
        """The base's own neurons of the planted layer: left out of sampled and "all" selections."""
        return list(range(self.n_units, self.n_neurons)) if layer == str(self.layer) else []

    def num_params(self) -> int:
        return int(self.base.num_params())


def _indicator_pool(count: Counter, n_tokens: int) -> list[str]:
    """The keys an indicator may use: 10+ occurrences (in every top record TaR uses), on at most 2% of tokens."""
    return sorted(k for k, c in count.items() if c >= INDICATOR_MIN_COUNT and c / n_tokens <= INDICATOR_MAX_FREQ)


def _unplantable(families: Sequence[str], count: Counter, n_tokens: int) -> dict[str, str]:
    """family -> why it cannot be planted on these tokens (indicators need enough keys of moderate frequency)."""
    pool = len(_indicator_pool(count, n_tokens))
    return {f: (f"needs {INDICATOR_KEYS[f]} of the token keys that occur {INDICATOR_MIN_COUNT}+ times and on at most "
                f"{INDICATOR_MAX_FREQ:.0%} of the recorded tokens; the {n_tokens:,} recorded tokens have {pool}: record "
                f"more tokens") for f in families if f in INDICATOR_KEYS and pool < INDICATOR_KEYS[f]}


def _draw_keys(family: str, rng: np.random.Generator, count: Counter, n_tokens: int,
               own_density: float | None) -> dict[str, float]:
    """The (key, value) table of one token-determined or previous-token unit; `count`: key -> recorded tokens."""
    freq = {k: c / n_tokens for k, c in count.items()}
    if family in INDICATOR_KEYS:
        pool = _indicator_pool(count, n_tokens)
        return {pool[i]: 1.0 for i in sorted(rng.choice(len(pool), size=INDICATOR_KEYS[family], replace=False))}
    target = own_density if family == OWN_DENSITY else LOOKUP_DENSITY.get(family, PREVIOUS_DENSITY)
    chosen, total = [], 0.0
    order = sorted(freq)
    for k in (order[i] for i in rng.permutation(len(order))):
        if total + freq[k] <= target:
            chosen.append(k)
            total += freq[k]
    if family == "previous-token":
        return {k: 1.0 for k in chosen}
    return {k: float(v) for k, v in zip(chosen, rng.uniform(0.2, 1.0, size=len(chosen)))}


def _describe(family: str, keys: dict[str, float], seed: int) -> str:
    shown = ", ".join(f"{k!r}" if family.startswith(("indicator", "previous")) else f"{k!r}={v:.2f}"
                      for k, v in list(keys.items())[:8]) + (", ..." if len(keys) > 8 else "")
    if family.startswith("indicator"):
        return f"1.0 on token keys {shown}"
    if family.startswith("lookup"):
        return f"{len(keys)} token keys: {shown}"
    if family == "previous-token":
        return f"1.0 after a token with key in {len(keys)} keys: {shown}"
    if family == "position":
        return "t / (T - 1), the position in the sequence"
    if family == "noise-dense":
        return f"uniform(0, 1) per token (hash seed {seed})"
    return f"1.0 on {SPARSE_RATE:.0%} of tokens, iid (hash seed {seed})"


def plant_units(model: nn.Module, stream: np.ndarray, token_strings: Sequence[str], n_tokens: int | None,
                seq_len: int, *, layer: int = 0, families: Sequence[str] = FAMILIES, replicates: int = 4,
                seed: int = 0, own_density: float | None = None, strict: bool = True) -> PlantedModel:
    """`model` with `replicates` units of each family planted over layer `layer`'s first neurons (family-major, in
    FAMILIES order, then OWN_DENSITY's lookup units at `own_density` when it is given). Keys and densities are
    measured on the tokens a recording of `n_tokens` tokens in sequences of `seq_len` reads (as run_interpret records them). A unit's draws depend only on (seed, family, replicate).
    A family these tokens cannot carry (too few keys for an indicator) is refused, or with `strict=False` left out
    and named with the reason in `model.skipped`."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families or replicates < 1:
        raise CrateError(f"planted families must be some of {list(FAMILIES)} and replicates >= 1; got "
                         f"{list(families)}, replicates={replicates}")
    if own_density is not None and not 0 < own_density <= 1:
        raise CrateError(f"own_density is a fraction of tokens in (0, 1], got {own_density}")
    if not 0 <= layer < model.config.n_layer:
        raise CrateError(f"layer {layer} out of range: the model has {model.config.n_layer} layers")
    T, n_used = recorded_tokens(len(stream), RecordingSpec(n_tokens=n_tokens, seq_len=seq_len),
                                model.config.block_size)
    if n_used <= 0:
        raise CrateError(f"the token stream has {len(stream)} tokens: fewer than one sequence of {T}")
    ids = np.asarray(stream[:n_used], dtype=np.int64)
    V = int(model.config.vocab_size)
    names, key_idx = np.unique([token_key(s) for s in token_strings[:V]], return_inverse=True)  # key of each id
    if ids.max() >= len(key_idx):
        raise CrateError(f"the stream has token id {ids.max()}, past the {len(key_idx)} token strings given")
    counts = np.bincount(key_idx[ids], minlength=len(names))
    count = Counter({str(names[j]): int(c) for j, c in enumerate(counts) if c})
    skipped = _unplantable(families, count, n_used)
    if skipped and strict:
        raise CrateError("; ".join(f"{f} {why}" for f, why in skipped.items()) + ", or leave them out")
    families = [f for f in FAMILIES if f in families and f not in skipped] + (
        [OWN_DENSITY] if own_density is not None else [])
    K, width = len(families) * replicates, int(model.n_neurons)
    if K > width:
        raise CrateError(f"{len(families)} families x {replicates} replicates = {K} planted units, but layer {layer} "
                         f"has only {width} neurons: plant fewer replicates or families, or use a wider model")

    token_table, prev_table = torch.zeros(V, K), torch.zeros(V, K)
    pos_weight, noise_dense, noise_rate = torch.zeros(K), torch.zeros(K), torch.zeros(K)
    noise_seed = torch.zeros(K, dtype=torch.int64)
    drawn: list[tuple[str, int, dict[str, float], int]] = []
    for f_i, family in enumerate(families):
        for r in range(replicates):
            n = f_i * replicates + r
            rng = np.random.default_rng([seed, (*FAMILIES, OWN_DENSITY).index(family), r])
            keys: dict[str, float] = {}
            if family == "position":
                pos_weight[n] = 1.0
            elif family.startswith("noise"):
                noise_seed[n] = int(rng.integers(0, 1 << 32))
                if family == "noise-dense":
                    noise_dense[n] = 1.0
                else:
                    noise_rate[n] = SPARSE_RATE
            else:
                keys = _draw_keys(family, rng, count, n_used, own_density)
                by_key = np.array([keys.get(str(k), 0.0) for k in names], dtype=np.float32)
                (prev_table if family == "previous-token" else token_table)[: len(key_idx), n] = torch.from_numpy(
                    by_key[key_idx])
            drawn.append((family, r, keys, int(noise_seed[n])))
    identity = {"families": list(families), "skipped": skipped, "replicates": replicates, "seed": seed, "layer": layer, "n_units": K,
                "densities_asked": {**LOOKUP_DENSITY, "previous-token": PREVIOUS_DENSITY, "noise-sparse": SPARSE_RATE,
                                    **({OWN_DENSITY: own_density} if own_density is not None else {})}}
    dev = next(model.parameters()).device
    planted = PlantedModel(model, layer, token_table, prev_table, pos_weight, noise_seed, noise_dense, noise_rate,
                           identity).to(dev)
    active = torch.zeros(K, dtype=torch.int64, device=dev)
    rows = torch.from_numpy(ids).view(-1, T)
    with torch.no_grad():
        for s0 in range(0, len(rows), 64):
            active += (planted.planted_values(rows[s0:s0 + 64].to(dev)) > 0).sum((0, 1))
    planted.units = [PlantedUnit(n, family, r, float(active[n]) / n_used, _describe(family, keys, s),
                                 tuple(keys.items()), s) for n, (family, r, keys, s) in enumerate(drawn)]
    return planted


def family_table(lines: Sequence[dict[str, Any]], units: Sequence[PlantedUnit],
                 metrics: Sequence[str] = ("score", "auprc", "random_score"), n_boot: int = 2000,
                 seed: int = 0) -> dict[str, dict[str, dict[str, Any]]]:
    """Per family (FAMILIES order, then OWN_DENSITY) and metric: {"mean", "ci95" (bootstrap over the family's units), "n" (finite),
    "n_nan"} of the metric in the units' JSONL lines (scores as correlations, unscaled). A metric no line of the
    family carries is left out; units without a line are not counted."""
    by_neuron = {int(x["neuron"]): x for x in lines}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for family in (*FAMILIES, OWN_DENSITY):
        fam = [by_neuron[u.neuron] for u in units if u.family == family and u.neuron in by_neuron]
        for metric in metrics:
            values = [x[metric] for x in fam if metric in x]
            if values:
                s = layer_summary(values, n_boot=n_boot, seed=seed)
                out.setdefault(family, {})[metric] = {k: s[k] for k in ("mean", "ci95", "n", "n_nan")}
    return out


__all__ = ["FAMILIES", "INDICATOR_KEYS", "LOOKUP_DENSITY", "PREVIOUS_DENSITY", "SPARSE_RATE", "PlantedUnit",
           "PlantedModel", "hash_uniform", "plant_units", "family_table"]
