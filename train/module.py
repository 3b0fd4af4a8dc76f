"""The LightningModule: any model config, AdamW with the paper's decay groups, warm-up + cosine, clipping.

Per-step randomness (dropout) comes from a generator re-seeded from (seed, step, rank) at every optimizer
step, so a resumed run draws the same random numbers as an uninterrupted one without saving RNG states.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from crate.config import ModelConfig
from crate.errors import CrateError
from crate.model import LanguageModel


class NonFiniteLossError(CrateError):
    """The loss or the gradient norm became NaN or inf."""


def lr_factor(step: int, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """nanoGPT's schedule as a factor of `lr`: linear warm-up, cosine to `min_lr` at `decay_steps`, then flat."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step >= decay_steps:
        return min_lr / lr
    ratio = (step - warmup) / max(1, decay_steps - warmup)
    return (min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)) / lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The paper's groups: decay every parameter with >= 2 dims (embeddings, dictionary), none on biases and norms."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}  # tied weights once
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LMModule(L.LightningModule):
    def __init__(self, model_config: dict[str, Any], train: dict[str, Any], tokenizer: dict[str, Any] | None = None,
                 accumulation: int = 1, data_dir: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.config = ModelConfig.from_dict(model_config)
        self.train_cfg = train
        self.accumulation = accumulation
        self.model = LanguageModel(self.config)
        self._micro_losses: list[torch.Tensor] = []
        self.step_loss: float | None = None  # mean over the step's micro-batches and ranks
        self.grad_norm: float | None = None
        self._sharded = self._compiled = False

    # --- sharding and compile -------------------------------------------------------------------
    def configure_model(self) -> None:
        """Called by the Trainer before every fit/validate: FSDP2 shards first (its strategy sets the device
        mesh), then torch.compile wraps the sharded model; each happens once."""
        if self.device_mesh is not None and not self._sharded:
            from crate.train.fsdp import shard

            shard(self.model, self.device_mesh["data_parallel"])
            self._sharded = True
        if self.train_cfg.get("compile") and not self._compiled:
            self.model = torch.compile(self.model)
            self._compiled = True

    # --- steps --------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.accumulation == 0:
            seed = (int(self.train_cfg["seed"]) * 1_000_003 + self.global_step * 8191 + self.global_rank) % 2**63
            torch.manual_seed(seed)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(*batch)
        self._micro_losses.append(loss.detach())
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        loss = torch.stack(self._micro_losses).mean()
        self._micro_losses = []
        loss = self.trainer.strategy.reduce(loss, reduce_op="mean")
        self.step_loss = float(loss)
        if not math.isfinite(self.step_loss):
            raise NonFiniteLossError(
                f"the training loss is {self.step_loss} at step {self.global_step + 1}: stopped before the update"
            )

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        clip = float(self.train_cfg.get("grad_clip") or 0.0)
        max_norm = clip if clip > 0 else float("inf")
        # under FSDP2 the gradients are DTensor shards: the norm is still the global one
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm))
        if not math.isfinite(self.grad_norm):
            raise NonFiniteLossError(
                f"the gradient norm is {self.grad_norm} at step {self.global_step + 1}: stopped before the update"
            )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(*batch)
        # to the loggers by crate.train.callbacks.ValidationLog, at the step it measures (Lightning's is one early)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, on_epoch=True, on_step=False, logger=False)
        return loss

    # --- optimizer ------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        t = self.train_cfg
        fused = torch.cuda.is_available() and self.device.type == "cuda"
        opt = torch.optim.AdamW(param_groups(self, float(t["weight_decay"])), lr=float(t["lr"]),
                                betas=tuple(t["betas"]), eps=float(t["eps"]), **({"fused": True} if fused else {}))
        decay = int(t.get("lr_decay_steps") or t["max_steps"])
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, float(t["lr"]), float(t["min_lr"]), int(t["warmup_steps"]), decay)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_train_start(self) -> None:
        """Put the schedule of the current train settings in force. On a resume Lightning restores the
        scheduler's base_lrs (the checkpoint's train.lr) and the optimizer's lr; the lambda is ours and
        reads this run's settings (lr, min_lr, warmup, decay, max_steps). A fresh run is left as it is."""
        sched = self.lr_schedulers()
        lr = float(self.train_cfg["lr"])
        sched.base_lrs = [lr] * len(sched.optimizer.param_groups)
        for group, factor in zip(sched.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"], group["lr"] = lr, lr * factor(self.global_step)
        sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]

    # --- checkpoint identity --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # fsdp: FSDP2 keys the optimizer state by parameter order, the others by param-group order
        checkpoint["crate"] = {"model": self.config.to_dict(), "tokenizer": self.hparams.get("tokenizer"),
                               "fsdp": self._sharded, "data_dir": self.hparams.get("data_dir")}
        # A compiled model's keys carry `_orig_mod.`: store plain keys so any run can load them.
        sd = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = {k.replace("model._orig_mod.", "model."): v for k, v in sd.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if getattr(self, "_compiled", False):
            sd = checkpoint.get("state_dict", {})
            checkpoint["state_dict"] = {
                (k.replace("model.", "model._orig_mod.", 1) if k.startswith("model.") else k): v for k, v in sd.items()
            }
