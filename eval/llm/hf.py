"""The in-process backend: a causal LM from transformers (a hub id, a local directory or a .gguf file), batched by
length and sharing prompt prefixes, on CUDA when present (`quantize="4bit"` uses bitsandbytes as the paper did); and
where an `hf:` LLM's files are and what identifies their content."""

from __future__ import annotations

import bisect
import inspect
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crate.eval.llm.base import BackendError, ManyGenerator
from crate.eval.llm.batching import prefix_groups, token_batches
from crate.eval.llm.gguf import load_gguf


def _force_fp32_4bit(model) -> None:
    """Make every bitsandbytes 4-bit layer on a CPU take its fp32 path (dequantize, then an fp32 matmul). On a CPU
    with AVX512-BF16, bitsandbytes (0.50) would otherwise repack the weights at the first forward and run a fused
    kernel that casts the activations to bf16, so the same model would give other probabilities on other CPUs."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


class HFLLM(ManyGenerator):
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
                model, tok = load_gguf(path, kwargs)
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

    def generate_many(self, prompts: Sequence[str], seeds: Sequence[int], *, max_new_tokens: int = 60,
                      temperature: float = 1.0, until: Callable[[str], bool] | None = None) -> list[str]:
        """One prompt at a time, each with its own seed (transformers samples a batch from one random generator, so
        a batch would change the text a seed gives); the tokens that all the prompts start with (the explainer's
        few-shot preamble) run once, and their KV cache is reused for each (`prefix_cache`). `until(text so far)`
        true stops early: the tokens before are those of a run without it (same seed)."""
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


__all__ = ["HFLLM", "resolve_hf_source", "hf_weights_identity"]
