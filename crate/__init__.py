"""crate-lm: train, evaluate and interpret CRATE white-box language models against a GPT-2 baseline."""

from crate.checkpoint import load, save
from crate.config import ModelConfig, preset_config
from crate.errors import CheckpointError, ConfigError, CrateError, TokenOutOfRangeError
from crate.model import LanguageModel, build_model

__version__ = "0.1.0"
__all__ = [
    "build_model", "load", "save", "LanguageModel", "ModelConfig", "preset_config",
    "ConfigError", "CheckpointError", "CrateError", "TokenOutOfRangeError", "__version__",
]
