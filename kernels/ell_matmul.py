"""Dictionary GEMM for DictLinear: y = (x·Dᵀ)·Cᵀ + b with C in an ELL layout, never forming D·C.

Two launches: the dense dictionary product h = x·Dᵀ (k atoms, a skinny GEMM with split-K), then
the ELL product y[n, r] = Σ_j C_val[r, j]·h[n, C_idx[r, j]]: every output row has the same
number s of coefficients, so a tile of rows does equal work. Indices are bit-packed, b bits each
(DictLinear): index j of a row is bits j·b.. of the row's bytes, rows padded to whole 32-bit
words. Bytes read: k·in dictionary values plus out·s·(value + b/8), against out·in for the dense
weight.

Decode (`_ell_gemv_kernel`): four lanes share a row, each a chunk of 16 coefficients (32 for odd
b: a chunk's indices fill whole words) per pass: one 16-byte load of its values, the b/2 words of
its indices read as words and split by constant funnel shifts, the atoms' activations gathered
from shared memory (`tl.gather` of the token's h, which a program holds whole in fp32: up to 32
KB, `GEMV_H_BYTES`), and a chain of FMAs; split-K fills the GPU. A program takes up to four
tokens; more go in token groups side by side in one launch (`gemv_token_group`), the groups of a
row block reading its bytes from HBM once and from L2 after. On sm_90 its loop issues 0.10–0.21
warp-instructions per weight byte (a group of 1–4 tokens, float or int8 coefficients;
eval/compile_kernels.py), within Hopper's 0.218. Where groups would cost more (a dictionary too
large to hold, many groups of one or two tokens), `_ell_kernel` gathers from global memory (L1)
and unpacks each index from bytes (0.28 per weight byte at one token, 1.26 at 16).
"""

from __future__ import annotations

import math

import torch

from .runtime import (
    SplitK,
    check_launch,
    expanded_weight,
    flat_tokens,
    interpreting,
    launch_refusal,
    next_pow2,
    output_like,
    split_k_plan,
    tl,
    triton,
)
from .int8_matmul import int8_matmul
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


    @triton.jit
    def _atom(words, j: tl.constexpr, ok, row_words, BITS: tl.constexpr, K_BLOCK: tl.constexpr):
        """Index j of a chunk whose indices start at bit 0 of `words` (pointers to its first word,
        `row_words` of them left in the row): one or two word loads (a word loaded again is one
        load after CSE) and a funnel shift. The mask keeps any index within the K_BLOCK gathered
        (the padding of a row's last word and words past it read as index 0)."""
        w: tl.constexpr = j * BITS // 32
        shift: tl.constexpr = j * BITS % 32
        low = tl.load(words + w, mask=ok & (w < row_words), other=0).to(tl.uint32, bitcast=True)
        if shift + BITS > 32:
            high = tl.load(words + w + 1, mask=ok & (w + 1 < row_words), other=0).to(tl.uint32, bitcast=True)
            low = (low >> shift) | (high << (32 - shift))
        else:
            low = low >> shift
        return (low & (min(1 << BITS, K_BLOCK) - 1)).to(tl.int32)

    # A chunk's indices as one tensor (..., 2, 2, ...) whose row-major position p holds index
    # o + s·p: each level joins the even positions' tensor with the odd ones' (tl.join adds the
    # new, fastest-varying dimension).
    @triton.jit
    def _atoms2(words, o: tl.constexpr, s: tl.constexpr, ok, left, BITS: tl.constexpr, K_BLOCK: tl.constexpr):
        return tl.join(_atom(words, o, ok, left, BITS, K_BLOCK), _atom(words, o + s, ok, left, BITS, K_BLOCK))

    @triton.jit
    def _atoms4(words, o: tl.constexpr, s: tl.constexpr, ok, left, BITS: tl.constexpr, K_BLOCK: tl.constexpr):
        return tl.join(_atoms2(words, o, 2 * s, ok, left, BITS, K_BLOCK), _atoms2(words, o + s, 2 * s, ok, left, BITS, K_BLOCK))

    @triton.jit
    def _atoms8(words, o: tl.constexpr, s: tl.constexpr, ok, left, BITS: tl.constexpr, K_BLOCK: tl.constexpr):
        return tl.join(_atoms4(words, o, 2 * s, ok, left, BITS, K_BLOCK), _atoms4(words, o + s, 2 * s, ok, left, BITS, K_BLOCK))

    @triton.jit
    def _atoms16(words, o: tl.constexpr, s: tl.constexpr, ok, left, BITS: tl.constexpr, K_BLOCK: tl.constexpr):
        return tl.join(_atoms8(words, o, 2 * s, ok, left, BITS, K_BLOCK), _atoms8(words, o + s, 2 * s, ok, left, BITS, K_BLOCK))

    # acc + Σ_j v_j·g_j over the last dimension (2, 4, 8, 16) as a chain of FMAs: tl.sum would
    # build a tree (a multiply and an add for half the products, 1.5 instructions a product)
    @triton.jit
    def _fma2(acc, v, g):
        v0, v1 = tl.split(v)
        g0, g1 = tl.split(g)
        return acc + v0 * g0 + v1 * g1

    @triton.jit
    def _fma4(acc, v, g, ROWS: tl.constexpr):
        v0, v1 = tl.split(v.reshape(ROWS, 2, 2))
        g0, g1 = tl.split(g.reshape(ROWS, 2, 2))
        return _fma2(_fma2(acc, v0, g0), v1, g1)

    @triton.jit
    def _fma8(acc, v, g, ROWS: tl.constexpr):
        v0, v1 = tl.split(v.reshape(ROWS, 4, 2))
        g0, g1 = tl.split(g.reshape(ROWS, 4, 2))
        return _fma4(_fma4(acc, v0, g0, ROWS), v1, g1, ROWS)

    @triton.jit
    def _fma16(acc, v, g, ROWS: tl.constexpr):
        v0, v1 = tl.split(v.reshape(ROWS, 8, 2))
        g0, g1 = tl.split(g.reshape(ROWS, 8, 2))
        return _fma8(_fma8(acc, v0, g0, ROWS), v1, g1, ROWS)

    @triton.jit
    def _token_fma(acc, h, atoms, values, ROWS: tl.constexpr):
        """acc + each (row, lane)'s sum over 16 coefficients of value · h[atom], h gathered on chip."""
        gathered = tl.gather(h, atoms, 0).to(tl.float32).reshape(ROWS, 16)
        return _fma16(acc, values.reshape(ROWS, 16), gathered, ROWS)

    @triton.jit
    def _held(h_ptr, kk, K, present):
        """A token's h row as the program holds it: in fp32, converted once (not per gather);
        zeros for a token that is not `present` (past N in the last token group)."""
        return tl.load(h_ptr + kk, mask=kk < tl.where(present, K, 0), other=0.0).to(tl.float32)

    @triton.jit
    def _store_token(y_ptr, sums, rm, m_ok, scale, bias, present, BLOCK_M: tl.constexpr, LANES: tl.constexpr):
        row = tl.sum(sums.reshape(BLOCK_M, LANES), axis=1) * scale + bias
        tl.store(y_ptr + rm, row.to(y_ptr.dtype.element_ty), mask=tl.where(present, m_ok, False))

    @triton.jit
    def _ell_gemv_kernel(
        h_ptr, v_ptr, w_ptr, sc_ptr, b_ptr, y_ptr,
        M, N, S, K, ROW_WORDS, S_PER_SPLIT, stride_hn, stride_yn, stride_ys,
        HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, BITS: tl.constexpr, TOKENS: tl.constexpr,
        BLOCK_M: tl.constexpr, LANES: tl.constexpr, CHUNK: tl.constexpr, K_BLOCK: tl.constexpr, S_ALIGN: tl.constexpr,
    ):  # fmt: skip
        """1–4 tokens: `LANES` lanes a row (BLOCK_M·LANES = the threads: one (row, lane) each), a
        chunk of CHUNK coefficients each per pass, in halves of 16; the tokens' h rows held whole
        in fp32 (K_BLOCK) and gathered from shared memory. Program (i, j) takes rows block i and
        the coefficients [j·S_PER_SPLIT, (j + 1)·S_PER_SPLIT) of each, into split j's slot of y,
        for token group t = program_id(0) (tokens t·TOKENS .. of N: the groups of a row block run
        side by side, so its bytes come from HBM once and from L2 for the others)."""
        first_token = tl.program_id(0) * TOKENS
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        # S itself, known to the compiler as a multiple of S_ALIGN (8 or 16 where it is one, as the
        # dictionary compressors make it): the value loads and their masks then go 16 bytes at a time
        ROW_VALUES = S // S_ALIGN * S_ALIGN
        start = tl.program_id(2) * S_PER_SPLIT
        end = tl.minimum(start + S_PER_SPLIT, ROW_VALUES)
        h_ptr += first_token * stride_hn
        y_ptr += tl.program_id(2) * stride_ys + first_token * stride_yn
        m_ok = rm < M
        lane = tl.arange(0, LANES)
        jj = tl.arange(0, 16)
        kk = tl.arange(0, K_BLOCK)
        ROWS: tl.constexpr = BLOCK_M * LANES
        h0 = _held(h_ptr, kk, K, first_token < N)
        h1 = h0
        h2 = h0
        h3 = h0
        if TOKENS > 1:
            h1 = _held(h_ptr + stride_hn, kk, K, first_token + 1 < N)
        if TOKENS > 2:
            h2 = _held(h_ptr + 2 * stride_hn, kk, K, first_token + 2 < N)
        if TOKENS > 3:
            h3 = _held(h_ptr + 3 * stride_hn, kk, K, first_token + 3 < N)
        acc0 = tl.zeros([ROWS], tl.float32)
        acc1 = tl.zeros([ROWS], tl.float32)
        acc2 = tl.zeros([ROWS], tl.float32)
        acc3 = tl.zeros([ROWS], tl.float32)
        for c0 in range(start, end, CHUNK * LANES):
            first = c0 + lane * CHUNK  # each lane's first coefficient
            ok = m_ok[:, None] & (first[None, :] < end)
            word = first * BITS // 32  # the lane's first index word
            words = w_ptr + rm[:, None] * ROW_WORDS + word[None, :]
            left = ROW_WORDS - word[None, :]
            for half in tl.static_range(CHUNK // 16):  # odd widths: two halves of 16 (registers)
                column = first[None, :, None] + 16 * half + jj[None, None, :]
                values = tl.load(v_ptr + rm[:, None, None] * ROW_VALUES + column, mask=m_ok[:, None, None] & (column < end), other=0)
                values = values.to(tl.float32).reshape(ROWS * 16)
                atoms = _atoms16(words, 16 * half, 1, ok, left, BITS, K_BLOCK).reshape(ROWS * 16)
                acc0 = _token_fma(acc0, h0, atoms, values, ROWS)
                if TOKENS > 1:
                    acc1 = _token_fma(acc1, h1, atoms, values, ROWS)
                if TOKENS > 2:
                    acc2 = _token_fma(acc2, h2, atoms, values, ROWS)
                if TOKENS > 3:
                    acc3 = _token_fma(acc3, h3, atoms, values, ROWS)
        scale = tl.load(sc_ptr + rm, mask=m_ok, other=0.0).to(tl.float32) if SCALED else 1.0
        bias = tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
        _store_token(y_ptr, acc0, rm, m_ok, scale, bias, first_token < N, BLOCK_M, LANES)
        if TOKENS > 1:
            _store_token(y_ptr + stride_yn, acc1, rm, m_ok, scale, bias, first_token + 1 < N, BLOCK_M, LANES)
        if TOKENS > 2:
            _store_token(y_ptr + 2 * stride_yn, acc2, rm, m_ok, scale, bias, first_token + 2 < N, BLOCK_M, LANES)
        if TOKENS > 3:
            _store_token(y_ptr + 3 * stride_yn, acc3, rm, m_ok, scale, bias, first_token + 3 < N, BLOCK_M, LANES)


def packed_row_bytes(nnz_per_row: int, bits: int) -> int:
    """Bytes of a row's packed indices (DictLinear): whole 32-bit words, which `_ell_gemv_kernel`
    loads and splits by shifts."""
    return (nnz_per_row * bits + 31) // 32 * 4


def index_fits_two_bytes(bits: int) -> bool:
    """Whether every `bits`-bit index of a packed row lies within two bytes: index j starts at bit
    j·bits, whose offset in its byte is a multiple of gcd(bits, 8), at most 8 − gcd(bits, 8)."""
    return bits + 8 - math.gcd(bits, 8) <= 16


def ell_tiles(n: int, s: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_S, BLOCK_M) of `_ell_kernel`: 4096 per-lane partial sums (rows × coefficients
    × tokens) per program of 4 warps."""
    block_n = min(16, next_pow2(n))
    block_s = min(16, next_pow2(s))
    return block_n, block_s, max(2, min(64, 4096 // (block_s * block_n)))


GEMV_MAX_TOKENS = 4
LANES = 4
GEMV_H_BYTES = 32768  # the tokens' h rows (fp32, atoms rounded up to a power of two) a decode program holds


def gemv_tiles(bits: int, warps: int) -> tuple[int, int]:
    """(CHUNK, BLOCK_M) of `_ell_gemv_kernel`: a chunk fills whole index words (16 indices of an
    even width, 32 of an odd one); one (row, lane) a thread."""
    return (16 if bits % 2 == 0 else 32), 32 * warps // LANES


def gemv_warps(tokens: int, atoms: int) -> int | None:
    """The warps of the `_ell_gemv_kernel` program that takes this call (4 while the tokens' fp32 h
    rows take at most 16 KB, 8 up to 32 KB: h is spread over the program's registers before it
    goes to shared memory, and 8 warps keep every sm_90 build within 128 registers), or None:
    more than four tokens, or a dictionary too large to hold."""
    held = tokens * next_pow2(atoms) * 4
    if tokens > GEMV_MAX_TOKENS or held > GEMV_H_BYTES:
        return None
    return 4 if held <= GEMV_H_BYTES // 2 else 8


def gemv_token_group(tokens: int, atoms: int) -> int | None:
    """Tokens per `_ell_gemv_kernel` program for this call: all of them up to four, else the most
    of 4, 2, 1 whose h rows a program holds, in groups run side by side (one launch). None where
    the groups would cost more than `_ell_kernel`, which unpacks each index once for up to 16
    tokens: by the sm_90 builds (0.11 / 0.13 / 0.17–0.21 warp-instructions per weight byte for a
    group of 1 / 2 / 4 against 0.28 at one token and 1.26 at 16), up to 4·t groups of t."""
    for group in (min(4, tokens), min(2, tokens), 1):
        if gemv_warps(group, atoms) is not None:
            return group if -(-tokens // group) <= 4 * group else None
    return None


def ell_matmul(
    h: torch.Tensor,
    values: torch.Tensor,
    packed_index: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    gemv: bool | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """y[..., r] = scale_r·Σ_j values[r, j]·h[..., index[r, j]] + bias; h (..., k), values (M, s)
    floats (no scales) or int8 codes with `scales` (M,), and the indices bit-packed `bits` each
    into packed_index (M, row bytes) uint8, rows padded to whole 32-bit words (`packed_row_bytes`).
    `gemv`: force (True) or forbid (False) the decode kernel; None picks it where it fits; it
    splits each row's coefficients over `split_k` programs (None: enough to fill the GPU)."""
    check_launch(h, values, packed_index)
    if (scales is None) != values.is_floating_point() or (scales is not None and values.dtype != torch.int8):
        raise ValueError("values are floats without scales, or int8 codes with a scale per row")
    if scales is not None and (scales.shape != (values.shape[0],) or not scales.is_contiguous()):
        raise ValueError(f"scales must be a contiguous (out,) vector, got {tuple(scales.shape)}")
    m, s = values.shape if values.dim() == 2 else (None, None)
    if m is None or packed_index.dim() != 2 or packed_index.shape[0] != m:
        raise ValueError(f"values {tuple(values.shape)} must be (out, s) and the packed index (out, bytes)")
    row_bytes = packed_row_bytes(s, bits)
    if not 1 <= bits <= 16 or packed_index.shape[1] != row_bytes:
        raise ValueError(
            f"packed index of {packed_index.shape[1]} bytes per row does not hold {s} indices of {bits} bits "
            f"in whole 32-bit words ({row_bytes} bytes)"
        )
    if not (values.is_contiguous() and packed_index.is_contiguous()):
        raise ValueError("values and index must be contiguous")
    if packed_index.dtype != torch.uint8:
        raise ValueError(f"the packed index must be uint8, got {packed_index.dtype}")
    h2 = flat_tokens(h)
    n, atoms = h2.shape
    out = output_like(h, m)
    if n == 0:
        return out
    scale_arg, bias_arg = scales if scales is not None else h2, bias if bias is not None else h2
    group = gemv_token_group(n, atoms)
    if gemv and group is None:
        raise ValueError(
            f"the decode kernel takes groups of at most {GEMV_MAX_TOKENS} tokens whose fp32 h rows fit a program "
            f"({GEMV_H_BYTES} bytes): not {n} tokens of {atoms} atoms"
        )
    if gemv is None:
        gemv = group is not None
    if gemv:
        warps = gemv_warps(group, atoms)
        chunk, block_m = gemv_tiles(bits, warps)
        block_m = 32 if interpreting() else block_m  # smaller programs: more of the interpreter's checks per second
        groups, programs = triton.cdiv(n, group), triton.cdiv(m, block_m)
        s_align = 16 if s % 16 == 0 else 8 if s % 8 == 0 else 1  # rows of values 16-byte aligned where 8 | s
        splits, per_split = split_k_plan(triton.cdiv(s, chunk * LANES), programs * groups, h2.device, 2, split_k)
        split = SplitK(out.view(n, m), splits)
        words = packed_index.view(torch.int32)
        _ell_gemv_kernel[(groups, programs, splits)](
            h2, values, words, scale_arg, bias_arg, split.target,
            m, n, s, atoms, words.shape[1], per_split * chunk * LANES, h2.stride(0), m, split.split_stride,
            HAS_BIAS=split.single and bias is not None, SCALED=scales is not None, BITS=bits, TOKENS=group,
            BLOCK_M=block_m, LANES=LANES, CHUNK=chunk, K_BLOCK=next_pow2(atoms), S_ALIGN=s_align, num_warps=warps,
        )  # fmt: skip
        split.finish(bias)
        return out
    block_n, block_s, block_m = ell_tiles(n, s)
    block_m = 16 if interpreting() else block_m
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _ell_kernel[grid](
        h2, values, packed_index, scale_arg, bias_arg, out,
        m, n, s, packed_index.shape[1], h2.stride(0), m,
        HAS_BIAS=bias is not None, SCALED=scales is not None, BITS=bits, TWO_BYTES=index_fits_two_bytes(bits),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_S=block_s, num_warps=4,
    )  # fmt: skip
    return out


def _project(module, x: torch.Tensor) -> torch.Tensor:
    """h = x·Dᵀ: the skinny GEMM on float atoms, the W8 kernel on W8 ones (Int8Linear's layout)."""
    store = module.atom_store()
    if store.atom_bits == 8:
        return int8_matmul(x, store.atom_codes, store.atom_scales, store.atom_zeros)
    return skinny_matmul(x, store.atoms)


def dict_refusal(module, x: torch.Tensor) -> str | None:
    store = module.atom_store()
    why = launch_refusal(x, store.atoms if store.atom_bits == 16 else store.atom_scales, module.coef_values)
    if why is None and store.atom_bits == 8 and store.atom_group % 2:
        why = f"W8 atoms in groups of {store.atom_group} (odd)"
    return why


def dict_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    return ell_matmul(_project(module, x), module.coef_values, module.coef_index, module.index_bits, module.bias, module.coef_scales)


def dict_reference(module, x: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: project on the atoms, then apply the dense coefficient matrix."""
    store = module.atom_store()
    atoms = store.atoms if store.atom_bits == 16 else expanded_weight(store, store.atom_scales.dtype, "atoms", store.dictionary)
    atoms = atoms.to(x.device)  # a group's owner may sit on another device (device_map)
    coefficients = expanded_weight(module, module.coefficient_dtype, "coefficients", module.dense_coefficients)
    return torch.nn.functional.linear(torch.nn.functional.linear(x, atoms), coefficients, module.bias)
