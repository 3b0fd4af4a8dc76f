"""Training recipes: YAML files in `configs/` with four sections, every key checked.

    model:  arch, preset and any ModelConfig field (vocab_size: null takes the data's vocabulary)
    data:   the prepared directory, and how to prepare it when it is missing
    train:  optimisation (global batch, schedule, AdamW, clipping, precision, compile, validation, checkpoints)
    system: devices, nodes, strategy, logging

Overrides on the command line use dotted paths: `crate train --config configs/tiny-crate.yaml train.max_steps=50
model.n_layer=4`. Values are parsed as YAML (`1e-3`, `true`, `null`, `[0.9, 0.95]`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crate.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RUN_RECORD_KEYS = ("resolved", "history")  # written into a run's config.yaml by `crate train`


@dataclass
class DataConfig:
    path: str = "data/shakespeare-bpe512"  # a prepared directory (crate prepare)
    # Prepared automatically on first use when `path` has no manifest and `source` is set.
    source: str | None = "embedded"
    tokenizer: str = "bpe"
    vocab_size: int = 512  # of a trained BPE
    val_fraction: float = 0.05
    seed: int = 0
    text_field: str = "text"
    max_documents: int | None = None
    encoding: str = "utf-8"  # of .txt / .jsonl sources


@dataclass
class TrainConfig:
    max_steps: int = 2000
    batch_size: int = 32  # GLOBAL sequences per optimizer step, whatever the world size
    micro_batch_size: int = 16  # per device and forward pass; accumulation = batch_size / (micro * world)
    context: int | None = None  # tokens per sample; None = model.block_size
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # cosine until here, then min_lr; None = max_steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str | int = "auto"  # auto = bf16-mixed on GPU, 32-true on CPU; or any Lightning precision
    compile: bool = False
    seed: int = 1337
    val_every: int = 200  # steps; 0 disables periodic validation (a final eval still runs)
    val_batches: int = 20  # micro-batches per validation, over all ranks
    final_val_batches: int | None = None  # None = the whole val split (capped at 1000 micro-batches)
    ckpt_every: int = 500  # steps
    ckpt_keep: int = 3  # periodic checkpoints kept (last and best are kept besides); -1 keeps all
    # steps; 0: none. Weights only, in our format, each with its validation loss: grid/step-<N>/ (a multiple of
    # val_every), for comparisons at matched loss (`crate study`)
    grid_every: int = 0


@dataclass
class SystemConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto (DDP when several devices), ddp, ddp_spawn, fsdp (FSDP2, per block), deepspeed...
    log_every: int = 10
    # auto: on when logged in or WANDB_MODE is set (offline otherwise never needed); on; off (YAML: a bool)
    wandb: str | bool = "auto"
    wandb_project: str = "crate-lm"
    progress_bar: bool = True
    peak_flops: float | None = None  # per device, for MFU on GPUs missing from crate.train.flops
    matmul_precision: str = "high"  # torch.set_float32_matmul_precision


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"arch": "crate", "preset": "tiny", "vocab_size": None})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"]["betas"] = list(d["train"]["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        _check_keys(d, {f.name for f in dataclasses.fields(cls)}, "recipe")
        sections = {}
        for name, kind in (("data", DataConfig), ("train", TrainConfig), ("system", SystemConfig)):
            raw = d.get(name) or {}
            if not isinstance(raw, dict):
                raise ConfigError(f"recipe section {name!r} must be a mapping, got {raw!r}")
            _check_keys(raw, {f.name for f in dataclasses.fields(kind)}, name)
            sections[name] = kind(**check_section(raw, kind, name))
        model = dict(d.get("model") or {})
        model.setdefault("arch", "crate")
        model.setdefault("preset", "tiny")
        model.setdefault("vocab_size", None)
        cfg = cls(model=model, name=d.get("name"), **sections)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from crate.config import ModelConfig

        fields = {f.name for f in dataclasses.fields(ModelConfig)} | {"preset"}
        _check_keys(self.model, fields, "model")
        t = self.train
        if t.batch_size % t.micro_batch_size:
            raise ConfigError(
                f"train.batch_size={t.batch_size} (global) must be a multiple of train.micro_batch_size={t.micro_batch_size}"
            )
        if t.grid_every and (not t.val_every or t.grid_every % t.val_every):
            raise ConfigError(f"train.grid_every={t.grid_every} must be a multiple of train.val_every={t.val_every} "
                              "(each grid checkpoint carries the validation loss of its step): set train.val_every to "
                              "a divisor of it")
        if t.min_lr > t.lr:
            raise ConfigError(f"train.min_lr={t.min_lr} must not exceed train.lr={t.lr} (the cosine decays from lr to min_lr)")

    def model_config(self, data_vocab: int | None = None):
        """The ModelConfig of this recipe; vocab_size None takes the data's (padded like GPT-2's 50257 -> 50304)."""
        from crate.config import preset_config
        from crate.tokenizer import padded_vocab

        overrides = {k: v for k, v in self.model.items() if k not in ("arch", "preset")}
        if overrides.get("vocab_size") is None:
            if data_vocab is None:
                overrides.pop("vocab_size", None)
            else:
                overrides["vocab_size"] = padded_vocab(data_vocab)
        if self.train.context is not None and "block_size" not in overrides:
            overrides["block_size"] = max(self.train.context, 1)
        return preset_config(self.model["arch"], self.model["preset"], **overrides)


# Ranges of the keys where a value of the right type can still be wrong: (test, what is expected).
def _positive(v: Any) -> bool:
    return v is None or v > 0


def _non_negative(v: Any) -> bool:
    return v is None or v >= 0


def _in(*choices: Any) -> Callable[[Any], bool]:
    return lambda v: v in choices


RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.vocab_size": (lambda v: v >= 257, ">= 257 (the 256 bytes and <|endoftext|>)"),
    "data.val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.seed": (_non_negative, ">= 0"),
    "data.max_documents": (_positive, "> 0"),
    "data.tokenizer": (_in("gpt2", "bpe"), "gpt2 or bpe"),
    "train.max_steps": (_positive, "> 0"),
    "train.batch_size": (_positive, "> 0"),
    "train.micro_batch_size": (_positive, "> 0"),
    "train.context": (_positive, "> 0"),
    "train.lr": (_positive, "> 0"),
    "train.min_lr": (_non_negative, ">= 0"),
    "train.warmup_steps": (_non_negative, ">= 0"),
    "train.lr_decay_steps": (_positive, "> 0"),
    "train.weight_decay": (_non_negative, ">= 0"),
    "train.betas": (lambda v: all(0 <= b < 1 for b in v), "each in [0, 1)"),
    "train.eps": (_positive, "> 0"),
    "train.grad_clip": (_non_negative, ">= 0 (0 disables clipping)"),
    "train.seed": (_non_negative, ">= 0"),
    "train.val_every": (_non_negative, ">= 0 (0 disables periodic validation)"),
    "train.val_batches": (_positive, "> 0"),
    "train.final_val_batches": (_positive, "> 0"),
    "train.ckpt_every": (_positive, "> 0"),
    "train.ckpt_keep": (lambda v: v == -1 or v >= 1, "-1 (keep all) or >= 1"),
    "train.grid_every": (_non_negative, ">= 0 (0: no grid)"),
    "system.num_nodes": (_positive, "> 0"),
    "system.log_every": (_positive, "> 0"),
    "system.peak_flops": (_positive, "> 0"),
    "system.wandb": (_in("auto", "on", "off", True, False), "auto, on or off"),
    "system.matmul_precision": (_in("highest", "high", "medium"), "highest, high or medium"),
}


def _convert(value: Any, kind: Any) -> Any:
    """`value` as the field type `kind` (int, float, bool, str, X | None, tuple[float, float], Any); raises
    ValueError when it is not one. Numbers in strings count as floats: YAML reads `1e-3` as a string."""
    if kind is Any:
        return value
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option)
            except ValueError:
                pass
        raise ValueError
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError
        return tuple(_convert(v, a) for v, a in zip(value, args))
    if kind is bool or isinstance(value, bool):  # True is an int in Python, never a number here
        if kind is not bool or not isinstance(value, bool):
            raise ValueError
        return value
    if kind is int and isinstance(value, int):
        return value
    if kind is float and isinstance(value, (int, float, str)):
        number = float(value)  # ValueError for "fast"
        if not math.isfinite(number):
            raise ValueError
        return number
    if kind is str and isinstance(value, str):
        return value
    raise ValueError


def _type_name(kind: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    if typing.get_origin(kind) is tuple:
        return f"a list of {len(typing.get_args(kind))} numbers"
    if typing.get_args(kind):
        return " or ".join(_type_name(a) for a in typing.get_args(kind))
    return names.get(kind, str(kind))


def check_section(raw: dict[str, Any], kind: type, section: str) -> dict[str, Any]:
    """The values of one recipe section converted to its dataclass's field types and checked against RANGES;
    a wrong one raises ConfigError naming the key, the value and what is expected (before anything runs)."""
    hints = typing.get_type_hints(kind)
    out = {}
    for key, value in raw.items():
        where = f"{section}.{key}"
        test, expected = RANGES.get(where, (None, ""))
        problem = ConfigError(f"{where}={value!r}: expected {_type_name(hints[key])} {expected}".rstrip())
        try:
            out[key] = _convert(value, hints[key])
        except ValueError:
            raise problem from None
        if test is not None and not test(out[key]):
            raise problem
    return out


def _check_keys(d: dict[str, Any], valid: set[str], where: str) -> None:
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys are {sorted(valid)}")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=100)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return out


def resolve_recipe(path: str | Path | None) -> Path | None:
    """A recipe path, or a name looked up in configs/ (`tiny-crate` -> configs/tiny-crate.yaml)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml", Path("configs") / f"{p}.yaml"):
        if candidate.is_file():
            return candidate
    available = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe {str(path)!r} not found; recipes in {CONFIG_DIR}: {available}")


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A recipe (None = configs/tiny-crate.yaml, the tiny CRATE on the embedded corpus) with overrides applied."""
    if path is None and (CONFIG_DIR / "tiny-crate.yaml").is_file():
        path = CONFIG_DIR / "tiny-crate.yaml"
    recipe = resolve_recipe(path)
    raw: dict[str, Any] = {}
    if recipe is not None:
        try:
            raw = yaml.safe_load(recipe.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{recipe}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{recipe}: a recipe is a mapping with sections model, data, train, system")
        for key in RUN_RECORD_KEYS:  # a run's config.yaml is its recipe plus what the run recorded
            raw.pop(key, None)
        raw.setdefault("name", recipe.stem)
    return RunConfig.from_dict(apply_overrides(raw, overrides or []))
