"""crate-lm: train, evaluate and interpret CRATE white-box language models against a GPT-2 baseline.

The public names are imported lazily (PEP 562) so that `crate --help` does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "build_model": "crate.model", "LanguageModel": "crate.model",
    "load": "crate.loading",
    "ModelConfig": "crate.config", "preset_config": "crate.config",
    "CrateError": "crate.errors", "ConfigError": "crate.errors", "CheckpointError": "crate.errors",
    "TokenOutOfRangeError": "crate.errors",
    "CrateConfig": "crate.modeling_crate", "CrateForCausalLM": "crate.modeling_crate",
}
__all__ = [*_EXPORTS, "save", "__version__"]

from crate import hf_registry as _hf_registry  # noqa: E402  (light: registers CRATE once transformers is imported)

_hf_registry.install()


def save(*args: Any, **kwargs: Any) -> Any:
    """`crate.checkpoint.save` (see there). Defined here, not lazily: nnsight mounts a `.save` method on every
    object, which module attribute lookup finds before a PEP 562 `__getattr__`, so a lazy `crate.save` would be
    nnsight's."""
    return importlib.import_module("crate.checkpoint").save(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'crate' has no attribute {name!r}")
