"""Unstructured sparse GEMM for DeltaSparseLinear (MACKO-style rows in 32-row slices): y = x·Ŵᵀ + b.

Storage (compress/modules/delta_sparse.py): each row lists its kept weights in column order, every
entry with a 4-bit code, the columns it advances past the previous entry (0–15, from column 0
before the first); a longer step takes zero-valued filler entries that advance 15 each, and
padding entries advance 0 (so every entry's column lies inside the row: no bounds checks on the
activation reads). Rows come in slices of 32 (one per lane of a warp), padded to the slice's
longest row in chunks of 8 entries, and stored chunk-major: chunk c of the slice's row r at
slice_start + (c·32 + r)·8. A warp reading chunk c of its 32 rows reads 512 contiguous bytes of
values (one 16-byte load a lane) and 128 of codes (one 32-bit word a lane). `marks` holds each
row's column before every MARK_CHUNKS-th chunk, so split-K programs start mid-row.

One thread owns one row: it turns its word of eight codes into eight columns by a running sum in
registers (no shuffles, no shared memory), reads the activations there (the rows of a warp walk
their columns in step, so a gather touches few L1 lines) and keeps fp32 partial sums; two chunks
a loop pass. Bytes: 2.5 per entry (fp16/bf16): with fillers and padding about 0.65 of dense at 50%
sparsity in every row, 0.39 at 70%.
For more than one token the activations are read from a token-major fp32 copy (one wide load per
entry for all of a tile's tokens, no conversions in the loop).
"""

from __future__ import annotations

import torch

from .runtime import (
    SplitK,
    check_launch,
    flat_tokens,
    interpreting,
    launch_refusal,
    next_pow2,
    output_like,
    split_k_plan,
    tl,
    triton,
)

SLICE_ROWS = 32  # rows per slice: one per lane of a warp
CHUNK = 8  # entries per chunk: one 16-byte load of fp16/bf16 values, one 32-bit word of codes
SLICE_ALIGN = 2 * CHUNK  # a slice's rows are padded to multiples of this many entries (a loop pass reads two chunks)
MARK_CHUNKS = 32  # a row's column is recorded before every 32nd chunk (256 entries): where split-K programs start
MAX_ADVANCE = 15  # a 4-bit code


if triton is not None:

    @triton.jit
    def _columns_of_eight(t):
        """(R, 8) -> its eight columns as (R,) tensors (each thread's own registers: no data moves)."""
        a, b = tl.split(tl.reshape(t, (t.shape[0], 4, 2)))
        a0, a1 = tl.split(tl.reshape(a, (t.shape[0], 2, 2)))
        b0, b1 = tl.split(tl.reshape(b, (t.shape[0], 2, 2)))
        c0, c4 = tl.split(a0)
        c2, c6 = tl.split(a1)
        c1, c5 = tl.split(b0)
        c3, c7 = tl.split(b1)
        return c0, c1, c2, c3, c4, c5, c6, c7

    @triton.jit
    def _gather_fma(acc, v, x_ptr, col, rn, stride_xk, stride_xn):
        x = tl.load(x_ptr + col[:, None] * stride_xk + rn[None, :] * stride_xn)
        return acc + v.to(tl.float32)[:, None] * x.to(tl.float32)

    @triton.jit
    def _chunk(acc, acc2, col, v_ptr, w_ptr, x_ptr, pos, ok, rn, stride_xk, stride_xn):
        """One chunk of eight entries of every row: returns the sums and the row's last column."""
        v = tl.load(v_ptr + pos[:, None] + tl.arange(0, 8)[None, :], mask=ok[:, None], other=0.0)
        w = tl.load(w_ptr + pos // 8, mask=ok, other=0)  # rows past their end: advance 0
        v0, v1, v2, v3, v4, v5, v6, v7 = _columns_of_eight(v)
        c0 = col + (w & 0xF)
        c1 = c0 + ((w >> 4) & 0xF)
        c2 = c1 + ((w >> 8) & 0xF)
        c3 = c2 + ((w >> 12) & 0xF)
        c4 = c3 + ((w >> 16) & 0xF)
        c5 = c4 + ((w >> 20) & 0xF)
        c6 = c5 + ((w >> 24) & 0xF)
        c7 = c6 + ((w >> 28) & 0xF)
        acc = _gather_fma(acc, v0, x_ptr, c0, rn, stride_xk, stride_xn)
        acc2 = _gather_fma(acc2, v1, x_ptr, c1, rn, stride_xk, stride_xn)
        acc = _gather_fma(acc, v2, x_ptr, c2, rn, stride_xk, stride_xn)
        acc2 = _gather_fma(acc2, v3, x_ptr, c3, rn, stride_xk, stride_xn)
        acc = _gather_fma(acc, v4, x_ptr, c4, rn, stride_xk, stride_xn)
        acc2 = _gather_fma(acc2, v5, x_ptr, c5, rn, stride_xk, stride_xn)
        acc = _gather_fma(acc, v6, x_ptr, c6, rn, stride_xk, stride_xn)
        acc2 = _gather_fma(acc2, v7, x_ptr, c7, rn, stride_xk, stride_xn)
        return acc, acc2, c7

    @triton.jit
    def _delta_kernel(
        x_ptr, v_ptr, w_ptr, ss_ptr, mk_ptr, b_ptr, y_ptr,
        M, N, MARKS, CHUNKS_PER_SPLIT, stride_xn, stride_xk, stride_yn, stride_ys,
        HAS_BIAS: tl.constexpr, SLICE: tl.constexpr, MARK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # the launcher pads the tokens to whole tiles
        m_ok = rm < M
        start = tl.load(ss_ptr + rm // SLICE, mask=m_ok, other=0)
        chunks = (tl.load(ss_ptr + rm // SLICE + 1, mask=m_ok, other=0) - start) // (SLICE * 8)
        row_base = start + (rm % SLICE) * 8
        c_lo = pid_k * CHUNKS_PER_SPLIT
        col = tl.load(mk_ptr + rm * MARKS + c_lo // MARK, mask=m_ok & (c_lo < chunks), other=0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in range(c_lo, tl.minimum(c_lo + CHUNKS_PER_SPLIT, tl.max(chunks, axis=0)), 2):
            ok = c < chunks  # slices hold an even number of chunks: a pass never straddles a row's end
            pos = tl.multiple_of(row_base + c * (SLICE * 8), 8)
            acc, acc2, col = _chunk(acc, acc2, col, v_ptr, w_ptr, x_ptr, pos, ok, rn, stride_xk, stride_xn)
            pos = tl.multiple_of(pos + SLICE * 8, 8)
            acc, acc2, col = _chunk(acc, acc2, col, v_ptr, w_ptr, x_ptr, pos, ok, rn, stride_xk, stride_xn)
        out = acc + acc2
        if HAS_BIAS:
            out += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        y = y_ptr + pid_k * stride_ys + rn[None, :] * stride_yn + rm[:, None]
        tl.store(y, out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (rn < N)[None, :])


def delta_tiles(n: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_M): one row per thread of 4 warps; up to 4 tokens a program (the products
    grow with the tokens, the decode work per entry does not)."""
    return min(4, next_pow2(n)), 128


def delta_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    gaps: torch.Tensor,
    slice_start: torch.Tensor,
    marks: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x·Ŵᵀ + bias for DeltaSparseLinear's storage: `values` (E,) entries slice by slice,
    `gaps` (E/2,) uint8 nibble-packed codes, `slice_start` (S + 1,) int32 entry offsets,
    `marks` (32·S, MARKS) int32 row columns before every MARK_CHUNKS-th chunk; x (..., K) ->
    (..., out_features), out_features <= 32·S (the last slice's missing rows are empty)."""
    check_launch(x, values, gaps, slice_start, marks)
    if slice_start.dtype != torch.int32 or marks.dtype != torch.int32 or gaps.dtype != torch.uint8:
        raise ValueError("slice_start and marks must be int32, gaps uint8")
    if values.numel() % (SLICE_ROWS * SLICE_ALIGN) or gaps.numel() * 2 != values.numel():
        raise ValueError(f"{values.numel()} entries in slices of {SLICE_ROWS} rows × multiples of {SLICE_ALIGN} need {values.numel() // 2} code bytes, got {gaps.numel()}")
    for name, t in (("values", values), ("gaps", gaps), ("slice_start", slice_start), ("marks", marks)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    m = out_features
    if not 0 < m <= marks.shape[0] or marks.shape[0] != SLICE_ROWS * (slice_start.numel() - 1):
        raise ValueError(f"{slice_start.numel() - 1} slices hold {SLICE_ROWS * (slice_start.numel() - 1)} rows and marks {marks.shape[0]}: not {m} output features")
    x2 = flat_tokens(x)
    n = x2.shape[0]
    out = output_like(x, m)
    if n == 0:
        return out
    block_n, block_m = delta_tiles(n)
    if interpreting():  # fewer, larger programs: the interpreter's cost is per program and operation
        block_n, block_m = min(16, next_pow2(n)), 64
    if n == 1:
        stride_xn, stride_xk = x2.shape[1], 1
    else:  # token-major fp32 copy, padded to whole token tiles: one unmasked wide load per entry
        padded = triton.cdiv(n, block_n) * block_n
        xt = torch.zeros(x2.shape[1], padded, dtype=torch.float32, device=x2.device)
        xt[:, :n] = x2.t()
        x2, stride_xn, stride_xk = xt, 1, padded
    marks_per_row = marks.shape[1]
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    splits, per_split = split_k_plan(marks_per_row, programs, x.device, 1, split_k)
    split = SplitK(out.view(n, m), splits)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), splits)  # token tiles fastest: a row block is read once
    _delta_kernel[grid](
        x2, values, gaps.view(torch.int32), slice_start, marks, bias if bias is not None else values, split.target,
        m, n, marks_per_row, per_split * MARK_CHUNKS, stride_xn, stride_xk, split.target.stride(-2), split.split_stride,
        HAS_BIAS=split.single and bias is not None, SLICE=SLICE_ROWS, MARK=MARK_CHUNKS, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4,
    )  # fmt: skip
    split.finish(bias)
    return out


def delta_refusal(module, x: torch.Tensor) -> str | None:
    return launch_refusal(x, module.values, module.gaps, module.slice_start, module.marks)


def delta_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    return delta_matmul(x, module.values, module.gaps, module.slice_start, module.marks, module.out_features, module.bias)
