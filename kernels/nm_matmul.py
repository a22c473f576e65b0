"""2:4 sparse GEMM read straight from SparseLinear's storage: y = x·Ŵᵀ + b.

A 2:4 layer keeps exactly two weights in every group of four input columns, so SparseLinear's
row-major `values` are already the compact layout (row r's kept weights start at r·K/2, two per
group, in column order) and its bitmap holds one nibble per group (1 bit per weight: as many
bytes as two 2-bit positions per group). No offsets are needed and nothing is stored twice.

Decode per group, from the nibble b and the group's two kept values v0 < v1 in column order:
column 0 is v0 if bit 0, column 1 is v1 if bits 0 and 1 else v0 if bit 1, column 2 is v0 if
bits 2 and 3 else v1 if bit 2, column 3 is v1 if bit 3. The four columns are joined back into
column order (Load-as-Sparse, Compute-as-Dense) and multiplied
- on CUDA cores for one token (`_nm24_fma_kernel`): per-lane partial sums over the chunk's
  columns, reduced once after the loop, as in the W8 kernel;
- on tensor cores for more tokens (`_nm24_dot_kernel`: one `tl.dot` per K tile, split-K). On
  the GPU (fp16/bf16) each group's two values are read as one 32-bit word and placed by two PRMTs
  whose selectors come from a 16-entry table indexed by the group's nibble (`SELECTOR_TABLE`,
  64 bytes: one L1 line): 0.124 warp-instructions per weight byte, 0.084 of them integer, against 0.193
  and 0.159 for the per-column selects (`tl.where`) that fp32 layers and the interpreter run.
Bytes read per weight: 0.5·2 + 1/8 = 1.125 for fp16/bf16 (0.5625 of dense, limit 1.78x).
Layers with a group that does not keep exactly two (a hand-made mask) go to the bitmap kernel.
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
    in_column_order,
    interpreting,
    launch_refusal,
    next_pow2,
    output_like,
    ptx_applies,
    storage_key,
    tl,
    triton,
)

# tokens served on CUDA cores; more go to tensor cores. On sm_90 the CUDA-core loop issues 0.207
# warp-instructions per weight byte at 1 token (within Hopper's 0.218), 0.259 at 2 and 0.372 at 4
# (the products grow with the tokens), the tensor-core loop 0.124 at any count up to 16, 0.084 of
# them integer (eval/compile_kernels.py)
FMA_MAX_TOKENS = 1
# the tensor-core kernel's loads go straight to registers: staging them through shared memory
# (cp.async, 3 stages) cost 0.253 warp-instructions per weight byte against 0.193 without, and
# 66 registers leave enough CTAs per SM to keep loads in flight
DOT_STAGES = 1

def _selector(nibble: int) -> tuple[int, int]:
    """The PRMT selectors that place a 2:4 group's two kept 16-bit values (v0, v1, in column
    order, as one 32-bit word: bytes 0–3) into its columns (0, 1) and (2, 3), byte 4 being a zero
    register: column c takes v0 (bytes 0, 1) if it holds the group's first kept weight, v1
    (bytes 2, 3) if its second, else zeros (bytes 4, 4)."""
    sources, rank = [], 0
    for c in range(4):
        if nibble >> c & 1 and rank < 2:
            sources.append((2 * rank, 2 * rank + 1))
            rank += 1
        else:
            sources.append((4, 4))
    pack = lambda a, b: a[0] | a[1] << 4 | b[0] << 8 | b[1] << 12  # noqa: E731
    return pack(sources[0], sources[1]), pack(sources[2], sources[3])


# per nibble (a group's bitmap bits): its two selectors as one int32, columns (0, 1) in the low
# half and (2, 3) in the high one. 64 bytes, one cache line: a warp's lookups are one L1 pass,
# where a table per bitmap byte (4 KB) would touch up to 32 lines per load
SELECTOR_TABLE = [lo | hi << 16 for lo, hi in map(_selector, range(16))]
_TABLES: dict[torch.device, torch.Tensor] = {}


def selector_table(device: torch.device) -> torch.Tensor:
    """SELECTOR_TABLE on `device`, read through L1 by the tensor-core kernel's PTX path."""
    if device not in _TABLES:
        _TABLES[device] = torch.tensor(SELECTOR_TABLE, dtype=torch.int32, device=device)
    return _TABLES[device]


# one group: $4 its two values as a 32-bit word, $5 its selectors (SELECTOR_TABLE); $0..$3 the
# four columns (PRMT reads the low 16 bits of its selector)
NM24_GROUP_PTX_TEXT = """{
.reg .b32 zero, high, r01, r23;
mov.b32 zero, 0;
shr.u32 high, $5, 16;
prmt.b32 r01, $4, zero, $5;
prmt.b32 r23, $4, zero, high;
mov.b32 {$0, $1}, r01;
mov.b32 {$2, $3}, r23;
}"""


if triton is not None:
    NM24_GROUP_PTX = tl.constexpr(NM24_GROUP_PTX_TEXT)

    @triton.jit
    def _dense_2of4(v_ptr, bm_ptr, rm, m_ok, k0, K, BYTES_PER_ROW, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, FP32: tl.constexpr):
        """The (BLOCK_M × CHUNK) dense tile of columns k0.. of rows rm (zeros past K), in fp32 or
        in the values' dtype (selecting in the narrow type keeps conversions off the tensor-core path)."""
        HALF: tl.constexpr = CHUNK // 2
        GROUPS: tl.constexpr = CHUNK // 4
        BYTES: tl.constexpr = CHUNK // 8
        jv = k0 // 2 + tl.arange(0, HALF)
        vals = tl.load(v_ptr + rm[:, None] * (K // 2) + jv[None, :], mask=m_ok[:, None] & (jv < K // 2)[None, :], other=0.0)
        if FP32:
            vals = vals.to(tl.float32)
        v0, v1 = tl.split(tl.reshape(vals, (BLOCK_M, GROUPS, 2)))
        zero = tl.zeros_like(v0)
        jb = k0 // 8 + tl.arange(0, BYTES)
        byte = tl.load(bm_ptr + rm[:, None] * BYTES_PER_ROW + jb[None, :], mask=m_ok[:, None] & (jb < BYTES_PER_ROW)[None, :], other=0)
        byte = byte.to(tl.int32)
        nib = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_M, GROUPS))  # group 2i low nibble, 2i+1 high
        b0 = (nib & 1) != 0
        b1 = (nib & 2) != 0
        b2 = (nib & 4) != 0
        b3 = (nib & 8) != 0
        c0 = tl.where(b0, v0, zero)
        c1 = tl.where(b1, tl.where(b0, v1, v0), zero)
        c2 = tl.where(b2, tl.where(b3, v0, v1), zero)
        c3 = tl.where(b3, v1, zero)
        return tl.reshape(in_column_order(c0, c1, c2, c3), (BLOCK_M, CHUNK))  # columns 4g + 0..3 in order

    @triton.jit
    def _dense_2of4_ptx(w_ptr, bm_ptr, sel_ptr, rows, k0, K, BYTES_PER_ROW, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BF16: tl.constexpr):
        """The same tile on the GPU, in the values' 16-bit dtype: each group's two values read as
        one 32-bit word (w_ptr: an int32 view of the values), its two PRMT selectors looked up by
        its nibble in SELECTOR_TABLE (L1), and two PRMTs place the values in their columns: no
        per-column select."""
        GROUPS: tl.constexpr = CHUNK // 4
        BYTES: tl.constexpr = CHUNK // 8
        jg = k0 // 4 + tl.arange(0, GROUPS)
        words = tl.load(w_ptr + rows[:, None] * (K // 4) + jg[None, :], mask=(jg < K // 4)[None, :], other=0)
        jb = k0 // 8 + tl.arange(0, BYTES)
        byte = tl.load(bm_ptr + rows[:, None] * BYTES_PER_ROW + jb[None, :], mask=(jb < BYTES_PER_ROW)[None, :], other=0).to(tl.int32)
        nibble = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_M, GROUPS))  # group 2i low nibble, 2i+1 high
        selectors = tl.load(sel_ptr + nibble)
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            NM24_GROUP_PTX, "=h,=h,=h,=h,r,r", [words, selectors], dtype=(tl.bfloat16 if BF16 else tl.float16,) * 4, is_pure=True, pack=1
        )
        return tl.reshape(in_column_order(c0, c1, c2, c3), (BLOCK_M, CHUNK))

    @triton.jit
    def _nm24_fma_kernel(
        x_ptr, v_ptr, bm_ptr, b_ptr, y_ptr,
        M, N, K, BYTES_PER_ROW, stride_xn, stride_yn,
        HAS_BIAS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, CHUNK, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, CHUNK):
            w = _dense_2of4(v_ptr, bm_ptr, rm, m_ok, k0, K, BYTES_PER_ROW, CHUNK, BLOCK_M, True)
            cols = k0 + tl.arange(0, CHUNK)
            x = tl.load(x_ptr + rn[None, None, :] * stride_xn + cols[None, :, None], mask=(cols < K)[None, :, None] & n_ok[None, None, :], other=0.0)
            acc += w[:, :, None] * x.to(tl.float32)
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rn[None, :] * stride_yn + rm[:, None], out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _nm24_dot_kernel(
        x_ptr, v_ptr, bm_ptr, sel_ptr, b_ptr, y_ptr,
        M, N, K, K_PER_SPLIT, BYTES_PER_ROW, stride_xn, stride_yn, stride_ys,
        HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PTX: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """PTX (fp16/bf16 on a GPU): v_ptr is an int32 view of the values (one word per group) and
        sel_ptr the selector table; else v_ptr holds the values and sel_ptr is unused."""
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
        rows = tl.minimum(rm, M - 1)  # rows past M read row M − 1 (never stored): no row mask on the PTX path
        for k0 in range(k_start, k_end, BLOCK_K):
            if PTX:
                w = _dense_2of4_ptx(v_ptr, bm_ptr, sel_ptr, rows, k0, K, BYTES_PER_ROW, BLOCK_K, BLOCK_M, x_ptr.dtype.element_ty == tl.bfloat16)
            else:
                w = _dense_2of4(v_ptr, bm_ptr, rm, m_ok, k0, K, BYTES_PER_ROW, BLOCK_K, BLOCK_M, DOT_FP32)
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rn[None, :] * stride_xn + rk[:, None], mask=n_ok[None, :] & (rk < k_end)[:, None], other=0.0)
            if DOT_FP32:
                acc += tl.dot(w, x.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(w.to(x.dtype), x)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        y_offsets = pid_k * stride_ys + rn[None, :] * stride_yn + rm[:, None]
        tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


FMA_CHUNK = 128  # columns per step of the CUDA-core kernel


def fma_tiles(n: int, chunk: int = FMA_CHUNK) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_M) of the CUDA-core kernel: 4096 partial sums (rows × chunk × tokens) per
    program of 4 warps. Fewer (2048, as in the W8 kernel) leave the loop's address and bit work
    spread over too few bytes: 0.111 integer warp-instructions per byte at one token against
    Hopper's 0.109; at 4096, 0.109 with 94 registers (eval/compile_kernels.py)."""
    block_n = min(4, next_pow2(n))  # tokens per program (the launcher sends more than FMA_MAX_TOKENS only when asked)
    return block_n, max(2, min(64, 4096 // (chunk * block_n)))


def nm24_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmap: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
    tensor_cores: bool | None = None,
) -> torch.Tensor:
    """y = x·Ŵᵀ + bias for a 2:4 Ŵ stored as SparseLinear stores it: `values` (M·K/2, row-major
    kept weights) and `bitmap` (M, K/8) uint8 with exactly two bits set per nibble (not checked
    here: `two_of_four` checks a module once). `tensor_cores`: None picks by token count."""
    check_launch(x, values, bitmap)
    k = x.shape[-1]
    m = out_features
    if k % 8:
        raise ValueError(f"the 2:4 kernel needs in_features divisible by 8, got {k}")
    if bitmap.dtype != torch.uint8 or bitmap.shape != (m, k // 8) or not bitmap.is_contiguous():
        raise ValueError(f"bitmap must be a contiguous uint8 tensor of shape {(m, k // 8)}, got {bitmap.dtype} {tuple(bitmap.shape)}")
    if values.numel() != m * k // 2 or not values.is_contiguous():
        raise ValueError(f"a 2:4 layer keeps {m * k // 2} contiguous values, got {values.numel()}")
    x2 = flat_tokens(x)
    n = x2.shape[0]
    out = output_like(x, m)
    if n == 0:
        return out
    ptx = ptx_applies(x, values.dtype)
    if tensor_cores is None:  # the PTX placement makes tensor cores cheaper even at one token (bf16 on CUDA cores: 0.131 integer)
        tensor_cores = n > FMA_MAX_TOKENS or ptx
    has_bias = bias is not None
    if not tensor_cores:
        chunk = FMA_CHUNK
        block_n, block_m = fma_tiles(n, chunk)
        block_m = 16 if interpreting() else block_m
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))  # token tiles fastest: a weight tile is read once
        _nm24_fma_kernel[grid](
            x2, values, bitmap, bias if has_bias else values, out,
            m, n, k, bitmap.shape[1], x2.stride(0), m,
            HAS_BIAS=has_bias, CHUNK=chunk, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )  # fmt: skip
        return out
    block = 32 if interpreting() else 64
    cfg = gemm_config(m, n, k, x.device, block, block, 4, split_k)
    split = SplitK(out.view(n, m), cfg["split_k"])
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), cfg["split_k"])
    _nm24_dot_kernel[grid](
        x2, values.view(torch.int32) if ptx else values, bitmap, selector_table(x.device) if ptx else bitmap,
        bias if has_bias else values, split.target,
        m, n, k, cfg["k_per_split"], bitmap.shape[1], x2.stride(0), split.target.stride(-2), split.split_stride,
        HAS_BIAS=split.single and has_bias, DOT_FP32=dot_in_fp32(x.dtype), PTX=ptx,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=4, num_stages=DOT_STAGES,
    )  # fmt: skip
    split.finish(bias)
    return out


_NIBBLE_BITS = torch.tensor([bin(i).count("1") for i in range(16)], dtype=torch.uint8)


def two_of_four(module) -> bool:
    """Whether a SparseLinear keeps exactly two weights in every group of four columns (K a
    multiple of 8); checked once per storage and cached on the module."""

    def check() -> bool:
        bitmap = module.bitmap
        if module.in_features % 8 or module.nnz != module.out_features * module.in_features // 2:
            return False
        table = _NIBBLE_BITS.to(bitmap.device)
        return bool(((table[(bitmap & 0xF).long()] == 2) & (table[(bitmap >> 4).long()] == 2)).all())

    return cached_on(module, "_two_of_four", storage_key(module.bitmap), check)


def nm24_refusal(module, x: torch.Tensor) -> str | None:
    why = launch_refusal(x, module.values, module.bitmap)
    if why is None and not two_of_four(module):
        why = "the mask does not keep exactly 2 of every 4 columns (in_features a multiple of 8): the bitmap kernel serves it"
    return why


def nm24_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    return nm24_matmul(x, module.values, module.bitmap, module.out_features, module.bias)
