"""Decode on CUDA cores, two weights per instruction: what the W3/W2 (lowbit_matmul) and the
group-sparse W4 (gqsa_matmul) pair kernels share (a program takes one token, or up to four for W4
sharing the dequantization; more tokens go in token groups side by side in one launch).

A 32-bit word of b-bit codes (b = 2: W3/W2's low bits, b = 4: W4) holds its 32/b columns at bits
b·c. Masking it with (2^b − 1)·0x00010001 << b·p, after a shift by 8s, leaves columns (i, w/2 + i)
of the word's w = 32/b, pair i = (8/b)·s + p, at bits b·p of each 16-bit half;
OR-ing in the exponent of 1024 (fp16 0x6400) makes the halves the floats 1024 + 2^(b·p)·q, exactly.
A packed subtract of 1024 + 2^(b·p)·zero leaves 2^(b·p)·(q − z), and a packed FMA multiplies it by
activations prepared in the same pair order and scaled by 2^−b·p / max|x| (`gemv_activations`),
so the products are (q − z)·x / max|x|, summed in fp16 over a few words (no overflow: |x'| <= 1;
the fewer, the smaller the rounding: W4 one word, W3 two, W2 four, as their budgets allow) and in
fp32 beyond. The kernels' PTX programs do this per word; their Triton-arithmetic twins
(fp32, for the interpreter) read the same pairs.
"""

from __future__ import annotations

import struct

import torch

from .int4_matmul import NEG_FP16_BIAS2  # the fp16 pair (−1024, −1024) as int32
from .runtime import SplitK, interpreting, split_k_plan, tl, triton

LANES = 4  # lanes of a warp sharing a row in the one-token kernels, one group each per pass


def _fp16_bits(value: float) -> int:
    return struct.unpack("<H", struct.pack("<e", value))[0]


def offsets_program(code_bits: int) -> str:
    """PTX: $0.. the pairs −(1024 + 2^(b·p)·z) for p = 1 .. 8/b − 1 from p = 0's in $(8/b − 1), one
    exact fp16 FMA each (fp pipes, not integer ones): −(1024 + z)·2^(b·p) + (2^(b·p) − 1)·1024."""
    positions = 8 // code_bits
    lines = ["{", ".reg .b32 scale, offset;"]
    for p in range(1, positions):
        scale, offset = _fp16_bits(2.0 ** (code_bits * p)), _fp16_bits((2.0 ** (code_bits * p) - 1) * 1024)
        lines += [
            f"mov.b32 scale, 0x{scale:04x}{scale:04x};",
            f"mov.b32 offset, 0x{offset:04x}{offset:04x};",
            f"fma.rn.f16x2 ${p - 1}, ${positions - 1}, scale, offset;",
        ]
    return "\n".join(lines + ["}"])


def gemv_activations(x: torch.Tensor, code_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One token's activations (K,) in pair order for words of `code_bits`-bit codes: (K/2,) int32
    fp16 pairs, pair i = (8/b)·s + p of word u holding columns (w·u + i, w·u + w/2 + i), w = 32/b,
    scaled by 2^−b·p / max|x|; and max|x| as a (1,) fp32 tensor. The PyTorch reference of
    `launch_gemv_activations` (one launch instead of several)."""
    positions = 8 // code_bits
    xf = x.float()
    amax = xf.abs().amax().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    scale = 2.0 ** (code_bits * torch.arange(positions, device=x.device, dtype=torch.float32))
    pairs = (xf / amax).view(-1, 2, 2, positions) / scale  # (word, h, s, p)
    pairs = pairs.permute(0, 2, 3, 1).to(torch.float16).contiguous()  # (word, s, p, h)
    return pairs.view(torch.int32).flatten(), amax


def launch_gemv_activations(x: torch.Tensor, code_bits: int, padded_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`gemv_activations` of each token (row) of x (T, K) or (K,) by `_gemv_activations_kernel`,
    one program a token: pairs (T, K/2) and max|x| (T,) (flat for one (K,) token). With
    `padded_tokens` > T the rows past T are zero pairs with max|x| = 1 (a last token group's
    missing tokens: read, never stored)."""
    x2 = x.reshape(-1, x.shape[-1])
    tokens, k = x2.shape
    padded = max(tokens, padded_tokens or 0)
    pairs = torch.empty(padded, k, dtype=torch.float16, device=x.device)
    amax = torch.empty(padded, dtype=torch.float32, device=x.device)
    if padded > tokens:
        pairs[tokens:].zero_()
        amax[tokens:] = 1.0
    _gemv_activations_kernel[(tokens,)](x2, pairs, amax, k, CODE_BITS=code_bits, BLOCK=min(1024, triton.next_power_of_2(k)), num_warps=4)
    pairs = pairs.view(torch.int32)
    return (pairs.flatten(), amax) if x.dim() == 1 else (pairs, amax)


def token_groups(tokens: int, most: int) -> tuple[int, int]:
    """(tokens a group, groups) for `tokens` in groups of at most `most`, as even as they come
    (7 tokens by 4: two groups of 4, the last one short; 5: two of 3), so that the fewest
    tokens are padding."""
    groups = -(-tokens // most)
    return -(-tokens // groups), groups


def launch_pair_kernel(
    kernel, x2: torch.Tensor, out: torch.Tensor, words, scales, zeros, group_index, bias, split_k: int | None, code_bits: int,
    group_tokens: int = 1, **meta,
) -> None:  # fmt: skip
    """Launch a pair kernel (W3/W2 `_lowbit_gemv_kernel`, group-sparse W4 `_gqsa_gemv_kernel`:
    the same arguments, plus the kernel's own constexprs in `meta`) for x2 (T, K) fp16/bf16
    into out (…, M): the activations' pairs prepared in one launch, 64-row programs (16 in the
    interpreter), split-K over passes of LANES groups, and the tokens in groups of at most
    `group_tokens` (what one program takes), side by side in one launch: the token group is
    program_id(0), so the programs of one row block run together and read its bytes from HBM
    once (the others from L2)."""
    m, groups = scales.shape
    tokens = x2.shape[0]
    per_group, token_group_count = token_groups(tokens, group_tokens)
    pairs, amax = launch_gemv_activations(x2, code_bits, per_group * token_group_count)
    block_m = 16 if interpreting() else 64
    programs = triton.cdiv(m, block_m)
    splits, per_split = split_k_plan(triton.cdiv(groups, LANES), programs * token_group_count, x2.device, 2, split_k)
    split = SplitK(out.view(tokens, m), splits)
    kernel[(token_group_count, programs, splits)](
        pairs, words, scales, zeros, scales if group_index is None else group_index, bias if bias is not None else scales,
        split.target, amax, m, tokens, groups, per_split * LANES, split.split_stride, pairs.shape[1], split.target.stride(-2),
        HAS_BIAS=split.single and bias is not None, BLOCK_M=block_m, LANES=LANES, TOKENS=per_group,
        GROUPED=token_group_count > 1, num_warps=4, **meta,
    )  # fmt: skip
    split.finish(bias)


if triton is not None:
    _NEG_FP16_BIAS2 = tl.constexpr(NEG_FP16_BIAS2)

    @triton.jit
    def program_work(M, GROUPS, GROUPS_PER_SPLIT, BLOCK_M: tl.constexpr, TOKENS: tl.constexpr):
        """This program's first token (its token group's, program_id(0)), its rows (rm), the rows
        it reads (those past M read row M − 1 and are never stored, so no load needs a mask) and
        its split's groups [start, end)."""
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        start = tl.program_id(2) * GROUPS_PER_SPLIT
        return tl.program_id(0) * TOKENS, rm, tl.minimum(rm, M - 1), start, tl.minimum(start + GROUPS_PER_SPLIT, GROUPS)

    @triton.jit
    def store_rows(row_sum, amax_ptr, b_ptr, y_ptr, rm, M, token, N, stride_ys, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr):
        """y (this split's slot; token `token`'s: amax_ptr and y_ptr point at it) = the lanes'
        sums times max|x|, plus the bias; nothing for a padding token (token >= N), which only a
        launch of several token groups has."""
        out = tl.sum(row_sum, axis=1) * tl.load(amax_ptr)
        rows = M
        if GROUPED:
            rows = tl.where(token < N, M, 0)  # a mask from a scalar, in a form the interpreter takes
        if HAS_BIAS:
            out += tl.load(b_ptr + rm, mask=rm < rows, other=0.0).to(tl.float32)
        tl.store(y_ptr + tl.program_id(2) * stride_ys + rm, out.to(y_ptr.dtype.element_ty), mask=rm < rows)

    @triton.jit
    def lane_groups(s_ptr, z_ptr, rows, g0, g_end, GROUPS, LANES: tl.constexpr):
        """A pass's groups g0 + lane of each (row, lane): (group, slot, scale, zero, −(1024 + z) as
        an fp16 pair). Lanes past the split's groups read its last group with scale 0."""
        lane = tl.arange(0, LANES)
        group = tl.minimum(g0 + lane, GROUPS - 1)
        slot = rows[:, None] * GROUPS + group[None, :]  # (rows, lanes)
        scale = tl.where((g0 + lane < g_end)[None, :], tl.load(s_ptr + slot).to(tl.float32), 0.0)
        zero = tl.load(z_ptr + slot).to(tl.int32)
        return group, slot, scale, zero, zero * 0x10001 + _NEG_FP16_BIAS2

    @triton.jit
    def pair_sum(acc, PTX: tl.constexpr):
        """A lane's sum over its group: the fp16 pair's two halves in fp32 (PTX), else acc."""
        if PTX:
            acc = half_to_float(acc, False) + half_to_float(acc, True)
        return acc

    @triton.jit
    def split2(t):
        """(…, 2) -> its two entries."""
        return tl.split(t)

    @triton.jit
    def split4(t):
        """(…, 4) -> its four entries, in order (each thread's own registers)."""
        a, b = tl.split(tl.reshape(t, t.shape[:-1] + (2, 2)))
        a0, a1 = tl.split(a)
        b0, b1 = tl.split(b)
        return a0, b0, a1, b1

    @triton.jit
    def half_to_float(pair, HIGH: tl.constexpr):
        """The low or high fp16 of an int32 pair, as fp32."""
        bits = (pair >> 16) if HIGH else pair
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _gemv_activations_kernel(x_ptr, pairs_ptr, amax_ptr, K, CODE_BITS: tl.constexpr, BLOCK: tl.constexpr):
        """`gemv_activations` of token program_id(0): max|x|, then the pairs, half by half."""
        WIDTH: tl.constexpr = 32 // CODE_BITS  # columns a word
        token = tl.program_id(0)
        x_ptr += token * K
        pairs_ptr += token * K
        amax_ptr += token
        POSITIONS: tl.constexpr = 8 // CODE_BITS
        offsets = tl.arange(0, BLOCK)
        largest = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            v = tl.load(x_ptr + k0 + offsets, mask=k0 + offsets < K, other=0.0).to(tl.float32)
            largest = tl.maximum(largest, tl.abs(v))
        amax = tl.maximum(tl.max(largest), 1.1754943508222875e-38)
        tl.store(amax_ptr, amax)
        for k0 in range(0, K, BLOCK):
            e = k0 + offsets  # output half e: word e // WIDTH, pair (e % WIDTH) // 2, half e % 2
            pair = (e % WIDTH) // 2
            source = (e // WIDTH) * WIDTH + (WIDTH // 2) * (e % 2) + pair
            scale = (1 << (CODE_BITS * (pair % POSITIONS))).to(tl.float32)
            v = tl.load(x_ptr + source, mask=e < K, other=0.0).to(tl.float32) / amax
            tl.store(pairs_ptr + e, (v / scale).to(tl.float16), mask=e < K)
