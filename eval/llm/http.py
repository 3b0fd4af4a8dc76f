"""The remote backend: an OpenAI-compatible `completions` endpoint (vLLM, OpenAI) through the `openai` client,
`concurrency` requests in flight. The key comes from an environment variable (never logged or saved); retries with
backoff; a start-up check that the endpoint returns prompt log-probabilities (`echo` + `logprobs`), failing loudly if
not (llama.cpp servers)."""

from __future__ import annotations

import bisect
import importlib.util
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from crate.eval.llm.base import BackendError


class HTTPLLM:
    """The `completions` endpoint of an OpenAI-compatible server, with prompt log-probabilities, through the `openai`
    client; `concurrency` requests in flight at once (a vLLM server batches them: give it hundreds)."""

    def __init__(self, base_url: str, model: str | None = None, *, api_key_env: str | None = "OPENAI_API_KEY",
                 require_key: bool = True, top_logprobs: int = 20, timeout: float = 60.0, max_retries: int = 5,
                 backoff: float = 1.0, check: bool = True, concurrency: int = 256):
        if concurrency < 1:
            raise BackendError(f"requests in flight must be >= 1, got {concurrency}")
        if importlib.util.find_spec("openai") is None:
            raise BackendError("the HTTP backend needs the openai client: pip install -e '.[llm]' (or pip install openai)")
        import openai

        self.base_url = base_url.rstrip("/")
        self.concurrency = concurrency
        self.model = model
        self.top_logprobs = top_logprobs
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        key = os.environ.get(api_key_env) if api_key_env else None
        if require_key and api_key_env and not key:
            raise BackendError(
                f"the HTTP backend at {self.base_url} needs an API key in the environment variable ${api_key_env}: "
                f"export {api_key_env}=... (or pass --no-api-key for a server without authentication)")
        # retries are ours (below), with the backoff asked for; a server without authentication gets a placeholder
        self._client = openai.OpenAI(api_key=key or "none", base_url=self.base_url, timeout=timeout, max_retries=0)
        self._pool: Any = None
        self.identity = {"backend": "http", "url": self.base_url, "model": model, "top_logprobs": top_logprobs}
        if check:
            self.check()

    def __repr__(self) -> str:  # never show the key
        return f"HTTPLLM({self.base_url!r}, model={self.model!r})"

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        """One `completions` request, retried with exponential backoff and jitter on 408/409/429/5xx and lost
        connections; a rejected key or another client error fails at once."""
        import openai

        url = self.base_url + "/completions"
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                # the raw JSON: validating hundreds of log-probability dicts per prompt into pydantic objects
                # would cost more client CPU than the request itself
                raw = self._client.completions.with_raw_response.create(model=self.model or openai.NOT_GIVEN, **payload)
                return _completion_json(url, raw.status_code, raw.headers.get("content-type"), raw.text)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise BackendError(f"{url} rejected the API key (HTTP {e.status_code}): check the key variable") from None
            except openai.APIStatusError as e:
                if e.status_code not in (408, 409, 429) and e.status_code < 500:
                    raise BackendError(f"{url} answered HTTP {e.status_code}: {e.response.text[:300]}") from None
                last = f"HTTP {e.status_code}"
            except openai.APIConnectionError as e:
                last = str(e.__cause__ or e)
            if attempt < self.max_retries:
                time.sleep(self.backoff * 2**attempt * (0.5 + random.random() / 2))
        raise BackendError(f"{url} failed after {self.max_retries + 1} attempts: {last}")

    def _map(self, fn: Any, items: Sequence[Any]) -> list[Any]:
        """`fn` over `items`, `concurrency` at a time, results in order."""
        if len(items) <= 1 or self.concurrency <= 1:
            return [fn(x) for x in items]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="crate-http")
        return list(self._pool.map(fn, items))

    def _echo(self, text: str) -> dict[str, Any]:
        resp = self._post({"prompt": text, "max_tokens": 1, "echo": True, "logprobs": self.top_logprobs,
                           "temperature": 0.0})
        lp = (resp.get("choices") or [{}])[0].get("logprobs") or {}
        tokens, offsets, tops = lp.get("tokens"), lp.get("text_offset"), lp.get("top_logprobs")
        if not tokens or offsets is None or tops is None or len(tops) < 2 or all(t is None for t in tops[1:]):
            raise BackendError(
                f"{self.base_url} does not return prompt log-probabilities (completions with echo=true and "
                f"logprobs): the simulator needs them. vLLM and OpenAI's legacy completions do; llama.cpp servers "
                f"silently don't. Use another server, or the in-process backend (hf:...)")
        return lp

    def check(self) -> None:
        """At start-up, before any work: the server is there and returns prompt log-probabilities."""
        self._check_port()
        lp = self._echo("The quick brown fox jumps over the lazy dog")
        if len(lp["tokens"]) < 3:
            raise BackendError(f"{self.base_url} echoed {len(lp['tokens'])} tokens of a 9-word prompt: no prompt logprobs")

    def _check_port(self) -> None:
        import socket
        from urllib.parse import urlsplit

        u = urlsplit(self.base_url)
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            socket.create_connection((u.hostname, port), timeout=self.timeout).close()
        except OSError as e:
            raise BackendError(f"nothing answers at {u.hostname}:{port} ({e.strerror or e}): start the server, or fix "
                               f"the URL in the LLM spec") from None

    def generate(self, prompt: str, *, max_new_tokens: int = 60, temperature: float = 1.0, seed: int = 0,
                 until: Callable[[str], bool] | None = None) -> str:
        """`until` is not sent: a server generates the whole completion (cheaply, batched with the others)."""
        resp = self._post({"prompt": prompt, "max_tokens": max_new_tokens, "temperature": temperature, "seed": seed})
        return resp["choices"][0].get("text") or ""

    def generate_many(self, prompts: Sequence[str], seeds: Sequence[int], *, max_new_tokens: int = 60,
                      temperature: float = 1.0, until: Callable[[str], bool] | None = None) -> list[str]:
        """Several prompts, each with its own seed, `concurrency` in flight."""
        return self._map(lambda ps: self.generate(ps[0], max_new_tokens=max_new_tokens, temperature=temperature,
                                                  seed=ps[1]), list(zip(prompts, seeds)))

    def slot_probs(self, prompts: Sequence[Sequence[str]], candidates: Sequence[str]) -> list[np.ndarray]:
        """One echo request per prompt, `concurrency` in flight (the server batches them and, with prefix caching
        on, computes the prefix that one explanation's prompts share once)."""
        return self._map(lambda p: self._slot_probs_one(p, candidates), prompts)

    def _slot_probs_one(self, pieces: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        text = "".join(pieces)
        lp = self._echo(text)
        offsets = list(lp["text_offset"])
        tops = lp["top_logprobs"]
        ends = np.cumsum([len(p) for p in pieces])[:-1]
        res = np.zeros((len(ends), len(candidates)))
        columns: dict[str, list[int]] = {}
        for c, cand in enumerate(candidates):
            columns.setdefault(cand.strip(), []).append(c)
        for s, o in enumerate(ends):
            # the token that starts at the slot: its distribution is the prediction after the slot
            i = bisect.bisect_left(offsets, int(o))
            if i >= len(tops) or not tops[i]:
                continue
            for tok, logp in tops[i].items():
                for c in columns.get(tok.strip(), ()):
                    res[s, c] += math.exp(logp)
        return res


def _completion_json(url: str, status: int, content_type: str | None, text: str) -> dict[str, Any]:
    """The JSON object of a `completions` answer; any other body (an HTML page of a proxy, a login or a web
    server, JSON that is not an object) fails at once, naming the URL, the status and the start of the body."""
    try:
        body = json.loads(text)
        what = "JSON but not an object"
    except ValueError:
        body, what = None, "not JSON"
    if isinstance(body, dict):
        return body
    start = " ".join(text.split())[:200] or "(empty)"
    raise BackendError(
        f"{url} answered HTTP {status} with a body that is {what} ({content_type or 'no content type'}): {start!r}. "
        f"Check that the URL of the LLM spec is the base of an OpenAI-compatible API (e.g. http://host:8000/v1) "
        f"and that the server there, not a proxy, login or other web page, answers it")


__all__ = ["HTTPLLM"]
