"""A model from any checkpoint we know, by one call: our checkpoint directories, the authors'/nanoGPT `.pt` files,
transformers directories and hub ids, and our Lightning training checkpoints (`.ckpt`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from crate.checkpoint import CONFIG, FORMAT, WEIGHTS, read_safetensors, read_torch_file, load_state, torch_load
from crate.config import ModelConfig
from crate.errors import CheckpointError
from crate.hf import hf_info, is_hf_dir, read_hf_dir, resolve_hub_id
from crate.model import LanguageModel
from crate.tokenizer import gpt2_tokenizer, tokenizer_identity


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` of one of our checkpoint directories."""
    path = Path(path)
    cfg = path / CONFIG
    if is_hf_dir(path):  # a transformers directory (GPT2LMHeadModel, CrateForCausalLM)
        return hf_info(path)
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
    """A model in eval mode from our checkpoint directory, an authors'/nanoGPT `.pt` file, or a transformers
    `GPT2LMHeadModel` / `CrateForCausalLM` directory or hub id (offline: from the local Hugging Face cache).

    `overrides` change config fields that do not affect the weights' shapes (e.g. `ista_impl`,
    `dropout`, or `activation` for a GPT file that does not record it)."""
    path = Path(path)
    if not path.exists():
        path = resolve_hub_id(str(path))  # a hub id, read from the local Hugging Face cache; else FileNotFoundError
    if is_hf_dir(path):  # a transformers directory (GPT2LMHeadModel, CrateForCausalLM)
        config, state = read_hf_dir(path, overrides)
    elif path.is_dir():
        info = read_info(path)
        config = ModelConfig.from_dict({**info["model"], **overrides})
        state = read_safetensors(path / WEIGHTS)
    else:
        config, state = read_torch_file(path, overrides)
    model = LanguageModel(config)
    load_state(model, state)
    return model.to(map_location).eval()


def read_checkpoint_identity(ckpt: Path) -> dict[str, Any]:
    state = torch_load(Path(ckpt), mmap=True)  # a pickle that needs code, or a damaged file, is refused in our words
    if not isinstance(state, dict) or "crate" not in state:
        raise CheckpointError(f"{ckpt} is not a crate training checkpoint (no 'crate' entry)")
    return state


def model_from_state(model_config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Any:
    """A plain LanguageModel from the LightningModule's state dict (`model.` keys, compiled or not)."""
    model = LanguageModel(ModelConfig.from_dict(model_config))
    load_state(model, {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")})
    return model


def load_any(checkpoint: str | Path, map_location: str = "cpu") -> tuple[Any, dict[str, Any] | None]:
    """(model in eval mode, tokenizer identity or None) from any checkpoint we know."""
    path = Path(checkpoint)
    if path.suffix == ".ckpt":
        state = read_checkpoint_identity(path)
        # every weight must be there (missing, unexpected and mis-shaped keys are refused, naming them)
        model = model_from_state(state["crate"]["model"], state["state_dict"])
        return model.eval().to(map_location), state["crate"].get("tokenizer")
    model = load(path, map_location=map_location)
    tok = None
    if path.is_dir():
        tok = read_info(path).get("tokenizer")
    return model, tok


def find_tokenizer(checkpoint: str | Path | None, data: str | Path | None = None) -> Any | None:
    """A `tokenizers.Tokenizer` from --data, the checkpoint folder, or the data directory its metadata names."""
    from tokenizers import Tokenizer

    candidates = []
    if data:
        if checkpoint and Path(checkpoint).is_dir() and (Path(data) / "manifest.json").is_file():
            from crate.datadir import read_manifest
            from crate.provenance import check_tokenizers

            check_tokenizers(read_info(checkpoint).get("tokenizer"), read_manifest(data), str(checkpoint), str(data))
        candidates.append(Path(data) / "tokenizer.json")
    if checkpoint:
        ck = Path(checkpoint)
        candidates += [ck / "tokenizer.json", ck.parent / "tokenizer.json"]
        try:
            info = read_info(ck)
            tok = info.get("tokenizer") or {}
            if isinstance(tok, dict) and isinstance(tok.get("json"), str):  # crate train stores the whole tokenizer
                return Tokenizer.from_str(tok["json"])
            meta = info.get("metadata") or {}
            for key in ("data_dir", "data"):
                if isinstance(meta.get(key), str):
                    candidates.append(Path(meta[key]) / "tokenizer.json")
        except Exception:  # a .pt file or a checkpoint without metadata: no tokenizer, ids only
            pass
    for c in candidates:
        if c.is_file():
            return Tokenizer.from_file(str(c))
    return None


def checkpoint_tokenizer(checkpoint: str | os.PathLike, data: str | os.PathLike | None = None
                         ) -> tuple[Any, dict | None]:
    """(tokenizers.Tokenizer or None, identity or None) of a checkpoint: from --data, the checkpoint's folder or
    metadata, or GPT-2's BPE when the identity says gpt2."""
    path = Path(checkpoint)
    identity = None
    if path.is_dir() and (path / "config.json").is_file():
        identity = read_info(path).get("tokenizer")
    tok = find_tokenizer(path, data)
    if tok is None and identity and identity.get("name") == "gpt2":
        tok = gpt2_tokenizer()
    if tok is not None and identity and identity.get("sha256"):
        found = tokenizer_identity(tok, identity.get("name", ""))["sha256"]
        if found != identity["sha256"]:
            raise CheckpointError(f"the tokenizer found for {checkpoint} (sha256 {found[:12]}) is not the one it "
                                  f"was trained with ({identity['sha256'][:12]}): pass --data with the run's data")
    return tok, identity
