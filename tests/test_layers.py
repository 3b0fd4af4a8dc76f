"""The layers of the package, read from the source: every import statement, those inside functions included.

- the core (`crate`, `crate.kernels`) imports nothing from `crate.train` or `crate.eval`;
- `crate.train` imports only the core;
- the analysis parts of `crate.eval` import the core, the data access of `crate.train` (its data, and the grid
  of checkpoints a run leaves) and `crate.eval`;
- reports (`crate.eval.report`) and workflows (`crate.eval.workflows`) are imported only by command handlers
  (`*.cli` modules), by workflows, and (reports) by other reports;
- no two modules import each other, directly or through others.

The rules are checked on a synthetic source tree too, so each can be seen to fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"crate": "crate", "crate.kernels": "kernels", "crate.train": "train", "crate.eval": "eval"}
DATA_ACCESS = ("crate.train.data", "crate.train.datamodule", "crate.train.grid")  # what a run left, read
TOP = ("crate.eval.report", "crate.eval.workflows")


def module_files(root: Path) -> dict[str, Path]:
    """Module name -> file, for the four source folders under `root` (a package is its __init__.py)."""
    mods = {}
    for pkg, folder in SOURCES.items():
        for f in sorted((root / folder).rglob("*.py")):
            parts = [p for p in f.relative_to(root / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


def imports(name: str, file: Path, mods: dict[str, Path]) -> set[str]:
    """The crate modules `file` imports anywhere in its body: `from a.b import c` counts as a.b.c when that is a
    module, else as a.b; a relative import is resolved against the module's package."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:  # `import crate.eval.x.y` names the module crate.eval.x.y or a package above
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    mods = module_files(root)
    return {name: imports(name, f, mods) for name, f in mods.items()}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layer(name: str) -> str:
    if within(name, "crate.train"):
        return "train"
    if within(name, "crate.eval"):
        return "eval"
    return "core"


def is_handler(name: str) -> bool:
    return name.rpartition(".")[2] == "cli"


def violations(g: dict[str, set[str]]) -> list[str]:
    out = []
    for a, deps in sorted(g.items()):
        for b in sorted(deps):
            if layer(a) == "core" and layer(b) != "core":
                out.append(f"{a} (core) imports {b}")
            elif layer(a) == "train" and layer(b) == "eval":
                out.append(f"{a} (crate.train) imports {b}")
            elif (layer(a) == "eval" and layer(b) == "train" and not within(a, "crate.eval.workflows")
                  and not any(within(b, d) for d in DATA_ACCESS)):
                out.append(f"{a} imports {b}, which is training, not its data access")
            top = next((t for t in TOP if within(b, t)), None)
            if top and not (is_handler(a) or within(a, "crate.eval.workflows") or within(a, top)):
                out.append(f"{a} imports {b}: {top} is imported only by command handlers and workflows")
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_the_package_keeps_its_layers():
    g = graph(ROOT)
    assert len(g) > 50 and "crate.eval.autointerp.cli" in g  # the source was found
    assert violations(g) == []


def test_no_module_imports_itself_through_others():
    assert cycles(graph(ROOT)) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for folder in SOURCES.values():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "__init__.py").write_text("")
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, expected", [
    # an import inside a function counts
    ({"crate/hf.py": "def f():\n    from crate.eval.steer.clamp import find\n", "eval/steer/clamp.py": ""},
     "crate.hf (core) imports crate.eval.steer.clamp"),
    ({"train/cli.py": "import crate.eval.harness as h\n", "eval/harness.py": ""},
     "crate.train.cli (crate.train) imports crate.eval.harness"),
    ({"eval/interpret.py": "from crate.train.run import train\n", "train/run.py": ""},
     "crate.eval.interpret imports crate.train.run, which is training"),
    ({"eval/autointerp/interpret.py": "from crate.eval.report import results\n", "eval/report/results.py": "",
      "eval/report/__init__.py": "", "eval/autointerp/__init__.py": ""},
     "crate.eval.autointerp.interpret imports crate.eval.report.results: crate.eval.report is imported only"),
    ({"eval/a.py": "from . import b\n", "eval/b.py": "def f():\n    from crate.eval.workflows.demo import demo\n",
      "eval/workflows/demo.py": "", "eval/workflows/__init__.py": ""},
     "crate.eval.b imports crate.eval.workflows.demo"),
])
def test_each_rule_fails_on_a_violation(tmp_path, files, expected):
    found = violations(graph(_tree(tmp_path, files)))
    assert any(v.startswith(expected) for v in found), found


def test_what_the_rules_allow(tmp_path):
    root = _tree(tmp_path, {
        "train/run.py": "from crate.model import M\n", "crate/model.py": "",
        "eval/sae/train.py": "from crate.train.data import open_split\n", "train/data.py": "",
        "eval/report/cli.py": "from crate.eval.report.results import x\n", "eval/report/results.py": "",
        "eval/workflows/demo.py": "from crate.eval.report.results import x\nfrom crate.train.run import t\n",
        "eval/sae/__init__.py": "", "eval/report/__init__.py": "", "eval/workflows/__init__.py": ""})
    assert violations(graph(root)) == []


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    root = _tree(tmp_path, {"crate/checkpoint.py": "def f():\n    from crate.hf import OURS\n",
                            "crate/hf.py": "from crate import checkpoint\n", "crate/model.py": "import crate.config\n",
                            "crate/config.py": ""})
    assert cycles(graph(root)) == [["crate.checkpoint", "crate.hf"]]
