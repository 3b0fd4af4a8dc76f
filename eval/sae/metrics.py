"""How good an SAE is on a model's activations (L0, dead and dense latents, explained variance, cosine similarity,
cross-entropy loss recovered), and the `metrics.json` an SAE folder keeps them in.

Dead latents: fewer than 15 activations per 2M tokens, scaled to the tokens measured (fewer than
15 * n / 2e6 activations over n tokens; below 133,334 tokens that means never active). Dense: active on more
than 10% of tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from crate.eval.sae.activations import n_sequences, token_rows
from crate.hooks import hooks, record
from crate.model import LanguageModel

METRICS_FILE = "metrics.json"
DEAD_PER_2M = 15
DENSE_FRACTION = 0.1


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, over tokens (rows): variance about the mean explained."""
    x, x_hat = x.double(), x_hat.double()
    return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def dead_threshold(n_tokens: int) -> float:
    """A latent is dead with fewer activations than this over `n_tokens` (15 per 2M tokens, scaled)."""
    return DEAD_PER_2M * n_tokens / 2e6


def _ce(logits: Tensor, idx: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten(), reduction="sum")


@torch.no_grad()
def sae_metrics(model: LanguageModel, sae: Any, stream: np.ndarray, n_tokens: int, seq_len: int,
                batch: int = 8) -> dict[str, Any]:
    """L0, dead / dense fractions, explained variance, cosine similarity and the cross-entropy loss recovered
    when the reconstruction replaces the activations, against zero- and mean-ablation, on the first `n_tokens`."""
    hook = sae.cfg.metadata.hook_name
    T = min(seq_len, model.config.block_size)
    n_seq = min(n_sequences(stream, T, "evaluation"), max(1, n_tokens // T))
    device = next(model.parameters()).device
    sae = sae.to(device)
    d = sae.cfg.d_in
    s1, s2, sse = torch.zeros(d, dtype=torch.float64, device=device), 0.0, 0.0
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=device)
    cos_sum, l0_sum, ce = 0.0, 0.0, {"clean": 0.0, "sae": 0.0, "zero": 0.0, "mean": 0.0}
    batches = [list(range(i, min(i + batch, n_seq))) for i in range(0, n_seq, batch)]
    for rows in batches:
        idx = token_rows(stream, rows, T, device)
        with record(model, [hook]) as cache:
            ce["clean"] += float(_ce(model(idx), idx))
        x = cache[hook].reshape(-1, d).float()
        f = sae.encode(x)
        x_hat = sae.decode(f)
        s1 += x.double().sum(0)
        s2 += float(x.double().pow(2).sum())
        sse += float((x - x_hat).double().pow(2).sum())
        cos_sum += float(F.cosine_similarity(x, x_hat, dim=-1, eps=1e-8).sum())
        l0_sum += float((f > 0).sum())
        counts += (f > 0).sum(0).double()
    n = n_seq * T
    mean = (s1 / n).float()
    splices = {"sae": lambda a: sae.decode(sae.encode(a.float())).to(a.dtype), "zero": torch.zeros_like,
               "mean": lambda a: mean.to(a.dtype).expand_as(a)}
    for rows in batches:
        idx = token_rows(stream, rows, T, device)
        for name, fn in splices.items():
            with hooks(model, {hook: fn}):
                ce[name] += float(_ce(model(idx), idx))
    n_pred = n_seq * (T - 1)
    ce = {k: v / n_pred for k, v in ce.items()}
    freq = counts / n
    sst = s2 - float((s1 * s1).sum()) / n
    recovered = lambda base: (ce[base] - ce["sae"]) / (ce[base] - ce["clean"]) if ce[base] != ce["clean"] else math.nan  # noqa: E731
    return {
        "hook": hook, "d_in": d, "d_sae": sae.cfg.d_sae, "architecture": sae.cfg.architecture(), "n_tokens": n,
        "l0": l0_sum / n, "dead_fraction": float((counts < dead_threshold(n)).double().mean()),
        "dense_fraction": float((freq > DENSE_FRACTION).double().mean()),
        "dead_latents": [int(i) for i in (counts < dead_threshold(n)).nonzero().flatten()],
        "dead_rule": f"fewer than {DEAD_PER_2M} activations per 2M tokens: < {dead_threshold(n):.3g} over {n} tokens",
        "dense_rule": f"active on more than {DENSE_FRACTION:.0%} of tokens",
        "explained_variance": 1 - sse / sst if sst > 0 else math.nan,
        "cosine_similarity": cos_sum / n,
        "ce_loss": ce, "ce_recovered_vs_zero": recovered("zero"), "ce_recovered_vs_mean": recovered("mean"),
        "_frequency": freq.cpu().tolist(),
    }


def read_metrics(path: str | Path) -> dict[str, Any]:
    """The metrics.json of an SAE folder ({} when it has none)."""
    f = Path(path) / METRICS_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def metrics_line(m: dict[str, Any]) -> str:
    """One line of an SAE's metrics, as `crate sae` and the report print them."""
    f = lambda v, p=3: "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{p}f}"  # noqa: E731
    ce = m.get("ce_loss", {})
    return (f"L0 {f(m.get('l0'), 1)}  dead {f(m.get('dead_fraction'))}  dense {f(m.get('dense_fraction'))}  "
            f"explained variance {f(m.get('explained_variance'))}  cosine {f(m.get('cosine_similarity'))}  "
            f"CE clean/SAE/zero/mean {f(ce.get('clean'))}/{f(ce.get('sae'))}/{f(ce.get('zero'))}/{f(ce.get('mean'))}  "
            f"recovered vs zero {f(m.get('ce_recovered_vs_zero'))} vs mean {f(m.get('ce_recovered_vs_mean'))}")


__all__ = ["METRICS_FILE", "DEAD_PER_2M", "DENSE_FRACTION", "explained_variance", "dead_threshold", "sae_metrics",
           "read_metrics", "metrics_line"]
