"""A disk cache in front of any LLM: every call stored in sqlite, keyed by (model identity, operation, prompt,
parameters), so that a rerun asks the model only what it has not answered yet."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crate.eval.llm.base import LLM, ManyGenerator, generate_many


class CachedLLM(ManyGenerator):
    """Every call of the wrapped LLM stored in sqlite, keyed by its identity, the operation, prompt and parameters."""

    def __init__(self, llm: LLM, path: str | Path):
        self.llm = llm
        self.identity = llm.identity
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, value TEXT)")
        self._db.commit()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def _key(self, op: str, payload: Any) -> str:
        blob = json.dumps([self.identity, op, payload], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _get(self, key: str) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM calls WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _put(self, items: list[tuple[str, Any]]) -> None:
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO calls VALUES (?, ?)", [(k, json.dumps(v)) for k, v in items])
            self._db.commit()

    def generate_many(self, prompts: Sequence[str], seeds: Sequence[int], *, max_new_tokens: int = 60,
                      temperature: float = 1.0, until: Callable[[str], bool] | None = None) -> list[str]:
        """`until` is not part of the key: it may only cut text after the point where it no longer matters."""
        keys = [self._key("generate", [p, max_new_tokens, temperature, s]) for p, s in zip(prompts, seeds)]
        out = [self._get(k) for k in keys]
        todo = [i for i, o in enumerate(out) if o is None]
        self.hits += len(prompts) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = generate_many(self.llm, [prompts[i] for i in todo], [seeds[i] for i in todo],
                                  max_new_tokens=max_new_tokens, temperature=temperature, until=until)
            self._put([(keys[i], t) for i, t in zip(todo, fresh)])
            for i, t in zip(todo, fresh):
                out[i] = t
        return out  # type: ignore[return-value]

    def slot_probs(self, prompts: Sequence[Sequence[str]], candidates: Sequence[str]) -> list[np.ndarray]:
        keys = [self._key("slot_probs", [list(p), list(candidates)]) for p in prompts]
        out: list[np.ndarray | None] = []
        for k in keys:
            hit = self._get(k)
            out.append(None if hit is None else np.asarray(hit, dtype=np.float64).reshape(-1, len(candidates)))
        todo = [i for i, o in enumerate(out) if o is None]
        self.hits += len(prompts) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = self.llm.slot_probs([prompts[i] for i in todo], candidates)
            self._put([(keys[i], r.tolist()) for i, r in zip(todo, fresh)])
            for i, r in zip(todo, fresh):
                out[i] = r
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self._db.close()


__all__ = ["CachedLLM"]
