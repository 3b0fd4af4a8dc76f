"""The repository layout keeps `kernels/` at the top (the design card) without shadowing Hugging Face's `kernels`
package, which bitsandbytes and transformers import, when Python runs from the repository root."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run_from_root(code: str, site: Path | None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    # -c puts the current directory first on sys.path, as `python -m pytest` does: the root shadows site-packages
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_third_party_kernels_package_is_importable_from_the_root(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("def get_kernel(name):\n    return 'hub:' + name\n")
    r = _run_from_root("import kernels, crate.kernels.ista as ista\nfrom kernels import get_kernel\n"
                       "print(kernels.__file__)\nprint(get_kernel('x'))\nprint(ista.ista_reference.__module__)", site)
    assert r.returncode == 0, r.stderr
    file, got, ours = r.stdout.split()
    assert Path(file) == site / "kernels" / "__init__.py" and got == "hub:x" and ours == "crate.kernels.ista"


def test_without_the_package_transformers_sees_none():
    r = _run_from_root("from transformers.utils import is_kernels_available\nprint(is_kernels_available())", None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
