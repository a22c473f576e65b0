"""W3/W2 group-quantized GEMM: y = x·Ŵᵀ + b with Ŵ stored as LowBitLinear's codes.

Ŵ[r, G] = (q − zero)·scale per group G of g input columns. A group's codes are 32-bit words
(compress/modules/lowbit.py): g/16 low words, then for W3 g/32 words of third bits; low word u
holds column 16u + c, c = 8h + 4s + p, at bit 16h + 8s + 2p, and third word v the third bits of
low words 2v (column c's at bit 16h + 2p + 2 + s) and 2v + 1 (the same rotated by 8).

One token (decode), fp16/bf16 (`_lowbit_gemv_kernel`): four lanes of a warp share a row, each
reading one group per pass as 16-byte (W2) or 8-byte (W3) vectors, so a warp's loads cover eight
rows' contiguous bytes. A word's 16 codes become eight pairs of 16-bit floats in PTX, two weights
per instruction (kernels/pairs.py, b = 2): the mask 0x00030003 << 2p after a shift by 8s leaves
columns (4s + p, 8 + 4s + p) at bits 2p of each half, a LOP3 ORs in the exponent of 1024 (for W3
a second one the third bits, which the third word has two bits above them once shifted by s, odd
words after a rotation by 8), one HADD2 subtracts 1024 + 4^p·zero, one HFMA2 multiplies by the
prepared activations and accumulates. Per weight 1.6 (W2) and 2.3 (W3) instructions, products
included. Partial sums in fp16 over two words (W3) or four (W2), then fp32: against the exact dot
product 6e-4 (W3 g64) and 1.4e-3 (W2 g64) relative error in the emulated PTX (fp16 tensor-core
products with fp32 sums: ~3e-4), where W2's own quantization error is orders of magnitude larger.
fp32 layers and Triton's interpreter (which cannot run PTX) run the same kernel with the pair
arithmetic written in Triton, in fp32.

More tokens, and fp32 layers, go to tensor cores (`_lowbit_dot_kernel`): per group the weights
in column order, dequantized on chip, one `tl.dot`. On the GPU a short PTX program
(`_word_values_ptx`) turns a low word (and its third word) into its 16 weights, two per
instruction: a shift by 8s + 4p1 leaves columns (c, c + 8) at bits 2p0 of each half, where a LOP3
(two for W3) ORs in the exponent whose mantissa unit sits there (1024 and 256 in fp16, 128 and 32
in bf16), a packed FMA subtracts base + z exactly and one multiplies by the scale: 0.35 (W3) and
0.40 (W2) warp-instructions per weight byte on sm_90 at g = 64 in both dtypes, where the same
arithmetic in Triton took 0.56–0.72 (the joins to column order then cost a PRMT a pair: the PTX
pairs columns c and c + 8, the tile wants neighbours). Two tokens take it too: the one-token
kernel run once a token side by side costs 0.42–0.44 (`tensor_cores=False` still runs that).
The reference is the dequantized weight (`expanded_reference`).
"""

from __future__ import annotations

import torch

from .pairs import half_to_float, lane_groups, launch_pair_kernel, offsets_program, pair_sum, program_work, split2, split4, store_rows
from .runtime import (
    check_group_codes,
    check_launch,
    choose_ptx,
    flat_tokens,
    interpreting,
    launch_group_dot,
    launch_refusal,
    output_like,
    tl,
    triton,
)


def _pair_program(bits: int, odd: bool = False) -> str:
    """PTX for one low word: $0 the updated pair sum; $1 the sum so far, $2 the word, $3 its third
    word (W3; `odd`: the word's third bits are those rotated by 8), $4..$11 the activation pairs
    4s + p, $12..$15 the pairs −(1024 + 4^p·zero)."""
    lines = ["{", ".reg .b32 magic, m, t, v, d, acc, w1, h0, h1;", "mov.b32 magic, 0x64006400;", "mov.b32 acc, $1;", "shr.u32 w1, $2, 8;"]
    if bits == 3:  # the third bits of columns (4s + p, 8 + 4s + p) to bits 2p + 2 of each half
        lines += ["shf.r.wrap.b32 h0, $3, $3, 8;" if odd else "mov.b32 h0, $3;", "shr.u32 h1, h0, 1;"]
    for s in range(2):
        word, third = ("$2", "h0") if s == 0 else ("w1", "h1")
        for p in range(4):
            lines.append(f"mov.b32 m, 0x{0x00030003 << 2 * p:08x};")
            if bits == 3:
                lines += [f"mov.b32 t, 0x{0x00040004 << 2 * p:08x};", f"lop3.b32 t, {third}, t, magic, 0xEA;", f"lop3.b32 v, {word}, m, t, 0xEA;"]
            else:
                lines.append(f"lop3.b32 v, {word}, m, magic, 0xEA;")  # (word & m) | magic: 1024 + 4^p·q, two at once
            lines += [f"add.rn.f16x2 d, v, ${12 + p};", f"fma.rn.f16x2 acc, d, ${4 + 4 * s + p}, acc;"]
    return "\n".join(lines + ["mov.b32 $0, acc;", "}"])


def _word_values_ptx(bits: int, bf16: bool) -> str:
    """PTX for one low word of 16 codes (and its third word, W3) to 16 dequantized 16-bit floats
    in column order: $0..$15 columns 0..15; $16 the word, $17 its third word (W3, pre-rotated for
    odd words), $18/$19 the pairs −(base_0 + z), −(base_1 + z), $20 the scale pair.
    Column c = 8h + 4s + 2p1 + p0 sits at bit 16h + 8s + 4p1 + 2p0: a shift by 8s + 4p1 leaves
    columns (c, c + 8) at bits 2p0 of each half, where a LOP3 ORs in the exponent of base_p0
    (whose mantissa's unit is there: 1024 and 256 in fp16, 128 and 32 in bf16): the floats
    base_p0 + q, two at once."""
    magic = ("0x43004300", "0x42004200") if bf16 else ("0x64006400", "0x5C005C00")
    one, fma = ("0x3F803F80", "fma.rn.bf16x2") if bf16 else ("0x3C003C00", "fma.rn.f16x2")
    w, t = "$16", "$17"
    lines = ["{", ".reg .b32 v, tm, sw, st, one, negzero;", f"mov.b32 one, {one};", "mov.b32 negzero, 0x80008000;"]
    for s in range(2):
        for p1 in range(2):
            shift = 8 * s + 4 * p1
            lines.append(f"shr.u32 sw, {w}, {shift};" if shift else f"mov.b32 sw, {w};")
            if bits == 3:  # the third bit of column c at 16h + 4p1 + 2p0 + 2 + s: two above its field after this shift
                tshift = 4 * p1 + s
                lines.append(f"shr.u32 st, {t}, {tshift};" if tshift else f"mov.b32 st, {t};")
            for p0 in range(2):
                field = f"0x{0x00030003 << 2 * p0:08x}"
                if bits == 3:
                    lines += [f"lop3.b32 tm, st, 0x{0x00040004 << 2 * p0:08x}, {magic[p0]}, 0xEA;", f"lop3.b32 v, sw, {field}, tm, 0xEA;"]
                else:
                    lines.append(f"lop3.b32 v, sw, {field}, {magic[p0]}, 0xEA;")
                lines += [f"{fma} v, v, one, ${18 + p0};", f"{fma} v, v, $20, negzero;"]
                c = 4 * s + 2 * p1 + p0
                lines.append(f"mov.b32 {{${c}, ${c + 8}}}, v;")
    return "\n".join(lines + ["}"])

# the pairs −base_p0 (see `_word_values_ptx`) as int32 bits: fp16 −1024 and −256, bf16 −128 and −32;
# a zero point z adds z (p0 = 0) and 4z (p0 = 1) to each half's mantissa
NEG_BASE2 = {False: (0xE400E400 - (1 << 32), 0xDC00DC00 - (1 << 32)), True: (0xC300C300 - (1 << 32), 0xC200C200 - (1 << 32))}


def lowbit_row_pairs(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `_lowbit_dot_kernel` computes per row and group for its PTX: the pairs −(base_0 + z),
    −(base_1 + z) and the scale's bits twice, as int32 tensors (for tests; the kernel does the same
    in registers)."""
    neg0, neg1 = NEG_BASE2[scales.dtype == torch.bfloat16]
    z = zeros.to(torch.int32)
    scale_bits = scales.view(torch.int16).to(torch.int32) & 0xFFFF
    return z * 0x10001 + neg0, z * 0x40004 + neg1, scale_bits * 0x10001


if triton is not None:
    OFFSETS = tl.constexpr(offsets_program(2))
    PAIRS_W2 = tl.constexpr(_pair_program(2))
    PAIRS_W3 = tl.constexpr(_pair_program(3))
    PAIRS_W3_ODD = tl.constexpr(_pair_program(3, odd=True))
    VALUES_W2_FP16 = tl.constexpr(_word_values_ptx(2, False))
    VALUES_W2_BF16 = tl.constexpr(_word_values_ptx(2, True))
    VALUES_W3_FP16 = tl.constexpr(_word_values_ptx(3, False))
    VALUES_W3_BF16 = tl.constexpr(_word_values_ptx(3, True))
    _NEG0_FP16 = tl.constexpr(NEG_BASE2[False][0])
    _NEG1_FP16 = tl.constexpr(NEG_BASE2[False][1])
    _NEG0_BF16 = tl.constexpr(NEG_BASE2[True][0])
    _NEG1_BF16 = tl.constexpr(NEG_BASE2[True][1])

    @triton.jit
    def _code(low, third, h: tl.constexpr, s: tl.constexpr, p: tl.constexpr, ODD: tl.constexpr, BITS: tl.constexpr):
        """The code of column 8h + 4s + p of a low word (int32), with its third bit for W3 (third:
        the word's third word; ODD: an odd low word, whose third bits are 8 further)."""
        codes = (low >> (16 * h + 8 * s + 2 * p)) & 3
        if BITS == 3:
            codes = codes | (((third >> ((16 * h + 2 * p + 2 + s + 8 * ODD) % 32)) & 1) << 2)
        return codes

    @triton.jit
    def _pair_fp32(acc, low, third, pair, zero, s: tl.constexpr, p: tl.constexpr, ODD: tl.constexpr, BITS: tl.constexpr):
        """One pair of `_pair_program` in Triton arithmetic, in fp32: columns (4s + p, 8 + 4s + p)."""
        d_lo = (_code(low, third, 0, s, p, ODD, BITS) - zero).to(tl.float32) * (1 << (2 * p))
        d_hi = (_code(low, third, 1, s, p, ODD, BITS) - zero).to(tl.float32) * (1 << (2 * p))
        return acc + d_lo * half_to_float(pair, False) + d_hi * half_to_float(pair, True)

    @triton.jit
    def _word_fp32(acc, low, third, x_lo, x_hi, zero, ODD: tl.constexpr, BITS: tl.constexpr):
        """`_pair_program` in Triton arithmetic, in fp32: acc + Σ (q − z)·4^p·x' over the word."""
        x0, x1, x2, x3 = split4(x_lo)
        x4, x5, x6, x7 = split4(x_hi)
        acc = _pair_fp32(acc, low, third, x0, zero, 0, 0, ODD, BITS)
        acc = _pair_fp32(acc, low, third, x1, zero, 0, 1, ODD, BITS)
        acc = _pair_fp32(acc, low, third, x2, zero, 0, 2, ODD, BITS)
        acc = _pair_fp32(acc, low, third, x3, zero, 0, 3, ODD, BITS)
        acc = _pair_fp32(acc, low, third, x4, zero, 1, 0, ODD, BITS)
        acc = _pair_fp32(acc, low, third, x5, zero, 1, 1, ODD, BITS)
        acc = _pair_fp32(acc, low, third, x6, zero, 1, 2, ODD, BITS)
        return _pair_fp32(acc, low, third, x7, zero, 1, 3, ODD, BITS)

    @triton.jit
    def _word(acc, low, third32, x_ptrs, zero, nb0, nb1, nb2, nb3, ODD: tl.constexpr, BITS: tl.constexpr, PTX: tl.constexpr):
        """One low word of every (row, lane): its 16 codes times their activations, into acc (an
        fp16 pair sum as int32 on the PTX path, fp32 otherwise). x_ptrs: the word's eight
        activation pairs, (rows, lanes, 4) pointers to the first four."""
        x_lo = tl.load(x_ptrs)
        x_hi = tl.load(x_ptrs + 4)
        if PTX:
            x0, x1, x2, x3 = split4(x_lo)
            x4, x5, x6, x7 = split4(x_hi)
            acc = tl.inline_asm_elementwise(
                PAIRS_W2 if BITS == 2 else (PAIRS_W3_ODD if ODD else PAIRS_W3), "=r," + ",".join(["r"] * 15),
                [acc, low, third32, x0, x1, x2, x3, x4, x5, x6, x7, nb0, nb1, nb2, nb3],
                dtype=tl.int32, is_pure=True, pack=1,
            )  # fmt: skip
        else:
            acc = _word_fp32(acc, low, third32, x_lo, x_hi, zero, ODD, BITS)
        return acc

    @triton.jit
    def _words(w0, w1, w2, w3, t0, t1, x_ptrs, zero, nb0, nb1, nb2, nb3, COUNT: tl.constexpr, BITS: tl.constexpr, PTX: tl.constexpr):
        """The fp32 sum of the first COUNT (1, 2 or 4) of four low words' products (t0: the third
        word of w0 and w1, t1 of w2 and w3). Their fp16 pair sums go to fp32 after COUNT words:
        W3 takes two (partial sums of 8 products a half: 8e-4 of the dot product where a
        group-long fp16 sum gave 1.1e-3 at g = 128, for 0.010 more warp-instructions per weight
        byte), W2 four, whose budget has no room for more (0.217 of 0.218)."""
        acc = tl.zeros(w0.shape, dtype=tl.int32 if PTX else tl.float32)
        acc = _word(acc, w0, t0, x_ptrs, zero, nb0, nb1, nb2, nb3, False, BITS, PTX)
        if COUNT >= 2:
            acc = _word(acc, w1, t0, x_ptrs + 8, zero, nb0, nb1, nb2, nb3, True, BITS, PTX)
        if COUNT == 4:
            acc = _word(acc, w2, t1, x_ptrs + 16, zero, nb0, nb1, nb2, nb3, False, BITS, PTX)
            acc = _word(acc, w3, t1, x_ptrs + 24, zero, nb0, nb1, nb2, nb3, True, BITS, PTX)
        return pair_sum(acc, PTX)

    @triton.jit
    def _lowbit_gemv_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, amax_ptr,
        M, N, GROUPS, GROUPS_PER_SPLIT, stride_ys, stride_xt, stride_yt,
        HAS_BIAS: tl.constexpr, PTX: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
        LANES: tl.constexpr, TOKENS: tl.constexpr, GROUPED: tl.constexpr,
    ):  # fmt: skip
        """Token program_id(0) of N (`launch_pair_kernel`, groups of TOKENS = 1). x_ptr: the
        prepared activation pairs (kernels/pairs.py, b = 2), int32, stride_xt a token; q_ptr: the
        codes as int32 words (M, groups, g·bits/32); g_ptr: unread (every group is kept);
        amax_ptr: max|x| per token (fp32); stride_yt: a token's outputs."""
        LOW: tl.constexpr = GROUP // 16  # low words per group
        WORDS: tl.constexpr = GROUP * BITS // 32
        VEC: tl.constexpr = 4 if LOW >= 4 else LOW  # low words a load
        token, rm, rows, g_start, g_end = program_work(M, GROUPS, GROUPS_PER_SPLIT, BLOCK_M, TOKENS)
        if GROUPED:  # several tokens, one a program (one token: none, which costs the loop two instructions less)
            x_ptr += token * stride_xt
            amax_ptr += token
            y_ptr += token * stride_yt
        vec = tl.arange(0, VEC)
        four = tl.arange(0, 4)
        row_sum = tl.zeros((BLOCK_M, LANES), dtype=tl.float32)
        for g0 in range(g_start, g_end, LANES):
            group, slot, scale, zero, nb0 = lane_groups(s_ptr, z_ptr, rows, g0, g_end, GROUPS, LANES)
            nb1, nb2, nb3 = nb0, nb0, nb0  # −(1024 + 4^p·z), twice, as fp16 bits
            if PTX:
                nb1, nb2, nb3 = tl.inline_asm_elementwise(OFFSETS, "=r,=r,=r,r", [nb0], dtype=(tl.int32,) * 3, is_pure=True, pack=1)
            group_sum = tl.zeros((BLOCK_M, LANES), dtype=tl.float32)
            x_word = x_ptr + (group * LOW)[None, :, None] * 8 + four[None, None, :] + tl.zeros((BLOCK_M, 1, 1), dtype=tl.int32)
            for c in tl.static_range(0, LOW, VEC):
                low = tl.load(q_ptr + slot[:, :, None] * WORDS + c + vec[None, None, :])
                third = tl.zeros((BLOCK_M, LANES, 2), dtype=tl.int32)
                if BITS == 3:  # the third words of these low words: VEC/2 of them (VEC >= 2 for W3)
                    third = tl.load(q_ptr + slot[:, :, None] * WORDS + LOW + c // 2 + tl.arange(0, 2)[None, None, :] % (VEC // 2))
                t0, t1 = split2(third)
                x_c = x_word + c * 8
                if VEC == 1:
                    w = tl.reshape(low, (BLOCK_M, LANES))
                    part = _words(w, w, w, w, t0, t1, x_c, zero, nb0, nb1, nb2, nb3, 1, BITS, PTX)
                elif VEC == 2:
                    w0, w1 = split2(low)
                    part = _words(w0, w1, w1, w1, t0, t1, x_c, zero, nb0, nb1, nb2, nb3, 2, BITS, PTX)
                else:
                    w0, w1, w2, w3 = split4(low)
                    if BITS == 3:
                        part = _words(w0, w1, w1, w1, t0, t1, x_c, zero, nb0, nb1, nb2, nb3, 2, BITS, PTX)
                        part += _words(w2, w3, w3, w3, t1, t1, x_c + 16, zero, nb0, nb1, nb2, nb3, 2, BITS, PTX)
                    else:
                        part = _words(w0, w1, w2, w3, t0, t1, x_c, zero, nb0, nb1, nb2, nb3, 4, BITS, PTX)
                if c == 0:  # assigned, not added to zeros (which costs an FADD the compiler may not drop)
                    group_sum = part
                else:
                    group_sum += part
            row_sum += group_sum * scale
        store_rows(row_sum, amax_ptr, b_ptr, y_ptr, rm, M, token, N, stride_ys, HAS_BIAS, GROUPED)

    @triton.jit
    def _column_codes(low, third, BITS: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr):
        """A group's codes in column order (rows × g) from its low words (rows × g/16) and their
        third words, odd words' rotated back (so every word reads its third bits where an even one
        does). The joins keep every value in its thread: column 8h + 4s + 2p1 + p0 of a word is
        element (h, s, p1, p0) of the last join, whose axis is the last of the four."""
        a0 = tl.join(_code(low, third, 0, 0, 0, False, BITS), _code(low, third, 1, 0, 0, False, BITS))
        a1 = tl.join(_code(low, third, 0, 0, 1, False, BITS), _code(low, third, 1, 0, 1, False, BITS))
        a2 = tl.join(_code(low, third, 0, 0, 2, False, BITS), _code(low, third, 1, 0, 2, False, BITS))
        a3 = tl.join(_code(low, third, 0, 0, 3, False, BITS), _code(low, third, 1, 0, 3, False, BITS))
        b0 = tl.join(_code(low, third, 0, 1, 0, False, BITS), _code(low, third, 1, 1, 0, False, BITS))
        b1 = tl.join(_code(low, third, 0, 1, 1, False, BITS), _code(low, third, 1, 1, 1, False, BITS))
        b2 = tl.join(_code(low, third, 0, 1, 2, False, BITS), _code(low, third, 1, 1, 2, False, BITS))
        b3 = tl.join(_code(low, third, 0, 1, 3, False, BITS), _code(low, third, 1, 1, 3, False, BITS))
        # (…, h, s) per p, then p1, then p0
        p0 = tl.join(tl.join(a0, b0), tl.join(a2, b2))
        p1 = tl.join(tl.join(a1, b1), tl.join(a3, b3))
        return tl.reshape(tl.join(p0, p1), (ROWS, GROUP))

    @triton.jit
    def _column_values_ptx(low, third, neg0, neg1, scale2, BITS: tl.constexpr, BF16: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr):
        """A group's weights in column order (rows × g) from its low words and third words (odd
        ones rotated back), dequantized by `_word_values_ptx`, two weights per instruction; the
        joins as in `_column_codes`, so each pair stays in the register the PTX wrote it to."""
        if BITS == 3:
            program: tl.constexpr = VALUES_W3_BF16 if BF16 else VALUES_W3_FP16
        else:
            program: tl.constexpr = VALUES_W2_BF16 if BF16 else VALUES_W2_FP16
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15 = tl.inline_asm_elementwise(
            program, ",".join(["=h"] * 16) + ",r,r,r,r,r", [low, third, neg0, neg1, scale2],
            dtype=(tl.bfloat16 if BF16 else tl.float16,) * 16, is_pure=True, pack=1,
        )  # fmt: skip
        p0 = tl.join(tl.join(tl.join(c0, c8), tl.join(c4, c12)), tl.join(tl.join(c2, c10), tl.join(c6, c14)))
        p1 = tl.join(tl.join(tl.join(c1, c9), tl.join(c5, c13)), tl.join(tl.join(c3, c11), tl.join(c7, c15)))
        return tl.reshape(tl.join(p0, p1), (ROWS, GROUP))

    @triton.jit
    def _to_float(codes):
        """Small non-negative int32 codes to float32, exactly: the bits of 2^23 + q, minus 2^23."""
        return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _dequant(codes, scale, zero, x_dtype: tl.constexpr, FP16: tl.constexpr):
        """Codes (rows × cols) to weights in the dot's input dtype. fp16 layers dequantize in fp16
        (0x6400 | q is the float 1024 + q; minus 1024 + z that is q − z exactly), others in fp32."""
        if FP16:
            q = (codes.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
            return (q - (1024.0 + zero).to(tl.float16)) * scale.to(tl.float16)
        return (_to_float(codes) * scale - zero * scale).to(x_dtype)

    @triton.jit
    def _lowbit_dot_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, GROUPS, GROUPS_PER_SPLIT, stride_xn, stride_yn, stride_ys,
        HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BITS: tl.constexpr, PTX: tl.constexpr,
    ):  # fmt: skip
        """Tensor cores: per group, the codes in column order, dequantized on chip, one `tl.dot`
        with the group's activation columns. q_ptr: the codes as int32 words; s_ptr: the scales,
        as an int16 view on the PTX path."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.minimum(rm, M - 1)
        n_ok = rn < N
        cols = tl.arange(0, GROUP)
        LOW: tl.constexpr = GROUP // 16
        WORDS: tl.constexpr = GROUP * BITS // 32
        u = tl.arange(0, LOW)
        dot_dtype: tl.constexpr = tl.float32 if DOT_FP32 else x_ptr.dtype.element_ty
        fp16: tl.constexpr = (not DOT_FP32) and x_ptr.dtype.element_ty == tl.float16
        BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        g_start = pid_k * GROUPS_PER_SPLIT
        for g in range(g_start, tl.minimum(g_start + GROUPS_PER_SPLIT, GROUPS)):
            slot = rows * GROUPS + g
            low = tl.load(q_ptr + slot[:, None] * WORDS + u[None, :])
            third = low
            if BITS == 3:
                third = tl.load(q_ptr + slot[:, None] * WORDS + LOW + u[None, :] // 2)
                third = tl.where((u % 2 == 1)[None, :], ((third >> 8) & 0xFFFFFF) | (third << 24), third)
            if PTX:
                zero = tl.load(z_ptr + slot).to(tl.int32)[:, None]
                scale2 = tl.load(s_ptr + slot).to(tl.uint16, bitcast=True).to(tl.int32)[:, None] * 0x10001
                neg0 = zero * 0x10001 + (_NEG0_BF16 if BF16 else _NEG0_FP16)
                neg1 = zero * 0x40004 + (_NEG1_BF16 if BF16 else _NEG1_FP16)
                w = _column_values_ptx(low, third, neg0, neg1, scale2, BITS, BF16, BLOCK_M, GROUP)
            else:
                scale = tl.load(s_ptr + slot).to(tl.float32)[:, None]
                zero = tl.load(z_ptr + slot).to(tl.float32)[:, None]
                w = _dequant(_column_codes(low, third, BITS, BLOCK_M, GROUP), scale, zero, dot_dtype, fp16)
            x = tl.load(x_ptr + rn[None, :] * stride_xn + (g * GROUP + cols)[:, None], mask=n_ok[None, :], other=0.0).to(dot_dtype)
            if DOT_FP32:
                acc += tl.dot(w, x, input_precision="ieee")
            else:
                acc += tl.dot(w, x)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rm, mask=rm < M, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + pid_k * stride_ys + rn[None, :] * stride_yn + rm[:, None], acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & n_ok[None, :])


# tokens the CUDA-core kernel takes: 0.21 warp-instructions per weight byte at one token on sm_90
# (eval/compile_kernels.py); from two tokens tensor cores cost less (0.35–0.40 against twice 0.21)
PAIR_MAX_TOKENS = 1


def lowbit_group_supported(group: int, bits: int) -> bool:
    """Whole 32-bit words per group (g a multiple of 16, for W3 of 32) and g a power of two (a
    tile's width)."""
    return group % (32 if bits == 3 else 16) == 0 and group & (group - 1) == 0


def lowbit_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
    tensor_cores: bool | None = None,
    split_k: int | None = None,
    ptx: bool | None = None,
) -> torch.Tensor:
    """y = x·Ŵᵀ + bias for LowBitLinear's storage: qweight (M, groups, g·bits/8) uint8, scales
    (M, groups), zeros (M, groups) uint8; x (..., K) -> (..., M) with K = groups·g. Up to
    PAIR_MAX_TOKENS fp16/bf16 tokens go to the CUDA-core kernel, the rest to tensor cores
    (`tensor_cores` overrides the choice); both run their PTX on a GPU (the tensor-core one for
    fp16/bf16 inputs whose scales have their dtype; `ptx` overrides)."""
    check_launch(x, qweight, scales, zeros)
    if bits not in (2, 3):
        raise ValueError(f"lowbit_matmul reads 2- or 3-bit codes, not {bits}")
    m, groups, packed = qweight.shape
    group = packed * 8 // bits
    k = x.shape[-1]
    if packed * 8 % bits or not lowbit_group_supported(group, bits):
        raise ValueError(f"the kernels take W{bits} groups of whole 32-bit words, a power of two, got {packed * 8 / bits:g}")
    if groups * group != k:
        raise ValueError(f"x has {k} features but the weight has {groups} groups of {group}")
    check_group_codes(qweight, scales, zeros)
    x2 = flat_tokens(x)
    n = x2.shape[0]
    out = output_like(x, m)
    if n == 0:
        return out
    words = qweight.view(torch.int32)
    if tensor_cores is None:
        tensor_cores = n > PAIR_MAX_TOKENS or x.dtype == torch.float32
    if tensor_cores:
        ptx = choose_ptx(x, scales.dtype, ptx)
        launch_group_dot(
            _lowbit_dot_kernel, x, x2, out, words, scales.view(torch.int16) if ptx else scales, zeros, bias, group, split_k, BITS=bits, PTX=ptx
        )  # fmt: skip
        return out
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the CUDA-core kernel reads fp16 or bf16 tokens, got {x.dtype}")
    if ptx is None:
        ptx = not interpreting()
    launch_pair_kernel(_lowbit_gemv_kernel, x2, out, words, scales, zeros, None, bias, split_k, 2, PTX=ptx, BITS=bits, GROUP=group)
    return out


def lowbit_refusal(module, x: torch.Tensor) -> str | None:
    why = launch_refusal(x, module.qweight, module.scales)
    if why is None and not lowbit_group_supported(module.group_size, module.bits):
        why = f"group size {module.group_size} is not a power of two" + (" of at least 32" if module.bits == 3 else "")
    return why


def lowbit_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    return lowbit_matmul(x, module.qweight, module.scales, module.zeros, module.bits, module.bias)
