"""W3/W2 group-quantized GEMM for decode: y = x·Ŵᵀ + b with Ŵ stored as LowBitLinear's codes.

Ŵ[r, G] = (q − zero)·scale per group G of g input columns. A group's codes lie in bit planes
(compress/modules/lowbit.py): 32-bit words of the low two bits (16 codes each), then for W3 words
of the third bit (32 codes each), so a weight costs bits/8 bytes. The kernels read those words
once from HBM and unpack on chip with the same shift and mask for every code (no code straddles
a word); bytes to float by the 2^23 bit trick (no I2F), then (q − z)·s = q·s − z·s as one FMA.
They read whole words, so g must be a multiple of 32.

One token runs on CUDA cores with per-lane partial sums (`_lowbit_kernel`, the W8 kernel's shape);
more go to tensor cores (`_lowbit_dot_kernel`: the group's code tile unpacked and dequantized, then
one `tl.dot`), launched like the W4 and W8 tensor-core kernels (`launch_group_dot`).
The reference is the dequantized weight (`expanded_reference`).
"""

from __future__ import annotations

import torch

from .runtime import (
    check_launch,
    flat_tokens,
    interpreting,
    launch_group_dot,
    launch_refusal,
    next_pow2,
    output_like,
    tl,
    triton,
)

FMA_MAX_TOKENS = 1  # as for W8: from a few tokens on, CUDA-core products outgrow HBM's pace
WORD_CODES = 32  # codes per unpacking step: one word of the third-bit plane, two of the low plane

if triton is not None:

    @triton.jit
    def _unpack(words_ptr, slot_words, row_ok, first, CODES: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr):
        """Codes (ROWS × CODES) from code `first` of each row's group; `slot_words` is where each
        row's group starts, in 32-bit words."""
        word = first // 16 + tl.arange(0, CODES // 16)  # low-plane words
        lane = tl.arange(0, 16)
        low = tl.load(words_ptr + slot_words[:, None] + word[None, :], mask=row_ok[:, None], other=0)
        codes = (low[:, :, None] >> (2 * lane)[None, None, :]) & 3
        if BITS == 3:  # the third bit: word w // 2 of the plane after the low one, bits 16·(w % 2) + lane
            high = tl.load(words_ptr + slot_words[:, None] + GROUP // 16 + word[None, :] // 2, mask=row_ok[:, None], other=0)
            codes = codes | (((high[:, :, None] >> ((word % 2) * 16)[None, :, None] + lane[None, None, :]) & 1) << 2)
        return tl.reshape(codes, (ROWS, CODES)).to(tl.int32)

    @triton.jit
    def _lowbit_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, K, stride_xn, stride_yn,
        HAS_BIAS: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        rk = tl.arange(0, CHUNK)
        words_ptr = q_ptr.to(tl.pointer_type(tl.uint32))
        groups = K // GROUP
        acc = tl.zeros((BLOCK_M, CHUNK, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, CHUNK):
            group = k0 // GROUP  # CHUNK divides GROUP: a chunk lies in one group
            slot = rm * groups + group
            scale = tl.load(s_ptr + slot, mask=m_ok, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + slot, mask=m_ok, other=0).to(tl.float32)
            codes = _unpack(words_ptr, slot * (GROUP * BITS // 32), m_ok, k0 - group * GROUP, CHUNK, GROUP, BITS, BLOCK_M)
            q = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            w = q * scale[:, None] - (zero * scale)[:, None]
            x = tl.load(x_ptr + rn[None, None, :] * stride_xn + k0 + rk[None, :, None], mask=n_ok[None, None, :], other=0.0)
            acc += w[:, :, None] * x.to(tl.float32)
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rn[None, :] * stride_yn + rm[:, None], out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _lowbit_dot_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, GROUPS, GROUPS_PER_SPLIT, stride_xn, stride_yn, stride_ys,
        HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BITS: tl.constexpr,
    ):  # fmt: skip
        """Tensor cores for several tokens: per group, the (BLOCK_M × g) codes unpacked and
        dequantized on chip, then one `tl.dot` with the group's activation columns."""
        tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and GROUP >= 16, "tl.dot needs tiles of at least 16")
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        cols = tl.arange(0, GROUP)
        words_ptr = q_ptr.to(tl.pointer_type(tl.uint32))
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        g_start = pid_k * GROUPS_PER_SPLIT
        for g in range(g_start, tl.minimum(g_start + GROUPS_PER_SPLIT, GROUPS)):
            slot = rm * GROUPS + g
            codes = _unpack(words_ptr, slot * (GROUP * BITS // 32), m_ok, 0, GROUP, GROUP, BITS, BLOCK_M)
            scale = tl.load(s_ptr + slot, mask=m_ok, other=0.0).to(tl.float32)[:, None]
            zero = tl.load(z_ptr + slot, mask=m_ok, other=0).to(tl.float32)[:, None]
            q = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            w = q * scale - zero * scale
            x = tl.load(x_ptr + rn[None, :] * stride_xn + (g * GROUP + cols)[:, None], mask=n_ok[None, :], other=0.0)
            acc += tl.dot(w, x.to(tl.float32), input_precision="ieee") if DOT_FP32 else tl.dot(w.to(x.dtype), x)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + pid_k * stride_ys + rn[None, :] * stride_yn + rm[:, None], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def lowbit_chunk(group_size: int) -> int:
    """Codes per inner step of the CUDA-core kernel: 64 where the group holds them, else 32."""
    return 64 if group_size % 64 == 0 else WORD_CODES


def lowbit_tiles(n: int, chunk: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_M): at most 4096 (rows × chunk × tokens) partial sums per program, as W8."""
    block_n = min(16, next_pow2(n))
    return block_n, max(2, min(64, 4096 // (chunk * block_n)))


def lowbit_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
    tensor_cores: bool | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x·Ŵᵀ + bias for LowBitLinear's storage: qweight (M, groups, g·bits/8) uint8, scales
    (M, groups), zeros (M, groups) uint8; x (..., K) -> (..., M) with K = groups·g. CUDA cores for
    one token, tensor cores for more (power-of-two groups of at least 16); `tensor_cores` overrides."""
    check_launch(x, qweight, scales, zeros)
    if bits not in (2, 3):
        raise ValueError(f"lowbit_matmul reads 2- or 3-bit codes, not {bits}")
    m, groups, packed = qweight.shape
    group = packed * 8 // bits
    k = x.shape[-1]
    if packed * 8 % bits or group % WORD_CODES:
        raise ValueError(f"the kernels read whole 32-bit words: the group size must be a multiple of 32, got {packed * 8 / bits:g}")
    if qweight.data_ptr() % 4:
        raise ValueError("qweight must start on a 4-byte boundary (it is read as 32-bit words)")
    if groups * group != k:
        raise ValueError(f"x has {k} features but the weight has {groups} groups of {group}")
    if scales.shape != (m, groups) or zeros.shape != (m, groups):
        raise ValueError("scales and zeros must be (out_features, groups)")
    if qweight.dtype != torch.uint8 or zeros.dtype != torch.uint8:
        raise ValueError("qweight and zeros must be uint8")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    x2 = flat_tokens(x)
    n = x2.shape[0]
    out = output_like(x, m)
    if n == 0:
        return out
    if tensor_cores is None:
        tensor_cores = n > FMA_MAX_TOKENS and group >= 16 and group & (group - 1) == 0
    if tensor_cores:
        launch_group_dot(_lowbit_dot_kernel, x, x2, out, qweight, scales, zeros, bias, group, split_k, BITS=bits)
        return out
    chunk = lowbit_chunk(group)
    block_n, block_m = lowbit_tiles(n, chunk)
    block_m = 16 if interpreting() else block_m
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))  # token tiles fastest: a weight tile is read once
    _lowbit_kernel[grid](
        x2, qweight, scales, zeros, bias if bias is not None else scales, out,
        m, n, k, x2.stride(0), m,
        HAS_BIAS=bias is not None, BITS=bits, GROUP=group, CHUNK=chunk, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return out


def lowbit_refusal(module, x: torch.Tensor) -> str | None:
    why = launch_refusal(x, module.qweight, module.scales)
    if why is None and module.group_size % WORD_CODES:
        why = f"group size {module.group_size} is not a multiple of {WORD_CODES} (the kernels read whole words)"
    return why


def lowbit_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    return lowbit_matmul(x, module.qweight, module.scales, module.zeros, module.bits, module.bias)
