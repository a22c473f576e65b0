"""Dictionary GEMM for DictLinear: y = (x·Dᵀ)·Cᵀ + b with C in an ELL layout, never forming D·C.

Two launches: the dense dictionary product h = x·Dᵀ (k atoms, a skinny GEMM with split-K), then
the ELL product y[n, r] = Σ_j C_val[r, j]·h[n, C_idx[r, j]]: every output row has the same
number s of coefficients, so a tile of rows does equal work; each row gathers its s entries of the
(tokens × k) activation h, which is small and stays in L1/L2. Indices are bit-packed, b bits each
(DictLinear): index j of a row is bits j·b.. of the row's bytes, read as two bytes where every
index of that width fits in two (b ≤ 10, 12, 16), else three, shifted and masked on chip. Each
lane keeps partial sums over its coefficients, reduced once after the loop. Bytes read: k·in
dictionary values plus out·s·(value + b/8), against out·in for the dense weight. On sm_90 the loop
issues 0.28 warp-instructions per weight byte at one token (0.92 per byte at 4 tokens before the
per-lane sums and two-byte indices, 0.51 after): over Hopper's 0.218, the per-coefficient index
unpacking and activation gather dominate (eval/compile_kernels.py).
"""

from __future__ import annotations

import math

import torch

from .runtime import (
    check_launch,
    expanded_weight,
    flat_tokens,
    interpreting,
    launch_refusal,
    next_pow2,
    output_like,
    tl,
    triton,
)
from .skinny_matmul import skinny_matmul

if triton is not None:

    @triton.jit
    def _ell_kernel(
        h_ptr, v_ptr, i_ptr, sc_ptr, b_ptr, y_ptr,
        M, N, S, ROW_BYTES, stride_hn, stride_yn,
        HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, BITS: tl.constexpr, TWO_BYTES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        # per-lane partial sums, reduced once after the loop (a reduction across lanes per step
        # cost a shuffle and an add per product)
        acc = tl.zeros((BLOCK_M, BLOCK_S, BLOCK_N), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            rs = s0 + tl.arange(0, BLOCK_S)
            ok = m_ok[:, None] & (rs[None, :] < S)
            slot = rm[:, None] * S + rs[None, :]
            bit = rs[None, :] * BITS  # where index j starts in its row's bit stream
            in_row = bit >> 3  # the byte within the row
            byte = rm[:, None] * ROW_BYTES + in_row
            b0 = tl.load(i_ptr + byte, mask=ok, other=0).to(tl.int32)
            b1 = tl.load(i_ptr + byte + 1, mask=ok & (in_row + 1 < ROW_BYTES), other=0).to(tl.int32)
            word = b0 | (b1 << 8)
            if not TWO_BYTES:  # an index may reach into a third byte
                word |= tl.load(i_ptr + byte + 2, mask=ok & (in_row + 2 < ROW_BYTES), other=0).to(tl.int32) << 16
            atom = (word >> (bit & 7)) & ((1 << BITS) - 1)
            value = tl.load(v_ptr + slot, mask=ok, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + rn[None, None, :] * stride_hn + atom[:, :, None], mask=ok[:, :, None] & n_ok[None, None, :], other=0.0)
            acc += value[:, :, None] * h.to(tl.float32)
        acc = tl.sum(acc, axis=1)
        if SCALED:  # int8 coefficients: one scale per row, applied once to the row's sum
            acc *= tl.load(sc_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rn[None, :] * stride_yn + rm[:, None], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def index_fits_two_bytes(bits: int) -> bool:
    """Whether every `bits`-bit index of a packed row lies within two bytes: index j starts at bit
    j·bits, whose offset in its byte is a multiple of gcd(bits, 8), at most 8 − gcd(bits, 8)."""
    return bits + 8 - math.gcd(bits, 8) <= 16


def ell_tiles(n: int, s: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_S, BLOCK_M): 4096 per-lane partial sums (rows × coefficients × tokens) per
    program of 4 warps."""
    block_n = min(16, next_pow2(n))
    block_s = min(16, next_pow2(s))
    return block_n, block_s, max(2, min(64, 4096 // (block_s * block_n)))


def ell_matmul(
    h: torch.Tensor,
    values: torch.Tensor,
    packed_index: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[..., r] = scale_r·Σ_j values[r, j]·h[..., index[r, j]] + bias; h (..., k), values (M, s)
    floats (no scales) or int8 codes with `scales` (M,), and the indices bit-packed `bits` each
    into packed_index (M, ceil(s·bits/8)) uint8."""
    check_launch(h, values, packed_index)
    if (scales is None) != values.is_floating_point() or (scales is not None and values.dtype != torch.int8):
        raise ValueError("values are floats without scales, or int8 codes with a scale per row")
    if scales is not None and (scales.shape != (values.shape[0],) or not scales.is_contiguous()):
        raise ValueError(f"scales must be a contiguous (out,) vector, got {tuple(scales.shape)}")
    m, s = values.shape if values.dim() == 2 else (None, None)
    if m is None or packed_index.dim() != 2 or packed_index.shape[0] != m:
        raise ValueError(f"values {tuple(values.shape)} must be (out, s) and the packed index (out, bytes)")
    if not 1 <= bits <= 16 or packed_index.shape[1] != (s * bits + 7) // 8:
        raise ValueError(f"packed index of {packed_index.shape[1]} bytes per row does not hold {s} indices of {bits} bits")
    if not (values.is_contiguous() and packed_index.is_contiguous()):
        raise ValueError("values and index must be contiguous")
    if packed_index.dtype != torch.uint8:
        raise ValueError(f"the packed index must be uint8, got {packed_index.dtype}")
    h2 = flat_tokens(h)
    n = h2.shape[0]
    out = output_like(h, m)
    if n == 0:
        return out
    block_n, block_s, block_m = ell_tiles(n, s)
    block_m = 16 if interpreting() else block_m
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _ell_kernel[grid](
        h2, values, packed_index, scales if scales is not None else h2, bias if bias is not None else h2, out,
        m, n, s, packed_index.shape[1], h2.stride(0), m,
        HAS_BIAS=bias is not None, SCALED=scales is not None, BITS=bits, TWO_BYTES=index_fits_two_bytes(bits),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_S=block_s, num_warps=4,
    )  # fmt: skip
    return out


def dict_matmul(x, atoms, values, packed_index, bits, bias=None, scales=None) -> torch.Tensor:
    """y = x·(C·D)ᵀ + bias with D = atoms (k × in) and C given as ELL values (out × s; int8 codes
    with `scales` per row) and bit-packed atom indices."""
    return ell_matmul(skinny_matmul(x, atoms), values, packed_index, bits, bias, scales)


def dict_refusal(module, x: torch.Tensor) -> str | None:
    return launch_refusal(x, module.dictionary(), module.coef_values)


def dict_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    return dict_matmul(
        x, module.dictionary(), module.coef_values, module.coef_index, module.index_bits, module.bias, module.coef_scales
    )


def dict_reference(module, x: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: project on the atoms, then apply the dense coefficient matrix."""
    atoms = module.dictionary().to(x.device)  # a group's owner may sit on another device (device_map)
    coefficients = expanded_weight(module, module.coefficient_dtype, "coefficients", module.dense_coefficients)
    return torch.nn.functional.linear(torch.nn.functional.linear(x, atoms), coefficients, module.bias)
