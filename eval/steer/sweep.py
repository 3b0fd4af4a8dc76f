"""Steering, measured: the paper says CRATE "can be steered without loss" and SAE steering is lossy; this puts
numbers on both. For a seeded sample of units (CRATE code units, GPT MLP units, GPT-SAE latents clamped through the
SAE's decoder), each clamped at every position to multiples of its largest activation on the text:

    intended effect    the mean rise in log-probability of the unit's top output tokens: the `top_tokens` tokens
                       whose log-probability the largest clamp raises most on the first half of the sequences
                       (chosen there, measured on the second half, so the choice does not inflate the effect)
    collateral KL      KL(clean || steered) of the next-token distribution renormalised over every other token
                       (what the clamp should not change), mean over positions
    collateral loss    the rise in next-token loss at positions whose true next token is not one of those tokens

each a mean over units with a bootstrap 95% interval over units.

    result = sweep({"crate": m1, "gpt": m2, "gpt-sae": attach_saes(m2, [...])}, stream, SweepConfig())
    write_sweep(result, out)             # steer_sweep.json, steer_sweep.md, steer_sweep.png
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crate.errors import CrateError

RESULT = "steer_sweep.json"


@dataclass
class SweepConfig:
    units: int = 16  # sampled per layer (dead SAE latents and units silent on the text left out)
    multiples: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0)  # clamp values, x the unit's largest activation
    sequences: int = 16  # half choose the tokens, half measure
    seq_len: int = 128
    top_tokens: int = 5
    layers: list[int] | None = None  # None: every layer
    seed: int = 0
    n_boot: int = 2000

    def validate(self) -> None:
        if self.sequences < 2 or self.units < 1 or self.top_tokens < 1 or not self.multiples:
            raise CrateError("steering sweep: --sequences must be at least 2, --units and --top-tokens at least 1, "
                             "and --multiples non-empty")


def renormalised_kl(clean: Tensor, steered: Tensor, keep: Tensor) -> Tensor:
    """KL(p || q) per position over the tokens `keep` (bool (V,)), both distributions renormalised there."""
    lp = torch.log_softmax(clean.double().masked_fill(~keep, -math.inf), -1)
    lq = torch.log_softmax(steered.double().masked_fill(~keep, -math.inf), -1)
    return (lp.exp() * (lp - lq)).masked_fill(~keep, 0.0).sum(-1)


def _logp(model: Any, idx: Tensor) -> Tensor:
    return torch.log_softmax(model(idx).double(), -1)


def _units(model: Any, layer: int, n: int, seed: int) -> list[int]:
    from crate.eval.stats.neurons import sample_neurons

    dead = set(getattr(model, "excluded_neurons", lambda _n: [])(str(layer)))
    live = [i for i in range(model.n_neurons) if i not in dead]
    return [live[i] for i in sample_neurons(len(live), n, seed, str(layer))]


@torch.no_grad()
def measure_unit(model: Any, layer: int, unit: int, amax: float, calib: Tensor, test: Tensor,
                 clean_calib: Tensor, clean_test: Tensor, cfg: SweepConfig) -> dict[str, Any]:
    """One unit's effect, collateral KL and loss rise at each multiple (see the module docstring)."""
    with model.steer(layer, unit, max(cfg.multiples) * amax):
        rise = (_logp(model, calib) - clean_calib).mean((0, 1))
    tokens = torch.topk(rise, cfg.top_tokens).indices
    keep = torch.ones(rise.numel(), dtype=torch.bool, device=rise.device)
    keep[tokens] = False
    nxt = test[:, 1:]
    other = keep[nxt]  # positions whose next token is not an intended one
    nll_clean = -clean_test[:, :-1].gather(-1, nxt[..., None])[..., 0]
    rows = []
    for m in cfg.multiples:
        with model.steer(layer, unit, m * amax):
            lp = _logp(model, test)
        nll = -lp[:, :-1].gather(-1, nxt[..., None])[..., 0]
        rows.append({
            "multiple": m, "value": m * amax,
            "effect": float((lp[..., tokens] - clean_test[..., tokens]).mean()),
            "kl": float(renormalised_kl(clean_test, lp, keep).mean()),
            "loss_increase": float((nll - nll_clean)[other].mean()) if other.any() else math.nan,
        })
    return {"layer": layer, "unit": unit, "max_activation": amax, "tokens": tokens.tolist(), "by_multiple": rows}


def _batches(stream: np.ndarray, cfg: SweepConfig, block: int, device: torch.device) -> tuple[Tensor, Tensor]:
    T = min(cfg.seq_len, block)
    n = min(cfg.sequences, len(stream) // T)
    if n < 2:
        raise CrateError(f"steering sweep: the split has {len(stream)} tokens, fewer than two sequences of {T}: "
                         f"use a larger split or a smaller --seq-len")
    idx = torch.from_numpy(np.asarray(stream[: n * T]).astype(np.int64)).view(n, T).to(device)
    return idx[: n // 2], idx[n // 2:]


@torch.no_grad()
def sweep_model(model: Any, stream: np.ndarray, cfg: SweepConfig) -> list[dict[str, Any]]:
    """Every sampled unit of every layer of one model (units silent on the calibration text are skipped)."""
    model.eval()
    device = next(model.parameters()).device
    calib, test = _batches(stream, cfg, model.config.block_size, device)
    clean_calib, clean_test = _logp(model, calib), _logp(model, test)
    layers = cfg.layers if cfg.layers is not None else list(getattr(model, "sae_layers", range(model.config.n_layer)))
    out = []
    for layer in layers:
        hook = model.neuron_hook(layer)
        _, cache = model.run_with_cache(calib, [hook])
        amax = cache[hook].flatten(0, 1).max(0).values
        for u in _units(model, layer, cfg.units, cfg.seed):
            if float(amax[u]) > 0:
                out.append(measure_unit(model, layer, u, float(amax[u]), calib, test, clean_calib, clean_test, cfg))
    return out


def summarise(units: list[dict[str, Any]], cfg: SweepConfig) -> list[dict[str, Any]]:
    """Per multiple: mean and bootstrap 95% interval over units of effect, KL and loss increase."""
    from crate.eval.stats.neurons import bootstrap_ci

    rows = []
    for j, m in enumerate(cfg.multiples):
        row: dict[str, Any] = {"multiple": m, "n_units": len(units)}
        for key in ("effect", "kl", "loss_increase"):
            vals = [u["by_multiple"][j][key] for u in units]
            fin = [v for v in vals if math.isfinite(v)]
            row[key] = float(np.mean(fin)) if fin else math.nan
            row[f"{key}_ci95"] = list(bootstrap_ci(vals, n_boot=cfg.n_boot, seed=cfg.seed))
        rows.append(row)
    return rows


def sweep(models: dict[str, Any], stream: np.ndarray, cfg: SweepConfig | None = None) -> dict[str, Any]:
    """The sweep for each named model: {"config", "systems": {name: {"units": [...], "summary": [...]}}}."""
    cfg = cfg or SweepConfig()
    cfg.validate()
    systems = {}
    for name, model in models.items():
        units = sweep_model(model, stream, cfg)
        systems[name] = {"units": units, "summary": summarise(units, cfg)}
    return {"config": asdict(cfg), "systems": systems}


def _number(v: float | None) -> str:
    """Three significant digits: a KL of 2e-05 stays visible (fixed decimals would print it as 0)."""
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3g}"


def sweep_markdown(result: dict[str, Any]) -> str:
    lines = ["| system | clamp (x max act.) | units | effect (log-prob rise) | 95% CI | collateral KL | 95% CI | "
             "loss increase | 95% CI |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in result["systems"].items():
        for r in s["summary"]:
            cells = [f"{_number(r[k])} | [{_number(r[k + '_ci95'][0])}, {_number(r[k + '_ci95'][1])}]"
                     for k in ("effect", "kl", "loss_increase")]
            lines.append(f"| {name} | {r['multiple']:g} | {r['n_units']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def sweep_plot(result: dict[str, Any], path: Path) -> Path:
    """Intended effect against collateral KL, one line per system, one point per clamp multiple."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, s in result["systems"].items():
        rows = [r for r in s["summary"] if math.isfinite(r["kl"]) and math.isfinite(r["effect"])]
        ax.plot([r["kl"] for r in rows], [r["effect"] for r in rows], marker="o", label=name)
        for r in rows:
            ax.annotate(f"{r['multiple']:g}x", (r["kl"], r["effect"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("collateral KL (other tokens), nats")
    ax.set_ylabel("intended effect: log-prob rise of the unit's tokens")
    ax.set_title("Steering: effect against cost (clamp = multiple of max activation)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_sweep(result: dict[str, Any], out: str | Path) -> Path:
    from crate.atomic import write_bytes
    from crate.provenance import canonical, claim

    out = claim(out)
    write_bytes(out / RESULT, json.dumps(canonical(result), indent=1).encode())  # NaN -> null, value by value
    (out / "steer_sweep.md").write_text(sweep_markdown(result))
    sweep_plot(result, out / "steer_sweep.png")
    return out / RESULT


def sweep_files(checkpoints: dict[str, str], data_dir: str | Path, out: str | Path, cfg: SweepConfig,
                split: str = "val") -> dict[str, Any]:
    """`crate steer --sweep`: load every checkpoint (DIR or DIR+SAE), check the data's tokenizer, sweep, write."""
    from crate.eval.models import load_model
    from crate.provenance import check_owned, check_tokenizers
    from crate.datadir import read_manifest
    from crate.train.data import open_split

    cfg.validate()
    check_owned(out, "another --out")
    manifest = read_manifest(data_dir)
    models = {}
    for name, ckpt in checkpoints.items():
        model, tok = load_model(ckpt)
        check_tokenizers(tok, manifest, ckpt, str(data_dir))
        models[name] = model
    result = sweep(models, open_split(data_dir, split), cfg)
    result["checkpoints"] = dict(checkpoints)
    write_sweep(result, out)
    return result


def parse_multiples(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise CrateError(f"--multiples {text!r}: give numbers separated by commas, e.g. 0,1,2,4,8") from None
    if not vals:
        raise CrateError("--multiples is empty: give e.g. 0,1,2,4,8")
    if not all(math.isfinite(v) for v in vals):
        raise CrateError(f"--multiples {text!r}: NaN and infinities clamp to nothing measurable; give finite numbers")
    return vals


__all__ = ["SweepConfig", "sweep", "sweep_model", "measure_unit", "renormalised_kl", "summarise", "write_sweep",
           "sweep_files", "sweep_markdown", "parse_multiples", "RESULT"]
