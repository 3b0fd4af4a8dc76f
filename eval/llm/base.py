"""The interface every LLM backend implements, the error they raise, and `generate_many` over any of them.

An `LLM` does two things:

    generate(prompt, max_new_tokens=, temperature=, seed=) -> str
    slot_probs(prompts: list[list[str]], candidates: list[str]) -> list[np.ndarray]   # (n_slots, n_candidates)
    generate_many(prompts, seeds, ...) -> list[str]      (optional; `generate_many(llm, ...)` falls back to a loop)

`slot_probs` reads, in one forward pass per prompt, the next-token probability of each candidate string at the
end of every piece but the last (see crate.eval.autointerp.prompts). Candidates the tokenizer cannot express as a single
token get probability 0 everywhere (e.g. "10" when digits are split); callers renormalise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from crate.errors import CrateError


class BackendError(CrateError):
    """An LLM backend that cannot be used as asked (missing package, key, or capability)."""


class LLM(Protocol):
    identity: dict[str, Any]

    def generate(self, prompt: str, *, max_new_tokens: int = 60, temperature: float = 1.0, seed: int = 0,
                 until: Callable[[str], bool] | None = None) -> str: ...

    def slot_probs(self, prompts: Sequence[Sequence[str]], candidates: Sequence[str]) -> list[np.ndarray]: ...


class ManyGenerator:
    """A backend whose `generate_many` does the work: `generate` is one prompt of it (same seed, same text)."""

    generate_many: Callable[..., list[str]]

    def generate(self, prompt: str, *, max_new_tokens: int = 60, temperature: float = 1.0, seed: int = 0,
                 until: Callable[[str], bool] | None = None) -> str:
        return self.generate_many([prompt], [seed], max_new_tokens=max_new_tokens, temperature=temperature,
                                  until=until)[0]


def generate_many(llm: LLM, prompts: Sequence[str], seeds: Sequence[int], *, max_new_tokens: int = 60,
                  temperature: float = 1.0, until: Callable[[str], bool] | None = None) -> list[str]:
    """Many generations, each with its own seed, through the backend's own `generate_many` where it has one (HTTP:
    concurrent; in-process: one at a time over a shared prefix), else one `generate` at a time."""
    many = getattr(llm, "generate_many", None)
    if many is not None:
        return many(prompts, seeds, max_new_tokens=max_new_tokens, temperature=temperature, until=until)
    return [llm.generate(p, max_new_tokens=max_new_tokens, temperature=temperature, seed=s, until=until)
            for p, s in zip(prompts, seeds)]


__all__ = ["LLM", "BackendError", "ManyGenerator", "generate_many"]
