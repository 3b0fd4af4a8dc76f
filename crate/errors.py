"""Errors of ours: each message names the problem and the fix, so the CLI prints it without a traceback."""


class CrateError(ValueError):
    """Base of every user-facing error in crate-lm."""


class ConfigError(CrateError):
    """A configuration that cannot be built (unknown key, impossible shape)."""


class CheckpointError(CrateError):
    """A checkpoint that cannot be loaded (truncated, foreign, unsafe, mismatched keys)."""


class TokenOutOfRangeError(CrateError):
    """Token ids that the embedding does not have (wrong tokenizer or corrupted data)."""


class DataError(CrateError):
    """Data that cannot be prepared or trained on (missing source, bad shards, mismatched tokenizer)."""


class PipelineError(CrateError):
    """A pipeline step that cannot run (a missing subsystem, a failed step)."""


class DiskFullError(CrateError):
    """A write that ran out of disk space: what was being written, where, and that the old file is intact."""
