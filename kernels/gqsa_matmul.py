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
(the dequantization shared, a packed FMA per two weights and token: 0.27 at four); more go in
groups of four side by side in one launch. Rows keep different groups, so a warp's rows read
their activations from different places (L1 traffic the static budget does not count), and
tensor cores (which need one operand shared by the tile's rows) do not apply: on CUDA cores a
token costs at least half a packed FMA per weight, so beyond about four tokens no kernel of this
format stays within Hopper's 0.218 warp-instructions per weight byte (16 tokens: about 1.1).

fp32 layers and groups under 8 columns (`_gqsa_kernel`): each row reads its own group's
contiguous activation columns, the products on CUDA cores, each lane keeping partial sums over
the group's columns that are reduced once after the loop; codes become floats by the 2^23 bit
trick and (q − z)·s = q·s − z·s is one FMA. Split-K over the kept groups gives the SMs enough
programs at decode.
"""

from __future__ import annotations

import torch

from .pairs import half_to_float, lane_groups, launch_pair_kernel, offsets_program, pair_sum, program_work, split2, split4, store_rows
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


# tokens one program of the pair kernel takes: the dequantization is shared and each token adds
# one packed FMA per two weights; at 4 tokens sm_90 issues 0.27 warp-instructions per weight byte
# (see compile_kernels). More tokens go in groups of up to four side by side in one launch, each
# group a program over the same rows (the bytes from L2 after the first): 16 tokens cost about
# four times 0.27, where `_gqsa_kernel` took 4.2–6.7.
PAIR_GROUP_TOKENS = 4


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
) -> torch.Tensor:
    """y = x·Ŵᵀ + bias for GQSALinear's storage: qweight (M, kept, g/2) uint8, scales (M, kept),
    zeros (M, kept) uint8, group_index (M, kept) integer, or None when every group is kept in
    column order; x (..., K) -> (..., M). fp16/bf16 tokens go to `_gqsa_gemv_kernel` in groups
    of up to PAIR_GROUP_TOKENS (its PTX pairs on a GPU; `pairs` and `ptx` override), fp32 ones
    and groups under 8 columns to `_gqsa_kernel`."""
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
    if pairs is None:
        pairs = x.dtype in (torch.float16, torch.bfloat16) and group >= 8
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


def gqsa_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    return gqsa_matmul(x, module.qweight, module.scales, module.zeros, module.group_index, module.bias)

