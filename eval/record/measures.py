"""Explanation-free measures per layer, from a recording alone (no LLM).

- `l0_per_token`: mean (and std) number of units > 0 per token.
- `dead`: units never > 0; `always_on`: units > 0 on at least `always_on_threshold` of the tokens.
- `activation_frequency`: mean and median over units of the fraction of tokens where a unit is > 0.
- `token_selectivity`: median over live units of the share of positive activation mass on the 10 heaviest
  token types (1.0 = the unit fires on at most 10 token types), and of the effective number of token types
  exp(entropy of the mass distribution).
- `top_random_ratio`: median over live units of the mean positive part of the activation over the tokens of the
  top records divided by that over the tokens of the random records (the paper's "consistent and distinctive"
  claim as a number; inf when the random records are all zero, counted in `top_random_ratio_inf`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from crate.eval.record.recorder import LayerRecording


def _med(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if len(x) else math.nan


def layer_measures(rec: LayerRecording, always_on_threshold: float = 0.99, top_records: int = 10,
                   neurons: np.ndarray | None = None) -> dict[str, Any]:
    n_tok = rec.n_tokens
    sel = np.arange(rec.n_neurons) if neurons is None else np.asarray(neurons)
    freq = rec.active_count[sel] / n_tok
    live = rec.active_count[sel] > 0
    l0 = rec.l0_sum / n_tok
    l0_std = math.sqrt(max(rec.l0_sq_sum / n_tok - l0 * l0, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        # both sides clipped at 0 (relu, as the prompts normalise): a GELU unit's negative values would otherwise
        # lower the top side only
        top = np.nanmean(np.clip(rec.top_win[:top_records][:, sel], 0, None), axis=(0, 2))
        rnd = np.nanmean(np.clip(rec.rand_win[:, sel], 0, None), axis=(0, 2))
        ratio = np.where(rnd > 0, top / rnd, np.where(top > 0, np.inf, np.nan))
    r_live = ratio[live]
    finite = r_live[np.isfinite(r_live)]
    return {
        "n_units": int(len(sel)),
        "l0_per_token": l0,
        "l0_per_token_std": l0_std,
        "l0_fraction": l0 / rec.n_neurons,
        "dead": int((~live).sum()),
        "always_on": int((freq >= always_on_threshold).sum()),
        "always_on_threshold": always_on_threshold,
        "activation_frequency_mean": float(freq.mean()),
        "activation_frequency_median": float(np.median(freq)),
        "token_top10_share_median": _med(rec.token_top10_share[sel][live]),
        "token_effective_types_median": _med(rec.token_effective_types[sel][live]),
        "top_random_ratio_median": float(np.median(r_live)) if len(r_live) and np.isfinite(np.median(r_live)) else (
            math.inf if len(r_live) and np.isinf(r_live).sum() * 2 > len(r_live) else _med(finite)),
        "top_random_ratio_inf": int(np.isinf(r_live).sum()),
        "kurtosis_median": _med(rec.kurt[sel]),
        "skewness_median": _med(rec.skew[sel]),
        "n_tokens": n_tok,
    }


__all__ = ["layer_measures"]
