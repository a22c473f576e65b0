"""GQSA W4 group-sparse GEMM: y = x·Ŵᵀ + b with Ŵ stored as GQSALinear's ELL of INT4 groups.

Every output row keeps the same number of groups of g input columns; per kept group the kernel
reads its column-group index, g/2 bytes of packed 4-bit codes, a scale and a zero point, and
dequantizes on chip: Ŵ[r, G] = (q − zero)·scale. With all groups kept (group_index = 0..K/g−1)
this is plain W4 group quantization (GPTQ-style storage), so one kernel serves both.

fp16/bf16 tokens (`_gqsa_gemv_kernel`, also plain W4's one token from int4_matmul): four lanes of
a warp share a row, each one kept group per pass; each 32-bit word of eight codes becomes four
pairs of 16-bit floats in PTX (kernels/pairs.py, b = 4: a LOP3 puts columns (2s + p, 4 + 2s + p)
under the exponent of 1024, a packed subtract of 1024 + 16^p·zero, a packed FMA with the prepared
activation pairs), fp16 sums over a word's eight products, fp32 beyond (4e-4 relative error
against the exact dot product in the emulated PTX, g = 128): 0.151–0.160 warp-instructions per
weight byte on sm_90 at one token, every group kept or not. A program takes up to four tokens
(the dequantization shared, a packed FMA per two weights and token: 0.27 at four). Rows keep
different groups, so a warp's rows read their activations from different places (L1 traffic the
static budget does not count); on CUDA cores a token costs at least half a packed FMA per weight,
so 16 tokens in four groups of four cost about 1.1 warp-instructions per weight byte.

Five tokens and more (`_gqsa_dot_kernel`, fp16/bf16, groups of 16 columns or more): tensor
cores, which need one operand shared by a tile's rows, so the tile is dense: `_int4_kernel`'s loop
over every column group, each row's kept groups found on the way from a bit per column group
(`kept_group_bits`, cached per module) and its slots in ascending order. A row that did not keep
a group loads nothing for it and dequantizes zeros: the instructions are those of plain W4 over
the dense shape, 0.42–0.46 warp-instructions per weight byte at half the groups kept, at any
token count up to the tile's 16 (64 with wider tiles), where the pair kernel's groups took 1.1 at
16. Four tokens and fewer stay on the pair kernel (0.27 at four).

fp32 layers and groups under 8 columns (`_gqsa_kernel`): each row reads its own group's
contiguous activation columns, the products on CUDA cores, each lane keeping partial sums over
the group's columns that are reduced once after the loop; codes become floats by the 2^23 bit
trick and (q − z)·s = q·s − z·s is one FMA. Split-K over the kept groups gives the SMs enough
programs at decode.
"""

from __future__ import annotations

import torch

from .int4_matmul import int4_dot, step_groups
from .pairs import half_to_float, lane_groups, launch_pair_kernel, offsets_program, pair_sum, program_work, split2, split4, store_rows
from .runtime import (
    SplitK,
    cached_on,
    check_launch,
    choose_ptx,
    flat_tokens,
    interpreting,
    launch_group_dot,
    launch_refusal,
    next_pow2,
    output_like,
    split_k_plan,
    storage_key,
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


def _w4_pairs_program(tokens: int = 1) -> str:
    """PTX for one word of eight 4-bit codes (kernels/pairs.py, b = 4) against `tokens` tokens'
    activation pairs. One token: $0 the word's pair sum (an fp16 pair: its eight products, four a
    half); $1 the word, $2..$5 the activation pairs 2s + p (columns (2s + p, 4 + 2s + p)), $6 and
    $7 the pairs −(1024 + z) and −(1024 + 16·z). T > 1 tokens: $0..$T−1 the tokens' updated pair
    sums; then the sums so far, the word, 4T pairs (token by token) and the two offsets: the
    dequantization is shared, the FMAs are one a token."""
    t = tokens
    first = t if t > 1 else 0  # the sums so far (several tokens)
    word = f"${first + t}"
    pairs = first + t + 1
    offsets = pairs + 4 * t
    lines = ["{", ".reg .b32 magic, m, v, d, w1;", ".reg .b32 " + ", ".join(f"a{i}" for i in range(t)) + ";", "mov.b32 magic, 0x64006400;"]
    lines += [f"mov.b32 a{i}, {f'${t + i}' if t > 1 else 0};" for i in range(t)]
    lines.append(f"shr.u32 w1, {word}, 8;")
    for s in range(2):
        for p in range(2):
            lines += [
                f"mov.b32 m, 0x{0x000F000F << 4 * p:08x};",
                f"lop3.b32 v, {word if s == 0 else 'w1'}, m, magic, 0xEA;",  # (word & m) | magic: 1024 + 16^p·q, two at once
                f"add.rn.f16x2 d, v, ${offsets + p};",
            ]
            lines += [f"fma.rn.f16x2 a{i}, d, ${pairs + 4 * i + 2 * s + p}, a{i};" for i in range(t)]
    return "\n".join(lines + [f"mov.b32 ${i}, a{i};" for i in range(t)] + ["}"])


if triton is not None:
    from .int4_matmul import w4_dot_step

    W4_PAIRS = tl.constexpr(_w4_pairs_program())
    W4_PAIRS_2 = tl.constexpr(_w4_pairs_program(2))
    W4_PAIRS_3 = tl.constexpr(_w4_pairs_program(3))
    W4_PAIRS_4 = tl.constexpr(_w4_pairs_program(4))
    W4_OFFSETS = tl.constexpr(offsets_program(4))

    @triton.jit
    def _w4_word(acc, word, x_ptrs, zero, nb0, nb1, PTX: tl.constexpr):
        """acc (fp32) plus one word of eight codes of every (row, lane) times its activation pairs
        (x_ptrs: the four pairs' pointers, (rows, lanes, 4)). The PTX sums a word's products in
        fp16, then fp32 takes over: partial sums of four products stay small, so their rounding
        does (4e-4 of the dot product where a group-long fp16 sum gave 1.4e-3, g = 128)."""
        if PTX:
            x0, x1, x2, x3 = split4(tl.load(x_ptrs))
            pair = tl.inline_asm_elementwise(W4_PAIRS, "=r,r,r,r,r,r,r,r", [word, x0, x1, x2, x3, nb0, nb1], dtype=tl.int32, is_pure=True, pack=1)
            acc += pair_sum(pair, True)
        else:
            acc = _w4_word_fp32(acc, word, x_ptrs, zero)
        return acc

    @triton.jit
    def _w4_pair_fp32(acc, word, pair, zero, s: tl.constexpr, p: tl.constexpr):
        """One pair of `_w4_pairs_program` in Triton arithmetic, in fp32: columns (2s + p, 4 + 2s + p)."""
        d_lo = (((word >> (8 * s + 4 * p)) & 0xF) - zero).to(tl.float32) * (1 << (4 * p))
        d_hi = (((word >> (16 + 8 * s + 4 * p)) & 0xF) - zero).to(tl.float32) * (1 << (4 * p))
        return acc + d_lo * half_to_float(pair, False) + d_hi * half_to_float(pair, True)

    @triton.jit
    def _w4_word_fp32(acc, word, x_ptrs, zero):
        """`_w4_pairs_program` in Triton arithmetic for one token: acc (fp32) plus the word's products."""
        x0, x1, x2, x3 = split4(tl.load(x_ptrs))
        acc = _w4_pair_fp32(acc, word, x0, zero, 0, 0)
        acc = _w4_pair_fp32(acc, word, x1, zero, 0, 1)
        acc = _w4_pair_fp32(acc, word, x2, zero, 1, 0)
        return _w4_pair_fp32(acc, word, x3, zero, 1, 1)

    @triton.jit
    def _w4_word_tokens(a0, a1, a2, a3, word, x_ptrs, stride_xt, zero, nb0, nb1, TOKENS: tl.constexpr, PTX: tl.constexpr):
        """One word against TOKENS (2–4) tokens' pairs (token t's at x_ptrs + t·stride_xt): the
        tokens' sums a0..a3 updated (fp16 pairs as int32 on the PTX path, fp32 otherwise; sums of
        tokens past TOKENS pass through)."""
        if PTX:
            x00, x01, x02, x03 = split4(tl.load(x_ptrs))
            x10, x11, x12, x13 = split4(tl.load(x_ptrs + stride_xt))
            if TOKENS == 2:
                a0, a1 = tl.inline_asm_elementwise(
                    W4_PAIRS_2, "=r,=r," + ",".join(["r"] * 13), [a0, a1, word, x00, x01, x02, x03, x10, x11, x12, x13, nb0, nb1],
                    dtype=(tl.int32, tl.int32), is_pure=True, pack=1,
                )  # fmt: skip
            else:
                x20, x21, x22, x23 = split4(tl.load(x_ptrs + 2 * stride_xt))
                if TOKENS == 3:
                    a0, a1, a2 = tl.inline_asm_elementwise(
                        W4_PAIRS_3, "=r,=r,=r," + ",".join(["r"] * 18),
                        [a0, a1, a2, word, x00, x01, x02, x03, x10, x11, x12, x13, x20, x21, x22, x23, nb0, nb1],
                        dtype=(tl.int32,) * 3, is_pure=True, pack=1,
                    )  # fmt: skip
                else:
                    x30, x31, x32, x33 = split4(tl.load(x_ptrs + 3 * stride_xt))
                    a0, a1, a2, a3 = tl.inline_asm_elementwise(
                        W4_PAIRS_4, "=r,=r,=r,=r," + ",".join(["r"] * 23),
                        [a0, a1, a2, a3, word, x00, x01, x02, x03, x10, x11, x12, x13, x20, x21, x22, x23, x30, x31, x32, x33, nb0, nb1],
                        dtype=(tl.int32,) * 4, is_pure=True, pack=1,
                    )  # fmt: skip
        else:
            a0 = _w4_word_fp32(a0, word, x_ptrs, zero)
            a1 = _w4_word_fp32(a1, word, x_ptrs + stride_xt, zero)
            if TOKENS >= 3:
                a2 = _w4_word_fp32(a2, word, x_ptrs + 2 * stride_xt, zero)
            if TOKENS == 4:
                a3 = _w4_word_fp32(a3, word, x_ptrs + 3 * stride_xt, zero)
        return a0, a1, a2, a3

    @triton.jit
    def _w4_chunk(s0, s1, s2, s3, w0, w1, w2, w3, x_ptrs, stride_xt, zero, nb0, nb1, COUNT: tl.constexpr, TOKENS: tl.constexpr, PTX: tl.constexpr):
        """The first COUNT (1, 2 or 4) of four words against the tokens' pairs (x_ptrs: the first
        word's), added to the tokens' fp32 group sums s0..s3. One token: each word's fp16 pair sum
        goes to fp32 (`_w4_word`); several: the chunk's, so the per-token conversions do not
        outweigh the shared dequantization."""
        if TOKENS == 1:
            s0 = _w4_word(s0, w0, x_ptrs, zero, nb0, nb1, PTX)
            if COUNT >= 2:
                s0 = _w4_word(s0, w1, x_ptrs + 4, zero, nb0, nb1, PTX)
            if COUNT == 4:
                s0 = _w4_word(s0, w2, x_ptrs + 8, zero, nb0, nb1, PTX)
                s0 = _w4_word(s0, w3, x_ptrs + 12, zero, nb0, nb1, PTX)
        else:
            a0 = tl.zeros(w0.shape, dtype=tl.int32 if PTX else tl.float32)
            a1, a2, a3 = a0, a0, a0
            a0, a1, a2, a3 = _w4_word_tokens(a0, a1, a2, a3, w0, x_ptrs, stride_xt, zero, nb0, nb1, TOKENS, PTX)
            if COUNT >= 2:
                a0, a1, a2, a3 = _w4_word_tokens(a0, a1, a2, a3, w1, x_ptrs + 4, stride_xt, zero, nb0, nb1, TOKENS, PTX)
            if COUNT == 4:
                a0, a1, a2, a3 = _w4_word_tokens(a0, a1, a2, a3, w2, x_ptrs + 8, stride_xt, zero, nb0, nb1, TOKENS, PTX)
                a0, a1, a2, a3 = _w4_word_tokens(a0, a1, a2, a3, w3, x_ptrs + 12, stride_xt, zero, nb0, nb1, TOKENS, PTX)
            s0 += pair_sum(a0, PTX)
            s1 += pair_sum(a1, PTX)
            if TOKENS >= 3:
                s2 += pair_sum(a2, PTX)
            if TOKENS == 4:
                s3 += pair_sum(a3, PTX)
        return s0, s1, s2, s3

    @triton.jit
    def _gqsa_gemv_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, amax_ptr,
        M, N, KEPT, KEPT_PER_SPLIT, stride_ys, stride_xt, stride_yt,
        HAS_BIAS: tl.constexpr, ALL_GROUPS: tl.constexpr, PTX: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
        LANES: tl.constexpr, TOKENS: tl.constexpr, GROUPED: tl.constexpr,
    ):  # fmt: skip
        """A group of one to four tokens of N (`launch_pair_kernel`): four lanes a row, each one
        kept group a pass. x_ptr: the prepared activation pairs (kernels/pairs.py, b = 4), int32,
        stride_xt a token; q_ptr: the codes as int32 words (M, kept, g/8); amax_ptr: max|x| per
        token (fp32); stride_yt: a token's outputs."""
        WORDS: tl.constexpr = GROUP // 8
        VEC: tl.constexpr = 4 if WORDS >= 4 else WORDS  # words a load
        first, rm, rows, j_start, j_end = program_work(M, KEPT, KEPT_PER_SPLIT, BLOCK_M, TOKENS)
        if GROUPED:  # several token groups: this one's pointers (a single group reads them as given)
            x_ptr += first * stride_xt
            amax_ptr += first
            y_ptr += first * stride_yt
        vec = tl.arange(0, VEC)
        four = tl.arange(0, 4)
        r0 = tl.zeros((BLOCK_M, LANES), dtype=tl.float32)  # the tokens' lane sums
        r1, r2, r3 = r0, r0, r0
        for j0 in range(j_start, j_end, LANES):
            j, slot, scale, zero, nb0 = lane_groups(s_ptr, z_ptr, rows, j0, j_end, KEPT, LANES)
            if ALL_GROUPS:
                group = slot * 0 + j[None, :]
            else:
                group = tl.load(g_ptr + slot).to(tl.int32)
            nb1 = nb0  # −(1024 + 16^p·z), twice, as fp16 bits
            if PTX:
                nb1 = tl.inline_asm_elementwise(W4_OFFSETS, "=r,r", [nb0], dtype=tl.int32, is_pure=True, pack=1)
            s0 = tl.zeros((BLOCK_M, LANES), dtype=tl.float32)  # the tokens' sums over the group
            s1, s2, s3 = s0, s0, s0
            x_word = x_ptr + (group * WORDS)[:, :, None] * 4 + four[None, None, :]  # the group's first word's pairs
            for c in tl.static_range(0, WORDS, VEC):
                words = tl.load(q_ptr + slot[:, :, None] * WORDS + c + vec[None, None, :])
                if VEC == 1:
                    w = tl.reshape(words, (BLOCK_M, LANES))
                    s0, s1, s2, s3 = _w4_chunk(s0, s1, s2, s3, w, w, w, w, x_word + c * 4, stride_xt, zero, nb0, nb1, 1, TOKENS, PTX)
                elif VEC == 2:
                    w0, w1 = split2(words)
                    s0, s1, s2, s3 = _w4_chunk(s0, s1, s2, s3, w0, w1, w1, w1, x_word + c * 4, stride_xt, zero, nb0, nb1, 2, TOKENS, PTX)
                else:
                    w0, w1, w2, w3 = split4(words)
                    s0, s1, s2, s3 = _w4_chunk(s0, s1, s2, s3, w0, w1, w2, w3, x_word + c * 4, stride_xt, zero, nb0, nb1, 4, TOKENS, PTX)
            r0 += s0 * scale
            if TOKENS >= 2:
                r1 += s1 * scale
            if TOKENS >= 3:
                r2 += s2 * scale
            if TOKENS == 4:
                r3 += s3 * scale
        store_rows(r0, amax_ptr, b_ptr, y_ptr, rm, M, first, N, stride_ys, HAS_BIAS, GROUPED)
        if TOKENS >= 2:
            store_rows(r1, amax_ptr + 1, b_ptr, y_ptr + stride_yt, rm, M, first + 1, N, stride_ys, HAS_BIAS, GROUPED)
        if TOKENS >= 3:
            store_rows(r2, amax_ptr + 2, b_ptr, y_ptr + 2 * stride_yt, rm, M, first + 2, N, stride_ys, HAS_BIAS, GROUPED)
        if TOKENS == 4:
            store_rows(r3, amax_ptr + 3, b_ptr, y_ptr + 3 * stride_yt, rm, M, first + 3, N, stride_ys, HAS_BIAS, GROUPED)


    @triton.jit
    def kept_before(g_ptr, base, KEPT, column_group, SEARCH: tl.constexpr):
        """Per row: how many of its kept groups (ascending indices at g_ptr + base) lie before
        `column_group`, by a branchless binary search of SEARCH probes (2^SEARCH > KEPT): the slot
        where a split-K program starting there finds the row's next kept group."""
        count = base * 0
        for b in tl.static_range(SEARCH):
            probe = count + (1 << (SEARCH - 1 - b))
            ahead = tl.load(g_ptr + base + probe - 1, mask=probe <= KEPT, other=column_group).to(tl.int32)
            count = tl.where(ahead < column_group, probe, count)
        return count

    @triton.jit
    def _gqsa_dot_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, GROUPS, GROUPS_PER_SPLIT, stride_xn, stride_yn, stride_ys, g_ptr, bits_ptr, KEPT, BIT_WORDS,
        HAS_BIAS: tl.constexpr, PTX: tl.constexpr, DOT_FP32: tl.constexpr, GROUP: tl.constexpr,
        STEP_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEARCH: tl.constexpr,
    ):  # fmt: skip
        """`_int4_kernel` over every column group, each row's kept groups found on the way: w_ptr
        the codes as int32 words (M, KEPT, g/8), g_ptr the ascending group indices (M, KEPT),
        bits_ptr which column groups each row keeps (M, BIT_WORDS) int32 (`kept_group_bits`),
        s_ptr the scales (an int16 view on the PTX path), z_ptr the zero points. A row that did not
        keep a column group loads nothing for it (masked: no HBM traffic) and its tile columns
        dequantize to exact zeros (code 0, zero point 0, scale 0)."""
        WORDS: tl.constexpr = GROUP // 8
        STEP: tl.constexpr = STEP_GROUPS * GROUP
        tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and STEP >= 16, "tl.dot needs tiles of at least 16")
        tl.static_assert(32 % STEP_GROUPS == 0, "a step's bits lie in one 32-bit word")
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        rows = tl.minimum(rm, M - 1)  # rows past M repeat row M − 1 and are never stored
        base = rows * KEPT
        in_step = tl.arange(0, STEP_GROUPS)
        word = tl.arange(0, WORDS)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        g_start = pid_k * GROUPS_PER_SPLIT
        # per row: the slot of its first kept group at or after the step (the indices ascend)
        next_slot = kept_before(g_ptr, base, KEPT, g_start, SEARCH)
        for g in range(g_start, tl.minimum(g_start + GROUPS_PER_SPLIT, GROUPS), STEP_GROUPS):
            # the step's bits: group g + i kept, at the slot after the row's kept groups before it
            chunk = (tl.load(bits_ptr + rows * BIT_WORDS + g // 32) >> (g % 32)) & ((1 << STEP_GROUPS) - 1)
            kept = (chunk[:, None] >> in_step[None, :]) & 1  # (BLOCK_M, STEP_GROUPS)
            if STEP_GROUPS == 1:
                slot = next_slot[:, None]
            else:
                slot = next_slot[:, None] + tl.cumsum(kept, axis=1) - kept
            next_slot += tl.sum(kept, axis=1)
            present = kept != 0
            where = base[:, None] + slot
            words = tl.load(w_ptr + where[:, :, None] * WORDS + word[None, None, :], mask=present[:, :, None], other=0)
            zero = tl.load(z_ptr + where, mask=present, other=0).to(tl.int32)
            scale = tl.load(s_ptr + where, mask=present, other=0)
            acc = w4_dot_step(acc, words, zero, scale, x_ptr, rn, n_ok, stride_xn, g * GROUP, PTX, DOT_FP32, STEP)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        y_offsets = pid_k * stride_ys + rn[None, :] * stride_yn + rm[:, None]
        tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

# tokens one program of the pair kernel takes: the dequantization is shared and each token adds
# one packed FMA per two weights; at 4 tokens sm_90 issues 0.27 warp-instructions per weight byte
# (see compile_kernels). Where tensor cores do not serve more (groups of 8, indices that do not
# ascend), they go in groups of up to four side by side in one launch, each group a program over
# the same rows (the bytes from L2 after the first): 16 tokens cost about four times 0.27.
PAIR_GROUP_TOKENS = 4
# from this many fp16/bf16 tokens the tensor-core kernel serves (every column group of a row
# tile dequantized, zeros where a row did not keep it, one `tl.dot` a step): 0.42–0.46 per weight
# byte at half the groups kept, against two token groups' 0.45–0.55 at 5–8 tokens
DOT_MIN_TOKENS = 5


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
    pairs: bool | None = None,
    ptx: bool | None = None,
    dot: bool | None = None,
    ascending: bool | None = None,
    bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x·Ŵᵀ + bias for GQSALinear's storage: qweight (M, kept, g/2) uint8, scales (M, kept),
    zeros (M, kept) uint8, group_index (M, kept) integer, or None when every group is kept in
    column order; x (..., K) -> (..., M). More than DOT_MIN_TOKENS - 1 fp16/bf16 tokens go to
    tensor cores (`_gqsa_dot_kernel`; groups of 16 columns or more, each row's indices ascending:
    `ascending` says so, else it is checked here, a device sync), fewer to `_gqsa_gemv_kernel` in
    groups of up to PAIR_GROUP_TOKENS (its PTX pairs on a GPU), fp32 ones and groups under 8
    columns to `_gqsa_kernel`; `dot`, `pairs` and `ptx` override. `bits`: `kept_group_bits` of
    the index, when the caller keeps them (else they are built per call)."""
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
    half_floats = x.dtype in (torch.float16, torch.bfloat16)
    if dot is None:
        dot = half_floats and n >= DOT_MIN_TOKENS and group >= 16 and (all_groups or ascending is not False)
        if dot and not all_groups and ascending is None:
            dot = bool((group_index[:, 1:] > group_index[:, :-1]).all())
    if dot:
        dot_matmul(x, x2, out, qweight, scales, zeros, None if all_groups else group_index, bias, split_k, ptx, bits)
        return out
    if pairs is None:
        pairs = half_floats and group >= 8
    if pairs:
        pair_matmul(x2, out, qweight, scales, zeros, None if all_groups else group_index, bias, split_k, ptx)
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


def dot_matmul(
    x, x2, out, qweight, scales, zeros, group_index, bias, split_k: int | None, ptx: bool | None, bits: torch.Tensor | None = None
) -> None:
    """`_gqsa_dot_kernel` for tokens x2 (T, K) into out: GQSALinear's storage with each row's
    group indices ascending (group_index None: every group kept in order, plain W4's kernel)."""
    m, kept, half = qweight.shape
    group = 2 * half
    if group < 16:
        raise ValueError(f"the tensor-core kernel needs groups of 16 columns or more, got {group}")
    if group_index is None:
        int4_dot(x, x2, out, qweight, scales, zeros, bias, split_k, ptx)
        return
    ptx = choose_ptx(x, scales.dtype, ptx)
    groups = x2.shape[1] // group
    if bits is None:
        bits = kept_group_bits(group_index, groups)
    launch_group_dot(
        _gqsa_dot_kernel, x, x2, out, qweight.view(torch.int32), scales.view(torch.int16) if ptx else scales, zeros, bias, group,
        split_k, step=(step := step_groups(group, groups)), g_ptr=group_index, bits_ptr=bits, KEPT=kept, BIT_WORDS=bits.shape[1],
        PTX=ptx, STEP_GROUPS=step, SEARCH=kept.bit_length(),
    )  # fmt: skip


def kept_group_bits(group_index: torch.Tensor, groups: int) -> torch.Tensor:
    """(M, ceil(groups / 32)) int32: bit j % 32 of word j // 32 set where the row keeps column
    group j. What the tensor-core kernel walks instead of the indices (cached per module: 4 bytes
    per 32 column groups of a row: 1.9% of the layer's bytes at g = 16 with half the groups kept,
    0.4% at g = 128)."""
    m = group_index.shape[0]
    words = -(-groups // 32)
    kept = torch.zeros(m, words * 32, dtype=torch.int64, device=group_index.device)
    kept.scatter_(1, group_index.long(), 1)
    packed = (kept.view(m, words, 32) << torch.arange(32, device=kept.device)).sum(-1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32).contiguous()


def pair_matmul(x2, out, qweight, scales, zeros, group_index, bias, split_k: int | None, ptx: bool | None) -> None:
    """`_gqsa_gemv_kernel` for fp16/bf16 tokens x2 (T, K), in groups of up to PAIR_GROUP_TOKENS,
    into out (..., M): GQSALinear's storage, group_index None when every group is kept in order
    (also W4's int4_matmul)."""
    group = 2 * qweight.shape[-1]
    if x2.dtype not in (torch.float16, torch.bfloat16) or group < 8:
        raise ValueError(f"the pair kernel reads fp16 or bf16 tokens and groups of 8 or more, got {x2.dtype}, g = {group}")
    launch_pair_kernel(
        _gqsa_gemv_kernel, x2, out, qweight.view(torch.int32), scales, zeros, group_index, bias, split_k, 4, PAIR_GROUP_TOKENS,
        ALL_GROUPS=group_index is None, PTX=not interpreting() if ptx is None else ptx, GROUP=group,
    )  # fmt: skip


def gqsa_refusal(module, x: torch.Tensor) -> str | None:
    why = launch_refusal(x, module.qweight, module.scales)
    if why is None and module.group_size & (module.group_size - 1):
        why = f"group size {module.group_size} is not a power of two"
    return why


def _dot_bits(module) -> torch.Tensor | None:
    """`kept_group_bits` of a group-sparse module whose indices ascend in every row (None when
    they do not: the tensor-core kernel cannot walk them); cached on the module."""

    def build() -> torch.Tensor | None:
        index = module.group_index
        if not bool((index[:, 1:] > index[:, :-1]).all()):
            return None
        return kept_group_bits(index, module.in_features // module.group_size)

    return cached_on(module, "_gqsa_dot_bits", storage_key(module.group_index), build)


def gqsa_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    bits = None
    if module.group_index is not None and x.numel() >= DOT_MIN_TOKENS * x.shape[-1]:
        bits = _dot_bits(module)
    ascending = module.group_index is None or bits is not None
    return gqsa_matmul(x, module.qweight, module.scales, module.zeros, module.group_index, module.bias, ascending=ascending, bits=bits)

