"""Skinny dense GEMM y = x·Wᵀ (+ bias) (+ y): the building block of the low-rank, EoRA and
dictionary paths.

Decode multiplies a large weight (M × K) by a few tokens (N = 1..64). The weight is the large
M operand: each program computes a (BLOCK_M × BLOCK_N) tile of yᵀ = W·xᵀ with `tl.dot`, and the
K loop is split across programs (split-K) when M alone gives too few programs to fill the SMs.
Split-K partial sums go to an fp32 workspace (SPLIT_K × N × M) summed afterwards: deterministic,
no atomics. With `accumulate=True` the result is added into `out` (EoRA adds its low-rank residual
into the main path's output this way).
"""

from __future__ import annotations

import torch

from .runtime import (
    SplitK,
    check_launch,
    dot_in_fp32,
    flat_tokens,
    gemm_config,
    interpreting,
    output_like,
    tl,
    triton,
)

if triton is not None:

    @triton.jit
    def _skinny_matmul_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr,
        M, N, K, K_PER_SPLIT,
        stride_xn, stride_wm, stride_yn, stride_ys,
        HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16, "tl.dot needs tiles of at least 16")
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * K_PER_SPLIT
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < k_end
            w = tl.load(w_ptr + rm[:, None] * stride_wm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + rn[None, :] * stride_xn + rk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            if DOT_FP32:
                acc += tl.dot(w.to(tl.float32), x.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(w.to(x.dtype), x)
        y_offsets = pid_k * stride_ys + rn[None, :] * stride_yn + rm[:, None]
        y_mask = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        if ACCUMULATE:
            acc += tl.load(y_ptr + y_offsets, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def skinny_config(m: int, n: int, k: int, device: torch.device, split_k: int | None = None) -> dict[str, int]:
    """Tile sizes and split-K for an (m × k) weight and n tokens: enough programs for about two
    waves of the SMs, each split at least two K tiles deep."""
    if interpreting():
        block_m, block_k = 32, 32
    else:
        block_m, block_k = (64, 128) if m >= 4096 else (32, 128)
    return gemm_config(m, n, k, device, block_m, block_k, 2, split_k)


def skinny_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x·weightᵀ + bias (+ out when `accumulate`), x (..., K), weight (M, K) -> (..., M) in x's dtype.

    `out` (..., M), contiguous, receives the result; with `accumulate` its old content is added."""
    check_launch(x, weight, *([bias] if bias is not None else []))
    m, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the weight has {k} input columns")
    if weight.stride(-1) != 1:
        raise ValueError("the weight must have unit stride along its input dimension (call .contiguous())")
    if accumulate and out is None:
        raise ValueError("accumulate=True needs `out`, the tensor to add into")
    x2 = flat_tokens(x)
    n = x2.shape[0]
    if out is None:
        out = output_like(x, m)
    elif out.shape != (*x.shape[:-1], m) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape {(*x.shape[:-1], m)}, got {tuple(out.shape)}")
    if n == 0:
        return out
    cfg = skinny_config(m, n, k, x.device, split_k)
    split = SplitK(out.view(n, m), cfg["split_k"])
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), cfg["split_k"])
    _skinny_matmul_kernel[grid](
        x2, weight, bias if bias is not None else weight, split.target,
        m, n, k, cfg["k_per_split"],
        x2.stride(0), weight.stride(0), split.target.stride(-2), split.split_stride,
        HAS_BIAS=split.single and bias is not None, ACCUMULATE=split.single and accumulate, DOT_FP32=dot_in_fp32(x.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=4, num_stages=4,
    )  # fmt: skip
    split.finish(bias, accumulate)
    return out


def skinny_matmul_reference(x, weight, bias=None):
    """The function skinny_matmul computes, in fp64 (for tests)."""
    y = x.double() @ weight.double().T
    return y + bias.double() if bias is not None else y
