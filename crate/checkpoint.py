"""Checkpoints: our directory format, and the authors' / nanoGPT `.pt` files (SPEC.md section 5).

Our format is a directory:

    model.safetensors   weights (the tied `lm_head.weight` is stored once, as `transformer.wte.weight`)
    config.json         {"format": "crate-lm/1", "model": {...ModelConfig...}, "tokenizer": {...} | null,
                         "metadata": {...}}

It is written into a temporary sibling directory and renamed into place, so a kill never leaves a
half-written checkpoint under the final name. `.pt` files are read with `weights_only=True`: a pickle
that needs code to load is refused, never executed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from crate.atomic import fsync_dir
from crate.config import ModelConfig
from crate.errors import CheckpointError, ConfigError
from crate.model import LanguageModel

FORMAT = "crate-lm/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TIED = "lm_head.weight"
COMPILE_PREFIX = "_orig_mod."
NANOGPT_ARGS = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "bias", "dropout")


def save(
    model: LanguageModel,
    path: str | os.PathLike,
    tokenizer: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a checkpoint directory at `path`, atomically (replacing any older one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED}
        save_file(state, tmp / WEIGHTS, metadata={"format": FORMAT})
        info = {"format": FORMAT, "model": model.config.to_dict(), "tokenizer": tokenizer, "metadata": metadata or {}}
        (tmp / CONFIG).write_text(json.dumps(info, indent=2) + "\n")
        fsync_dir(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` onto `dst`; an existing `dst` is moved aside first and removed only afterwards."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` of one of our checkpoint directories."""
    path = Path(path)
    cfg = path / CONFIG
    if not cfg.is_file():
        raise CheckpointError(f"{path} is not a crate-lm checkpoint directory: {CONFIG} is missing")
    try:
        info = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg} is not valid JSON ({e}): the checkpoint is corrupted, re-export it") from e
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{cfg} has format {info.get('format')!r}, expected {FORMAT!r}")
    return info


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides: Any) -> LanguageModel:
    """A model in eval mode from our checkpoint directory or an authors'/nanoGPT `.pt` file.

    `overrides` change config fields that do not affect the weights' shapes (e.g. `ista_impl`,
    `dropout`, or `activation` for a GPT file that does not record it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        info = read_info(path)
        config = ModelConfig.from_dict({**info["model"], **overrides})
        state = _read_safetensors(path / WEIGHTS)
    else:
        config, state = _read_torch_file(path, overrides)
    model = LanguageModel(config)
    load_state(model, state)
    return model.to(map_location).eval()


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint directory is incomplete")
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {file}: {e}. The file is truncated or corrupted; re-save it") from e


def load_state(model: LanguageModel, state: dict[str, Tensor]) -> None:
    """Copy `state` into `model`, naming every missing, unexpected or mis-shaped key on mismatch."""
    state = {k.removeprefix(COMPILE_PREFIX): v for k, v in state.items()}
    state.pop(TIED, None)  # tied to transformer.wte.weight
    expected = {k: v for k, v in model.state_dict().items() if k != TIED}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        problems = [f"missing keys {missing}"] * bool(missing) + [f"unexpected keys {unexpected}"] * bool(unexpected)
        problems += [f"mis-shaped keys {shapes}"] * bool(shapes)
        raise CheckpointError(
            "the checkpoint does not match the model config: " + "; ".join(problems)
            + ". Check that arch, preset and overrides (n_layer, n_embd, n_hidden, bias, block) match the run"
        )
    model.load_state_dict(state, strict=False)


def _read_torch_file(path: Path, overrides: dict[str, Any]) -> tuple[ModelConfig, dict[str, Tensor]]:
    """An authors' or nanoGPT checkpoint: a dict with `model` (state dict) and `model_args`."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it needs arbitrary code to unpickle ({e}). Only tensors and plain "
            f"Python values are loaded; re-save the file with plain values, or convert it where it was made"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e}. The file is truncated or not a torch checkpoint") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, expected a dict with 'model' and 'model_args'")
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} has no state dict under 'model': keys are {sorted(ckpt)[:10]}")
    # Drop nanoGPT's causal-mask buffers (saved by versions without flash attention).
    state = {k.removeprefix(COMPILE_PREFIX): v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    config = _config_from_state(state, ckpt.get("model_args") or {}, overrides)
    return config, state


def _config_from_state(state: dict[str, Tensor], args: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
    """Detect CRATE vs GPT from the keys; shapes come from the weights, the rest from `model_args`."""
    if any(k.endswith(".ista.weight") for k in state):
        arch = "crate"
        hidden = state["transformer.h.0.ista.weight"].shape[0]
    elif any(k.endswith(".mlp.c_fc.weight") for k in state):
        arch = "gpt"
        hidden = state["transformer.h.0.mlp.c_fc.weight"].shape[0]
    else:
        raise CheckpointError(
            "cannot tell the architecture: the state dict has neither '*.ista.weight' (CRATE) nor "
            f"'*.mlp.c_fc.weight' (GPT) keys; first keys: {sorted(state)[:6]}"
        )
    if "transformer.wte.weight" not in state or "transformer.wpe.weight" not in state:
        raise CheckpointError("missing keys ['transformer.wpe.weight', 'transformer.wte.weight']: not a nanoGPT-style checkpoint")
    vocab, n_embd = state["transformer.wte.weight"].shape
    n_layer = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.h."))
    bias = "transformer.ln_f.bias" in state
    fields = dict(
        arch=arch, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab, n_hidden=hidden, bias=bias,
        block_size=state["transformer.wpe.weight"].shape[0], n_head=args.get("n_head"),
    )
    if arch == "gpt":
        # nanoGPT with biases is GPT-2 (GELU); the paper's bias-free baseline uses ReLU (SPEC.md section 2).
        fields["activation"] = "gelu" if bias else "relu"
    fields["dropout"] = args.get("dropout", 0.0)
    if fields["n_head"] is None and "n_head" not in overrides:
        raise CheckpointError("model_args does not give n_head: pass it, e.g. crate.load(path, n_head=12)")
    try:
        return ModelConfig.from_dict({**fields, **overrides})
    except ConfigError as e:
        raise CheckpointError(f"checkpoint config is invalid: {e}") from e
