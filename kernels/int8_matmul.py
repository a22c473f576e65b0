"""W8 group-quantized GEMM for decode: y = x·Ŵᵀ + b with Ŵ stored as Int8Linear's codes.

Ŵ[r, G] = (q − zero)·scale per group G of g input columns, one byte per weight. The kernel reads
each weight byte once from HBM and dequantizes on chip: byte to float by the 2^23 bit trick (no
quarter-rate I2F), then (q − z)·s = q·s − z·s as one FMA per weight. Each lane keeps its own
partial sums over the columns it sees and they are reduced once after the loop. Decode (1–16
tokens) is memory-bound, so the products run on CUDA cores (about 1.05 bytes per weight at g = 64
with bf16 scales, against 2 for bf16); longer inputs go to cuBLAS through the reference in `auto`
mode. The static budget (eval/compile_kernels.py, sm_90): 0.17–0.20 warp-instructions per byte
at 1–16 tokens, 46–56 registers.
Used for the output head of a model whose embeddings are stored in W8 (the largest single GEMM
of a small model's decode step: 49k × 576 for SmolLM2).
"""

from __future__ import annotations

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

if triton is not None:

    @triton.jit
    def _int8_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, K, stride_xn, stride_yn,
        HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        rk = tl.arange(0, CHUNK)
        groups = K // GROUP
        # per-lane partial sums, reduced once after the loop (no cross-lane reduction per step)
        acc = tl.zeros((BLOCK_M, CHUNK, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, CHUNK):
            group = k0 // GROUP  # CHUNK divides GROUP: a chunk lies in one group
            scale = tl.load(s_ptr + rm * groups + group, mask=m_ok, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + rm * groups + group, mask=m_ok, other=0).to(tl.float32)
            codes = tl.load(q_ptr + rm[:, None] * K + k0 + rk[None, :], mask=m_ok[:, None], other=0)
            # byte -> float without the quarter-rate I2F: 2^23 + q as float bits, minus 2^23 (exact)
            q = (codes.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            offset = zero * scale  # per row: (q − z)·s = q·s − z·s is then one FMA per weight
            w = q * scale[:, None] - offset[:, None]
            x = tl.load(x_ptr + rn[None, None, :] * stride_xn + k0 + rk[None, :, None], mask=n_ok[None, None, :], other=0.0)
            acc += w[:, :, None] * x.to(tl.float32)
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rn[None, :] * stride_yn + rm[:, None], out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int8_chunk(group_size: int) -> int:
    """Columns per inner step: the largest power of two ≤ 64 dividing the group size."""
    chunk = 64
    while group_size % chunk:
        chunk //= 2
    return chunk


def int8_tiles(n: int, chunk: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_M): at most 2048 (rows × chunk × tokens) partial sums per program (16 per
    thread of 4 warps), which keeps every configuration within 128 registers on sm_90 and the
    main loop within Hopper's instruction budget per byte (eval/compile_kernels.py checks both)."""
    block_n = min(16, next_pow2(n))
    return block_n, max(2, min(64, 2048 // (chunk * block_n)))


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Ŵᵀ + bias for Int8Linear's storage: qweight (M, groups, g) uint8, scales (M, groups),
    zeros (M, groups) uint8; x (..., K) -> (..., M) with K = groups·g."""
    check_launch(x, qweight, scales, zeros)
    m, groups, group = qweight.shape
    k = x.shape[-1]
    if groups * group != k:
        raise ValueError(f"x has {k} features but the weight has {groups} groups of {group}")
    if scales.shape != (m, groups) or zeros.shape != (m, groups):
        raise ValueError("scales and zeros must be (out_features, groups)")
    if qweight.dtype != torch.uint8 or zeros.dtype != torch.uint8:
        raise ValueError("qweight and zeros must be uint8")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    chunk = int8_chunk(group)
    if chunk < 2:
        raise ValueError(f"the kernel needs an even group size, got {group}")
    x2 = flat_tokens(x)
    n = x2.shape[0]
    out = output_like(x, m)
    if n == 0:
        return out
    block_n, block_m = int8_tiles(n, chunk)
    block_m = 16 if interpreting() else block_m
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))  # token tiles fastest: a weight tile is read once
    _int8_kernel[grid](
        x2, qweight, scales, zeros, bias if bias is not None else scales, out,
        m, n, k, x2.stride(0), m,
        HAS_BIAS=bias is not None, GROUP=group, CHUNK=chunk, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return out


def int8_refusal(module, x: torch.Tensor) -> str | None:
    why = launch_refusal(x, module.qweight, module.scales)
    if why is None and module.group_size % 2:
        why = f"group size {module.group_size} is odd"
    return why


def int8_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    return int8_matmul(x, module.qweight, module.scales, module.zeros, module.bias)


def int8_reference(module, x: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: dequantize to the dense weight and multiply (the kernel never forms it)."""
    return torch.nn.functional.linear(x, expanded_weight(module, x.dtype), module.bias)
