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
        if name.split()[0] in ("skinny_matmul", "tile_sparse", "bitmap", "int4") or "(tensor cores)" in name:
            assert row["HGMMA"] > 0, f"{name} does not issue wgmma: {row}"


def test_skinny_matmul_k_loop_is_pipelined(report):
    row = report["skinny_matmul BM64 BN16 BK128"]
    assert row["LDGSTS"] > 0 and row["shared_bytes"] >= 3 * (64 * 128 + 128 * 16) * 2, row


# Kernels known to miss the static decode budget, and why: the test fails if one of them starts
# meeting it (take it off the list) or if any other kernel misses it. The budget counts only the
# compressed weight's bytes (HBM traffic); activation loads, L2 hits, earn none.
_PAIR_TOKENS = (
    "the dequantization is shared by a program's tokens, but each adds a packed FMA per two weights, a load of its "
    "pairs and its fp16-to-fp32 sums; two tokens are within (0.17-0.19)"
)
OVER_BUDGET = {
    "bitmap BM64 BK64": "per-element decode (shift, mask, prefix sum, gather): 240 registers and 1.44 warp-instructions "
    "per weight byte at 50% sparsity, 6.6x the budget; `sparse_format: delta` (32-row slices) is the unstructured "
    "format served within it",
    **{f"gqsa g{group} N4 BM64 (4 lanes a row, PTX pairs)": f"0.27 (1.0 before the pair kernel): {_PAIR_TOKENS}" for group in (128, 16)},
    "gqsa g16 N3 BM64 (4 lanes a row, PTX pairs)": f"0.232 (g128: 0.217, within): {_PAIR_TOKENS}",
    **{
        f"gqsa g{group} N16 BM64 BN16 (tensor cores, half the groups kept{step})": "0.42-0.46 at any token count from 5 "
        "(the pair kernel's four groups of four took 1.08-1.11 at 16): tensor cores need a dense tile, so every column "
        "group of the tile's rows is dequantized, the absent ones as zeros, twice the plain-W4 kernel's 0.2 per byte when "
        "half the groups are kept; rows keep different groups, and on CUDA cores 16 tokens cost at least 8 packed FMAs "
        "per weight (0.5 per weight byte)"
        for group, step in ((128, ""), (64, ""), (32, ", 2 groups a step"), (16, ", 4 groups a step"))
    },
    "lowbit W3 g64 BM64 BN16 (tensor cores)": "0.35 (0.56 before its PTX dequantization): 16 weights a word, two per "
    "instruction (a LOP3 or two, two packed FMAs), and a PRMT a pair to put neighbouring columns in a register for the "
    "tile, over 3/8 of a byte a weight; one token goes to the CUDA-core kernel, within budget",
    "lowbit W2 g64 BM64 BN16 (tensor cores)": "0.40 (0.57): the same over a quarter of a byte a weight",
    **{
        f"lowbit W{bits} g{group} N1 BM64 (4 lanes a row, PTX pairs)": "a group's own work (its scale, zero point and offsets, "
        "the fp16 sums to fp32) over fewer bytes than at g = 64: W3 g32 0.258, W2 g32 0.232, W2 g128 0.219 (its fp16 sums "
        "go to fp32 every four words); W3 g128 and both at g = 64 are within"
        for bits, group in ((3, 32), (2, 32), (2, 128))
    },
    "2:4 N1 BM32 BN1 (CUDA cores) bf16": "0.131 integer (fp16: 0.109): bf16 values to fp32 cost integer shifts; on a GPU "
    "one token goes to the tensor-core path, whose PTX placement is within budget in both dtypes (0.124)",
    **{
        f"ell (dict coefficients, 10-bit indices) N16 BM16 BS16{kind}": "the fallback where the decode kernel's token "
        "groups would cost more (a dictionary too large to hold on chip, or more than 4·t groups of t tokens): every "
        "coefficient unpacks its index from bytes and gathers its atom's activation from L1 for each token (1.26 per "
        "weight byte, int8 1.95); on CUDA cores 16 tokens cost 16 FMAs per coefficient, over budget by construction"
        for kind in ("", " int8")
    },
}


def test_decode_kernels_meet_the_hopper_static_budget(report):
    """<= 128 registers, no spills, and a main loop that issues no more warp-instructions per
    weight byte it reads than an H200 SM can issue while its share of HBM bandwidth arrives
    (compile_kernels.budget): the kernel stays memory-bound. This is how kernels are judged
    between GPU runs."""
    from compress.eval.compile_kernels import budget

    for name, row in report.items():
        assert row["loop"] is not None, f"{name}: no main loop with global loads found in its SASS"
        assert budget(row)["within_budget"] == row["within_budget"], name
        listed = name if name in OVER_BUDGET else name.removesuffix(" bf16")  # a reason given for fp16 covers bf16
        if listed in OVER_BUDGET:
            assert not row["within_budget"], f"{name} now meets the budget: remove it from OVER_BUDGET"
        else:
            assert row["within_budget"], f"{name} misses the decode budget: {row['over_budget']}"
    assert set(OVER_BUDGET) <= set(report), "OVER_BUDGET names a kernel that is no longer compiled"
    assert any(name.endswith(" bf16") for name in report), "the bf16 builds (the default serving dtype) are not judged"
