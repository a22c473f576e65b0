"""W3/W2 group-quantized GEMM for decode: y = x·Ŵᵀ + b with Ŵ stored as LowBitLinear's codes.

Ŵ[r, G] = (q − zero)·scale per group G of g input columns. A group's codes lie in bit planes
(compress/modules/lowbit.py): g/4 bytes of low two bits (code 4j+p at bits 2p of byte j), then
for W3 g/8 bytes of third bits, byte k serving low bytes k and k + g/8. Per group a program loads
three aligned (rows × g/8) byte tiles: the low bytes of each half of the group and the third-bit
bytes; code p of a low byte then comes out with one shift and one mask (two more for its third
bit), the same for every byte, so nothing straddles and nothing is gathered. Bytes to float by the
2^23 bit trick (no I2F), then (q − z)·s = q·s − z·s as one FMA.

Groups of 32 or more go to tensor cores at every token count (`_lowbit_dot_kernel`): each half's
four streams joined back into column order in registers (tl.join keeps them in-thread),
dequantized, one `tl.dot` per half; launched like the W4 and W8 kernels (`launch_group_dot`).
Even at one token this issues fewer instructions per weight byte than the CUDA-core kernel
(0.589 against 0.964 for W2 g64, 0.644 against 0.856 for W3 on sm_90, eval/compile_kernels.py):
the unpacking is the same and the products move off the FP pipes. Smaller groups run on CUDA
cores (`_lowbit_kernel`): the eight streams (half × position p) each multiply the activation
columns they hold, 4j + p of their half, into per-lane partial sums reduced after the loop.
g must be 8 times a power of two (at least 32 for tensor cores). The reference is the dequantized
weight (`expanded_reference`).
"""

from __future__ import annotations

import torch

from .runtime import (
    check_group_codes,
    check_launch,
    flat_tokens,
    launch_group_dot,
    launch_group_lanes,
    launch_refusal,
    next_pow2,
    output_like,
    tl,
    triton,
)


if triton is not None:

    @triton.jit
    def _stream(low, high, p: tl.constexpr, half: tl.constexpr, BITS: tl.constexpr):
        """Codes at position p of each low byte (int32), their third bit from `high` for W3."""
        codes = (low >> (2 * p)) & 3
        if BITS == 3:
            codes = codes | (((high >> (4 * half + p)) & 1) << 2)
        return codes

    @triton.jit
    def _to_float(codes):
        """Small non-negative int32 codes to float32, exactly: the bits of 2^23 + q, minus 2^23."""
        return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _load_planes(q_ptr, row_bytes, row_ok, GROUP: tl.constexpr, BITS: tl.constexpr):
        """(low bytes of the first half, of the second half, third-bit bytes) as int32 (rows × g/8)."""
        j = tl.arange(0, GROUP // 8)
        offsets = row_bytes[:, None] + j[None, :]
        low_a = tl.load(q_ptr + offsets, mask=row_ok[:, None], other=0).to(tl.int32)
        low_b = tl.load(q_ptr + offsets + GROUP // 8, mask=row_ok[:, None], other=0).to(tl.int32)
        high = low_a
        if BITS == 3:
            high = tl.load(q_ptr + offsets + GROUP // 4, mask=row_ok[:, None], other=0).to(tl.int32)
        return low_a, low_b, high

    @triton.jit
    def _lowbit_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, K, stride_xn, stride_yn,
        HAS_BIAS: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        j = tl.arange(0, GROUP // 8)
        groups = K // GROUP
        acc = tl.zeros((BLOCK_M, GROUP // 8, BLOCK_N), dtype=tl.float32)
        for g in range(0, groups):
            slot = rm * groups + g
            low_a, low_b, high = _load_planes(q_ptr, slot * (GROUP * BITS // 8), m_ok, GROUP, BITS)
            scale = tl.load(s_ptr + slot, mask=m_ok, other=0.0).to(tl.float32)[:, None]
            offset = tl.load(z_ptr + slot, mask=m_ok, other=0).to(tl.float32)[:, None] * scale
            x_cols = x_ptr + rn[None, None, :] * stride_xn + (g * GROUP + 4 * j)[None, :, None]
            for p in tl.static_range(4):
                w_a = _to_float(_stream(low_a, high, p, 0, BITS)) * scale - offset
                w_b = _to_float(_stream(low_b, high, p, 1, BITS)) * scale - offset
                x_a = tl.load(x_cols + p, mask=n_ok[None, None, :], other=0.0).to(tl.float32)
                x_b = tl.load(x_cols + GROUP // 2 + p, mask=n_ok[None, None, :], other=0.0).to(tl.float32)
                acc += w_a[:, :, None] * x_a + w_b[:, :, None] * x_b
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rn[None, :] * stride_yn + rm[:, None], out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _half_in_order(low, high, half: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr):
        """A half group's codes in column order (rows × g/2): element (j, a, b) of the joins is
        column 4j + 2a + b, which holds stream p = 2a + b."""
        even = tl.join(_stream(low, high, 0, half, BITS), _stream(low, high, 2, half, BITS))
        odd = tl.join(_stream(low, high, 1, half, BITS), _stream(low, high, 3, half, BITS))
        return tl.reshape(tl.join(even, odd), (ROWS, GROUP // 2))

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
        BLOCK_N: tl.constexpr, BITS: tl.constexpr,
    ):  # fmt: skip
        """Tensor cores for several tokens: per group, each half's codes in column order,
        dequantized on chip, one `tl.dot` with the half's activation columns."""
        tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and GROUP >= 32, "tl.dot needs tiles of at least 16")
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        cols = tl.arange(0, GROUP // 2)
        dot_dtype: tl.constexpr = tl.float32 if DOT_FP32 else x_ptr.dtype.element_ty
        fp16: tl.constexpr = (not DOT_FP32) and x_ptr.dtype.element_ty == tl.float16
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        g_start = pid_k * GROUPS_PER_SPLIT
        for g in range(g_start, tl.minimum(g_start + GROUPS_PER_SPLIT, GROUPS)):
            slot = rm * GROUPS + g
            low_a, low_b, high = _load_planes(q_ptr, slot * (GROUP * BITS // 8), m_ok, GROUP, BITS)
            scale = tl.load(s_ptr + slot, mask=m_ok, other=0.0).to(tl.float32)[:, None]
            zero = tl.load(z_ptr + slot, mask=m_ok, other=0).to(tl.float32)[:, None]
            w_a = _dequant(_half_in_order(low_a, high, 0, BITS, BLOCK_M, GROUP), scale, zero, dot_dtype, fp16)
            w_b = _dequant(_half_in_order(low_b, high, 1, BITS, BLOCK_M, GROUP), scale, zero, dot_dtype, fp16)
            x_half = x_ptr + rn[None, :] * stride_xn + (g * GROUP + cols)[:, None]
            x_a = tl.load(x_half, mask=n_ok[None, :], other=0.0).to(dot_dtype)
            x_b = tl.load(x_half + GROUP // 2, mask=n_ok[None, :], other=0.0).to(dot_dtype)
            if DOT_FP32:
                acc += tl.dot(w_a, x_a, input_precision="ieee")
                acc += tl.dot(w_b, x_b, input_precision="ieee")
            else:
                acc += tl.dot(w_a, x_a)
                acc += tl.dot(w_b, x_b)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + pid_k * stride_ys + rn[None, :] * stride_yn + rm[:, None], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def lowbit_group_supported(group: int, tensor_cores: bool) -> bool:
    """g/8 a power of two (the streams' tile width), and for tensor cores g/2 ≥ 16 (a dot's K)."""
    eighth = group // 8
    return group % 8 == 0 and eighth & (eighth - 1) == 0 and (not tensor_cores or group >= 32)


def lowbit_tiles(n: int, group: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_M): at most 4096 (rows × g × tokens) weights per program and step, as W8's
    chunks, in (rows × g/8 × tokens) partial sums."""
    block_n = min(16, next_pow2(n))
    return block_n, max(2, min(64, 4096 // (group * block_n)))


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
    (M, groups), zeros (M, groups) uint8; x (..., K) -> (..., M) with K = groups·g. Tensor cores
    for groups of at least 32, CUDA cores for smaller ones; `tensor_cores` overrides."""
    check_launch(x, qweight, scales, zeros)
    if bits not in (2, 3):
        raise ValueError(f"lowbit_matmul reads 2- or 3-bit codes, not {bits}")
    m, groups, packed = qweight.shape
    group = packed * 8 // bits
    k = x.shape[-1]
    if packed * 8 % bits or not lowbit_group_supported(group, False):
        raise ValueError(f"the kernels take groups of 8 times a power of two, got {packed * 8 / bits:g}")
    if groups * group != k:
        raise ValueError(f"x has {k} features but the weight has {groups} groups of {group}")
    check_group_codes(qweight, scales, zeros)
    x2 = flat_tokens(x)
    n = x2.shape[0]
    out = output_like(x, m)
    if n == 0:
        return out
    if tensor_cores is None:
        tensor_cores = lowbit_group_supported(group, True)
    if tensor_cores:
        if not lowbit_group_supported(group, True):
            raise ValueError(f"the tensor-core kernel needs a group of at least 32, got {group}")
        launch_group_dot(_lowbit_dot_kernel, x, x2, out, qweight, scales, zeros, bias, group, split_k, BITS=bits)
        return out
    block_n, block_m = lowbit_tiles(n, group)
    launch_group_lanes(_lowbit_kernel, x2, out, qweight, scales, zeros, bias, block_n, block_m, BITS=bits, GROUP=group)
    return out


def lowbit_refusal(module, x: torch.Tensor) -> str | None:
    why = launch_refusal(x, module.qweight, module.scales)
    if why is None and not lowbit_group_supported(module.group_size, False):
        why = f"group size {module.group_size} is not 8 times a power of two"
    return why


def lowbit_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    return lowbit_matmul(x, module.qweight, module.scales, module.zeros, module.bits, module.bias)
