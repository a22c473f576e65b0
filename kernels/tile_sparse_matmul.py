"""Tile-structured sparse GEMM for TileSparseLinear: Load-as-Sparse, Compute-as-Dense with the
decode done per tile, not per element.

In the format every tile of `tile_rows` output rows × `tile_cols` input columns keeps the same
`keep` columns. A program owns one row block (BLOCK_M = tile_rows) and a range of K tiles
(split-K); per tile it loads the `keep` column offsets (one byte each), gathers those activation
columns (keep × tokens, from a small x that stays in cache), loads the compact, contiguous
(tile_rows × keep) value tile and multiplies on tensor cores. The weight bytes read are the kept
values plus 1/tile_rows byte per kept value, so the byte limit at sparsity s is about 1/(1−s).
"""

from __future__ import annotations

import torch

from .runtime import (
    SplitK,
    check_launch,
    dot_in_fp32,
    flat_tokens,
    launch_refusal,
    next_pow2,
    output_like,
    split_k_plan,
    tl,
    token_block,
    triton,
)

if triton is not None:

    @triton.jit
    def _tile_sparse_kernel(
        x_ptr, v_ptr, c_ptr, b_ptr, y_ptr,
        M, N, TILES, TILES_PER_SPLIT, KEEP, stride_xn, stride_yn, stride_ys,
        HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, TILE_COLS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KEEP: tl.constexpr,
    ):  # fmt: skip
        tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_KEEP >= 16, "tl.dot needs tiles of at least 16")
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rows = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        kk = tl.arange(0, BLOCK_KEEP)
        k_ok = kk < KEEP
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        t_start = pid_k * TILES_PER_SPLIT
        t_end = tl.minimum(t_start + TILES_PER_SPLIT, TILES)
        for t in range(t_start, t_end):
            tile = pid_m * TILES + t
            cols = tl.load(c_ptr + tile * KEEP + kk, mask=k_ok, other=0).to(tl.int32) + t * TILE_COLS
            x = tl.load(x_ptr + rn[None, :] * stride_xn + cols[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            w = tl.load(v_ptr + tile * (BLOCK_M * KEEP) + rows[:, None] * KEEP + kk[None, :], mask=k_ok[None, :], other=0.0)
            if DOT_FP32:
                acc += tl.dot(w.to(tl.float32), x.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(w.to(x.dtype), x)
        rm = pid_m * BLOCK_M + rows
        if HAS_BIAS:
            acc += tl.load(b_ptr + rm).to(tl.float32)[:, None]
        y_offsets = pid_k * stride_ys + rn[None, :] * stride_yn + rm[:, None]
        tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & n_ok[None, :])


def tile_sparse_matmul(
    x: torch.Tensor, values: torch.Tensor, col_index: torch.Tensor, bias: torch.Tensor | None = None, split_k: int | None = None
) -> torch.Tensor:
    """y = x·Ŵᵀ + bias for TileSparseLinear storage: values (row_blocks, col_tiles, tile_rows, keep),
    col_index (row_blocks, col_tiles, keep) uint8 offsets inside each tile; x (..., K) -> (..., M)."""
    check_launch(x, values, col_index)
    if values.dim() != 4 or col_index.shape != (values.shape[0], values.shape[1], values.shape[3]):
        raise ValueError(f"values {tuple(values.shape)} and col_index {tuple(col_index.shape)} are not a tile-sparse pair")
    if not (values.is_contiguous() and col_index.is_contiguous()):
        raise ValueError("values and col_index must be contiguous")
    row_blocks, tiles, tile_rows, keep = values.shape
    if tile_rows < 16 or tile_rows & (tile_rows - 1):
        raise ValueError(f"the kernel needs tile_rows to be a power of two >= 16, got {tile_rows}")
    k = x.shape[-1]
    if k % tiles:
        raise ValueError(f"x has {k} features, not {tiles} tiles of equal width")
    tile_cols = k // tiles
    m = row_blocks * tile_rows
    x2 = flat_tokens(x)
    n = x2.shape[0]
    out = output_like(x, m)
    if n == 0:
        return out
    block_n = token_block(n)
    programs = row_blocks * triton.cdiv(n, block_n)
    split_k, per_split = split_k_plan(tiles, programs, x.device, 2, split_k)
    split = SplitK(out.view(n, m), split_k)
    grid = (row_blocks, triton.cdiv(n, block_n), split_k)
    _tile_sparse_kernel[grid](
        x2, values, col_index, bias if bias is not None else values, split.target,
        m, n, tiles, per_split, keep, x2.stride(0), split.target.stride(-2), split.split_stride,
        HAS_BIAS=split.single and bias is not None, DOT_FP32=dot_in_fp32(x.dtype), TILE_COLS=tile_cols,
        BLOCK_M=tile_rows, BLOCK_N=block_n, BLOCK_KEEP=max(16, next_pow2(keep)), num_warps=4, num_stages=4,
    )  # fmt: skip
    split.finish(bias)
    return out


def tile_sparse_refusal(module, x: torch.Tensor) -> str | None:
    why = launch_refusal(x, module.values, module.col_index)
    if why is None and (module.tile_rows < 16 or module.tile_rows & (module.tile_rows - 1)):
        why = f"tile_rows {module.tile_rows} is not a power of two >= 16"
    return why


def tile_sparse_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    return tile_sparse_matmul(x, module.values, module.col_index, module.bias)

