"""What every SAE module shares: the error they raise, the check that SAELens is installed, and the inference copy
of a SAELens training SAE."""

from __future__ import annotations

from typing import Any

from crate.errors import CrateError


class SAEError(CrateError):
    """An SAE that cannot be trained, read or attached (bad settings, missing files, another model's SAE)."""


def require_sae_lens() -> None:
    """A clear error, before any work, when SAELens is not installed."""
    import importlib.util

    if importlib.util.find_spec("sae_lens") is None:
        raise SAEError('SAEs need SAELens, which is not installed: pip install -e ".[sae]" (sae-lens==6.54.12)')


def to_inference(training_sae: Any) -> Any:
    """The SAELens inference SAE of a training SAE, through its own save path (what load_from_disk reads)."""
    import tempfile

    from sae_lens import SAE

    with tempfile.TemporaryDirectory() as tmp:
        training_sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device=str(training_sae.device))


__all__ = ["SAEError", "require_sae_lens", "to_inference"]
