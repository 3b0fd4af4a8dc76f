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
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from crate.atomic import atomic_dir
from crate.config import ModelConfig
from crate.errors import CheckpointError, ConfigError
from crate.model import LanguageModel

FORMAT = "crate-lm/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
OURS_KEY = "crate_lm"  # our fields in the config.json of a transformers export
TIED = "lm_head.weight"
COMPILE_PREFIX = "_orig_mod."
LAYER_KEY = re.compile(r"transformer\.h\.(\d+)\.")


def save(
    model: LanguageModel,
    path: str | os.PathLike,
    tokenizer: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a checkpoint directory at `path`, atomically (replacing any older one)."""
    path = Path(path)
    check_replaceable(path)
    with atomic_dir(path) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED}
        save_file(state, tmp / WEIGHTS, metadata={"format": FORMAT})
        info = {"format": FORMAT, "model": model.config.to_dict(), "tokenizer": tokenizer, "metadata": metadata or {}}
        (tmp / CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    return path


def check_replaceable(path: Path) -> None:
    """A checkpoint is written by replacing its whole folder: refuse unless `path` is new, an empty folder, or a
    checkpoint crate-lm wrote (ours, or our transformers export), so that no file of anyone else's is lost."""
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder: choose another output path")
    entries = sorted(e.name for e in path.iterdir())
    if not entries or _written_by_us(path):
        return
    raise CheckpointError(
        f"{path} holds files crate-lm did not write ({', '.join(entries[:5])}{'...' if len(entries) > 5 else ''}), "
        f"and a checkpoint replaces its whole folder: choose a new or empty folder")


def _written_by_us(path: Path) -> bool:
    try:
        info = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and (info.get("format") == FORMAT or OURS_KEY in info)


def read_safetensors(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint directory is incomplete")
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {file}: {e}. The file is truncated or corrupted; re-save it") from e


def load_state(model: LanguageModel, state: dict[str, Tensor]) -> None:
    """Copy `state` into `model`, naming every missing, unexpected or mis-shaped key on mismatch."""
    state = {k.removeprefix(COMPILE_PREFIX): v for k, v in state.items()}
    head, wte = state.pop(TIED, None), state.get("transformer.wte.weight")
    if head is not None and wte is not None and not (head.shape == wte.shape and torch.equal(head, wte)):
        raise CheckpointError(f"{TIED} differs from transformer.wte.weight: our models tie the output head to the "
                              f"token embedding, so this checkpoint (an untied or fine-tuned head) cannot load as one")
    expected = {k: v for k, v in model.state_dict().items() if k != TIED}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        problems = [f"{what} keys {_names(keys)}" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if keys]
        raise CheckpointError(
            "the checkpoint does not match the model config: " + "; ".join(problems)
            + ". Check that arch, preset and overrides (n_layer, n_embd, n_hidden, bias, block) match the run"
        )
    model.load_state_dict(state, strict=False)


def _names(keys: list[str], limit: int = 12) -> str:
    """A key list for a message: all of it when short, else the first `limit` and the count."""
    return str(keys) if len(keys) <= limit else f"{keys[:limit]} and {len(keys) - limit} more"


def read_torch_file(path: Path, overrides: dict[str, Any]) -> tuple[ModelConfig, dict[str, Tensor]]:
    """An authors' or nanoGPT checkpoint: a dict with `model` (state dict) and `model_args`."""
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, expected a dict with 'model' and 'model_args'")
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} has no state dict under 'model': keys are {sorted(ckpt)[:10]}")
    # Drop nanoGPT's causal-mask buffers (saved by versions without flash attention).
    state = {k.removeprefix(COMPILE_PREFIX): v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    config = _config_from_state(state, ckpt.get("model_args") or {}, overrides)
    return config, state


def _file_kind(path: Path) -> str:
    """'zip' (torch.save) or 'pickle' (legacy torch.save) from the first bytes; anything else is refused here,
    before torch sees it, so that garbage is reported as garbage and not as a pickle that needs code."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocols 2-5
        return "pickle"
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes): the copy or download was cut off; copy it again")
    header = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if head[8:9] == b"{" and 0 < header < path.stat().st_size:
        raise CheckpointError(
            f"{path} is a safetensors file, not a torch checkpoint (.pt): crate.load reads safetensors weights only "
            f"inside a checkpoint directory, next to its config.json; pass that directory instead"
        )
    raise CheckpointError(
        f"{path} is not a checkpoint: it is neither a torch.save file (zip or pickle) nor safetensors "
        f"(first bytes {head[:8]!r}). Check the path, or copy the file again if it is damaged"
    )


def torch_load(path: Path, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` with errors in our words: torch's advice to retry with
    `weights_only=False` (which runs the file's code) is never passed on, not even as a chained exception.
    `mmap` maps a zip-format file instead of reading it (Lightning's .ckpt)."""
    kind = _file_kind(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and kind == "zip")
    except pickle.UnpicklingError as e:
        needs = re.search(r"\bGLOBAL ([\w.]+)", str(e))  # a class or function the pickle would import
        if needs:
            raise CheckpointError(
                f"refusing to load {path}: it needs arbitrary code to unpickle ({needs[1]}), and crate-lm never runs "
                f"code from a checkpoint. Only tensors and plain Python values are loaded: re-save it where it was "
                f"made with plain values, e.g. torch.save({{'model': model.state_dict(), 'model_args': {{...}}}}, path)"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", str(e))
        raise CheckpointError(
            f"cannot read {path}: its {kind} data is not a torch checkpoint ({reason[1] if reason else 'unreadable'}); "
            f"the file is truncated or corrupted, or is not a torch.save file. Copy it again or re-save it"
        ) from None
    except Exception as e:  # noqa: BLE001 - a damaged file surfaces as RuntimeError, OSError, EOFError, KeyError...
        first = str(e).split(". ")[0].strip() or type(e).__name__
        raise CheckpointError(
            f"cannot read {path}: the file is truncated or not a torch checkpoint ({kind}: {first}). "
            f"Copy it again or re-save it"
        ) from None


def _config_from_state(state: dict[str, Tensor], args: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
    """Detect CRATE vs GPT from the keys; shapes come from the weights, the rest from `model_args`."""
    layers = {k: int(m[1]) for k in state if (m := LAYER_KEY.match(k))}
    ista = sorted((layers.get(k, -1), k) for k in state if k.endswith(".ista.weight"))
    fc = sorted((layers.get(k, -1), k) for k in state if k.endswith(".mlp.c_fc.weight"))
    if ista or fc:  # shapes from the lowest layer that has the key; any renamed key is named by load_state
        arch = "crate" if ista else "gpt"
        signature = (ista or fc)[0][1]
    else:
        raise CheckpointError(
            "cannot tell the architecture: the state dict has neither '*.ista.weight' (CRATE) nor "
            f"'*.mlp.c_fc.weight' (GPT) keys; first keys: {sorted(state)[:6]}"
        )
    wte, wpe = "transformer.wte.weight", "transformer.wpe.weight"
    missing = [k for k in (wpe, wte) if k not in state]
    if missing:
        raise CheckpointError(f"missing keys {missing}: not a nanoGPT-style checkpoint")
    flat = [f"{k}: checkpoint {tuple(state[k].shape)}, expected 2 dimensions" for k in (signature, wpe, wte)
            if state[k].dim() != 2]
    if flat:
        raise CheckpointError(f"mis-shaped keys {flat}: the checkpoint is corrupted or not a CRATE/GPT model")
    vocab, n_embd = state[wte].shape
    hidden = state[signature].shape[0]
    # keys like transformer.h.extra.foo count for no layer: load_state reports them as unexpected
    n_layer = 1 + max(layers.values(), default=0)
    bias = "transformer.ln_f.bias" in state
    fields = dict(
        arch=arch, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab, n_hidden=hidden, bias=bias,
        block_size=state[wpe].shape[0], n_head=args.get("n_head"),
    )
    if arch == "gpt" and "activation" not in overrides:
        # nanoGPT computes nn.GELU() (erf) with or without biases; the paper's bias-free baseline uses ReLU (SPEC.md
        # section 2). The file does not say which, so the guess is said
        fields["activation"] = "gelu_exact" if bias else "relu"
        why = "with biases: nanoGPT's nn.GELU()" if bias else "bias-free: the paper baseline"
        warnings.warn(f"a nanoGPT GPT checkpoint does not record its MLP activation; assuming "
                      f"{fields['activation']} ({why}). "
                      f"Pass activation='relu', 'gelu' (tanh approximation, GPT-2) or 'gelu_exact' (erf, nanoGPT) "
                      f"to crate.load (crate convert --activation) to say which", stacklevel=3)
    fields["dropout"] = args.get("dropout", 0.0)
    if fields["n_head"] is None and "n_head" not in overrides:
        raise CheckpointError("model_args does not give n_head: pass it, e.g. crate.load(path, n_head=12)")
    try:
        return ModelConfig.from_dict({**fields, **overrides})
    except ConfigError as e:
        raise CheckpointError(f"checkpoint config is invalid: {e}") from e
