"""nnsight and TransformerLens on CRATE: the codes and a clamped unit equal what our hooks and `model.steer` give."""

import warnings

import pytest
import torch

import crate

nnsight = pytest.importorskip("nnsight", reason="pip install -e '.[interp]' installs nnsight")
from crate.hf import export_hf  # noqa: E402

# importing nnsight mounts a `.save` method on every Python object (shadowing lazy module attributes); note what
# `crate.save` is under the mount, then take the mount off so that the rest of the session sees plain objects
# (these tests call nnsight.save(x) instead)
SAVE_UNDER_MOUNT = crate.save
if getattr(nnsight._c, "unmount", None) is not None:
    nnsight._c.unmount("save")

LAYER, UNIT, VALUE = 1, 17, 5.0


@pytest.fixture(scope="module")
def model():
    return crate.build_model("crate", "micro", n_layer=2, vocab_size=320, ista_impl="torch").eval()


@pytest.fixture(scope="module")
def export(model, tmp_path_factory):
    from crate.tokenizer import tokenizer_identity, train_bpe

    tok = train_bpe(["To be, or not to be, that is the question"] * 10, 300)
    path = tmp_path_factory.mktemp("nnsight") / "hf"
    export_hf(model, path, tokenizer=tok, tokenizer_identity=tokenizer_identity(tok, "bpe"))
    return path, tok


def ours(model, idx):
    """Our reference: the codes through our hooks, and the logits with the unit clamped by `model.steer`."""
    _, cache = model.run_with_cache(idx, [model.neuron_hook(LAYER)])
    with torch.no_grad(), model.steer(LAYER, UNIT, VALUE):
        steered = model(idx)
    return cache[model.neuron_hook(LAYER)], steered


def test_crate_save_is_ours_when_nnsight_is_imported(tmp_path, model):
    assert SAVE_UNDER_MOUNT is vars(crate)["save"]
    SAVE_UNDER_MOUNT(model, tmp_path / "ck")
    assert crate.load(tmp_path / "ck").config == model.config


def test_nnsight_wraps_our_model(model):
    idx = torch.randint(0, 320, (2, 11))
    codes, steered = ours(model, idx)
    assert (codes[..., UNIT] != VALUE).any() and (codes > 0).any()  # the clamp changes something
    wrapped = nnsight.NNsight(model)
    with wrapped.trace(idx):
        got = nnsight.save(wrapped.transformer.h[LAYER].hook_neurons.output)
    with wrapped.trace(idx):
        wrapped.transformer.h[LAYER].hook_neurons.output[..., UNIT] = VALUE
        got_steered = nnsight.save(wrapped.output)
    torch.testing.assert_close(got, codes, rtol=0, atol=0)
    torch.testing.assert_close(got_steered, steered, rtol=0, atol=0)
    assert not torch.equal(steered, model(idx))


def test_nnsight_language_model_on_an_export(model, export):
    path, tok = export
    text = "To be, or not to be"
    idx = torch.tensor([tok.encode(text).ids])
    codes, steered = ours(model, idx)
    with warnings.catch_warnings():  # nnsight 0.8 calls LanguageModel deprecated in favour of TransformersModel
        warnings.simplefilter("ignore")
        lm = nnsight.LanguageModel(str(path), dispatch=True)
    assert type(lm._module).__name__ == "CrateForCausalLM"
    with lm.trace(text):
        got = nnsight.save(lm.transformer.h[LAYER].hook_neurons.output)
    with lm.trace(text):
        lm.transformer.h[LAYER].ista.output[..., UNIT] = VALUE  # the ISTA module's output is the codes too
        got_steered = nnsight.save(lm.output.logits)
    torch.testing.assert_close(got, codes, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_steered, steered, rtol=1e-6, atol=1e-6)


def boot(path):
    pytest.importorskip("transformer_lens", reason="pip install -e '.[interp]' installs TransformerLens")
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(str(path), device="cpu")


def test_transformer_bridge_exposes_crate_codes_with_our_logits(model, export):
    path, tok = export
    bridge = boot(path)  # found through crate's adapter: `import crate` registered it when transformer_lens loaded
    idx = torch.tensor([tok.encode("To be, or not to be, that is").ids])
    codes, steered = ours(model, idx)
    hook = f"blocks.{LAYER}.mlp.hook_post"
    logits, cache = bridge.run_with_cache(idx, names_filter=[hook, f"blocks.{LAYER}.hook_resid_post"])
    torch.testing.assert_close(logits, model(idx), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache[hook], codes, rtol=1e-5, atol=1e-6)
    ours_resid = f"transformer.h.{LAYER}.hook_resid_post"
    _, resid = model.run_with_cache(idx, [ours_resid])
    torch.testing.assert_close(cache[f"blocks.{LAYER}.hook_resid_post"], resid[ours_resid], rtol=1e-5, atol=1e-6)

    def clamp(codes, hook):
        codes[..., UNIT] = VALUE
        return codes

    got = bridge.run_with_hooks(idx, fwd_hooks=[(hook, clamp)])
    torch.testing.assert_close(got, steered, rtol=1e-5, atol=1e-6)


def test_transformer_bridge_boots_the_exported_gpt(tmp_path):
    gpt = crate.build_model("gpt", "micro", activation="gelu", bias=True).eval()
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    export_hf(gpt, tmp_path / "gpt")
    bridge = boot(tmp_path / "gpt")
    idx = torch.randint(0, gpt.config.vocab_size, (2, 9))
    logits, cache = bridge.run_with_cache(idx, names_filter=["blocks.0.mlp.hook_post"])
    _, ours_cache = gpt.run_with_cache(idx, [gpt.neuron_hook(0)])
    torch.testing.assert_close(logits, gpt(idx), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache["blocks.0.mlp.hook_post"], ours_cache[gpt.neuron_hook(0)], rtol=1e-4, atol=1e-5)


def test_the_adapter_is_declared_as_transformer_lens_entry_point():
    import importlib
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["transformer_lens.architectures"]["CrateForCausalLM"]
    module, name = target.split(":")
    assert getattr(importlib.import_module(module), name).__name__ == "CrateArchitectureAdapter"


def test_nnsight_reads_gpt_sae_latents():
    """nnsight wraps forwards instead of registering hooks: the SAE latents' hook point must run regardless."""
    pytest.importorskip("sae_lens", reason="pip install -e '.[sae]' installs SAELens")
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

    from crate.eval.sae.attach import SAEModel
    from crate.eval.sae.base import to_inference
    from crate.hooks import record

    torch.manual_seed(0)
    gpt = crate.build_model("gpt", "micro").eval()
    n = gpt.config.n_hidden
    sae = to_inference(StandardTrainingSAE(StandardTrainingSAEConfig(d_in=n, d_sae=2 * n)))
    model = SAEModel(gpt, {0: sae}, {0: []}).eval()
    idx = torch.randint(0, gpt.config.vocab_size, (2, 9))
    wrapped = nnsight.NNsight(model)
    with wrapped.trace(idx):
        got = nnsight.save(wrapped.transformer.h[0].sae.hook_latents.output)
    with torch.no_grad(), record(model, ["transformer.h.0.hook_neurons"]) as cache:
        model(idx)
        want = sae.encode(cache["transformer.h.0.hook_neurons"])
    assert want.gt(0).any()
    torch.testing.assert_close(got, want)
