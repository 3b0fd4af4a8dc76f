"""Training a sparse autoencoder on a model's neurons (the paper's GPT-SAE, SPEC.md section 6a), through SAELens.

    cfg = SAETrainConfig(kind="relu", layer=0)           # the paper's ReLU + L1 defaults; kind="topk" for TopK
    sae, metrics = train_sae(model, train_stream, "sae/gpt-l0", cfg, eval_stream=val_stream)

The SAE (`StandardTrainingSAE` / `TopKTrainingSAE`), its optimiser, LR schedule and train step are SAELens's
(`SAETrainer`, fed by our activation iterator through SAELens's shuffling `mixing_buffer`). SAELens has no
dead-latent resampling since v3: a subclass of its trainer (`_trainer_class`) adds it (Anthropic's "Towards Monosemanticity" recipe) at
the steps given. A saved SAE is SAELens's on-disk layout (`cfg.json`, `sae_weights.safetensors`,
`sparsity.safetensors`) plus our `metrics.json` and provenance stamp. `train_from_files` is the whole step from a
checkpoint and a data folder, reusing an SAE of identical inputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crate.eval.sae.activations import activation_batches
from crate.eval.sae.base import SAEError, require_sae_lens, to_inference
from crate.eval.sae.metrics import METRICS_FILE, read_metrics, sae_metrics
from crate.model import LanguageModel

KINDS = ("relu", "topk")


@dataclass
class SAETrainConfig:
    """Defaults are the authors' (SPEC.md 6a) except `steps`, which the paper does not give."""

    kind: str = "relu"  # relu (ReLU + L1, the paper's) | topk
    layer: int = 0
    expansion: int = 16  # d_sae = expansion x d_in
    l1: float = 8e-5  # L1 coefficient (SAELens's loss: squared error summed over d_in, mean over tokens)
    k: int = 32  # TopK: latents kept per token
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)
    steps: int = 120_000
    batch_tokens: int = 4096  # activations per SAE step
    lm_batch: int = 4  # sequences per model forward (4 x 1024 tokens)
    seq_len: int = 1024
    buffer_tokens: int = 2**19  # the shuffled activation buffer
    warmup_steps: int | None = None  # None: 5% of the steps
    resample_at: tuple[int, ...] = (10_000, 20_000, 50_000, 75_000, 100_000)
    dead_window: int = 1000  # steps without firing that make a latent dead for resampling
    eval_tokens: int = 2**20
    seed: int = 0
    device: str | None = None  # None: cuda when available

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise SAEError(f"SAE kind {self.kind!r} is unknown: use one of {', '.join(KINDS)}")
        for name in ("expansion", "steps", "batch_tokens", "lm_batch", "seq_len", "buffer_tokens", "k", "dead_window",
                     "eval_tokens"):
            if getattr(self, name) < 1:
                raise SAEError(f"SAE setting {name}={getattr(self, name)} must be at least 1")
        if not (math.isfinite(self.l1) and self.l1 >= 0):
            raise SAEError(f"the L1 coefficient {self.l1} must be a number >= 0 (a negative one rewards dense latents)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SAEError(f"the learning rate {self.lr} must be a number > 0")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise SAEError(f"--warmup-steps {self.warmup_steps} must be at least 0 and below the {self.steps} steps: "
                           f"lower it or raise --steps")
        if any(s < 1 for s in self.resample_at):
            raise SAEError(f"resampling steps {list(self.resample_at)} count from 1: drop those below")
        if self.buffer_tokens < self.batch_tokens:
            raise SAEError(f"the activation buffer ({self.buffer_tokens} tokens) is smaller than one SAE batch "
                           f"({self.batch_tokens}): raise --buffer-tokens or lower --batch-tokens")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _training_sae(cfg: SAETrainConfig, d_in: int, metadata: dict[str, Any], device: str) -> Any:
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    common = dict(d_in=d_in, d_sae=cfg.expansion * d_in, device=device, metadata=SAEMetadata(**metadata))
    if cfg.kind == "relu":
        return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=cfg.l1, **common))
    if cfg.k > cfg.expansion * d_in:
        raise SAEError(f"TopK k={cfg.k} exceeds the {cfg.expansion * d_in} latents: lower --k")
    return TopKTrainingSAE(TopKTrainingSAEConfig(k=cfg.k, **common))


def _trainer_class() -> type:
    from sae_lens.training.sae_trainer import SAETrainer

    class ResamplingTrainer(SAETrainer):
        """SAELens's trainer, plus dead-latent resampling at given steps and a loss history."""

        def __init__(self, *args: Any, resample_at: Sequence[int] = (), **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.resample_at, self.history, self.resampled = set(resample_at), [], {}

        def step(self, batch: Tensor) -> Any:
            out = super().step(batch)
            self.history.append(float(out.loss.detach()))
            if self.n_training_steps + 1 in self.resample_at:
                n = resample_dead(self.sae, self.optimizer, self.dead_neurons, batch.to(self.sae.device))
                self.n_forward_passes_since_fired[self.dead_neurons] = 0
                self.resampled[self.n_training_steps + 1] = n
            return out

    return ResamplingTrainer


@torch.no_grad()
def resample_dead(sae: Any, optimizer: torch.optim.Optimizer, dead: Tensor, x: Tensor) -> int:
    """Re-initialise dead latents toward inputs the SAE reconstructs worst (sampled with probability ~ loss^2):
    decoder row = the input's direction at the live rows' mean norm, encoder column = that direction x 0.2 x the
    live columns' mean norm, bias 0, and their Adam moments zeroed. Returns how many were resampled."""
    idx = dead.nonzero().squeeze(1)
    if len(idx) == 0:
        return 0
    loss = (sae.decode(sae.encode(x)) - x).pow(2).sum(-1)
    pick = torch.multinomial(loss.square() + 1e-12, len(idx), replacement=True)
    v = x[pick] - sae.b_dec
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    live = ~dead
    dec_norm = sae.W_dec[live].norm(dim=-1).mean() if live.any() else torch.tensor(1.0)
    enc_norm = sae.W_enc[:, live].norm(dim=0).mean() if live.any() else torch.tensor(1.0)
    sae.W_dec[idx] = v * dec_norm
    sae.W_enc[:, idx] = v.T * enc_norm * 0.2
    sae.b_enc[idx] = 0.0
    for p, sl in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        for moment in optimizer.state.get(p, {}).values():
            if isinstance(moment, Tensor) and moment.shape == p.shape:
                moment[sl] = 0.0
    return len(idx)


def _device(cfg_device: str | None) -> str:
    return cfg_device or ("cuda" if torch.cuda.is_available() else "cpu")


def train_sae(model: LanguageModel, stream: np.ndarray, out: str | Path, cfg: SAETrainConfig, *,
              eval_stream: np.ndarray | None = None, identity: dict[str, Any] | None = None,
              model_name: str = "crate-lm") -> tuple[Any, dict[str, Any]]:
    """Train an SAE on `cfg.layer`'s neurons, save it in SAELens's format (+ metrics.json, stamp) to `out`
    atomically, and return (the SAELens inference SAE, its metrics)."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.mixing_buffer import mixing_buffer

    cfg.validate()
    hook = model.neuron_hook(cfg.layer)
    device = _device(cfg.device)
    model = model.eval().to(device)
    torch.manual_seed(cfg.seed)  # SAE init and the buffer's shuffles
    T = min(cfg.seq_len, model.config.block_size)
    from crate.provenance import weights_hash

    meta = {"model_name": model_name, "hook_name": hook, "context_size": T, "prepend_bos": False,
            "crate_model_weights": weights_hash(model)}
    sae = _training_sae(cfg, model.n_neurons, meta, device)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.steps // 20
    tcfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_tokens, train_batch_size_samples=cfg.batch_tokens, lr=cfg.lr,
        lr_end=cfg.lr / 10, lr_scheduler_name="cosineannealing", lr_warm_up_steps=warmup,
        adam_beta1=cfg.betas[0], adam_beta2=cfg.betas[1], device=device, dead_feature_window=cfg.dead_window,
        feature_sampling_window=max(cfg.steps, 1), logger=LoggingConfig(log_to_wandb=False))
    loader = activation_batches(model, stream, hook, T, cfg.lm_batch, cfg.seed)
    data = mixing_buffer(cfg.buffer_tokens, cfg.batch_tokens, loader)
    trainer = _trainer_class()(tcfg, sae, data, resample_at=cfg.resample_at)
    trainer.fit()
    inference = to_inference(sae)
    metrics = sae_metrics(model, inference, eval_stream if eval_stream is not None else stream, cfg.eval_tokens, T)
    h = trainer.history
    metrics["training"] = {"kind": cfg.kind, "steps": cfg.steps, "tokens": cfg.steps * cfg.batch_tokens,
                           "loss_first": h[0] if h else None, "loss_last": h[-1] if h else None,
                           "loss_curve": h[:: max(1, len(h) // 200)], "resampled": trainer.resampled,
                           "config": cfg.to_dict()}
    save_sae(inference, out, metrics, identity or {})
    return inference, metrics


def save_sae(sae: Any, out: str | Path, metrics: dict[str, Any], identity: dict[str, Any]) -> Path:
    """SAELens's `save_model` files, `sparsity.safetensors` (log10 firing frequency, SAELens's name), our
    metrics.json and provenance stamp, written into a temporary folder renamed onto `out` (an older `out` is moved
    aside first and removed only afterwards: an interrupt leaves the old SAE or the new one, whole)."""
    from safetensors.torch import save_file

    from crate.atomic import atomic_dir
    from crate.provenance import write_stamp

    out = Path(out)
    with atomic_dir(out) as tmp:
        sae.save_model(tmp)
        freq = torch.tensor(metrics.pop("_frequency"), dtype=torch.float32)
        save_file({"sparsity": torch.log10(freq + 1e-10)}, tmp / "sparsity.safetensors")
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
        write_stamp(tmp, "sae", identity)
    return out


def sae_identity(model: LanguageModel, manifest: dict[str, Any], split: str, cfg: SAETrainConfig) -> dict[str, Any]:
    """What an SAE depends on: the model's weights, the data (its manifest), the settings (not the device)."""
    from crate.provenance import digest, weights_hash

    return {"stage": "sae", "model_weights": weights_hash(model), "data": digest(manifest), "split": split,
            "config": {k: v for k, v in cfg.to_dict().items() if k != "device"}}


def default_out(checkpoint: str | Path, cfg: SAETrainConfig) -> Path:
    """<run>/sae/<kind>-l<L> beside a run's `final` checkpoint, else <checkpoint>-sae/<kind>-l<L>."""
    p = Path(str(checkpoint).rstrip("/"))
    root = p.parent / "sae" if p.name == "final" else p.with_name(p.name + "-sae")
    return root / f"{cfg.kind}-l{cfg.layer}"


def train_from_files(checkpoint: str | Path, data_dir: str | Path, out: str | Path | None, cfg: SAETrainConfig,
                     split: str = "train", overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Check everything, then train (or reuse an SAE of identical inputs in `out`); metrics on the val split."""
    from crate.eval.models import model_label
    from crate.provenance import check_stamp, check_tokenizers, refuse
    from crate.datadir import read_manifest
    from crate.train.data import open_split
    from crate.loading import load_any

    require_sae_lens()
    cfg.validate()
    model, tok = load_any(checkpoint)
    if not 0 <= cfg.layer < model.config.n_layer:
        raise SAEError(f"--layer {cfg.layer} does not exist: the model has layers 0..{model.config.n_layer - 1}")
    manifest = read_manifest(data_dir)
    check_tokenizers(tok, manifest, str(checkpoint), str(data_dir))
    out = Path(out) if out else default_out(checkpoint, cfg)
    identity = sae_identity(model, manifest, split, cfg)
    status, diffs = check_stamp(out, identity)
    if status == "reuse" and (out / "cfg.json").is_file():
        print(f"SAE {out}: reused (same model, data and settings)")
        return out, read_metrics(out)
    if status == "stale" and not overwrite:
        refuse("an SAE", out, diffs, "--overwrite")
    if status == "new" and out.exists() and any(out.iterdir()):
        raise SAEError(f"{out} is not empty and holds no SAE of ours: choose another --out")
    train, val = open_split(data_dir, split), open_split(data_dir, "val")
    _, metrics = train_sae(model, train, out, cfg, eval_stream=val, identity=identity,
                           model_name=model_label(checkpoint))
    return out, metrics


__all__ = ["KINDS", "SAETrainConfig", "resample_dead", "train_sae", "save_sae", "sae_identity", "default_out",
           "train_from_files"]
