"""SAEs read beside a model: load an SAE folder, check that it fits the model, and attach one per layer so that
its latents are the model's neurons (GPT-SAE), steerable through the decoder.

    sae = load_sae("sae/gpt-l0")                         # = sae_lens.SAE.load_from_disk("sae/gpt-l0")
    model = attach_saes(model, ["sae/gpt-l0"])           # its neurons are now the SAE's latents
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from crate.eval.sae.base import SAEError, require_sae_lens, to_inference
from crate.eval.sae.metrics import read_metrics
from crate.hooks import HookPoint, hooks, neuron_hook_name
from crate.model import LanguageModel

_HOOK = re.compile(r"^transformer\.h\.(\d+)\.hook_neurons$")


def load_sae(path: str | Path, device: str = "cpu") -> Any:
    """An SAE folder of ours or SAELens's, read with `sae_lens.SAE.load_from_disk`."""
    require_sae_lens()
    from sae_lens import SAE

    p = Path(path)
    if not (p / "cfg.json").is_file() or not (p / "sae_weights.safetensors").is_file():
        raise SAEError(f"{p} is not an SAE folder (it needs cfg.json and sae_weights.safetensors, SAELens's "
                       f"layout): train one with `crate sae train`")
    return SAE.load_from_disk(p, device=device)


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
        """Dead latents (the SAE's metrics.json, by the rule in crate.eval.sae.metrics): left out of samples."""
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
            sae.load_state_dict(to_inference(fresh).state_dict())

    @contextlib.contextmanager
    def steer(self, layer: int, neuron: int, value: float) -> Iterator[None]:
        """Clamp latent `neuron` to `value` through the SAE's decoder at every position (error term kept)."""
        sae = self._probe(layer).sae
        if not 0 <= neuron < self._width:
            raise IndexError(f"latent {neuron} out of range: the SAE has {self._width} latents")
        with hooks(self, {neuron_hook_name(layer): clamp_latent(sae, neuron, value)}):
            yield


def check_sae_fits(sae: Any, model: LanguageModel, path: str | Path, weights: str | None) -> int:
    """The layer `sae` (read from `path`) reads in `model`; an SAE of another model is refused: one at a layer the
    model lacks or of another width, or one trained on other weights (its cfg.json metadata records their hash;
    `weights` is the model's `weights_hash`, None to skip that check)."""
    layer = sae_layer(sae)
    if not 0 <= layer < model.config.n_layer or sae.cfg.d_in != model.n_neurons:
        raise SAEError(f"{path} reads layer {layer} with d_in={sae.cfg.d_in}; this {model.config.n_layer}-layer "
                       f"model has {model.n_neurons} neurons per layer: it is another model's SAE")
    trained_on = sae.cfg.metadata.get("crate_model_weights")
    if weights and trained_on and trained_on != weights:
        raise SAEError(f"{path} was trained on another model's activations (weights {trained_on[:12]}, this "
                       f"checkpoint's {weights[:12]}): use it with the checkpoint it was trained on")
    return layer


def attach_saes(model: LanguageModel, paths: Sequence[str | Path], check_model: bool = True) -> SAEModel:
    """`model` with the SAEs in `paths` (one per layer) attached; an SAE of another model is refused
    (`check_sae_fits`)."""
    from crate.provenance import weights_hash

    device = str(next(model.parameters()).device)
    saes: dict[int, Any] = {}
    dead: dict[int, list[int]] = {}
    ours = weights_hash(model) if check_model else None
    for p in paths:
        sae = load_sae(p, device=device)
        if sae_layer(sae) in saes:
            raise SAEError(f"two SAEs read layer {sae_layer(sae)} ({p}): give one SAE per layer")
        layer = check_sae_fits(sae, model, p, ours)
        saes[layer] = sae
        dead[layer] = read_metrics(p).get("dead_latents", [])
    if not saes:
        raise SAEError("no SAE given: use DIR+SAE_DIR")
    return SAEModel(model, saes, dead)



__all__ = ["load_sae", "sae_layer", "check_sae_fits", "clamp_latent", "SAEProbe", "SAEModel", "attach_saes"]
