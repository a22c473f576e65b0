"""GQSA W4 group-sparse GEMM: y = x·Ŵᵀ + b with Ŵ stored as GQSALinear's ELL of INT4 groups.

Every output row keeps the same number of groups of g input columns; per kept group the kernel
reads its column-group index, g/2 bytes of packed 4-bit codes, a scale and a zero point, and
dequantizes on chip: Ŵ[r, G] = (q − zero)·scale. With all groups kept (group_index = 0..K/g−1)
this is plain W4 group quantization (GPTQ-style storage), so one kernel serves both.

One fp16/bf16 token (`_gqsa_gemv_kernel`, also plain W4's from int4_matmul): four lanes of a warp
share a row, each one kept group per pass; each 32-bit word of eight codes becomes four pairs of
16-bit floats in PTX (kernels/pairs.py, b = 4: a LOP3 puts columns (2s + p, 4 + 2s + p) under the
exponent of 1024, a packed subtract of 1024 + 16^p·zero, a packed FMA with the prepared activation
pairs), fp16 sums over a word's eight products, fp32 beyond (4e-4 relative error against the
exact dot product in the emulated PTX, g = 128): 0.151–0.160 warp-instructions per weight byte on
sm_90, every group kept or not. Rows keep different groups, so a warp's rows
read their activations from different places: L1 traffic the static budget does not count.

More tokens and fp32 layers (`_gqsa_kernel`): each row reads its own group's contiguous activation
columns, the products on CUDA cores, each lane keeping partial sums over the group's columns that
are reduced once after the loop; codes become floats by the 2^23 bit trick and (q − z)·s =
q·s − z·s is one FMA. Rows keep different groups, so tensor cores (which need one operand shared
by the tile's rows) do not apply: 1.0 warp-instructions per weight byte at 4 tokens, over Hopper's
0.218. Split-K over the kept groups gives the SMs enough programs at decode.
"""

from __future__ import annotations

import torch

from .pairs import half_to_float, lane_groups, launch_one_token, offsets_program, pair_sum, program_work, split2, split4, store_rows
from .runtime import (
    SplitK,
    check_launch,
    flat_tokens,
    interpreting,
    launch_refusal,
    next_pow2,
    output_like,
    split_k_plan,
    tl,
    triton,
)

if triton is not None:

    @triton.jit
    def _gqsa_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr,
        M, N, KEPT, KEPT_PER_SPLIT, stride_xn, stride_yn, stride_ys,
        HAS_BIAS: tl.constexpr, ALL_GROUPS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        HALF: tl.constexpr = GROUP // 2
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        half = tl.arange(0, HALF)
        cols = tl.arange(0, GROUP)
        # per-lane partial sums over the group's columns, reduced once after the loop
        acc = tl.zeros((BLOCK_M, GROUP, BLOCK_N), dtype=tl.float32)
        j_start = pid_k * KEPT_PER_SPLIT
        for j in range(j_start, tl.minimum(j_start + KEPT_PER_SPLIT, KEPT)):
            slot = rm * KEPT + j
            if ALL_GROUPS:  # every group kept in column order: no index stored
                group = tl.zeros((BLOCK_M,), dtype=tl.int32) + j
            else:
                group = tl.load(g_ptr + slot, mask=m_ok, other=0).to(tl.int32)
            scale = tl.load(s_ptr + slot, mask=m_ok, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + slot, mask=m_ok, other=0).to(tl.float32)
            packed = tl.load(q_ptr + slot[:, None] * HALF + half[None, :], mask=m_ok[:, None], other=0).to(tl.int32)
            # a nibble to float by the 2^23 bit trick (no quarter-rate I2F), (q − z)·s = q·s − z·s as one FMA
            low = ((packed & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            high = ((packed >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            q = tl.reshape(tl.join(low, high), (BLOCK_M, GROUP))  # back in column order
            w = q * scale[:, None] - (zero * scale)[:, None]
            # the row's group of activations is contiguous: wide loads, not a per-column gather
            x_off = rn[None, None, :] * stride_xn + (group[:, None] * GROUP + cols[None, :])[:, :, None]
            x = tl.load(x_ptr + x_off, mask=m_ok[:, None, None] & n_ok[None, None, :], other=0.0)
            acc += w[:, :, None] * x.to(tl.float32)
        acc = tl.sum(acc, axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + pid_k * stride_ys + rn[None, :] * stride_yn + rm[:, None], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _w4_pairs_program() -> str:
    """PTX for one word of eight 4-bit codes (kernels/pairs.py, b = 4): $0 the word's pair sum
    (an fp16 pair: its eight products, four a half); $1 the word, $2..$5 the activation pairs
    2s + p (columns (2s + p, 4 + 2s + p)), $6 and $7 the pairs −(1024 + z) and −(1024 + 16·z)."""
    lines = ["{", ".reg .b32 magic, m, v, d, acc, w1;", "mov.b32 magic, 0x64006400;", "mov.b32 acc, 0;", "shr.u32 w1, $1, 8;"]
    for s in range(2):
        for p in range(2):
            lines += [
                f"mov.b32 m, 0x{0x000F000F << 4 * p:08x};",
                f"lop3.b32 v, {'$1' if s == 0 else 'w1'}, m, magic, 0xEA;",  # (word & m) | magic: 1024 + 16^p·q, two at once
                f"add.rn.f16x2 d, v, ${6 + p};",
                f"fma.rn.f16x2 acc, d, ${2 + 2 * s + p}, acc;",
            ]
    return "\n".join(lines + ["mov.b32 $0, acc;", "}"])


if triton is not None:
    W4_PAIRS = tl.constexpr(_w4_pairs_program())
    W4_OFFSETS = tl.constexpr(offsets_program(4))

    @triton.jit
    def _w4_word(acc, word, x_ptrs, zero, nb0, nb1, PTX: tl.constexpr):
        """acc (fp32) plus one word of eight codes of every (row, lane) times its activation pairs
        (x_ptrs: the four pairs' pointers, (rows, lanes, 4)). The PTX sums a word's products in
        fp16, then fp32 takes over: partial sums of four products stay small, so their rounding
        does (4e-4 of the dot product where a group-long fp16 sum gave 1.4e-3, g = 128)."""
        x0, x1, x2, x3 = split4(tl.load(x_ptrs))
        if PTX:
            pair = tl.inline_asm_elementwise(W4_PAIRS, "=r,r,r,r,r,r,r,r", [word, x0, x1, x2, x3, nb0, nb1], dtype=tl.int32, is_pure=True, pack=1)
            acc += pair_sum(pair, True)
        else:
            acc = _w4_pair_fp32(acc, word, x0, zero, 0, 0)
            acc = _w4_pair_fp32(acc, word, x1, zero, 0, 1)
            acc = _w4_pair_fp32(acc, word, x2, zero, 1, 0)
            acc = _w4_pair_fp32(acc, word, x3, zero, 1, 1)
        return acc

    @triton.jit
    def _w4_pair_fp32(acc, word, pair, zero, s: tl.constexpr, p: tl.constexpr):
        """One pair of `_w4_pairs_program` in Triton arithmetic, in fp32: columns (2s + p, 4 + 2s + p)."""
        d_lo = (((word >> (8 * s + 4 * p)) & 0xF) - zero).to(tl.float32) * (1 << (4 * p))
        d_hi = (((word >> (16 + 8 * s + 4 * p)) & 0xF) - zero).to(tl.float32) * (1 << (4 * p))
        return acc + d_lo * half_to_float(pair, False) + d_hi * half_to_float(pair, True)

    @triton.jit
    def _gqsa_gemv_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, amax_ptr,
        M, KEPT, KEPT_PER_SPLIT, stride_ys,
        HAS_BIAS: tl.constexpr, ALL_GROUPS: tl.constexpr, PTX: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
        LANES: tl.constexpr,
    ):  # fmt: skip
        """One token (`launch_one_token`): four lanes a row, each one kept group a pass. x_ptr: the
        prepared activation pairs (kernels/pairs.py, b = 4), int32; q_ptr: the codes as int32
        words (M, kept, g/8); amax_ptr: max|x| (fp32)."""
        WORDS: tl.constexpr = GROUP // 8
        VEC: tl.constexpr = 4 if WORDS >= 4 else WORDS  # words a load
        rm, rows, j_start, j_end = program_work(M, KEPT, KEPT_PER_SPLIT, BLOCK_M)
        vec = tl.arange(0, VEC)
        four = tl.arange(0, 4)
        row_sum = tl.zeros((BLOCK_M, LANES), dtype=tl.float32)
        for j0 in range(j_start, j_end, LANES):
            j, slot, scale, zero, nb0 = lane_groups(s_ptr, z_ptr, rows, j0, j_end, KEPT, LANES)
            if ALL_GROUPS:
                group = slot * 0 + j[None, :]
            else:
                group = tl.load(g_ptr + slot).to(tl.int32)
            nb1 = nb0  # −(1024 + 16^p·z), twice, as fp16 bits
            if PTX:
                nb1 = tl.inline_asm_elementwise(W4_OFFSETS, "=r,r", [nb0], dtype=tl.int32, is_pure=True, pack=1)
            acc = tl.zeros((BLOCK_M, LANES), dtype=tl.float32)
            x_word = (group * WORDS)[:, :, None] * 4 + four[None, None, :]  # the group's first word's pairs
            for c in tl.static_range(0, WORDS, VEC):
                words = tl.load(q_ptr + slot[:, :, None] * WORDS + c + vec[None, None, :])
                if VEC == 1:
                    acc = _w4_word(acc, tl.reshape(words, (BLOCK_M, LANES)), x_ptr + x_word + c * 4, zero, nb0, nb1, PTX)
                elif VEC == 2:
                    w0, w1 = split2(words)
                    acc = _w4_word(acc, w0, x_ptr + x_word + c * 4, zero, nb0, nb1, PTX)
                    acc = _w4_word(acc, w1, x_ptr + x_word + c * 4 + 4, zero, nb0, nb1, PTX)
                else:
                    w0, w1, w2, w3 = split4(words)
                    acc = _w4_word(acc, w0, x_ptr + x_word + c * 4, zero, nb0, nb1, PTX)
                    acc = _w4_word(acc, w1, x_ptr + x_word + c * 4 + 4, zero, nb0, nb1, PTX)
                    acc = _w4_word(acc, w2, x_ptr + x_word + c * 4 + 8, zero, nb0, nb1, PTX)
                    acc = _w4_word(acc, w3, x_ptr + x_word + c * 4 + 12, zero, nb0, nb1, PTX)
            row_sum += acc * scale
        store_rows(row_sum, amax_ptr, b_ptr, y_ptr, rm, M, stride_ys, HAS_BIAS)


def gqsa_tiles(n: int, half: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_M) for n tokens and groups of 2·half columns: 2048 per-lane partial sums
    (rows × g × tokens) per program of 4 warps, 48–78 registers on sm_90; more rows per program
    save little (g = 16, one token: 0.438 → 0.394 warp-instructions per weight byte at 4× the
    rows) and leave too few programs for the SMs."""
    block_n = min(16, next_pow2(n))
    return block_n, max(2, min(64, 1024 // (half * block_n)))


def gqsa_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_index: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
    one_token: bool | None = None,
    ptx: bool | None = None,
) -> torch.Tensor:
    """y = x·Ŵᵀ + bias for GQSALinear's storage: qweight (M, kept, g/2) uint8, scales (M, kept),
    zeros (M, kept) uint8, group_index (M, kept) integer, or None when every group is kept in
    column order; x (..., K) -> (..., M). One fp16/bf16 token goes to `_gqsa_gemv_kernel` (its
    PTX pairs on a GPU; `one_token` and `ptx` override), the rest to `_gqsa_kernel`."""
    all_groups = group_index is None
    group_index = scales if all_groups else group_index  # an unread pointer when there is no index
    check_launch(x, qweight, scales, zeros, group_index)
    m, kept, half = qweight.shape
    group = 2 * half
    if group & (group - 1) or group < 2:
        raise ValueError(f"the kernel needs a power-of-two group size, got {group}")
    if all_groups and kept * 2 * half != x.shape[-1]:
        raise ValueError(f"without a group index every group must be kept: {kept} groups of {2 * half} != {x.shape[-1]}")
    if scales.shape != (m, kept) or zeros.shape != (m, kept) or group_index.shape != (m, kept):
        raise ValueError("scales, zeros and group_index must all be (out_features, groups_per_row)")
    if qweight.dtype != torch.uint8 or zeros.dtype != torch.uint8:
        raise ValueError("qweight and zeros must be uint8 (packed INT4 codes, zero points)")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("group_index", group_index)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    k = x.shape[-1]
    if k % group:
        raise ValueError(f"x has {k} features, not a multiple of the group size {group}")
    x2 = flat_tokens(x)
    n = x2.shape[0]
    out = output_like(x, m)
    if n == 0:
        return out
    if one_token is None:
        one_token = n == 1 and x.dtype in (torch.float16, torch.bfloat16) and group >= 8
    if one_token:
        one_token_matmul(x2, out, qweight, scales, zeros, None if all_groups else group_index, bias, split_k, ptx)
        return out
    block_n, block_m = gqsa_tiles(n, half)
    block_m = 16 if interpreting() else block_m
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k, per_split = split_k_plan(kept, programs, x.device, 4, split_k)
    split = SplitK(out.view(n, m), split_k)
    # token tiles vary fastest: the programs sharing a weight tile run together and read it once from HBM
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    _gqsa_kernel[grid](
        x2, qweight, scales, zeros, group_index, bias if bias is not None else scales, split.target,
        m, n, kept, per_split, x2.stride(0), split.target.stride(-2), split.split_stride,
        HAS_BIAS=split.single and bias is not None, ALL_GROUPS=all_groups, GROUP=group, BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    split.finish(bias)
    return out


def one_token_matmul(x2, out, qweight, scales, zeros, group_index, bias, split_k: int | None, ptx: bool | None) -> None:
    """`_gqsa_gemv_kernel` for one fp16/bf16 token x2 (1, K) into out (..., M): GQSALinear's
    storage, group_index None when every group is kept in order (also W4's int4_matmul)."""
    group = 2 * qweight.shape[-1]
    if x2.shape[0] != 1 or x2.dtype not in (torch.float16, torch.bfloat16) or group < 8:
        raise ValueError(f"the one-token kernel reads one fp16 or bf16 token and groups of 8 or more, got {x2.shape[0]} in {x2.dtype}, g = {group}")
    launch_one_token(
        _gqsa_gemv_kernel, x2, out, qweight.view(torch.int32), scales, zeros, group_index, bias, split_k, 4,
        ALL_GROUPS=group_index is None, PTX=not interpreting() if ptx is None else ptx, GROUP=group,
    )  # fmt: skip


def gqsa_refusal(module, x: torch.Tensor) -> str | None:
    why = launch_refusal(x, module.qweight, module.scales)
    if why is None and module.group_size & (module.group_size - 1):
        why = f"group size {module.group_size} is not a power of two"
    return why


def gqsa_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    return gqsa_matmul(x, module.qweight, module.scales, module.zeros, module.group_index, module.bias)

