"""Model configuration: one dataclass that knows every preset of the paper (SPEC.md section 3).

Field names follow nanoGPT (`n_layer`, `n_head`, `n_embd`, `vocab_size`, `block_size`, `bias`,
`dropout`) so that overrides read the same as in the authors' configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from crate.errors import ConfigError

Arch = Literal["crate", "gpt"]

# (n_layer, n_head, n_embd) of the paper's sizes; h = 4d, context 1024, V = 50304.
PAPER_SIZES: dict[str, tuple[int, int, int]] = {
    "1L": (1, 4, 128),
    "2L": (2, 4, 128),
    "3L": (3, 4, 128),
    "S": (6, 12, 768),
    "B": (12, 12, 768),
}
# Small presets for tests and CPU smoke runs (byte-level BPE vocabularies, short context).
TINY_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=512, block_size=128),
    "micro": dict(n_layer=1, n_head=2, n_embd=32, vocab_size=128, block_size=32),
}
PRESETS: tuple[str, ...] = tuple(PAPER_SIZES) + tuple(TINY_SIZES)


# GPT MLP activations (ModelConfig.activation)
ACTIVATIONS = ("relu", "gelu", "gelu_exact")

# How the ISTA codes are computed, not what they are: a run may resume or load under other values.
IMPLEMENTATION_KEYS = ("ista_impl", "ista_recompute")


@dataclass
class ModelConfig:
    arch: Arch = "crate"
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50304
    block_size: int = 1024
    # CRATE: biases of the LayerNorms and of W_o (the paper has them). GPT: every Linear and LayerNorm.
    bias: bool = True
    dropout: float = 0.0
    # Width of the ISTA dictionary (CRATE) or the MLP hidden layer (GPT); None means 4 * n_embd.
    n_hidden: int | None = None
    # GPT only: "relu" is the paper's baseline, "gelu" (tanh approximation) is true GPT-2, "gelu_exact" (erf) is
    # nanoGPT's nn.GELU() and transformers' "gelu".
    activation: Literal["relu", "gelu", "gelu_exact"] = "relu"
    # CRATE only.
    ista_steps: int = 2
    eta: float = 0.1
    lmbda: float = 0.1
    learn_eta_lambda: bool = False
    block: Literal["crate", "alpha"] = "crate"  # "alpha": decoupled decoder D_out and a residual
    ista_impl: Literal["auto", "triton", "torch"] = "auto"
    # Fused kernels only: save just the codes and recompute the ISTA intermediates in the backward
    # (about half the saved activation memory for 2 extra GEMMs per layer).
    ista_recompute: bool = False
    init_std: float = 0.02
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_hidden is None:
            self.n_hidden = 4 * self.n_embd
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.arch in ("crate", "gpt"), f"arch must be 'crate' or 'gpt', got {self.arch!r}")
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "n_hidden", "ista_steps"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(
            self.n_embd % self.n_head == 0,
            f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
            f"choose n_head among the divisors of n_embd",
        )
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.activation in ACTIVATIONS,
             f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {self.activation!r}")
        need(self.block in ("crate", "alpha"), f"block must be 'crate' or 'alpha', got {self.block!r}")
        need(
            self.ista_impl in ("auto", "triton", "torch"),
            f"ista_impl must be 'auto', 'triton' or 'torch', got {self.ista_impl!r}",
        )
        need(self.eta > 0 and self.lmbda >= 0, f"need eta > 0 and lmbda >= 0, got eta={self.eta} lmbda={self.lmbda}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a mapping, refusing keys that are not fields (a typo must not be silently ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown model config keys {unknown}; valid keys are {sorted(names)}"
            )
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})


def preset_config(arch: Arch, preset: str, **overrides: Any) -> ModelConfig:
    """The config of a named preset for `arch`, with nanoGPT-style overrides applied on top."""
    if preset in PAPER_SIZES:
        n_layer, n_head, n_embd = PAPER_SIZES[preset]
        base: dict[str, Any] = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50304, block_size=1024)
    elif preset in TINY_SIZES:
        base = dict(TINY_SIZES[preset])
    else:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    # The paper's GPT baseline has no biases; CRATE keeps LayerNorm and W_o biases.
    base.update(arch=arch, bias=(arch == "crate"))
    return ModelConfig.from_dict({**base, **overrides})
