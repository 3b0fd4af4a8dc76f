"""The fused ISTA kernels compile for real GPUs, checked offline (no GPU, no interpreter).

The interpreter tests check the kernels' arithmetic; these check what only a GPU compile shows:
every launch of a forward and backward lowers to a cubin for sm_80 and sm_90, with a software-
pipelined K loop, tensor-core matmuls and shared memory that fits. Each case compiles in a fresh
process (Triton fixes interpreted or compiled mode at import) with an empty Triton cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import json, sys, torch
from crate.kernels import ista_aot
dtype, arch, config, steps, learnable, only = sys.argv[1:]
for launch in ista_aot.launches(int(steps), getattr(torch, dtype), scalar_grads=learnable == "1"):
    if only and launch.name != only:
        continue
    b = ista_aot.compile_launch(launch, ista_aot.CONFIGS[int(config)], arch)
    print(json.dumps(dict(kernel=launch.name, flags=launch.flags, shared=b.shared_bytes, fits=b.fits,
                          pipelined=b.pipelined, tensor_cores=b.tensor_cores, cubin=b.cubin_bytes)))
"""


def compile_all(tmp_path: Path, dtype: str, arch: str, config: int, steps: int, learnable: bool,
                only: str = "") -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    argv = [dtype, arch, str(config), str(steps), str(int(learnable)), only]
    out = subprocess.run([sys.executable, "-c", SCRIPT, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.parametrize(
    "dtype, arch, config, steps, learnable",
    [
        ("bfloat16", "sm90", 0, 2, False),  # the paper's path on an H100, the largest tile
        ("float16", "sm80", -1, 3, True),  # every other kernel variant on an A100, the smallest tile
    ],
)
def test_every_launch_compiles_pipelined_on_tensor_cores(
    tmp_path: Path, dtype: str, arch: str, config: int, steps: int, learnable: bool
) -> None:
    builds = compile_all(tmp_path, dtype, arch, config, steps, learnable)
    assert {b["kernel"] for b in builds} == {"encode", "decode", "code_grad", "weight_grad"}
    # 2 steps: 2 encodes, 3 decodes, 1 code_grad, 1 weight_grad; 3 steps with learnable eta/lambda adds
    # the accumulating weight_grad and the code_grad of a middle step.
    assert len(builds) == {2: 7, 3: 10}[steps]
    if steps == 3:
        assert {b["flags"]["ACCUMULATE"] for b in builds if b["kernel"] == "weight_grad"} == {True, False}
        assert {b["flags"]["FIRST_STEP"] for b in builds if b["kernel"] == "code_grad"} == {True, False}
    for b in builds:
        assert b["cubin"] > 0, b
        assert b["fits"], f"shared memory {b['shared']} B exceeds {arch}'s limit: {b}"
        assert b["pipelined"], f"the K loop is not software-pipelined: {b}"
        assert b["tensor_cores"], f"the matmuls do not use tensor cores: {b}"


def test_fp32_weight_gradient_has_a_tile_that_fits(tmp_path: Path) -> None:
    """The dictionary gradient streams six operands: in fp32 only the smallest tile fits an A100's shared memory."""
    builds = compile_all(tmp_path, "float32", "sm80", -1, 2, False, only="weight_grad")
    assert builds and all(b["fits"] and b["pipelined"] for b in builds), builds
    assert not any(b["tensor_cores"] for b in builds)  # fp32 at 'highest' precision: exact FMA, no TF32
