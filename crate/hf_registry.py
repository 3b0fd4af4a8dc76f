"""Register CRATE with transformers and TransformerLens once they are imported, without importing them here.

`import crate` must stay fast, so it only installs `RegisterOnImport` on `sys.meta_path`: when (and if) the
process later imports `transformers` (or `transformer_lens`), the hook lets that import finish and then imports
`crate.modeling_crate` (or `crate.tl_adapter`). Importing those registers CRATE: `CrateConfig` /
`CrateForCausalLM` with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`, and the TransformerBridge
adapter for `CrateForCausalLM`. A library already imported is registered at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

REGISTRARS = {"transformers": "crate.modeling_crate", "transformer_lens": "crate.tl_adapter"}


def register(library: str) -> None:
    """Import our module for `library`; a failure warns instead of breaking the user's own import."""
    try:
        importlib.import_module(REGISTRARS[library])
    except Exception as e:  # an incompatible version must not stop `import transformers`
        if isinstance(e, ModuleNotFoundError) and (e.name or "").startswith(library + "."):
            return  # a version without what we register with (TransformerLens < 3 has no TransformerBridge)
        warnings.warn(f"crate-lm could not register CRATE with {library}: {e}", stacklevel=2)


class RegisterOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, pending: set[str]):
        self.pending = pending

    def find_spec(self, name, path=None, target=None):
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # the other finders' answer (this one passes: name is done)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register(name)

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    pending = set()
    for library in REGISTRARS:
        if library in sys.modules:
            register(library)
        else:
            pending.add(library)
    if pending and not any(isinstance(f, RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, RegisterOnImport(pending))
