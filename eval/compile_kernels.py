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
    # bytes of the compressed weight (values, codes, indices, masks, scales) one CTA reads per pass
    # of its main loop: what comes from HBM. The loop's other loads (activations, reused by every
    # CTA and held in L2) are not HBM traffic, so they do not earn instruction budget.
    weight_bytes: float = 0.0


def _ints(*names: str) -> dict[str, str]:
    return {n: "i32" for n in names}


def builds(dtype: str = "fp16") -> list[Build]:
    """The production configurations of every kernel at decode shapes (N <= 16), for fp16 or bf16
    activations (bf16 names end in " bf16": the kernels' bf16 code differs where they dequantize)."""
    p = f"*{dtype}"
    out = []
    for block_m, block_n in ((64, 16), (64, 64)):
        out.append(Build(
            f"skinny_matmul BM{block_m} BN{block_n} BK128", "skinny_matmul:_skinny_matmul_kernel",
            {"x_ptr": p, "w_ptr": p, "b_ptr": p, "y_ptr": p, **_ints("M", "N", "K", "K_PER_SPLIT", "stride_xn", "stride_wm", "stride_yn", "stride_ys")},
            {"HAS_BIAS": False, "ACCUMULATE": False, "DOT_FP32": False, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 128},
            aligned=("M", "K", "K_PER_SPLIT", "stride_xn", "stride_wm", "stride_yn", "stride_ys"), weight_bytes=block_m * 128 * 2,
        ))  # fmt: skip
    for keep in (32, 16):
        out.append(Build(
            f"tile_sparse 64x64 keep{keep}", "tile_sparse_matmul:_tile_sparse_kernel",
            {"x_ptr": p, "v_ptr": p, "c_ptr": "*u8", "b_ptr": p, "y_ptr": p, **_ints("M", "N", "TILES", "TILES_PER_SPLIT", "KEEP", "stride_xn", "stride_yn", "stride_ys")},
            {"HAS_BIAS": False, "DOT_FP32": False, "TILE_COLS": 64, "BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_KEEP": keep},
            aligned=("M", "TILES", "KEEP", "stride_xn", "stride_yn", "stride_ys"), weight_bytes=64 * keep * 2 + keep,
        ))  # fmt: skip
    out.append(Build(
        "bitmap BM64 BK64", "bitmap_matmul:_bitmap_kernel",
        {"x_ptr": p, "v_ptr": p, "bm_ptr": "*u8", "off_ptr": "*i32", "b_ptr": p, "y_ptr": p,
         **_ints("M", "N", "K", "K_PER_SPLIT", "SPLITS", "BYTES_PER_ROW", "stride_xn", "stride_yn", "stride_ys")},
        {"HAS_BIAS": False, "DOT_FP32": False, "BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 64}, {"num_warps": 4, "num_stages": 3},
        aligned=("M", "K", "K_PER_SPLIT", "BYTES_PER_ROW", "stride_xn", "stride_yn", "stride_ys"),
        weight_bytes=64 * 64 * (0.5 * 2 + 1 / 8),  # at 50% sparsity: half the values, one bit per weight
    ))  # fmt: skip
    from compress.kernels.delta_matmul import CHUNK, MARK_CHUNKS, SLICE_ROWS, delta_tiles

    for tokens in (1, 4):
        block_n, block_m = delta_tiles(tokens)
        # one token reads its activations in the layer's dtype, more from a token-major fp32 copy
        out.append(Build(
            f"delta rows N{tokens} BM{block_m} (32-row slices)", "delta_matmul:_delta_kernel",
            {"x_ptr": p if tokens == 1 else "*fp32", "v_ptr": p, "w_ptr": "*i32", "ss_ptr": "*i32", "mk_ptr": "*i32", "b_ptr": p, "y_ptr": p,
             **_ints("M", "N", "MARKS", "CHUNKS_PER_SPLIT", "stride_yn", "stride_ys"),
             **({"stride_xn": "i32", "stride_xk": "constexpr"} if tokens == 1 else {"stride_xn": "constexpr", "stride_xk": "i32"})},
            {"HAS_BIAS": False, "SLICE": SLICE_ROWS, "MARK": MARK_CHUNKS, "BLOCK_M": block_m, "BLOCK_N": block_n,
             **({"stride_xk": 1} if tokens == 1 else {"stride_xn": 1})},
            {"num_warps": 4}, aligned=("M", "CHUNKS_PER_SPLIT", "stride_yn", "stride_ys", "stride_xn" if tokens == 1 else "stride_xk"),
            weight_bytes=block_m * 2 * CHUNK * 2.5,  # a pass: two chunks of 8 entries a row, value + 4-bit code
        ))  # fmt: skip
    from compress.kernels.nm_matmul import DOT_STAGES, FMA_CHUNK, fma_tiles

    for tokens in (1,):  # FMA_MAX_TOKENS: more go to tensor cores (2 tokens: 0.259, 4: 0.372 per weight byte)
        block_n, block_m = fma_tiles(tokens)
        out.append(Build(
            f"2:4 N{tokens} BM{block_m} BN{block_n} (CUDA cores)", "nm_matmul:_nm24_fma_kernel",
            {"x_ptr": p, "v_ptr": p, "bm_ptr": "*u8", "b_ptr": p, "y_ptr": p, **_ints("M", "N", "K", "BYTES_PER_ROW", "stride_xn", "stride_yn")},
            {"HAS_BIAS": False, "CHUNK": FMA_CHUNK, "BLOCK_M": block_m, "BLOCK_N": block_n}, {"num_warps": 4},
            aligned=("M", "K", "BYTES_PER_ROW", "stride_xn", "stride_yn"), weight_bytes=block_m * FMA_CHUNK * (0.5 * 2 + 1 / 8),
        ))  # fmt: skip
    out.append(Build(
        "2:4 BM64 BN16 BK64 (tensor cores)", "nm_matmul:_nm24_dot_kernel",
        {"x_ptr": p, "v_ptr": "*i32", "bm_ptr": "*u8", "sel_ptr": "*i32", "b_ptr": p, "y_ptr": p,
         **_ints("M", "N", "K", "K_PER_SPLIT", "BYTES_PER_ROW", "stride_xn", "stride_yn", "stride_ys")},
        {"HAS_BIAS": False, "DOT_FP32": False, "PTX": True, "BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 64}, {"num_warps": 4, "num_stages": DOT_STAGES},
        aligned=("M", "K", "K_PER_SPLIT", "BYTES_PER_ROW", "stride_xn", "stride_yn", "stride_ys"),
        weight_bytes=64 * 64 * (0.5 * 2 + 1 / 8),
    ))  # fmt: skip
    from compress.kernels.gqsa_matmul import PAIR_GROUP_TOKENS
    from compress.kernels.pairs import LANES as GQSA_LANES, token_groups

    for group, all_groups, tokens in ((128, False, 1), (16, False, 1), (128, True, 1), (64, True, 1), (32, True, 1), (128, False, 2),
                                      (16, False, 2), (128, False, 3), (16, False, 3), (128, False, 4), (16, False, 4)):  # fmt: skip
        # the activations as prepared fp16 pairs (int32), four lanes a row, one kept group each a pass; every group
        # kept (plain W4, no index): what int4_matmul sends one token to. From DOT_MIN_TOKENS tokens the tensor-core
        # kernel below serves (groups of 8, or indices that do not ascend: token groups of up to four here)
        per_group, groups = token_groups(tokens, PAIR_GROUP_TOKENS)
        out.append(Build(
            f"gqsa g{group} N{tokens} BM64 ({'W4, no index; ' if all_groups else ''}{GQSA_LANES} lanes a row, PTX pairs"
            + (f", {groups} groups of {per_group} tokens" if groups > 1 else "") + ")",
            "gqsa_matmul:_gqsa_gemv_kernel",
            {"x_ptr": "*i32", "q_ptr": "*i32", "s_ptr": p, "z_ptr": "*u8", "g_ptr": p if all_groups else "*i16", "b_ptr": p, "y_ptr": p,
             "amax_ptr": "*fp32", **_ints("M", "N", "KEPT", "KEPT_PER_SPLIT", "stride_ys", "stride_xt", "stride_yt")},
            {"HAS_BIAS": False, "ALL_GROUPS": all_groups, "PTX": True, "GROUP": group, "BLOCK_M": 64, "LANES": GQSA_LANES, "TOKENS": per_group,
             "GROUPED": groups > 1},
            {"num_warps": 4}, aligned=("M", "KEPT", "KEPT_PER_SPLIT", "stride_ys", "stride_xt", "stride_yt"),
            weight_bytes=64 * GQSA_LANES * (group // 2 + 2 + 1 + (0 if all_groups else 2)) / groups,  # codes, scale, zero, group index
        ))  # fmt: skip
    from compress.kernels.int4_matmul import step_groups

    def w4_dot(name: str, kernel: str, group: int, sparse: bool, label: str | None = None) -> Build:
        """W4 on tensor cores, every group (`_int4_kernel`) or a group-sparse row's kept ones found
        on the way (`_gqsa_dot_kernel`, judged at half the groups kept, GQSA W4S50)."""
        step = step_groups(group, 256)
        extra = {"g_ptr": "*i16", "bits_ptr": "*i32", **_ints("KEPT", "BIT_WORDS")} if sparse else {}
        notes = ([label] if label else []) + ([f"{step} groups a step"] if step > 1 else [])
        return Build(
            name + (f" ({', '.join(notes)})" if notes else ""),
            kernel,
            {"x_ptr": p, "w_ptr": "*i32", "s_ptr": "*i16", "z_ptr": "*u8", "b_ptr": p, "y_ptr": p,
             **_ints("M", "N", "GROUPS", "GROUPS_PER_SPLIT", "stride_xn", "stride_yn", "stride_ys"), **extra},
            {"HAS_BIAS": False, "PTX": True, "DOT_FP32": False, "GROUP": group, "STEP_GROUPS": step, "BLOCK_M": 64, "BLOCK_N": 16,
             **({"SEARCH": 8} if sparse else {})},
            {"num_warps": 4, "num_stages": 1},
            aligned=("M", "GROUPS", "GROUPS_PER_SPLIT", "stride_xn", "stride_yn", "stride_ys") + (("KEPT",) if sparse else ()),
            # codes, scale, zero (and the group index of the kept half)
            weight_bytes=64 * step * (0.5 * (group // 2 + 2 + 1 + 2) if sparse else group // 2 + 2 + 1),
        )  # fmt: skip

    # five tokens and more of group-sparse W4: tensor cores over every column group of a row tile, zeros where a row kept none
    half_kept = "tensor cores, half the groups kept"
    out += [w4_dot(f"gqsa g{group} N16 BM64 BN16", "gqsa_matmul:_gqsa_dot_kernel", group, True, half_kept) for group in (128, 64, 32, 16)]
    out += [w4_dot(f"int4 (W4, all groups) g{group} BM64 BN16", "int4_matmul:_int4_kernel", group, False) for group in (128, 64, 32, 16)]
    from compress.kernels.int8_matmul import int8_chunk, int8_tiles

    for group in (64, 128):
        out.append(Build(
            f"int8 g{group} BM64 BN16 (tensor cores)", "int8_matmul:_int8_dot_kernel",
            {"x_ptr": p, "q_ptr": "*i32", "s_ptr": "*i16", "z_ptr": "*u8", "b_ptr": p, "y_ptr": p,
             **_ints("M", "N", "GROUPS", "GROUPS_PER_SPLIT", "stride_xn", "stride_yn", "stride_ys")},
            {"HAS_BIAS": False, "DOT_FP32": False, "GROUP": group, "BLOCK_M": 64, "BLOCK_N": 16, "PTX": True}, {"num_warps": 4, "num_stages": 1},
            aligned=("M", "GROUPS", "stride_xn", "stride_yn", "stride_ys"), weight_bytes=64 * (group + 3),
        ))  # fmt: skip
    for group, tokens in ((64, 1),):  # FMA_MAX_TOKENS: more go to tensor cores (4 tokens: 0.39 per weight byte)
        chunk = int8_chunk(group)
        block_n, block_m = int8_tiles(tokens, chunk)
        out.append(Build(
            f"int8 g{group} N{tokens} BM{block_m} BN{block_n}", "int8_matmul:_int8_kernel",
            {"x_ptr": p, "q_ptr": "*u8", "s_ptr": p, "z_ptr": "*u8", "b_ptr": p, "y_ptr": p,
             **_ints("M", "N", "K", "stride_xn", "stride_yn")},
            {"HAS_BIAS": False, "GROUP": group, "CHUNK": chunk, "BLOCK_M": block_m, "BLOCK_N": block_n},
            {"num_warps": 4}, aligned=("M", "K", "stride_xn", "stride_yn"), weight_bytes=block_m * chunk * (1 + 3 / group),
        ))  # fmt: skip
    from compress.kernels.pairs import LANES

    for bits in (3, 2):
        group = 64
        out.append(Build(
            f"lowbit W{bits} g{group} BM64 BN16 (tensor cores)", "lowbit_matmul:_lowbit_dot_kernel",
            {"x_ptr": p, "q_ptr": "*i32", "s_ptr": "*i16", "z_ptr": "*u8", "b_ptr": p, "y_ptr": p,
             **_ints("M", "N", "GROUPS", "GROUPS_PER_SPLIT", "stride_xn", "stride_yn", "stride_ys")},
            {"HAS_BIAS": False, "DOT_FP32": False, "GROUP": group, "BLOCK_M": 64, "BLOCK_N": 16, "BITS": bits, "PTX": True},
            {"num_warps": 4, "num_stages": 1},
            aligned=("M", "GROUPS", "stride_xn", "stride_yn", "stride_ys"), weight_bytes=64 * (group * bits / 8 + 3),
        ))  # fmt: skip
    for bits, group, tokens in ((3, 64, 1), (2, 64, 1), (3, 128, 1), (2, 128, 1), (3, 32, 1), (2, 32, 1)):
        # the activations as prepared fp16 pairs (int32), four lanes a row, one group each a pass (one token: from two
        # the tensor-core kernel above costs less than this one once a token)
        out.append(Build(
            f"lowbit W{bits} g{group} N{tokens} BM64 ({LANES} lanes a row, PTX pairs" + (f", {tokens} programs of one token" if tokens > 1 else "") + ")",
            "lowbit_matmul:_lowbit_gemv_kernel",
            {"x_ptr": "*i32", "q_ptr": "*i32", "s_ptr": p, "z_ptr": "*u8", "g_ptr": p, "b_ptr": p, "y_ptr": p, "amax_ptr": "*fp32",
             **_ints("M", "N", "GROUPS", "GROUPS_PER_SPLIT", "stride_ys", "stride_xt", "stride_yt")},
            {"HAS_BIAS": False, "PTX": True, "BITS": bits, "GROUP": group, "BLOCK_M": 64, "LANES": LANES, "TOKENS": 1, "GROUPED": tokens > 1},
            {"num_warps": 4}, aligned=("M", "GROUPS", "GROUPS_PER_SPLIT", "stride_ys", "stride_xt", "stride_yt"),
            weight_bytes=64 * LANES * (group * bits / 8 + 3) / tokens,
        ))  # fmt: skip
    from compress.kernels.ell_matmul import LANES as ELL_LANES, ell_tiles, gemv_tiles, gemv_warps

    # dictionary coefficients at decode: h (k atoms) held whole in fp32 and gathered on chip; k as
    # large as the kernel holds for the token count (4 warps up to 16 KB of h, 8 up to 32 KB)
    for bits, tokens, atoms, scaled in ((10, 1, 4096, False), (10, 1, 8192, False), (10, 2, 4096, False), (10, 4, 2048, False),
                                        (11, 1, 8192, False), (11, 4, 2048, False), (10, 1, 8192, True), (10, 4, 2048, True)):  # fmt: skip
        warps = gemv_warps(tokens, atoms)
        chunk, block_m = gemv_tiles(bits, warps)
        out.append(Build(
            f"ell (dict coefficients, {bits}-bit indices) N{tokens} k{atoms} BM{block_m} ({ELL_LANES} lanes a row, h gathered on chip)"
            + (" int8" if scaled else ""), "ell_matmul:_ell_gemv_kernel",
            {"h_ptr": p, "v_ptr": "*i8" if scaled else p, "w_ptr": "*i32", "sc_ptr": p, "b_ptr": p, "y_ptr": p,
             **_ints("M", "N", "S", "K", "ROW_WORDS", "S_PER_SPLIT", "stride_hn", "stride_yn", "stride_ys")},
            {"HAS_BIAS": False, "SCALED": scaled, "BITS": bits, "TOKENS": tokens, "BLOCK_M": block_m, "LANES": ELL_LANES,
             "CHUNK": chunk, "K_BLOCK": atoms, "S_ALIGN": 16 if scaled else 8}, {"num_warps": warps},
            # s: a multiple of 8 (16 for int8 coefficients), what the dictionary compressors choose
            aligned=("M", "S_PER_SPLIT", "stride_hn", "stride_yn", "stride_ys"),
            weight_bytes=block_m * ELL_LANES * chunk * ((1 if scaled else 2) + bits / 8),
        ))  # fmt: skip
    for scaled in (False, True):  # more tokens, or a dictionary too large to hold: gathered from L1
        block_n, block_s, block_m = ell_tiles(16, 64)
        out.append(Build(
            f"ell (dict coefficients, 10-bit indices) N16 BM{block_m} BS{block_s}" + (" int8" if scaled else ""), "ell_matmul:_ell_kernel",
            {"h_ptr": p, "v_ptr": "*i8" if scaled else p, "i_ptr": "*u8", "sc_ptr": p, "b_ptr": p, "y_ptr": p,
             **_ints("M", "N", "S", "ROW_BYTES", "stride_hn", "stride_yn")},
            {"HAS_BIAS": False, "SCALED": scaled, "BITS": 10, "TWO_BYTES": True, "BLOCK_M": block_m, "BLOCK_N": block_n,
             "BLOCK_S": block_s}, {"num_warps": 4},
            aligned=("M", "S", "stride_hn", "stride_yn"), weight_bytes=block_m * block_s * ((1 if scaled else 2) + 10 / 8),
        ))  # fmt: skip
    if dtype != "fp16":  # the same configurations for another activation dtype, named apart
        for build in out:
            build.name += f" {dtype}"
    return out


# Hopper budget (H200 SXM): HBM 4.8 TB/s shared by 132 SMs at ~1.98 GHz is ~18.4 bytes per SM
# per clock; an SM issues at most 4 warp-instructions per clock (one per scheduler), and its
# integer pipes take about half of those (64 INT32 lanes). A decode kernel streams its weight
# bytes once, so it stays memory-bound only while its main loop issues at most
# 4 / 18.4 = 0.22 warp-instructions (0.11 integer ones) per weight byte it reads from HBM.
# Activation loads cost instructions (counted) but not HBM bytes (they hit L2), so they earn no
# budget: per pass, bytes = the build's declared `weight_bytes`, not every byte loaded.
HOPPER = {"sms": 132, "clock_ghz": 1.98, "hbm_tb_s": 4.8, "issue_per_clk": 4.0, "int_issue_per_clk": 2.0,
          "registers_per_sm": 65536, "max_warps_per_sm": 64, "max_ctas_per_sm": 32, "shared_per_sm": 228 * 1024}  # fmt: skip
BYTES_PER_CLK_PER_SM = HOPPER["hbm_tb_s"] * 1e12 / HOPPER["sms"] / (HOPPER["clock_ghz"] * 1e9)
ISSUE_PER_BYTE_BUDGET = HOPPER["issue_per_clk"] / BYTES_PER_CLK_PER_SM
INT_PER_BYTE_BUDGET = HOPPER["int_issue_per_clk"] / BYTES_PER_CLK_PER_SM
MAX_DECODE_REGISTERS = 128  # 4 warps x 128 registers: 4 CTAs per SM, enough loads in flight

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_INT_OPS = ("IMAD", "IADD3", "IADD", "LOP3", "SHF", "ISETP", "LEA", "SEL", "POPC", "PRMT", "IABS", "IMNMX", "BFE",
            "BFI", "FLO", "SGXT", "I2F", "F2I", "IMUL", "ISCADD", "VIADD", "BREV", "LOP", "SHL", "SHR", "IDP")  # fmt: skip
_FP_OPS = ("FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "HFMA2", "HADD2", "HMUL2", "F2F", "F2FP", "FSEL", "MUFU", "DFMA", "DADD", "DMUL")


def _load_width(op: str) -> int:
    """Bytes per thread of a global load (LDG, LDGSTS) from its SASS modifiers."""
    mods = op.split(".")[1:]
    if "128" in mods:
        return 16
    if "64" in mods:
        return 8
    if "U16" in mods or "S16" in mods:
        return 2
    if "U8" in mods or "S8" in mods:
        return 1
    return 4


def main_loop(sass: str) -> dict[str, float] | None:
    """The loop (a backward branch's body) that loads the most global bytes, as counts per pass:
    instructions, integer and floating-point ones, tensor-core ones, and bytes loaded per thread."""
    instrs = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _SASS_LINE.finditer(sass)]
    loops = []
    for address, op, args in instrs:
        if op.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", args)
            if target and int(target.group(1), 16) < address:
                loops.append((int(target.group(1), 16), address))
    best = None
    for start, end in loops:
        body = [op for address, op, _ in instrs if start <= address <= end]
        loads = [op for op in body if op.startswith(("LDG", "LDGSTS"))]
        stats = {
            "instructions": len(body),
            "int": sum(op.split(".")[0] in _INT_OPS for op in body),
            "fp": sum(op.split(".")[0] in _FP_OPS for op in body),
            "tensor": sum(op.startswith(("HGMMA", "HMMA")) for op in body),
            "loads": len(loads),
            "bytes_per_thread": sum(_load_width(op) for op in loads),
        }
        key = (stats["bytes_per_thread"], -stats["instructions"])
        if best is None or key > best[0]:
            best = (key, stats)
    return best[1] if best and best[1]["bytes_per_thread"] > 0 else None


def occupancy(registers: int, shared: int, warps: int) -> dict[str, float]:
    """CTAs and warps per SM the registers and shared memory allow on Hopper."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = HOPPER["registers_per_sm"] // (regs_per_warp * warps)
    by_shared = HOPPER["shared_per_sm"] // shared if shared else HOPPER["max_ctas_per_sm"]
    ctas = min(by_regs, by_shared, HOPPER["max_warps_per_sm"] // warps, HOPPER["max_ctas_per_sm"])
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * warps, "occupancy": ctas * warps / HOPPER["max_warps_per_sm"]}


def budget(row: dict) -> dict[str, object]:
    """The static budget of a decode kernel: registers, spills, and main-loop issue per byte."""
    loop = row.get("loop")
    reasons = []
    if row["registers"] > MAX_DECODE_REGISTERS:
        reasons.append(f"{row['registers']} registers > {MAX_DECODE_REGISTERS}")
    if row["local_bytes"] or row["LDL"]:
        reasons.append("spills")
    if loop is None:
        reasons.append("no main loop with global loads found")
    else:
        if loop["issue_per_byte"] > ISSUE_PER_BYTE_BUDGET:
            reasons.append(f"{loop['issue_per_byte']:.3f} warp-instructions per weight byte > {ISSUE_PER_BYTE_BUDGET:.3f}")
        if loop["int_per_byte"] > INT_PER_BYTE_BUDGET:
            reasons.append(f"{loop['int_per_byte']:.3f} integer warp-instructions per weight byte > {INT_PER_BYTE_BUDGET:.3f}")
    return {"within_budget": not reasons, "over_budget": reasons}


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
    warps = build.options.get("num_warps", 4)
    row: dict[str, object] = {
        "kernel": build.name,
        "registers": int(fields.get("REG", -1)),
        "local_bytes": int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0)),
        "shared_bytes": compiled.metadata.shared,
        "warps": warps,
        **{op: ops.get(op, 0) for op in SASS_OPS},
    }
    row.update(occupancy(row["registers"], row["shared_bytes"], warps))
    loop = main_loop(sass)
    if loop is not None:  # per pass of the main loop, for the whole CTA
        cta_bytes = loop["bytes_per_thread"] * 32 * warps
        hbm = build.weight_bytes or cta_bytes
        loop = {**loop, "cta_bytes": cta_bytes, "weight_bytes": build.weight_bytes, "issue_per_byte": loop["instructions"] * warps / hbm,
                "int_per_byte": loop["int"] * warps / hbm, "issue_per_loaded_byte": loop["instructions"] * warps / cta_bytes}  # fmt: skip
    row["loop"] = loop
    row.update(budget(row))
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/compile-kernels")
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the real backend, even when launched under pytest's setting
    rows = [compile_one(b, args.arch) for b in builds("fp16") + builds("bf16")]
    header = ["kernel", "registers", "local_bytes", "shared_bytes", *SASS_OPS]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    lines += [
        "",
        f"Static budget (Hopper/H200: {BYTES_PER_CLK_PER_SM:.1f} HBM bytes per SM-clock; memory-bound while the main loop "
        f"issues <= {ISSUE_PER_BYTE_BUDGET:.3f} warp-instructions and <= {INT_PER_BYTE_BUDGET:.3f} integer ones per "
        f"weight byte read from HBM; <= {MAX_DECODE_REGISTERS} registers, no spills). Per pass of the main loop, per CTA: "
        "`loaded` counts every global load (activations included, L2 hits), `weight` the compressed weight's bytes "
        "(at 50% sparsity for the bitmap kernel), on which the budget is judged:",
        "",
        "| kernel | CTAs/SM | occupancy | loop instr | int | fp | tensor | loads | loaded | weight | instr/loaded byte | instr/weight byte | int/weight byte | within budget |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        loop = r["loop"] or {}
        cells = [loop.get(k, "-") for k in ("instructions", "int", "fp", "tensor", "loads", "cta_bytes")]
        cells.append(f"{loop['weight_bytes']:.0f}" if loop else "-")
        ratios = [f"{loop[k]:.3f}" if loop else "-" for k in ("issue_per_loaded_byte", "issue_per_byte", "int_per_byte")]
        verdict = "yes" if r["within_budget"] else "no: " + "; ".join(r["over_budget"])
        lines.append(f"| {r['kernel']} | {r['ctas_per_sm']} | {r['occupancy']:.2f} | " + " | ".join(map(str, cells)) + f" | {' | '.join(ratios)} | {verdict} |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"arch": f"sm_{args.arch}", "hopper": HOPPER, "rows": rows}, indent=2))
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
