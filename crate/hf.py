"""Our models in and out of the Hugging Face format.

Out: `export_hf` writes CRATE as `CrateForCausalLM` (config.json with `auto_map` and `modeling_crate.py`
beside it, so it loads with `trust_remote_code=True` where crate-lm is not installed) and GPT as
`GPT2LMHeadModel`, each with its tokenizer as a `PreTrainedTokenizerFast`. transformers' GPT-2 uses Conv1D
layers, whose weights are the transpose of our nn.Linear ones; a GPT without biases exports with zero biases,
and the paper's ReLU baseline with `activation_function="relu"`: both give our logits.

In: `read_hf_dir` turns a `GPT2LMHeadModel` or `CrateForCausalLM` directory into our config and state dict
(`crate.load` calls it), and `resolve_hub_id` finds a hub id in the local Hugging Face cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crate.atomic import atomic_dir
from crate.checkpoint import OURS_KEY, check_replaceable
from crate.config import ModelConfig
from crate.errors import CheckpointError, ConfigError
from crate.model import LanguageModel
from crate.tokenizer import EOT

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MODELING_FILE = Path(__file__).with_name("modeling_crate.py")
AUTO_MAP = {"AutoConfig": "modeling_crate.CrateConfig", "AutoModel": "modeling_crate.CrateModel",
            "AutoModelForCausalLM": "modeling_crate.CrateForCausalLM"}
# what transformers' config cannot say travels in the exported config.json under this key: our tokenizer
# identity ({"name", "vocab_size", "sha256"}) and, for GPT, whether the (zero) biases are absent in our model
# HF activations that are exactly one of ours (our "gelu" is the tanh approximation, "gelu_exact" the erf GELU)
GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu": "relu"}
HF_ACTIVATION = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}
CRATE_FIELDS = ("vocab_size", "block_size", "n_embd", "n_layer", "n_head", "n_hidden", "bias", "dropout",
                "ista_steps", "eta", "lmbda", "learn_eta_lambda", "block", "ista_impl", "layer_norm_eps")


# --- out: our model -> transformers ----------------------------------------------------------
def gpt2_config(model: LanguageModel, eot: int | None = None):  # -> transformers.GPT2Config
    from transformers import GPT2Config

    cfg = model.config
    if eot is None and cfg.vocab_size > 50256:
        eot = 50256  # GPT-2's <|endoftext|>, when the vocabulary has it
    return GPT2Config(
        bos_token_id=eot, eos_token_id=eot, vocab_size=cfg.vocab_size, n_positions=cfg.block_size,
        n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_hidden,
        layer_norm_epsilon=cfg.layer_norm_eps,
        activation_function=HF_ACTIVATION[cfg.activation],
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )


def gpt2_state_dict(model: LanguageModel) -> dict[str, Tensor]:
    """Our GPT weights under transformers' names, Conv1D weights transposed, absent biases as zeros."""
    if model.config.arch != "gpt":
        raise CheckpointError("only arch 'gpt' exports to GPT2LMHeadModel; CRATE exports to CrateForCausalLM")
    out: dict[str, Tensor] = {}
    for name, p in model.state_dict().items():
        t = p.detach().cpu()
        if name.endswith(CONV1D):
            t = t.t()
        out[name] = t.contiguous()
    if not model.config.bias:
        for name, p in list(out.items()):
            if name.endswith("weight") and ("ln" in name or name.endswith(CONV1D)):
                width = p.shape[-1] if name.endswith(CONV1D) else p.shape[0]
                out[name.removesuffix("weight") + "bias"] = torch.zeros(width, dtype=p.dtype)
    return out


def crate_config(model: LanguageModel, eot: int | None = None):  # -> CrateConfig
    from crate.modeling_crate import CrateConfig

    cfg = model.config
    fields = {k: getattr(cfg, k) for k in CRATE_FIELDS}
    fields["ista_impl"] = "auto"  # how, not what: the fused kernels where they run, the reference elsewhere
    return CrateConfig(**fields, initializer_range=cfg.init_std, bos_token_id=eot, eos_token_id=eot)


def to_transformers(model: LanguageModel, eot: int | None = None):  # -> PreTrainedModel
    """The transformers model with our weights, in memory: `CrateForCausalLM` or `GPT2LMHeadModel`."""
    if model.config.arch == "crate":
        from crate.modeling_crate import CrateForCausalLM

        hf, state = CrateForCausalLM(crate_config(model, eot)), model.state_dict()
    else:
        from transformers import GPT2LMHeadModel

        hf, state = GPT2LMHeadModel(gpt2_config(model, eot)), gpt2_state_dict(model)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))]
    if missing or unexpected:
        raise CheckpointError(f"export to {type(hf).__name__} failed: missing {missing}, unexpected {unexpected}")
    return hf.to(next(model.parameters()).device).eval()


def export_hf(model: LanguageModel, out_dir: str | os.PathLike, tokenizer: Any = None,
              tokenizer_identity: dict[str, Any] | None = None) -> Path:
    """Write a transformers directory (atomically) that `AutoModelForCausalLM.from_pretrained` loads with our logits.

    `tokenizer` (a `tokenizers.Tokenizer`) is saved beside it as a `PreTrainedTokenizerFast`; a CRATE export also
    holds `modeling_crate.py`, named by `auto_map`, so it needs no crate-lm to load."""

    check_replaceable(Path(out_dir))
    eot = tokenizer.token_to_id(EOT) if tokenizer is not None else None
    hf = to_transformers(model, eot)
    ours: dict[str, Any] = {"bias": model.config.bias}
    if tokenizer_identity:
        ours["tokenizer"] = {k: v for k, v in tokenizer_identity.items() if k in ("name", "vocab_size", "sha256")}
    setattr(hf.config, OURS_KEY, ours)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        if model.config.arch == "crate":
            hf.config.auto_map = dict(AUTO_MAP)
            shutil.copyfile(MODELING_FILE, tmp / MODELING_FILE.name)
        hf.save_pretrained(tmp)
        if tokenizer is not None:
            hf_tokenizer(tokenizer, model.config.block_size).save_pretrained(tmp)
    return out


def hf_tokenizer(tokenizer: Any, max_length: int):  # -> PreTrainedTokenizerFast
    """Our `tokenizers.Tokenizer` (GPT-2 BPE or a BPE from `crate prepare`) as transformers' fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    special = EOT if tokenizer.token_to_id(EOT) is not None else None
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special, eos_token=special,
                                   unk_token=special, model_max_length=max_length)


# --- in: transformers -> our model ----------------------------------------------------------
def is_hf_dir(path: Path) -> bool:
    """A transformers model directory: config.json with a `model_type` (ours have `format` instead)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False


def hf_info(path: str | os.PathLike) -> dict[str, Any]:
    """`read_info`'s answer for a transformers directory: our model config, and the tokenizer identity if we
    exported it."""
    config, raw = _hf_config(Path(path), {})
    tokenizer = (raw.get(OURS_KEY) or {}).get("tokenizer")
    return {"format": "transformers", "model": config.to_dict(), "tokenizer": tokenizer,
            "metadata": {"model_type": raw["model_type"], "source": str(path)}}


def read_hf_dir(path: Path, overrides: dict[str, Any]) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Our config and state dict from a `GPT2LMHeadModel` or `CrateForCausalLM` directory."""
    config, raw = _hf_config(path, overrides)
    state = _read_hf_weights(path)
    state = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    lm_head = state.pop("lm_head.weight", None)
    if lm_head is not None and not torch.equal(lm_head, state.get("transformer.wte.weight", lm_head)):
        raise CheckpointError(f"{path} has an untied lm_head.weight: our models tie the LM head to the token embedding")
    if raw["model_type"] == "gpt2":
        state = {k: v.t().contiguous() if k.endswith(CONV1D) else v for k, v in state.items()}
        if not config.bias:  # our bias-free GPT exported its biases as zeros
            nonzero = sorted(k for k, v in state.items() if k.endswith(".bias") and v.any())
            if nonzero:
                raise CheckpointError(f"{path} says bias=false ({OURS_KEY}) but has non-zero biases {nonzero[:4]}")
            state = {k: v for k, v in state.items() if not k.endswith(".bias")}
    return config, state


def _hf_config(path: Path, overrides: dict[str, Any]) -> tuple[ModelConfig, dict[str, Any]]:
    raw = json.loads((path / "config.json").read_text())
    kind = raw.get("model_type")
    if kind == "crate":
        fields = {k: raw[k] for k in CRATE_FIELDS if k in raw}
        fields.update(arch="crate", init_std=raw.get("initializer_range", 0.02))
    elif kind == "gpt2":
        fields = _gpt2_fields(path, raw)
        fields["bias"] = (raw.get(OURS_KEY) or {}).get("bias", True)
    else:
        raise CheckpointError(f"{path} holds a transformers {kind!r} model: crate.load reads 'gpt2' "
                              f"(GPT2LMHeadModel) and 'crate' (CrateForCausalLM) directories")
    try:
        return ModelConfig.from_dict({**fields, **overrides}), raw
    except ConfigError as e:
        raise CheckpointError(f"{path}/config.json does not give a valid model config: {e}") from e


def _gpt2_fields(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    act = raw.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise CheckpointError(f"{path}: activation_function {act!r} has no exact counterpart in our GPT "
                              f"(which has {sorted(GPT2_ACTIVATIONS)})")
    exact = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
    for key, want in exact.items():
        if raw.get(key, want) != want:
            raise CheckpointError(f"{path}: {key}={raw[key]} changes GPT-2's attention; our GPT needs {key}={want}")
    if not raw.get("tie_word_embeddings", True):
        raise CheckpointError(f"{path}: tie_word_embeddings=false; our GPT ties the LM head to the token embedding")
    n_embd = raw.get("n_embd", 768)
    return dict(arch="gpt", vocab_size=raw.get("vocab_size", 50257), block_size=raw.get("n_positions", 1024),
                n_embd=n_embd, n_layer=raw.get("n_layer", 12), n_head=raw.get("n_head", 12),
                n_hidden=raw.get("n_inner") or 4 * n_embd, activation=GPT2_ACTIVATIONS[act],
                layer_norm_eps=raw.get("layer_norm_epsilon", 1e-5), init_std=raw.get("initializer_range", 0.02))


def _read_hf_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    if index.is_file():
        state: dict[str, Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(path / shard))
        return state
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{path} has a config.json but no model.safetensors, safetensors index or pytorch_model.bin")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve_hub_id(name: str) -> Path:
    """The local snapshot of hub model `name` (`owner/model`, or `hf:owner/model`): from the Hugging Face cache when
    HF_HUB_OFFLINE=1, else downloaded. A bare name whose first part is a local folder (`runs/typo`) is a mistyped
    local path, refused without asking the hub; `hf:` says a name is a hub id whatever the local folders are."""
    explicit = name.startswith("hf:")
    name = name[3:] if explicit else name
    if not HUB_ID.fullmatch(name) or Path(name).suffix in (".pt", ".ckpt", ".safetensors", ".bin"):
        raise FileNotFoundError(f"no checkpoint at {name}")
    folder = Path(name).parts[0]
    if not explicit and "/" in name and Path(folder).is_dir():
        raise FileNotFoundError(f"no checkpoint at {name}: {folder}/ is a local folder without {name[len(folder) + 1:]!r} "
                                f"(a mistyped path?); for the hub model of that name write hf:{name}")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "*.py",
                "special_tokens_map.json", "vocab.json", "merges.txt", "generation_config.json"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as e:
        where = (f"it is not in the local Hugging Face cache {constants.HF_HUB_CACHE} and HF_HUB_OFFLINE=1 forbids "
                 f"downloading it: run `hf download {name}` where there is network" if constants.HF_HUB_OFFLINE
                 else "nor a hub model that could be downloaded")
        raise CheckpointError(f"no checkpoint at {name}: it is not a local path, and {where} "
                              f"({type(e).__name__})") from e
