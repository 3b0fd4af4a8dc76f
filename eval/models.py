"""The one grammar for naming models on the command line (interpret, report, browse, steer and the sweep), and
loading what it names:

    DIR | FILE | HUB_ID        a checkpoint: ours, an authors'/nanoGPT .pt, a Lightning .ckpt, a transformers model
                               (hub id: owner/model, or hf:owner/model when owner is also a local folder)
    DIR+SAE[,SAE...]           the model with SAEs attached at its neuron hooks: their latents are the neurons (GPT-SAE);
                               a folder of SAE folders (one per layer) counts as all of them
    NAME=DIR[+SAE...]          the same, named (a bare one is named after its run: <run>/final -> <run>)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crate.errors import CrateError


def split_sae_spec(spec: str | Path) -> tuple[str, list[str]]:
    """"DIR+SAE[,SAE...]" -> (DIR, [SAE, ...]); a path that exists as it is has no SAE part."""
    s = str(spec)
    if Path(s).exists() or "+" not in s:
        return s, []
    base, _, rest = s.partition("+")
    saes = [p for p in rest.split(",") if p]
    expanded: list[str] = []
    for p in saes:  # a folder of SAE folders (one per layer) counts as all of them
        # hidden folders are an interrupted save's leftovers (.NAME.tmp-*, .NAME.old-*), never an SAE to attach
        sub = sorted(str(c.parent) for c in Path(p).glob("*/cfg.json") if not c.parent.name.startswith("."))
        expanded += sub if sub and not (Path(p) / "cfg.json").exists() else [p]
    return base, expanded


def model_label(checkpoint: str | Path) -> str:
    """A checkpoint's display name: its run's for `<run>/final` (what `crate report` shows too), else its own."""
    p = Path(str(checkpoint).rstrip("/"))
    return p.parent.name if p.name == "final" and p.parent.name else p.stem if p.suffix in (".pt", ".ckpt") else p.name


def checkpoint_names(specs: Sequence[str]) -> dict[str, str]:
    """NAME=SPEC pairs; a bare SPEC is named by its run (DIR+SAE with "-sae" added); two of one name are refused."""
    names: dict[str, str] = {}
    for c in specs:
        name, sep, path = c.partition("=")
        if not sep:
            base, saes = split_sae_spec(c)  # DIR+SAE: named after the run, as GPT-SAE
            name, path = model_label(base) + ("-sae" if saes else ""), c
        if name in names:
            raise CrateError(f"two checkpoints are named {name!r}: name them, e.g. -c crate=DIR gpt=DIR")
        names[name] = path
    return names


def load_model(checkpoint: str | Path, control: bool = False, seed: int = 0) -> tuple[Any, dict[str, Any] | None]:
    """(model in eval mode, the tokenizer identity its checkpoint records or None) of DIR or DIR+SAE; `control`:
    its weights re-initialised from `seed` (the random-init control)."""
    from crate.eval.sae.attach import attach_saes

    path, saes = split_sae_spec(checkpoint)  # "DIR+SAE[,SAE]": the SAEs' latents are the neurons (GPT-SAE)
    from crate.loading import load_any

    model, tokenizer = load_any(path)
    if saes:
        model = attach_saes(model, saes)
    if control:
        reset_weights(model, seed)
    return model.eval(), tokenizer


def reset_weights(model: Any, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    model.reset_parameters()



def run_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's resolved config (config.yaml / config.json / hparams.yaml) and a checkpoint's metadata."""
    config: dict[str, Any] = {}
    for name in ("config.yaml", "config.yml", "resolved_config.yaml", "hparams.yaml", "config.json"):
        f = path / name
        if f.is_file():
            try:
                if f.suffix == ".json":
                    config = json.loads(f.read_text())
                else:
                    import yaml

                    config = yaml.safe_load(f.read_text()) or {}
            except Exception:  # a config we cannot read only costs the label
                config = {}
            if isinstance(config, dict) and config.get("format") == "crate-lm/1":  # a checkpoint's config.json
                config = {"model": config.get("model", {}), "metadata": config.get("metadata", {})}
            break
    metadata = dict(config.get("metadata") or {}) if isinstance(config, dict) else {}
    for ck in sorted(path.glob("*/config.json")):
        try:
            info = json.loads(ck.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(info, dict) and info.get("format") == "crate-lm/1":
            config.setdefault("model", info.get("model", {}))
            metadata = {**(info.get("metadata") or {}), **metadata}
            break
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    for key in ("size", "preset"):
        value = config.get(key) or model.get(key)
        if value and key not in metadata:
            metadata[key] = value
    return (config if isinstance(config, dict) else {}), metadata


def trained_size(checkpoint: str | Path) -> str | None:
    """The size or preset a checkpoint was trained as: its own metadata's (crate.loading.read_info), else its
    run's config (`<run>/final` -> `<run>/config.yaml`); None when neither names one. `crate interpret` records it
    so that the report never has to find the checkpoint again."""
    path = Path(checkpoint)
    try:
        from crate.loading import read_info  # torch: imported only when a checkpoint is read

        own = read_info(path).get("metadata") or {}
    except (CrateError, OSError, ValueError):  # a .pt / .ckpt file, or a folder that is not ours
        own = {}
    metadata = {**run_config(path.parent)[1], **own}
    return next((str(metadata[k]) for k in ("size", "preset") if metadata.get(k)), None)


def checkpoint_fields(checkpoint: str | Path | None) -> dict[str, str | None]:
    """How a result names its checkpoint, outside its identity (the key): every part of "DIR[+SAE,...]" as an
    absolute path, and the size DIR was trained as (read now, so that `crate report` needs neither the checkpoint
    nor the directory interpret ran in)."""
    if not checkpoint:
        return {"checkpoint": None, "size": None}
    base, saes = split_sae_spec(checkpoint)
    spec = str(Path(base).resolve()) + ("+" + ",".join(str(Path(s).resolve()) for s in saes) if saes else "")
    return {"checkpoint": spec, "size": trained_size(base)}
