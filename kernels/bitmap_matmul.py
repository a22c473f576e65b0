"""Unstructured sparse GEMM for SparseLinear, straight from its storage (no second copy).

SparseLinear stores the kept weights row-major (`values`) and a bitmap, one bit per weight. Each
program owns a block of rows and a range of K (split-K) and walks its K tiles in order, keeping
per row the offset of its next nonzero in `values`: a tile's bits are expanded on chip, an
exclusive prefix sum along the row gives each kept weight's position, the dense (BLOCK_M × BLOCK_K)
tile is gathered from the row's contiguous run of values and multiplied on tensor cores
(Load-as-Sparse, Compute-as-Dense). The only extra metadata is each row's offset at each split
start (out × splits integers, derived from the bitmap once and cached on the module).

The decode is per element (shift, mask, prefix sum), which costs integer work the memory-bound
regime has little slack for; its speed against cuBLAS must be measured (eval/bench_kernels.py)
before it is preferred to a dense or tile-structured format.
"""

from __future__ import annotations

import torch

from .runtime import (
    SplitK,
    cached_on,
    check_launch,
    dot_in_fp32,
    flat_tokens,
    gemm_config,
    interpreting,
    launch_refusal,
    output_like,
    storage_key,
    tl,
    triton,
)

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)

if triton is not None:

    @triton.jit
    def _bitmap_kernel(
        x_ptr, v_ptr, bm_ptr, off_ptr, b_ptr, y_ptr,
        M, N, K, K_PER_SPLIT, SPLITS, BYTES_PER_ROW,
        stride_xn, stride_yn, stride_ys,
        HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16, "tl.dot needs tiles of at least 16")
        tl.static_assert(BLOCK_K % 8 == 0, "a K tile spans whole bitmap bytes")
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        offset = tl.load(off_ptr + rm * SPLITS + pid_k, mask=m_ok, other=0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * K_PER_SPLIT
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < k_end
            tile_ok = m_ok[:, None] & k_ok[None, :]
            byte = tl.load(bm_ptr + rm[:, None] * BYTES_PER_ROW + (rk[None, :] >> 3), mask=tile_ok, other=0).to(tl.int32)
            bit = (byte >> (rk[None, :] & 7)) & 1
            position = tl.cumsum(bit, axis=1) - bit
            w = tl.load(v_ptr + offset[:, None] + position, mask=bit != 0, other=0.0)
            offset += tl.sum(bit, axis=1)
            x = tl.load(x_ptr + rn[None, :] * stride_xn + rk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            if DOT_FP32:
                acc += tl.dot(w.to(tl.float32), x.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(w.to(x.dtype), x)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        y_offsets = pid_k * stride_ys + rn[None, :] * stride_yn + rm[:, None]
        tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def split_offsets(bitmap: torch.Tensor, k_per_split: int) -> torch.Tensor:
    """(rows, splits) position in the row-major values of each row's first nonzero at or after
    each split start (k_per_split must be a multiple of 8)."""
    counts = _POPCOUNT.to(bitmap.device)[bitmap.long()]  # (rows, bytes)
    per_split = k_per_split // 8
    splits = -(-bitmap.shape[1] // per_split)
    padded = torch.nn.functional.pad(counts, (0, splits * per_split - counts.shape[1]))
    chunk = padded.view(bitmap.shape[0], splits, per_split).sum(-1, dtype=torch.int64).flatten()
    starts = torch.cumsum(chunk, 0) - chunk
    dtype = torch.int32 if int(chunk.sum()) < 2**31 else torch.int64
    return starts.view(bitmap.shape[0], splits).to(dtype).contiguous()


def bitmap_config(m: int, n: int, k: int, device: torch.device, split_k: int | None = None) -> dict[str, int]:
    block_m, block_k = (32, 32) if interpreting() else (64, 64)
    return gemm_config(m, n, k, device, block_m, block_k, 4, split_k)


def bitmap_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmap: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x·Ŵᵀ + bias for Ŵ stored as row-major nonzero `values` and a (M, ceil(K/8)) uint8 `bitmap`
    (bit j of byte b = column 8b+j). `offsets` (from split_offsets with this call's k_per_split)
    may be passed to skip recomputing them."""
    check_launch(x, values, bitmap)
    k = x.shape[-1]
    m = out_features
    if bitmap.dtype != torch.uint8 or bitmap.shape != (m, (k + 7) // 8) or not bitmap.is_contiguous():
        raise ValueError(f"bitmap must be a contiguous uint8 tensor of shape {(m, (k + 7) // 8)}, got {bitmap.dtype} {tuple(bitmap.shape)}")
    x2 = flat_tokens(x)
    n = x2.shape[0]
    out = output_like(x, m)
    if n == 0:
        return out
    cfg = bitmap_config(m, n, k, x.device, split_k)
    if offsets is None:
        offsets = split_offsets(bitmap, cfg["k_per_split"])
    if offsets.shape != (m, cfg["split_k"]):
        raise ValueError(f"offsets {tuple(offsets.shape)} were computed for another split; expected {(m, cfg['split_k'])}")
    split = SplitK(out.view(n, m), cfg["split_k"])
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), cfg["split_k"])
    _bitmap_kernel[grid](
        x2, values, bitmap, offsets, bias if bias is not None else values, split.target,
        m, n, k, cfg["k_per_split"], cfg["split_k"], bitmap.shape[1],
        x2.stride(0), split.target.stride(-2), split.split_stride,
        HAS_BIAS=split.single and bias is not None, DOT_FP32=dot_in_fp32(x.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=4, num_stages=3,
    )  # fmt: skip
    split.finish(bias)
    return out


def sparse_refusal(module, x: torch.Tensor) -> str | None:
    return launch_refusal(x, module.values, module.bitmap)


def sparse_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    """The split offsets are cached on the module for the split this call uses."""
    n = x.numel() // x.shape[-1]
    per_split = bitmap_config(module.out_features, n, module.in_features, x.device)["k_per_split"]
    key = (per_split, *storage_key(module.bitmap))
    offsets = cached_on(module, "_split_offsets", key, lambda: split_offsets(module.bitmap, per_split))
    return bitmap_matmul(x, module.values, module.bitmap, module.out_features, module.bias, offsets=offsets)

