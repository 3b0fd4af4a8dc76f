"""argparse types shared by the commands: a bad value is a one-line usage error (exit 2) naming the flag and the
valid range, before any work, instead of a traceback from deep inside the run."""

from __future__ import annotations

import argparse
import math
from typing import Any


def positive_int(text: str) -> int:
    return _at_least(_int(text), 1, text, "an integer >=")


def nonnegative_int(text: str) -> int:
    return _at_least(_int(text), 0, text, "an integer >=")


def finite_float(text: str) -> float:
    """A real number: NaN and the infinities are refused (a clamp or a coefficient of NaN only prints tables of NaN)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    return _at_least(finite_float(text), 0, text, "a number >=")


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def device(text: str) -> str:
    """cpu, cuda or cuda:N (only when this torch sees that GPU), or mps (when available)."""
    import torch

    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return text
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            build = "the CPU build of torch" if torch.version.cuda is None else "no visible GPU"
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device here ({build}); use cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s), cuda:0..")
        return text
    if text == "mps" and torch.backends.mps.is_available():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device here: use cpu, or cuda / cuda:N on a GPU machine")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _at_least(value: float, low: int, text: str, what: str) -> Any:
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what} {low}, got {text}")
    return value
