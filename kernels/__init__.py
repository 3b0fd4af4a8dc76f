"""crate.kernels: the ISTA layer's PyTorch reference and fused Triton kernels (see ista.py).

When Python runs from the repository root (`python -m pytest`, `python -c ...`), the root is on sys.path and this
folder is also found as a top-level module named `kernels`, shadowing Hugging Face's `kernels` package that
bitsandbytes and transformers import. Imported under that name, it puts the installed package in its place when
there is one (and otherwise stays an empty module, which transformers' availability check reads as "not
installed"); `crate.kernels` itself is only ever imported as `crate.kernels`.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds once this file ran
        _spec.loader.exec_module(_module)
