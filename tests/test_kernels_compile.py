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


# Kernels known to miss the static decode budget, and why: the test fails if one of them starts
# meeting it (take it off the list) or if any other kernel misses it.
OVER_BUDGET = {
    "bitmap BM64 BK64": "per-element decode (shift, mask, prefix sum, gather): 240 registers and about twice the "
    "instructions per byte Hopper's HBM allows; a compact row format (MACKO-style) replaces it (issue 22)",
    "ell (dict coefficients, 10-bit indices) BS16": "0.249 warp-instructions per byte: 10-bit index unpacking "
    "per coefficient, 14% over",
    "ell (dict coefficients, 10-bit indices) BS16 int8": "0.277: the same loop over half the coefficient bytes "
    "(int8 codes, one scale per row applied after the loop); the index unpacking dominates",
}


def test_decode_kernels_meet_the_hopper_static_budget(report):
    """<= 128 registers, no spills, and a main loop that issues no more warp-instructions per
    byte it loads than an H200 SM can issue while its share of HBM bandwidth arrives
    (compile_kernels.budget): the kernel stays memory-bound. This is how kernels are judged
    between GPU runs."""
    from compress.eval.compile_kernels import budget

    for name, row in report.items():
        assert row["loop"] is not None, f"{name}: no main loop with global loads found in its SASS"
        assert budget(row)["within_budget"] == row["within_budget"], name
        if name in OVER_BUDGET:
            assert not row["within_budget"], f"{name} now meets the budget: remove it from OVER_BUDGET"
        else:
            assert row["within_budget"], f"{name} misses the decode budget: {row['over_budget']}"
    assert set(OVER_BUDGET) <= set(report), "OVER_BUDGET names a kernel that is no longer compiled"
