"""INT4 group-quantized GEMM on tensor cores: GQSALinear with every group kept (W4 alone, the
GPTQ-style storage), y = x·Ŵᵀ + b.

When every row keeps all K/g groups in order, a row's packed codes are contiguous and a K step of
one group is the same for all rows, so the tile can go through `tl.dot`: each program loads a
(BLOCK_M × g/2) byte tile, splits it into the low nibbles (even columns) and high nibbles (odd
columns), dequantizes both halves with the rows' scale and zero point of this group (in fp16 for
fp16 layers, two weights per instruction) and multiplies them by the group's even and odd
activation columns in two `tl.dot`s. On sm_90 this loop issues 0.333 warp-instructions per weight
byte (Hopper allows 0.218): joining the halves back into column order for one dot took 0.373 (a
PRMT per pair of weights), and staging the code tile through shared memory (cp.async) more
(eval/results/kernels/static-sm90). Bytes read per weight: 0.5 + (scale + zero)/g, about 0.52 at
g = 128 with fp16 scales, against 2 for dense fp16 (limit ~3.8x).
"""

from __future__ import annotations

import torch

from .runtime import (
    cached_on,
    check_launch,
    flat_tokens,
    launch_group_dot,
    launch_refusal,
    output_like,
    storage_key,
    tl,
    triton,
)

if triton is not None:

    @triton.jit
    def dequant_nibbles_fp16(packed, scale, zero):
        """(low, high) nibbles of uint8 codes dequantized in fp16, packed two per register (HADD2,
        HMUL2): the bits 0x6400 | q are the float 1024 + q; minus 1024 + z that is q − z exactly,
        and the product with the scale rounds once, as the reference's fp32 product cast to fp16
        does. 10% fewer instructions per weight byte than dequantizing in fp32 and packing after
        (eval/compile_kernels.py). bf16 (0x4300 | q = 128 + q) would work the same way on a GPU,
        but Triton's interpreter cannot check bf16 bit casts, so bf16 keeps the fp32 path."""
        base = (1024.0 + zero).to(tl.float16)
        low = ((packed & 0xF).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
        high = ((packed >> 4).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
        scale16 = scale.to(tl.float16)
        return (low - base) * scale16, (high - base) * scale16

    @triton.jit
    def _int4_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, GROUPS, GROUPS_PER_SPLIT, stride_xn, stride_yn, stride_ys,
        HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        HALF: tl.constexpr = GROUP // 2
        tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and HALF >= 16, "tl.dot needs tiles of at least 16")
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        half = tl.arange(0, HALF)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        g_start = pid_k * GROUPS_PER_SPLIT
        g_end = tl.minimum(g_start + GROUPS_PER_SPLIT, GROUPS)
        for g in range(g_start, g_end):
            slot = rm * GROUPS + g
            packed = tl.load(q_ptr + slot[:, None] * HALF + half[None, :], mask=m_ok[:, None], other=0)
            scale = tl.load(s_ptr + slot, mask=m_ok, other=0.0).to(tl.float32)[:, None]
            zero = tl.load(z_ptr + slot, mask=m_ok, other=0).to(tl.float32)[:, None]
            if DOT_FP32 or x_ptr.dtype.element_ty != tl.float16:
                offset = -zero * scale  # (q − z)·s = q·s + (−z·s): one FMA per weight instead of a subtract and a multiply
                # a nibble q to float without the quarter-rate int-to-float conversion: the bits of 2^23 + q
                # (exponent 0x4B0) minus 2^23, exact
                wide = packed.to(tl.int32)
                low = ((wide & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                high = ((wide >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                low = low * scale + offset
                high = high * scale + offset
            else:
                low, high = dequant_nibbles_fp16(packed, scale, zero)
            # low nibbles (columns 2i) against the even activation columns, high ones against the odd
            even = g * GROUP + 2 * half
            x_even = tl.load(x_ptr + rn[None, :] * stride_xn + even[:, None], mask=n_ok[None, :], other=0.0)
            x_odd = tl.load(x_ptr + rn[None, :] * stride_xn + even[:, None] + 1, mask=n_ok[None, :], other=0.0)
            if DOT_FP32:
                acc += tl.dot(low, x_even.to(tl.float32), input_precision="ieee")
                acc += tl.dot(high, x_odd.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(low.to(x_even.dtype), x_even)
                acc += tl.dot(high.to(x_odd.dtype), x_odd)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        y_offsets = pid_k * stride_ys + rn[None, :] * stride_yn + rm[:, None]
        tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x·Ŵᵀ + bias for W4 group quantization with every group kept in order: qweight
    (M, K/g, g/2) uint8, scales (M, K/g), zeros (M, K/g) uint8; x (..., K) -> (..., M)."""
    check_launch(x, qweight, scales, zeros)
    m, groups, half = qweight.shape
    group = 2 * half
    if group < 32 or group & (group - 1):
        raise ValueError(f"the INT4 tensor-core kernel needs a power-of-two group size >= 32, got {group}")
    if scales.shape != (m, groups) or zeros.shape != (m, groups) or qweight.dtype != torch.uint8:
        raise ValueError("scales and zeros must be (out_features, K/g) and qweight uint8 (out_features, K/g, g/2)")
    if x.shape[-1] != groups * group:
        raise ValueError(f"x has {x.shape[-1]} features; the weight has {groups} groups of {group}")
    x2 = flat_tokens(x)
    n = x2.shape[0]
    out = output_like(x, m)
    if n == 0:
        return out
    launch_group_dot(_int4_kernel, x, x2, out, qweight, scales, zeros, bias, group, split_k)
    return out


def _all_groups_in_order(module) -> bool:
    """Whether a GQSALinear keeps every group in order (plain W4); cached on the module."""

    if module.group_index is None:  # every group kept, stored in column order
        return True

    def check() -> bool:
        index = module.group_index
        groups = module.in_features // module.group_size
        return module.groups_per_row == groups and bool((index == torch.arange(groups, device=index.device, dtype=index.dtype)).all())

    return cached_on(module, "_all_groups_in_order", storage_key(module.group_index), check)


def int4_refusal(module, x: torch.Tensor) -> str | None:
    why = launch_refusal(x, module.qweight, module.scales)
    if why is None and (module.group_size < 32 or module.group_size & (module.group_size - 1)):
        why = f"group size {module.group_size} is not a power of two >= 32"
    if why is None and not _all_groups_in_order(module):
        why = "the layer is group-sparse (not every group kept in order): the GQSA gather kernel serves it"
    return why


def int4_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    return int4_matmul(x, module.qweight, module.scales, module.zeros, module.bias)
