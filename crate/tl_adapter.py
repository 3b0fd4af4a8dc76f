"""TransformerLens `TransformerBridge` adapter for `CrateForCausalLM` (entry point `transformer_lens.architectures`).

The bridge wraps the transformers modules and runs their own forward, so CRATE's block stays exact: no
residual around ISTA, the dictionary tied between encoding and decoding. Each block is therefore an opaque
block (`blocks.{i}.hook_resid_pre` / `hook_resid_post`), with the ISTA layer bridged as the block's `mlp`:
`blocks.{i}.mlp.hook_in` is its normalised input and `blocks.{i}.mlp.hook_post` (= `hook_out`) the codes, the
neurons we score, under the name TransformerLens gives GPT-2's MLP neurons.
What the bridge cannot do with it: fold LayerNorms or split CRATE into TransformerLens's `HookedTransformer`
weights (W_Q = W_K = W_V = U, and the MLP has no separate W_in / W_out), so `enable_compatibility_mode()` and
weight processing are off.

TransformerLens (3.9 and 4.3 alike) discovers entry-point adapters only after `boot_transformers` has
looked the architecture up in its static `SUPPORTED_ARCHITECTURES` table, so importing this module also
adds CRATE to that table; `import crate` does so as soon as transformer_lens is imported (crate.hf_registry).
"""

from __future__ import annotations

from typing import Any

from transformer_lens.factories import architecture_adapter_factory
from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
from transformer_lens.model_bridge.generalized_components import (
    EmbeddingBridge,
    MLPBridge,
    NormalizationBridge,
    OpaqueBlockBridge,
    PosEmbedBridge,
    UnembeddingBridge,
)


ARCHITECTURE = "CrateForCausalLM"


class IstaBridge(MLPBridge):
    """The ISTA layer as an opaque MLP: input the normalised residual, output the codes (TL's `hook_post`)."""

    hook_aliases = {"hook_post": "hook_out"}


class CrateArchitectureAdapter(ArchitectureAdapter):
    """CRATE's modules under TransformerLens's canonical names; the forward is the transformers class's own."""

    applicable_phases: list[int] = []  # TL's HookedTransformer-equivalence phases assume a standard block
    supports_fold_ln = False

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.cfg.normalization_type = "LN"
        self.cfg.positional_embedding_type = "standard"
        self.cfg.final_rms = False
        self.cfg.gated_mlp = False
        self.cfg.attn_only = False
        self.weight_processing_conversions = {}
        self.component_mapping = {
            "embed": EmbeddingBridge(name="transformer.wte"),
            "pos_embed": PosEmbedBridge(name="transformer.wpe"),
            "blocks": OpaqueBlockBridge(name="transformer.h", submodules={
                "ln1": NormalizationBridge(name="prenorm_1", config=self.cfg),
                "ln2": NormalizationBridge(name="prenorm_2", config=self.cfg),
                "mlp": IstaBridge(name="ista", config=self.cfg, submodules={}),
            }),
            "ln_final": NormalizationBridge(name="transformer.ln_f", config=self.cfg),
            "unembed": UnembeddingBridge(name="lm_head"),
        }



def register() -> None:
    """Let `boot_transformers` find CRATE: the static table always; the factory only where the entry point is not
    visible (a stale egg-info in the working directory shadows it), since the factory warns about a duplicate."""
    from importlib.metadata import entry_points

    architecture_adapter_factory.SUPPORTED_ARCHITECTURES.setdefault(ARCHITECTURE, CrateArchitectureAdapter)
    if not any(ep.name == ARCHITECTURE for ep in entry_points(group="transformer_lens.architectures")):
        architecture_adapter_factory.ArchitectureAdapterFactory.register_adapter(ARCHITECTURE, CrateArchitectureAdapter)


register()
