"""benchmarks/gpu_check.py: the dry run checks every part on CPU, and a failing or hanging part stops no other."""

from __future__ import annotations

import csv
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (registered: dataclasses look their module up by name)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gc():
    yield load_benchmark("gpu_check")
    del sys.modules["gpu_check"]


def cuda_skipped_tests() -> set[str]:
    """Test ids that skip without CUDA, read from the test sources independently of gpu_check: functions under a
    `skipif(not ...CUDA...)` decorator, or a named marker defined so (a skip *with* CUDA is a CPU-only test)."""
    without_cuda = r"pytest\.mark\.skipif\(\s*not\b[^\n]*cuda"
    ids = set()
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        src = path.read_text()
        markers = set(re.findall(r"^(\w+)\s*=\s*" + without_cuda, src, re.M | re.I))
        pending = False
        for line in src.splitlines():
            deco = re.match(r"@(pytest\.mark\.skipif\(.*|\w+)", line)
            name = deco.group(1) if deco else ""
            if re.match(without_cuda, name, re.I) if name.startswith("pytest.") else name in markers:
                pending = True
            elif (m := re.match(r"def (test_\w+)", line)) and pending:
                ids.add(f"tests/{path.name}::{m.group(1)}")
                pending = False
            elif line.startswith("def "):
                pending = False
    return ids


def test_cuda_test_list_is_every_test_that_skips_without_cuda(gc) -> None:
    assert set(gc.CUDA_TESTS) == cuda_skipped_tests()


def test_dry_run_lists_and_checks_every_part(gc) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    total = sum(p.budget_s for p in gc.PARTS)
    assert total <= 420  # well under the 8 minutes, leaving room for start-up and the kill grace
    assert lines[0].startswith(f"plan: {len(gc.PARTS)} parts, budgets {total:.0f} s in all")
    for p in gc.PARTS:
        assert any(re.match(rf"  {re.escape(p.name)}\s+{p.budget_s:.0f} s  ", line) for line in lines), p.name
        assert any(line.startswith(f"check {p.name}: ok (") for line in lines), p.name
    assert lines[-1] == f"dry run: {len(gc.PARTS)} of {len(gc.PARTS)} parts checked OK"


def test_dry_run_names_a_part_whose_arguments_are_refused(gc, capsys) -> None:
    bad = gc.Part("bad-args", "a benchmark given an option it lacks",
                  ("benchmarks/train_throughput.py", "--no-such-option"), 1, lambda out: [], (gc.check_parses,))
    good = next(p for p in gc.PARTS if p.name == "train-gpt-B-eager")
    assert gc.dry_run([bad, good], Path("/tmp/unused")) == 1
    out = capsys.readouterr().out
    assert "check bad-args: FAILED (its parser refused the arguments: " in out and "--no-such-option" in out
    assert "check train-gpt-B-eager: ok (" in out
    assert out.splitlines()[-1] == "dry run: 1 of 2 parts checked OK; failed: bad-args"


def test_a_failing_and_a_hanging_part_stop_no_other(gc, tmp_path: Path) -> None:
    def answer(out: Path) -> list:
        return [gc.Metric("answer", float((out / "third.txt").read_text()), "units")]

    parts = [
        gc.Part("fails", "exits 3", ("-c", "import sys; print('boom'); sys.exit(3)"), 1, lambda out: [],
                needs_cuda=False),
        gc.Part("hangs", "sleeps past its budget", ("-c", "import time; print('started', flush=True); time.sleep(60)"),
                1, lambda out: [], needs_cuda=False),
        gc.Part("gpu-only", "never started without CUDA", ("-c", "raise SystemExit(5)"), 1, lambda out: []),
        gc.Part("skips", "skips itself", ("-c", f"print('skipped: no widget'); raise SystemExit({gc.SKIP_RC})"), 1,
                lambda out: [], needs_cuda=False),
        gc.Part("third", "runs after them", ("-c", "open('{out}/third.txt', 'w').write('42')"), 1, answer,
                needs_cuda=False),
        gc.Part("stale", "writes nothing: an earlier run's output must not count", ("-c", "pass"), 1,
                lambda out: [gc.Metric("x", float((out / "stale.txt").read_text()))], needs_cuda=False,
                outputs=("stale.txt",)),
    ]
    (tmp_path / "stale.txt").write_text("41")
    env = gc.Env(cuda=False, gpu="Fake GPU 80GB", driver="1.2", cuda_version="9.9", torch="0.0", triton="0.1")
    rc = gc.run_parts(parts, tmp_path, env, "python benchmarks/gpu_check.py --out X")
    assert rc == 1
    with (tmp_path / "gpu_check.csv").open() as f:
        rows = {r["part"]: r for r in csv.DictReader(f)}
    statuses = [rows[n]["status"] for n in ("fails", "hangs", "gpu-only", "third")]
    assert statuses == ["failed", "timed out", "skipped", "ok"]
    assert rows["fails"]["note"] == "rc 3: boom"
    assert rows["hangs"]["note"] == "killed after its 1 s budget; last output: started"
    assert float(rows["hangs"]["seconds"]) < 60  # killed, not waited for
    assert rows["gpu-only"]["note"] == "no CUDA"
    assert (rows["skips"]["status"], rows["skips"]["note"]) == ("skipped", "no widget")
    assert (rows["third"]["metric"], rows["third"]["value"], rows["third"]["unit"]) == ("answer", "42", "units")
    assert rows["stale"]["status"] == "failed" and "FileNotFoundError" in rows["stale"]["note"]
    assert (tmp_path / "hangs.log").read_text().splitlines()[1] == "started"
    md = (tmp_path / "RESULTS-section.md").read_text()
    assert md.startswith("## GPU check, ") and "Fake GPU 80GB" in md.splitlines()[0]
    assert "Driver 1.2, CUDA 9.9, torch 0.0, triton 0.1" in md and "    python benchmarks/gpu_check.py --out X" in md
    assert "| fails | failed (rc 3) |" in md and "| hangs | timed out |" in md and "| gpu-only | skipped | 0 |" in md
    assert "| third | ok | " in md and "| answer | 42 | units |" in md
    assert "1 ok, 2 failed, 1 timed out, 2 skipped" in md


def test_a_part_that_exits_0_without_its_output_fails(gc, tmp_path: Path) -> None:
    part = next(p for p in gc.PARTS if p.name == "fsdp-tiny")
    (tmp_path / "fsdp-tiny.log").write_text("done\n")
    r = gc.judge(part, tmp_path, 0, 1.0, tmp_path / "fsdp-tiny.log")
    assert r.status == "failed" and r.note.startswith("no final/ model: ") and "model.safetensors" in r.note


def test_selecting_parts(gc) -> None:
    def error(msg: str) -> None:
        raise ValueError(msg)

    chosen = gc.select(gc.PARTS, "fsdp-tiny,llm-4bit", None, 2.0, error)
    assert [(p.name, p.budget_s) for p in chosen] == [("fsdp-tiny", 80), ("llm-4bit", 40)]
    assert "cuda-tests" not in [p.name for p in gc.select(gc.PARTS, None, "cuda-tests", 1.0, error)]
    with pytest.raises(ValueError, match=r"unknown part\(s\) fsdp; the parts are: cuda-tests, ista-kernels"):
        gc.select(gc.PARTS, "fsdp", None, 1.0, error)


def test_a_rerun_of_one_part_keeps_the_others_rows(gc, tmp_path: Path) -> None:
    def seven(out: Path) -> list:
        return [gc.Metric("seven", 7.0, "s")]

    a = gc.Part("a", "ok with a number", ("-c", "pass"), 5, seven, needs_cuda=False)
    b = gc.Part("b", "fails, then is fixed", ("-c", "raise SystemExit(2)"), 5, lambda out: [], needs_cuda=False)
    env = gc.Env(cuda=False, gpu="Fake GPU")
    assert gc.run_parts([a, b], tmp_path, env, "first", known=[a, b]) == 1
    fixed = gc.dataclasses.replace(b, args=("-c", "pass"))
    assert gc.run_parts([fixed], tmp_path, env, "python benchmarks/gpu_check.py --only b", known=[a, b]) == 0
    with (tmp_path / "gpu_check.csv").open() as f:
        rows = [(r["part"], r["status"], r["metric"], r["value"]) for r in csv.DictReader(f)]
    assert rows == [("a", "ok", "seven", "7"), ("b", "ok", "", "")]
    md = (tmp_path / "RESULTS-section.md").read_text()
    assert "| a | ok | " in md and "| seven | 7 | s |" in md and "| b | ok | " in md
    assert "this command did not rerun them): a." in md and "--only b" in md


def test_ista_numbers_are_the_targets_ratios(gc, tmp_path: Path) -> None:
    """Rows as benchmarks/ista_kernels.py writes them (its Row fields), at the target shape; ratios by hand."""
    fields = [f.name for f in gc.dataclasses.fields(load_benchmark("ista_kernels").Row)]
    del sys.modules["ista_kernels"]
    times = {"triton": 2.2, "triton-recompute": 2.5, "eager": 4.4, "compile": 3.3, "gemm floor": 2.0}
    saved = {"triton": 120.0, "triton-recompute": 124.5, "eager": 249.0, "compile": 249.0, "gemm floor": None}
    with (tmp_path / "ista-kernels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for impl, ms in times.items():
            w.writerow({**dict.fromkeys(fields, 1.0), "d": 768, "h": 3072, "tokens": 16384, "impl": impl,
                        "fwd_bwd_ms": ms, "saved_mb": saved[impl]})
    got = {m.name: m.value for m in gc.collect_ista(tmp_path)}
    assert got["fwd+bwd eager d=768 T=16384"] == 4.4
    assert got["triton x GEMM floor (target <= 1.15)"] == pytest.approx(1.1)
    assert got["triton-recompute x GEMM floor"] == pytest.approx(1.25)
    assert got["speed-up vs eager (target >= 1.5)"] == pytest.approx(2.0)
    assert got["speed-up vs torch.compile (target >= 1.1)"] == pytest.approx(1.5)
    assert got["saved MB recompute / eager, all saved tensors"] == pytest.approx(0.5)
