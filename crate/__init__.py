"""crate-lm: train, evaluate and interpret CRATE white-box language models against a GPT-2 baseline.

The public names are imported lazily (PEP 562) so that `crate --help` does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "build_model": "crate.model", "LanguageModel": "crate.model",
    "load": "crate.checkpoint", "save": "crate.checkpoint",
    "ModelConfig": "crate.config", "preset_config": "crate.config",
    "CrateError": "crate.errors", "ConfigError": "crate.errors", "CheckpointError": "crate.errors",
    "TokenOutOfRangeError": "crate.errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'crate' has no attribute {name!r}")
