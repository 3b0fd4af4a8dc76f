"""Activation records: stream a token stream through a model and keep, per neuron, what explanation needs.

For every neuron of the chosen layers (CRATE codes, GPT MLP hidden units, or any hook point) one pass keeps

- the top `top_k` positions by activation, with the window of activations around each;
- `n_random` seeded uniform-random positions (drawn per neuron from `seed` and the neuron index only, so
  every model with the same `n_tokens` gets the same positions: CRATE-vs-GPT comparisons are paired);
- running moments (mean, variance, skewness, excess kurtosis, Pebay's parallel update in float64;
  on CUDA each batch's sums are float32 first), the
  activation frequency (> 0), L0 per token, the activation mass per token type (token selectivity), and a
  log2 histogram of the positive activations;

and a second pass (only when `per_bin > 0`) samples `per_bin` positions in each of `n_bins` rank-quantile
bins of the positive activations, uniformly (a seeded bottom-k hash sketch, independent of batch size).

The stream is cut into sequences of `seq_len` tokens (context restarts at each), positions are flattened
(sequence * seq_len + t), and a record is the window [t - window//2, t + window - window//2) clipped to its
sequence. Memory is O(neurons x records x window) on the device (plus vocab x neurons for selectivity),
never O(tokens x neurons); the stream itself may be a np.memmap.

One neuron's windows and NeuronRecord come from the recording afterwards (crate.eval.record.windows); a records
folder is written and read by crate.eval.record.recordings_io.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crate.errors import CrateError

HIST_LO, HIST_HI = -24.0, 24.0  # log2 range of the positive-activation histogram


@dataclass
class RecordingSpec:
    n_tokens: int | None = None  # tokens from the start of the stream; None: all of it (whole sequences)
    seq_len: int = 1024
    window: int = 64
    top_k: int = 50
    n_random: int = 50
    n_bins: int = 11
    per_bin: int = 4
    seed: int = 0
    batch_size: int = 8  # sequences per forward pass
    selectivity: bool | None = None  # token-type mass (vocab x neurons floats per layer); None: on CUDA, or
    # on CPU when it needs at most `selectivity_max_gb` in all
    selectivity_max_gb: float = 2.0
    hist_bins: int = 1024
    device: str | None = None  # None: cuda when available
    autocast_bf16: bool = False  # bf16 forward on CUDA (statistics stay float32/float64)

    @property
    def left(self) -> int:
        return self.window // 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerRecording:
    """What one layer's recording keeps, as numpy arrays. K top, R random, Q bins x P per bin, N neurons, W window."""

    layer: str
    hook: str
    n_tokens: int
    seq_len: int
    window: int
    left: int
    top_vals: np.ndarray  # (K, N) descending
    top_pos: np.ndarray  # (K, N) flattened positions
    top_win: np.ndarray  # (K, N, W), NaN outside the sequence
    rand_pos: np.ndarray  # (R, N)
    rand_win: np.ndarray  # (R, N, W)
    q_pos: np.ndarray  # (Q, P, N), -1 where a bin had fewer than P positions
    q_win: np.ndarray  # (Q, P, N, W)
    boundaries: np.ndarray  # (N, Q + 1): bin q holds positive activations in (b[q], b[q+1]]
    mean: np.ndarray  # (N,)
    var: np.ndarray
    skew: np.ndarray
    kurt: np.ndarray  # excess kurtosis
    max: np.ndarray
    min: np.ndarray
    active_count: np.ndarray  # (N,) positions with activation > 0
    l0_sum: float  # sum over tokens of the number of active units
    l0_sq_sum: float
    token_top10_share: np.ndarray  # (N,) share of positive activation mass on the 10 heaviest token types
    token_effective_types: np.ndarray  # (N,) exp(entropy) of the mass distribution over token types

    @property
    def n_neurons(self) -> int:
        return int(self.top_vals.shape[1])

    def save(self, path: str | Path) -> None:
        arrays = {k: np.asarray(v) for k, v in asdict(self).items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "LayerRecording":
        with np.load(path, allow_pickle=False) as z:
            d: dict[str, Any] = {k: z[k] for k in z.files}
        for k in ("layer", "hook"):
            d[k] = str(d[k])
        for k in ("n_tokens", "seq_len", "window", "left"):
            d[k] = int(d[k])
        for k in ("l0_sum", "l0_sq_sum"):
            d[k] = float(d[k])
        return cls(**d)


def recorded_tokens(stream_tokens: int, spec: RecordingSpec, block_size: int) -> tuple[int, int]:
    """(sequence length, tokens recorded): sequences of `spec.seq_len` tokens (at most the model's block size),
    as many whole ones as the stream holds, within `spec.n_tokens` from its start (all of it when None)."""
    T = min(spec.seq_len, block_size)
    available = (stream_tokens // T) * T
    return T, available if spec.n_tokens is None else (min(spec.n_tokens, stream_tokens) // T) * T


def random_positions(n_tokens: int, n_neurons: int, n_random: int, seed: int) -> np.ndarray:
    """(n_random, n_neurons) uniform positions; column i depends only on (seed, i, n_tokens)."""
    out = np.empty((n_random, n_neurons), dtype=np.int64)
    for i in range(n_neurons):
        out[:, i] = np.random.default_rng([seed, i]).integers(0, n_tokens, size=n_random)
    return out


def _hash_keys(pos: Tensor, neurons: Tensor, seed: int) -> Tensor:
    """Pseudo-random keys in [0, 2^31) for (position, neuron) pairs: a reproducible uniform ordering."""
    m = 2**31
    k = (pos * 2654435761 + neurons * 40503 + seed * 97 + 12345) % m
    k = (k * 1103515245 + 12345) % m
    k = (k ^ (k >> 13)) % m
    k = (k * 69069 + 1) % m
    return k


class _LayerState:
    def __init__(self, name: str, hook: str, n: int, spec: RecordingSpec, n_tokens: int, vocab: int, dev: torch.device):
        self.name, self.hook, self.n, self.spec, self.dev = name, hook, n, spec, dev
        K, R, W = spec.top_k, spec.n_random, spec.window
        f32 = dict(device=dev, dtype=torch.float32)
        self.top_vals = torch.full((K, n), -math.inf, **f32)
        self.top_pos = torch.full((K, n), -1, device=dev, dtype=torch.int64)
        self.top_win = torch.full((K, n, W), math.nan, **f32)
        self.rand_pos = torch.from_numpy(random_positions(n_tokens, n, R, spec.seed)).to(dev)
        self.rand_win = torch.full((R, n, W), math.nan, **f32)
        f64 = dict(device=dev, dtype=torch.float64)
        self.count = 0
        self.mean, self.m2, self.m3, self.m4 = (torch.zeros(n, **f64) for _ in range(4))
        self.max = torch.full((n,), -math.inf, **f32)
        self.min = torch.full((n,), math.inf, **f32)
        self.active = torch.zeros(n, device=dev, dtype=torch.int64)
        self.l0_sum = torch.zeros((), **f64)
        self.l0_sq = torch.zeros((), **f64)
        self.hist = torch.zeros(n * spec.hist_bins, device=dev, dtype=torch.int64)
        self.mass = torch.zeros((vocab, n), **f32) if spec.selectivity else None
        Q, P = spec.n_bins, spec.per_bin
        self.q_key = torch.full((Q, P, n), math.inf, **f32)
        self.q_pos = torch.full((Q, P, n), -1, device=dev, dtype=torch.int64)
        self.q_win = torch.full((Q, P, n, W), math.nan, **f32)
        self.inner: Tensor | None = None  # (N, Q - 1) inner bin boundaries for pass 2


def _windows(A: Tensor, b: Tensor, t: Tensor, n: Tensor, left: int, W: int) -> Tensor:
    """A (B, T, N); b, t, n index tensors of one shape S -> (S..., W) windows, NaN outside the sequence."""
    T = A.shape[1]
    tt = t.unsqueeze(-1) + (torch.arange(W, device=A.device) - left)
    valid = (tt >= 0) & (tt < T)
    vals = A[b.unsqueeze(-1), tt.clamp(0, T - 1), n.unsqueeze(-1)]
    return torch.where(valid, vals, torch.full_like(vals, math.nan))


def _pass1(st: _LayerState, A: Tensor, ids: Tensor, start: int) -> None:
    B, T, N = A.shape
    spec = st.spec
    K, W, left = spec.top_k, spec.window, spec.left
    flat = A.reshape(B * T, N)
    # --- top-k, merged with the running top-k (windows gathered only for the entries that enter it)
    k = min(K, B * T)
    vals, rows = torch.topk(flat, k, dim=0)
    st.top_vals, st.top_pos, st.top_win = _merge(st.top_vals, st.top_pos, st.top_win, vals, rows, A, start,
                                                  largest=True, left=left)
    # --- random positions falling into this batch
    hit = (st.rand_pos >= start) & (st.rand_pos < start + B * T)
    if hit.any():
        r, n = hit.nonzero(as_tuple=True)
        p = st.rand_pos[r, n] - start
        st.rand_win[r, n] = _windows(A, p // T, p % T, n, left, W)
    # --- moments (Pebay's pairwise update)
    x = flat.double() if flat.device.type == "cpu" else flat
    nb = B * T
    mb = x.mean(0)
    d = x - mb
    d2 = d * d
    m2b, m3b, m4b = d2.sum(0).double(), (d2 * d).sum(0).double(), (d2 * d2).sum(0).double()
    mb = mb.double()
    na, n_ = st.count, st.count + nb
    delta = mb - st.mean
    if na == 0:
        st.mean, st.m2, st.m3, st.m4 = mb, m2b, m3b, m4b
    else:
        m2a, m3a = st.m2, st.m3
        st.m4 = (st.m4 + m4b + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n_**3
                 + 6 * delta**2 * (na * na * m2b + nb * nb * m2a) / n_**2 + 4 * delta * (na * m3b - nb * m3a) / n_)
        st.m3 = m3a + m3b + delta**3 * na * nb * (na - nb) / n_**2 + 3 * delta * (na * m2b - nb * m2a) / n_
        st.m2 = m2a + m2b + delta**2 * na * nb / n_
        st.mean = st.mean + delta * nb / n_
    st.count = n_
    st.max = torch.maximum(st.max, flat.max(0).values)
    st.min = torch.minimum(st.min, flat.min(0).values)
    pos_mask = flat > 0
    st.active += pos_mask.sum(0)
    l0 = pos_mask.sum(1).double()
    st.l0_sum += l0.sum()
    st.l0_sq += (l0 * l0).sum()
    # --- histogram of log2 of the positive activations
    H = spec.hist_bins
    r, n = pos_mask.nonzero(as_tuple=True)
    if r.numel():
        v = flat[r, n]
        hb = ((torch.log2(v) - HIST_LO) * (H / (HIST_HI - HIST_LO))).floor().clamp(0, H - 1).long()
        st.hist += torch.bincount(n * H + hb, minlength=N * H)
    # --- activation mass per token type
    if st.mass is not None:
        st.mass.index_add_(0, ids.reshape(-1), flat.clamp_min(0))


def _boundaries(st: _LayerState) -> Tensor:
    """(N, Q + 1) rank-quantile boundaries of the positive activations from the log2 histogram."""
    Q, H = st.spec.n_bins, st.spec.hist_bins
    hist = st.hist.view(st.n, H).double()
    cum = hist.cumsum(1)
    total = cum[:, -1:]
    targets = total * torch.arange(Q + 1, device=hist.device, dtype=torch.float64) / Q  # (N, Q+1)
    j = torch.searchsorted(cum.contiguous(), targets.contiguous()).clamp(max=H - 1)  # bin where rank reached
    before = torch.where(j > 0, torch.gather(cum, 1, (j - 1).clamp(min=0)), torch.zeros_like(targets))
    inbin = torch.gather(hist, 1, j).clamp(min=1)
    frac = ((targets - before) / inbin).clamp(0, 1)
    width = (HIST_HI - HIST_LO) / H
    b = torch.exp2(HIST_LO + (j.double() + frac) * width).float()
    b[:, 0] = 0.0
    b[:, -1] = st.max.clamp(min=0)
    b = torch.where(total > 0, b, torch.zeros_like(b))
    return torch.cummax(b, dim=1).values


def _pass2(st: _LayerState, A: Tensor, start: int) -> None:
    """Bottom-`per_bin` hash keys per (bin, neuron): one sort of (bin, key) per batch, one merge for all bins."""
    B, T, N = A.shape
    spec = st.spec
    Q, P, W, left = spec.n_bins, spec.per_bin, spec.window, spec.left
    flat = A.reshape(B * T, N)
    assert st.inner is not None
    M = 2**31
    bins = torch.searchsorted(st.inner, flat.t().contiguous(), right=False).t()  # (BT, N): v <= b[1] -> 0
    pos = torch.arange(B * T, device=A.device).unsqueeze(1) + start
    neur = torch.arange(N, device=A.device).unsqueeze(0)
    keys = _hash_keys(pos, neur, spec.seed)  # (BT, N) in [0, 2^31)
    combined = torch.where(flat > 0, bins * M + keys, torch.full_like(keys, Q * M))
    sk, rows = torch.sort(combined, dim=0)
    first = torch.searchsorted(sk.t().contiguous(), (torch.arange(Q, device=A.device) * M).expand(N, Q).contiguous()).t()
    idx = first.unsqueeze(1) + torch.arange(P, device=A.device).view(1, P, 1)  # (Q, P, N)
    idc = idx.clamp(max=B * T - 1)
    nk = torch.gather(sk, 0, idc.reshape(Q * P, N)).view(Q, P, N)
    nrows = torch.gather(rows, 0, idc.reshape(Q * P, N)).view(Q, P, N)
    qs = torch.arange(Q, device=A.device).view(Q, 1, 1)
    ok = (idx < B * T) & (nk // M == qs)
    new_key = torch.where(ok, (nk % M).float(), torch.full_like(nk, 0, dtype=torch.float32) + math.inf)
    cat_k = torch.cat([st.q_key, new_key], dim=1)  # (Q, 2P, N)
    kv, sel = torch.topk(cat_k, P, dim=1, largest=False)
    new_p = torch.where(ok, nrows + start, torch.full_like(nrows, -1))
    st.q_pos = torch.gather(torch.cat([st.q_pos, new_p], dim=1), 1, sel)
    win = torch.take_along_dim(st.q_win, sel.clamp(max=P - 1).unsqueeze(-1), dim=1)
    fresh = (sel >= P) & (st.q_pos >= 0)
    if fresh.any():
        q, i, n = fresh.nonzero(as_tuple=True)
        r = nrows[q, sel[q, i, n] - P, n]
        win[q, i, n] = _windows(A, r // T, r % T, n, left, W)
    st.q_win = torch.where((st.q_pos >= 0).unsqueeze(-1), win, torch.full_like(win, math.nan))
    st.q_key = kv


def _merge(old_v: Tensor, old_p: Tensor, old_w: Tensor, new_v: Tensor, rows: Tensor, A: Tensor, start: int,
           largest: bool, left: int) -> tuple[Tensor, Tensor, Tensor]:
    """Merge a batch's candidates (values, batch rows) into a running top/bottom-k with windows."""
    K = old_v.shape[0]
    T = A.shape[1]
    new_p = torch.where(torch.isfinite(new_v), rows + start, torch.full_like(rows, -1))
    v, sel = torch.topk(torch.cat([old_v, new_v]), K, dim=0, largest=largest)
    pos = torch.gather(torch.cat([old_p, new_p]), 0, sel)
    win = torch.take_along_dim(old_w, sel.clamp(max=K - 1).unsqueeze(-1), dim=0)
    fresh = sel >= K
    if fresh.any():
        i, n = fresh.nonzero(as_tuple=True)
        r = rows[sel[i, n] - K, n]
        win[i, n] = _windows(A, r // T, r % T, n, left, old_w.shape[-1])
        win = torch.where((pos >= 0).unsqueeze(-1), win, torch.full_like(win, math.nan))
    return v, pos, win


def resolve_layers(model: torch.nn.Module, layers: Sequence[int | str] | None) -> list[tuple[str, str]]:
    """[(layer name, hook name)]: ints are neuron layers ("0" -> transformer.h.0.hook_neurons), strings hook names."""
    if layers is None:
        layers = list(range(model.config.n_layer))  # type: ignore[attr-defined]
    out = []
    names = set(model.hook_names())  # type: ignore[operator]
    for layer in layers:
        if isinstance(layer, str) and layer.isdigit():
            layer = int(layer)
        if isinstance(layer, int):
            if not 0 <= layer < model.config.n_layer:  # type: ignore[attr-defined]
                raise CrateError(f"layer {layer} out of range: the model has {model.config.n_layer} layers")
            out.append((str(layer), model.neuron_hook(layer)))  # type: ignore[operator]
        elif layer in names:
            out.append((layer, layer))
        else:
            raise CrateError(f"unknown layer or hook point {layer!r}; use layer indices or one of {sorted(names)}")
    return out


@torch.no_grad()
def record_activations(
    model: torch.nn.Module,
    stream: np.ndarray,
    spec: RecordingSpec,
    layers: Sequence[int | str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, LayerRecording]:
    """Record every neuron of `layers` over the first `spec.n_tokens` tokens of `stream` (1-D token ids)."""
    dev = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    T, n_tokens = recorded_tokens(len(stream), spec, model.config.block_size)  # type: ignore[attr-defined]
    if n_tokens <= 0:
        raise CrateError(f"the token stream has {len(stream)} tokens: fewer than one sequence of {T}")
    spec = RecordingSpec(**{**spec.to_dict(), "seq_len": T, "n_tokens": n_tokens})
    vocab = int(model.config.vocab_size)  # type: ignore[attr-defined]
    model = model.to(dev).eval()
    named = resolve_layers(model, layers)
    # neuron count per hook: a dry run on one short sequence
    from crate.hooks import hooks, record

    with record(model, [h for _, h in named]) as cache:
        model(torch.from_numpy(np.asarray(stream[:min(T, 8)], dtype=np.int64)).view(1, -1).to(dev))
    widths = {hook: int(cache[hook].shape[-1]) for _, hook in named}
    if spec.selectivity is None:
        need_gb = vocab * sum(widths.values()) * 4 / 1024**3
        spec.selectivity = dev.type == "cuda" or need_gb <= spec.selectivity_max_gb
    states = {name: _LayerState(name, hook, widths[hook], spec, n_tokens, vocab, dev) for name, hook in named}
    hook_to_state = {st.hook: st for st in states.values()}
    order = {name: i for i, name in enumerate(n for n, _ in model.named_modules())}
    last_hook = max(hook_to_state, key=lambda h: order[h])
    n_seq = n_tokens // T
    passes = [1, 2] if spec.per_bin > 0 and spec.n_bins > 0 else [1]

    for pas in passes:
        if pas == 2:
            for st in states.values():
                b = _boundaries(st)
                st.boundaries = b
                st.inner = b[:, 1:-1].contiguous()
        done = 0
        for s0 in range(0, n_seq, spec.batch_size):
            s1 = min(n_seq, s0 + spec.batch_size)
            chunk = np.asarray(stream[s0 * T : s1 * T], dtype=np.int64)
            ids = torch.from_numpy(chunk).view(s1 - s0, T).to(dev, non_blocking=True)
            with record(model, list(hook_to_state)) as cache, hooks(model, {last_hook: _stop}):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=spec.autocast_bf16 and dev.type == "cuda"):
                    try:
                        model(ids)  # stops at the last recorded hook: later blocks and the LM head are not computed
                    except _StopForward:
                        pass
            for hook, st in hook_to_state.items():
                A = cache[hook].float()
                if pas == 1:
                    _pass1(st, A, ids, s0 * T)
                else:
                    _pass2(st, A, s0 * T)
            done += (s1 - s0) * T
            if progress is not None:
                progress(done, n_tokens, f"pass {pas}/{len(passes)}")
    return {name: _finish(st, n_tokens) for name, st in states.items()}


class _StopForward(Exception):
    """Raised at the last recorded hook point: nothing after it is needed."""


def _stop(x: Tensor) -> None:
    raise _StopForward


def _selectivity(mass: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Per neuron: share of the mass on the 10 heaviest token types, and exp(entropy) over token types."""
    top10, eff = [], []
    for c0 in range(0, mass.shape[1], chunk):
        m = mass[:, c0 : c0 + chunk]
        total = m.sum(0)
        k = min(10, m.shape[0])
        t10 = m.topk(k, dim=0).values.sum(0) / total
        p = m / total.clamp(min=1e-30)
        ent = -torch.special.xlogy(p, p).sum(0)
        dead = total <= 0
        top10.append(torch.where(dead, torch.full_like(t10, math.nan), t10))
        eff.append(torch.where(dead, torch.full_like(ent, math.nan), torch.exp(ent)))
    return torch.cat(top10), torch.cat(eff)


def _finish(st: _LayerState, n_tokens: int) -> LayerRecording:
    spec = st.spec
    n = st.count
    var = st.m2 / n
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = (math.sqrt(n) * st.m3 / st.m2.pow(1.5)).cpu().numpy()
        kurt = (n * st.m4 / (st.m2 * st.m2) - 3.0).cpu().numpy()
    if st.mass is not None:
        top10, eff = _selectivity(st.mass)
        st.mass = None
    else:
        top10 = eff = torch.full((st.n,), math.nan)
    boundaries = getattr(st, "boundaries", None)
    if boundaries is None:
        boundaries = _boundaries(st)
    c = lambda t: t.detach().cpu().numpy()  # noqa: E731
    return LayerRecording(
        layer=st.name, hook=st.hook, n_tokens=n_tokens, seq_len=spec.seq_len, window=spec.window, left=spec.left,
        top_vals=c(st.top_vals), top_pos=c(st.top_pos), top_win=c(st.top_win),
        rand_pos=c(st.rand_pos), rand_win=c(st.rand_win),
        q_pos=c(st.q_pos), q_win=c(st.q_win), boundaries=c(boundaries),
        mean=c(st.mean), var=c(var), skew=skew, kurt=kurt, max=c(st.max), min=c(st.min),
        active_count=c(st.active), l0_sum=float(st.l0_sum), l0_sq_sum=float(st.l0_sq),
        token_top10_share=c(top10), token_effective_types=c(eff),
    )


__all__ = ["RecordingSpec", "LayerRecording", "record_activations", "recorded_tokens", "random_positions",
           "resolve_layers"]
