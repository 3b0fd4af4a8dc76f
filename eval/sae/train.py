"""Sparse autoencoders on a model's neurons (the paper's GPT-SAE, SPEC.md section 6a), through SAELens.

    cfg = SAETrainConfig(kind="relu", layer=0)           # the paper's ReLU + L1 defaults; kind="topk" for TopK
    sae, metrics = train_sae(model, train_stream, "sae/gpt-l0", cfg, eval_stream=val_stream)
    sae = load_sae("sae/gpt-l0")                         # = sae_lens.SAE.load_from_disk("sae/gpt-l0")
    model = attach_saes(model, ["sae/gpt-l0"])           # its neurons are now the SAE's latents

The SAE (`StandardTrainingSAE` / `TopKTrainingSAE`), its optimiser, LR schedule and train step are SAELens's
(`SAETrainer`, fed by our activation iterator through SAELens's shuffling `mixing_buffer`). SAELens has no
dead-latent resampling since v3: a subclass of its trainer (`_trainer_class`) adds it (Anthropic's "Towards Monosemanticity" recipe) at
the steps given. A saved SAE is SAELens's on-disk layout (`cfg.json`, `sae_weights.safetensors`,
`sparsity.safetensors`) plus our `metrics.json` and provenance stamp.

Dead latents: fewer than 15 activations per 2M tokens, scaled to the tokens measured (fewer than
15 * n / 2e6 activations over n tokens; below 133,334 tokens that means never active). Dense: active on more
than 10% of tokens.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crate.errors import CrateError
from crate.hooks import HookPoint, hooks, neuron_hook_name, record
from crate.model import LanguageModel

KINDS = ("relu", "topk")
METRICS = "metrics.json"
DEAD_PER_2M = 15
DENSE_FRACTION = 0.1
_HOOK = re.compile(r"^transformer\.h\.(\d+)\.hook_neurons$")


class SAEError(CrateError):
    """An SAE that cannot be trained, read or attached (bad settings, missing files, another model's SAE)."""


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
        for name in ("expansion", "steps", "batch_tokens", "lm_batch", "seq_len", "buffer_tokens", "k"):
            if getattr(self, name) < 1:
                raise SAEError(f"SAE setting {name}={getattr(self, name)} must be at least 1")
        if self.buffer_tokens < self.batch_tokens:
            raise SAEError(f"the activation buffer ({self.buffer_tokens} tokens) is smaller than one SAE batch "
                           f"({self.batch_tokens}): raise --buffer-tokens or lower --batch-tokens")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_sae_lens() -> None:
    """A clear error, before any work, when SAELens is not installed."""
    import importlib.util

    if importlib.util.find_spec("sae_lens") is None:
        raise SAEError('SAEs need SAELens, which is not installed: pip install -e ".[sae]" (sae-lens==6.54.12)')


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, over tokens (rows): variance about the mean explained."""
    x, x_hat = x.double(), x_hat.double()
    return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def dead_threshold(n_tokens: int) -> float:
    """A latent is dead with fewer activations than this over `n_tokens` (15 per 2M tokens, scaled)."""
    return DEAD_PER_2M * n_tokens / 2e6


# --- activations --------------------------------------------------------------------------------------------

def _sequences(stream: np.ndarray, T: int, name: str) -> int:
    n = len(stream) // T
    if n < 1:
        raise SAEError(f"the {name} tokens ({len(stream)}) hold no sequence of {T}: use a larger split or --seq-len")
    return n


def _batch(stream: np.ndarray, rows: Sequence[int], T: int, device: torch.device) -> Tensor:
    return torch.from_numpy(np.stack([np.asarray(stream[r * T:(r + 1) * T]) for r in rows]).astype(np.int64)).to(device)


def activation_batches(model: nn.Module, stream: np.ndarray, hook: str, seq_len: int, lm_batch: int,
                       seed: int) -> Iterator[Tensor]:
    """Endless (tokens, d_in) activations at `hook`, sequences in a seeded random order, epoch after epoch."""
    T = min(seq_len, model.config.block_size)
    n = _sequences(stream, T, "training")
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    while True:
        order = rng.permutation(n)
        for i in range(0, n, lm_batch):
            with torch.no_grad(), record(model, [hook]) as cache:
                model(_batch(stream, order[i:i + lm_batch], T, device))
            a = cache[hook]
            yield a.reshape(-1, a.shape[-1]).float()


# --- training -----------------------------------------------------------------------------------------------

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
    inference = _to_inference(sae)
    metrics = sae_metrics(model, inference, eval_stream if eval_stream is not None else stream, cfg.eval_tokens, T)
    h = trainer.history
    metrics["training"] = {"kind": cfg.kind, "steps": cfg.steps, "tokens": cfg.steps * cfg.batch_tokens,
                           "loss_first": h[0] if h else None, "loss_last": h[-1] if h else None,
                           "loss_curve": h[:: max(1, len(h) // 200)], "resampled": trainer.resampled,
                           "config": cfg.to_dict()}
    save_sae(inference, out, metrics, identity or {})
    return inference, metrics


def _to_inference(training_sae: Any) -> Any:
    """The SAELens inference SAE of a training SAE, through its own save path (what load_from_disk reads)."""
    import tempfile

    from sae_lens import SAE

    with tempfile.TemporaryDirectory() as tmp:
        training_sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device=str(training_sae.device))


def save_sae(sae: Any, out: str | Path, metrics: dict[str, Any], identity: dict[str, Any]) -> Path:
    """SAELens's `save_model` files, `sparsity.safetensors` (log10 firing frequency, SAELens's name), our
    metrics.json and provenance stamp, written into a temporary folder renamed onto `out`."""
    import os
    import shutil

    from safetensors.torch import save_file

    from crate.atomic import honour_umask, temporary_dir
    from crate.provenance import write_stamp

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(out)
    try:
        sae.save_model(tmp)
        freq = torch.tensor(metrics.pop("_frequency"), dtype=torch.float32)
        save_file({"sparsity": torch.log10(freq + 1e-10)}, tmp / "sparsity.safetensors")
        (tmp / METRICS).write_text(json.dumps(metrics, indent=1))
        write_stamp(tmp, "sae", identity)
        honour_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- metrics ------------------------------------------------------------------------------------------------

def _ce(logits: Tensor, idx: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten(), reduction="sum")


@torch.no_grad()
def sae_metrics(model: LanguageModel, sae: Any, stream: np.ndarray, n_tokens: int, seq_len: int,
                batch: int = 8) -> dict[str, Any]:
    """L0, dead / dense fractions, explained variance, cosine similarity and the cross-entropy loss recovered
    when the reconstruction replaces the activations, against zero- and mean-ablation, on the first `n_tokens`."""
    hook = sae.cfg.metadata.hook_name
    T = min(seq_len, model.config.block_size)
    n_seq = min(_sequences(stream, T, "evaluation"), max(1, n_tokens // T))
    device = next(model.parameters()).device
    sae = sae.to(device)
    d = sae.cfg.d_in
    s1, s2, sse = torch.zeros(d, dtype=torch.float64, device=device), 0.0, 0.0
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=device)
    cos_sum, l0_sum, ce = 0.0, 0.0, {"clean": 0.0, "sae": 0.0, "zero": 0.0, "mean": 0.0}
    batches = [list(range(i, min(i + batch, n_seq))) for i in range(0, n_seq, batch)]
    for rows in batches:
        idx = _batch(stream, rows, T, device)
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
        idx = _batch(stream, rows, T, device)
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


# --- reading and attaching ----------------------------------------------------------------------------------

def load_sae(path: str | Path, device: str = "cpu") -> Any:
    """An SAE folder of ours or SAELens's, read with `sae_lens.SAE.load_from_disk`."""
    require_sae_lens()
    from sae_lens import SAE

    p = Path(path)
    if not (p / "cfg.json").is_file() or not (p / "sae_weights.safetensors").is_file():
        raise SAEError(f"{p} is not an SAE folder (it needs cfg.json and sae_weights.safetensors, SAELens's "
                       f"layout): train one with `crate sae train`")
    return SAE.load_from_disk(p, device=device)


def read_metrics(path: str | Path) -> dict[str, Any]:
    f = Path(path) / METRICS
    return json.loads(f.read_text()) if f.is_file() else {}


def sae_layer(sae: Any) -> int:
    """The layer whose neuron hook the SAE reads; other hook points are refused."""
    m = _HOOK.match(str(sae.cfg.metadata.hook_name))
    if not m:
        raise SAEError(f"the SAE reads {sae.cfg.metadata.hook_name!r}; crate-lm attaches SAEs at neuron hooks "
                       f"(transformer.h.L.hook_neurons) only")
    return int(m.group(1))


def _direction(sae: Any, i: int) -> Tensor:
    """What the decoder adds per unit of latent i: decode(e_i) - decode(0) (SAELens's decode is affine)."""
    e = torch.zeros(1, sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    base = sae.decode(e)
    e[0, i] = 1.0
    return (sae.decode(e) - base)[0]


def clamp_latent(sae: Any, i: int, value: float) -> Any:
    """A neuron-hook function: x <- x + (value - f_i(x)) * direction_i, the SAE's error term kept."""
    def fn(x: Tensor) -> Tensor:
        f = sae.encode(x.float())[..., i]
        return x + ((value - f).unsqueeze(-1) * _direction(sae, i)).to(x.dtype)

    return fn


class SAEProbe(nn.Module):
    """An SAE read beside a neuron hook: its latents pass through `hook_latents`; the model is not changed."""

    def __init__(self, sae: Any, dead: Sequence[int]):
        super().__init__()
        self.sae = sae
        self.hook_latents = HookPoint()
        self.dead = sorted(int(i) for i in dead)

    def observe(self, x: Tensor) -> None:
        # always: nnsight wraps the module's forward instead of registering hooks, so no test of the hooks can
        # tell whether someone reads the latents
        self.hook_latents(self.sae.encode(x.float()))


class SAEModel(LanguageModel):
    """A language model whose neurons are SAE latents at `transformer.h.{L}.sae.hook_latents` (GPT-SAE).
    It takes over the base model's modules; its weights (and so its provenance) include the SAEs'."""

    def __init__(self, base: LanguageModel, saes: dict[int, Any], dead: dict[int, Sequence[int]]):
        nn.Module.__init__(self)
        self.config, self.transformer, self.lm_head = base.config, base.transformer, base.lm_head
        widths = {s.cfg.d_sae for s in saes.values()}
        if len(widths) != 1:
            raise SAEError(f"the SAEs have different widths {sorted(widths)}: attach SAEs of one size")
        for layer, sae in saes.items():
            probe = SAEProbe(sae.to(next(base.parameters()).device), dead.get(layer, ()))
            blk = self.transformer.h[layer]
            blk.add_module("sae", probe)
            blk.hook_neurons.register_forward_hook(lambda _m, _i, out, p=probe: p.observe(out))
        self.sae_layers = sorted(saes)
        self._width = widths.pop()

    def _probe(self, layer: int) -> SAEProbe:
        if layer not in self.sae_layers:
            raise SAEError(f"layer {layer} has no SAE attached (SAEs at layers {self.sae_layers}): give one SAE per "
                           f"layer (-c NAME=DIR+SAE1,SAE2) or choose --layers {','.join(map(str, self.sae_layers))}")
        return self.transformer.h[layer].sae

    def neuron_hook(self, layer: int) -> str:
        self._probe(layer)
        return f"transformer.h.{layer}.sae.hook_latents"

    @property
    def n_neurons(self) -> int:
        return self._width

    def excluded_neurons(self, layer: str) -> list[int]:
        """Dead latents (the SAE's metrics.json, by the rule in this module's docstring): left out of samples."""
        return self._probe(int(layer)).dead if layer.isdigit() else []

    @property
    def sae_identity(self) -> dict[str, Any]:
        return {str(L): {"architecture": self._probe(L).sae.cfg.architecture(), "d_sae": self._width,
                         "dead": len(self._probe(L).dead)} for L in self.sae_layers}

    def reset_parameters(self) -> None:
        """The random-init control: the model's init, and every SAE as SAELens's training starts it (decoder rows of
        norm `decoder_init_norm`, W_enc = W_dec^T; its inference classes' own init has rows of norm about sqrt 2)."""
        from sae_lens.registry import get_sae_training_class

        super().reset_parameters()
        for L in getattr(self, "sae_layers", []):
            sae = self._probe(L).sae
            cls, cfg_cls = get_sae_training_class(sae.cfg.architecture())
            d = sae.cfg.to_dict()  # with the training settings the metadata records (decoder_init_norm among them)
            d = {**d, **(d.get("metadata") or {}).get("training_architecture_details", {}), "device": str(sae.W_dec.device)}
            fresh = cls(cfg_cls.from_dict(d))
            sae.load_state_dict(_to_inference(fresh).state_dict())

    @contextlib.contextmanager
    def steer(self, layer: int, neuron: int, value: float) -> Iterator[None]:
        """Clamp latent `neuron` to `value` through the SAE's decoder at every position (error term kept)."""
        sae = self._probe(layer).sae
        if not 0 <= neuron < self._width:
            raise IndexError(f"latent {neuron} out of range: the SAE has {self._width} latents")
        with hooks(self, {neuron_hook_name(layer): clamp_latent(sae, neuron, value)}):
            yield


def attach_saes(model: LanguageModel, paths: Sequence[str | Path], check_model: bool = True) -> SAEModel:
    """`model` with the SAEs in `paths` (one per layer) attached; an SAE trained on another model's weights
    (its cfg.json metadata records them) is refused."""
    from crate.provenance import weights_hash

    device = str(next(model.parameters()).device)
    saes: dict[int, Any] = {}
    dead: dict[int, list[int]] = {}
    ours = weights_hash(model) if check_model else None
    for p in paths:
        sae = load_sae(p, device=device)
        layer = sae_layer(sae)
        if layer in saes:
            raise SAEError(f"two SAEs read layer {layer} ({p}): give one SAE per layer")
        if not 0 <= layer < model.config.n_layer or sae.cfg.d_in != model.n_neurons:
            raise SAEError(f"{p} reads layer {layer} with d_in={sae.cfg.d_in}; this {model.config.n_layer}-layer "
                           f"model has {model.n_neurons} neurons per layer: it is another model's SAE")
        trained_on = sae.cfg.metadata.get("crate_model_weights")
        if ours and trained_on and trained_on != ours:
            raise SAEError(f"{p} was trained on another model's activations (weights {trained_on[:12]}, this "
                           f"checkpoint's {ours[:12]}): attach it to the checkpoint it was trained on")
        saes[layer] = sae
        dead[layer] = read_metrics(p).get("dead_latents", [])
    if not saes:
        raise SAEError("no SAE given: use DIR+SAE_DIR")
    return SAEModel(model, saes, dead)


# --- from files (the CLI and the pipeline) ------------------------------------------------------------------

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
    from crate.train.data import open_split, read_manifest
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


def metrics_line(m: dict[str, Any]) -> str:
    """One line of an SAE's metrics, as `crate sae` and the report print them."""
    f = lambda v, p=3: "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{p}f}"  # noqa: E731
    ce = m.get("ce_loss", {})
    return (f"L0 {f(m.get('l0'), 1)}  dead {f(m.get('dead_fraction'))}  dense {f(m.get('dense_fraction'))}  "
            f"explained variance {f(m.get('explained_variance'))}  cosine {f(m.get('cosine_similarity'))}  "
            f"CE clean/SAE/zero/mean {f(ce.get('clean'))}/{f(ce.get('sae'))}/{f(ce.get('zero'))}/{f(ce.get('mean'))}  "
            f"recovered vs zero {f(m.get('ce_recovered_vs_zero'))} vs mean {f(m.get('ce_recovered_vs_mean'))}")


__all__ = ["SAETrainConfig", "SAEError", "SAEModel", "train_sae", "train_from_files", "save_sae", "load_sae",
           "attach_saes", "sae_metrics", "explained_variance", "dead_threshold", "clamp_latent",
           "read_metrics", "metrics_line", "resample_dead", "activation_batches"]
