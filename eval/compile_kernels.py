"""Compile every Triton kernel for a Hopper GPU (sm_90) on a machine without one, and report what
the compiler made of it: registers, spills (local memory), shared memory, and the instruction mix
(HGMMA = Hopper tensor-core wgmma, HMMA = older mma, LDGSTS = asynchronous copies that pipeline
the K loop, LDL/STL = spills).

    python -m compress.eval.compile_kernels --out runs/compile-kernels

Triton ships ptxas and cuobjdump, so this needs no GPU or driver: it checks that each kernel
compiles for the real backend (the interpreter enforces none of the GPU's limits) and shows the
resource usage that decides its speed before any device time is spent. Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the real backend, even under pytest's setting

SASS_OPS = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDG", "LDS", "LDL", "STL", "FFMA", "POPC")


@dataclass
class Build:
    name: str
    kernel: str  # "module:function" under compress.kernels
    signature: dict[str, str]
    constexprs: dict[str, object]
    options: dict[str, int] = field(default_factory=lambda: {"num_warps": 4, "num_stages": 4})
    # integer arguments that are multiples of 16 at these shapes (pointers always are): Triton's
    # launcher specializes on this, and without it loads cannot be vectorized or pipelined
    aligned: tuple[str, ...] = ()


def _ints(*names: str) -> dict[str, str]:
    return {n: "i32" for n in names}


def builds(dtype: str = "fp16") -> list[Build]:
    """The production configurations of every kernel at decode shapes (N <= 16)."""
    p = f"*{dtype}"
    out = []
    for block_m, block_n in ((64, 16), (64, 64)):
        out.append(Build(
            f"skinny_matmul BM{block_m} BN{block_n} BK128", "skinny_matmul:_skinny_matmul_kernel",
            {"x_ptr": p, "w_ptr": p, "b_ptr": p, "y_ptr": p, **_ints("M", "N", "K", "K_PER_SPLIT", "stride_xn", "stride_wm", "stride_yn", "stride_ys")},
            {"HAS_BIAS": False, "ACCUMULATE": False, "DOT_FP32": False, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 128},
            aligned=("M", "K", "K_PER_SPLIT", "stride_xn", "stride_wm", "stride_yn", "stride_ys"),
        ))  # fmt: skip
    for keep in (32, 16):
        out.append(Build(
            f"tile_sparse 64x64 keep{keep}", "tile_sparse_matmul:_tile_sparse_kernel",
            {"x_ptr": p, "v_ptr": p, "c_ptr": "*u8", "b_ptr": p, "y_ptr": p, **_ints("M", "N", "TILES", "TILES_PER_SPLIT", "KEEP", "stride_xn", "stride_yn", "stride_ys")},
            {"HAS_BIAS": False, "DOT_FP32": False, "TILE_COLS": 64, "BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_KEEP": keep},
            aligned=("M", "TILES", "KEEP", "stride_xn", "stride_yn", "stride_ys"),
        ))  # fmt: skip
    out.append(Build(
        "bitmap BM64 BK64", "bitmap_matmul:_bitmap_kernel",
        {"x_ptr": p, "v_ptr": p, "bm_ptr": "*u8", "off_ptr": "*i32", "b_ptr": p, "y_ptr": p,
         **_ints("M", "N", "K", "K_PER_SPLIT", "SPLITS", "BYTES_PER_ROW", "stride_xn", "stride_yn", "stride_ys")},
        {"HAS_BIAS": False, "DOT_FP32": False, "BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 64}, {"num_warps": 4, "num_stages": 3},
        aligned=("M", "K", "K_PER_SPLIT", "BYTES_PER_ROW", "stride_xn", "stride_yn", "stride_ys"),
    ))  # fmt: skip
    for group, block_m, all_groups in ((128, 16, False), (16, 64, False), (16, 64, True)):
        out.append(Build(
            f"gqsa g{group} BM{block_m}" + (" (W4, no index)" if all_groups else ""), "gqsa_matmul:_gqsa_kernel",
            {"x_ptr": p, "q_ptr": "*u8", "s_ptr": p, "z_ptr": "*u8", "g_ptr": p if all_groups else "*i16", "b_ptr": p,
             "y_ptr": p, **_ints("M", "N", "KEPT", "stride_xn", "stride_yn")},
            {"HAS_BIAS": False, "ALL_GROUPS": all_groups, "GROUP": group, "BLOCK_M": block_m, "BLOCK_N": 4},
            {"num_warps": 4}, aligned=("M", "stride_xn", "stride_yn"),
        ))  # fmt: skip
    out.append(Build(
        "int4 (W4, all groups) g128 BM64 BN16", "int4_matmul:_int4_kernel",
        {"x_ptr": p, "q_ptr": "*u8", "s_ptr": p, "z_ptr": "*u8", "b_ptr": p, "y_ptr": p,
         **_ints("M", "N", "GROUPS", "GROUPS_PER_SPLIT", "stride_xn", "stride_yn", "stride_ys")},
        {"HAS_BIAS": False, "DOT_FP32": False, "GROUP": 128, "BLOCK_M": 64, "BLOCK_N": 16},
        aligned=("M", "GROUPS", "stride_xn", "stride_yn", "stride_ys"),
    ))  # fmt: skip
    out.append(Build(
        "ell (dict coefficients, 10-bit indices) BS16", "ell_matmul:_ell_kernel",
        {"h_ptr": p, "v_ptr": p, "i_ptr": "*u8", "b_ptr": p, "y_ptr": p,
         **_ints("M", "N", "S", "ROW_BYTES", "stride_hn", "stride_yn")},
        {"HAS_BIAS": False, "BITS": 10, "BLOCK_M": 64, "BLOCK_N": 4, "BLOCK_S": 16}, {"num_warps": 4},
        aligned=("M", "S", "stride_hn", "stride_yn"),
    ))  # fmt: skip
    return out


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_one(build: Build, arch: int = 90) -> dict[str, object]:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, fn_name = build.kernel.split(":")
    fn = getattr(importlib.import_module(f"compress.kernels.{module_name}"), fn_name)
    signature = {**build.signature, **{k: "constexpr" for k in build.constexprs}}
    aligned = [n for n, t in build.signature.items() if t.startswith("*")] + list(build.aligned)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(fn=fn, signature=signature, constexprs=build.constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=build.options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", cubin.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    ops = collections.Counter(re.findall(r"\b(" + "|".join(SASS_OPS) + r")\b", sass))
    return {
        "kernel": build.name,
        "registers": int(fields.get("REG", -1)),
        "local_bytes": int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0)),
        "shared_bytes": compiled.metadata.shared,
        **{op: ops.get(op, 0) for op in SASS_OPS},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/compile-kernels")
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    rows = [compile_one(b, args.arch) for b in builds()]
    header = ["kernel", "registers", "local_bytes", "shared_bytes", *SASS_OPS]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"arch": f"sm_{args.arch}", "rows": rows}, indent=2))
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
