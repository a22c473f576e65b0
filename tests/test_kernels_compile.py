"""Every Triton kernel compiles for Hopper (sm_90) with its production tile sizes, without a GPU:
the interpreter enforces none of the GPU's limits, the real compiler does. Also checks what makes
the kernels fast: tensor-core instructions where a tile allows tl.dot, a pipelined K loop for the
dense skinny GEMM, and no register spills."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (TOOLS / "cuobjdump").exists(), reason="triton's NVIDIA toolchain is not installed")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Compiled in a fresh process: this one imported triton in interpreter mode (conftest)."""
    out = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "compress.eval.compile_kernels", "--out", str(out)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return {row["kernel"]: row for row in json.loads((out / "results.json").read_text())["rows"]}


def test_every_kernel_compiles_for_sm90_without_spills(report):
    for name, row in report.items():
        assert row["local_bytes"] == 0 and row["LDL"] == 0, f"{name} spills registers: {row}"
        assert row["registers"] <= 255, name


def test_dot_kernels_use_hopper_tensor_cores(report):
    for name, row in report.items():
        if name.split()[0] in ("skinny_matmul", "tile_sparse", "bitmap", "int4"):
            assert row["HGMMA"] > 0, f"{name} does not issue wgmma: {row}"


def test_skinny_matmul_k_loop_is_pipelined(report):
    row = report["skinny_matmul BM64 BN16 BK128"]
    assert row["LDGSTS"] > 0 and row["shared_bytes"] >= 3 * (64 * 128 + 128 * 16) * 2, row
