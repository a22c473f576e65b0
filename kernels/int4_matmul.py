"""INT4 group-quantized GEMM on tensor cores: GQSALinear with every group kept (W4 alone, the
GPTQ-style storage), y = x·Ŵᵀ + b, for decode (1–16 tokens) and beyond.

When every row keeps all K/g groups in order, a row's packed codes are contiguous and a K step is
the same for all rows, so the tile can go through `tl.dot`: at one token the products are free
on tensor cores and the loop's work is the dequantization alone. Each program reads a
(BLOCK_M × step) tile of codes as 32-bit words (eight weights each; a step is one group, or
several small ones so that it spans at least 64 columns), turns every word into eight 16-bit
floats in column order and multiplies them with the step's activation columns in one `tl.dot`.

On the GPU the words are dequantized by a short PTX program (`dequant_words_ptx`), two weights
per instruction: 2.1 instructions per weight, 1.1 of them integer, where Triton's own lowering of
the same arithmetic on bytes took 5.6 (one PRMT per byte to unpack it, more to pack the halves).
On sm_90 the loop then issues 0.205 warp-instructions per weight byte at g = 128, 0.211 at
g = 64, 0.194 at g = 32 and 0.199 at g = 16 (two and four groups a step), the same in bf16
(Hopper's HBM allows 0.218; eval/compile_kernels.py; 0.333 before, for fp16 only). Rows past M read row M − 1 and are
never stored, so the weight loads need no mask. fp32 layers and Triton's interpreter (which
cannot run PTX) take the same kernel with the arithmetic written in Triton (`dequant_words`).
Bytes read per weight: 0.5 + (scale + zero)/g, 0.52 at g = 128 with 16-bit scales, against 2
for dense fp16 (limit ~3.8x).
"""

from __future__ import annotations

import torch

from .runtime import (
    cached_on,
    check_launch,
    choose_ptx,
    flat_tokens,
    in_column_order,
    launch_group_dot,
    launch_refusal,
    output_like,
    storage_key,
    tl,
    triton,
)

# a K step spans at least this many columns: smaller groups are taken several per step, so the
# loop's fixed cost (addresses, the shared-memory round trip of the tile) is paid per 64 columns
MIN_STEP_COLUMNS = 64


def _w4_word_ptx(magic: str, one: str, fma: str) -> str:
    """The PTX of `dequant_words_ptx` for one 16-bit float type. $8 is the word, $9 the row's
    (−bias − zero) pair, $10 its scale pair; $0..$7 receive the word's columns 0, 1, …, 7
    (column 2j is byte j's low nibble, 2j + 1 its high one, as `pack_int4` stores them)."""
    lines = [
        "{",
        ".reg .b32 odd, p, r, mask, magic, one, negzero;",
        "mov.b32 mask, 0x000F000F;",
        f"mov.b32 magic, {magic};",
        f"mov.b32 one, {one};",
        "mov.b32 negzero, 0x80008000;",
        "shr.u32 odd, $8, 4;",  # byte j of `odd` holds column 2j + 1 in its low nibble
    ]
    for pair in range(4):
        lines += [
            f"prmt.b32 p, $8, odd, 0x{pair + 4:x}0{pair:x};",  # byte `pair` of the word (low half), of `odd` (high half)
            "lop3.b32 r, p, mask, magic, 0xEA;",  # (p & mask) | magic: the floats bias + q, two at once
            f"{fma} r, r, one, $9;",  # − (bias + zero): q − z, exact
            f"{fma} r, r, $10, negzero;",  # × scale (+ −0.0): one rounding, as the reference's
            f"mov.b32 {{${2 * pair}, ${2 * pair + 1}}}, r;",
        ]
    return "\n".join(lines + ["}"])


def w4_row_pairs(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `_int4_kernel` computes per row and group for the PTX path, as int32 tensors: the
    16-bit float −(bias + z) twice (its bits are the bias's, negated, with z in the mantissa) and
    the scale's bits twice. For tests; the kernel does the same in registers."""
    bias2 = NEG_BF16_BIAS2 if scales.dtype == torch.bfloat16 else NEG_FP16_BIAS2
    scale_bits = scales.view(torch.int16).to(torch.int32) & 0xFFFF
    return zeros.to(torch.int32) * 0x10001 + bias2, scale_bits * 0x10001


# the bits of the pairs (−1024, −1024) in fp16 and (−128, −128) in bf16, as int32: 1024 + q and
# 128 + q are the floats whose mantissas are q
NEG_FP16_BIAS2 = 0xE400E400 - (1 << 32)
NEG_BF16_BIAS2 = 0xC300C300 - (1 << 32)

if triton is not None:
    W4_WORD_FP16 = tl.constexpr(_w4_word_ptx("0x64006400", "0x3C003C00", "fma.rn.f16x2"))
    W4_WORD_BF16 = tl.constexpr(_w4_word_ptx("0x43004300", "0x3F803F80", "fma.rn.bf16x2"))
    _NEG_FP16_BIAS2 = tl.constexpr(NEG_FP16_BIAS2)
    _NEG_BF16_BIAS2 = tl.constexpr(NEG_BF16_BIAS2)

    @triton.jit
    def eight_in_column_order(c0, c1, c2, c3, c4, c5, c6, c7):
        """(…, 8) from a word's eight columns: the even columns in order, then the odd ones, joined
        last (flat index 2·(even/odd position) + parity; see `in_column_order`)."""
        return tl.join(in_column_order(c0, c2, c4, c6), in_column_order(c1, c3, c5, c7))

    @triton.jit
    def dequant_words_ptx(words, neg_base2, scale2, BF16: tl.constexpr):
        """Eight codes per 32-bit word dequantized in PTX, two weights per instruction (see
        `_w4_word_ptx`): one shift per word, then per pair of columns a PRMT, a LOP3 and two
        packed FMAs. neg_base2 and scale2 hold the row's 16-bit pairs (`w4_row_pairs`)."""
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            W4_WORD_BF16 if BF16 else W4_WORD_FP16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [words, neg_base2, scale2],
            dtype=(tl.bfloat16 if BF16 else tl.float16,) * 8, is_pure=True, pack=1,
        )  # fmt: skip
        return eight_in_column_order(c0, c1, c2, c3, c4, c5, c6, c7)

    @triton.jit
    def dequant_words(words, zero, scale):
        """The same in Triton arithmetic, in fp32 (fp32 layers, the interpreter): column k of a
        word is its nibble k."""
        offset = -zero * scale
        c0 = ((words & 0xF).to(tl.float32)) * scale + offset
        c1 = (((words >> 4) & 0xF).to(tl.float32)) * scale + offset
        c2 = (((words >> 8) & 0xF).to(tl.float32)) * scale + offset
        c3 = (((words >> 12) & 0xF).to(tl.float32)) * scale + offset
        c4 = (((words >> 16) & 0xF).to(tl.float32)) * scale + offset
        c5 = (((words >> 20) & 0xF).to(tl.float32)) * scale + offset
        c6 = (((words >> 24) & 0xF).to(tl.float32)) * scale + offset
        c7 = (((words >> 28) & 0xF).to(tl.float32)) * scale + offset
        return eight_in_column_order(c0, c1, c2, c3, c4, c5, c6, c7)

    @triton.jit
    def w4_dot_step(acc, words, zero, scale, x_ptr, rn, n_ok, stride_xn, first_col, PTX: tl.constexpr, DOT_FP32: tl.constexpr, STEP: tl.constexpr):
        """acc plus one K step's `tl.dot`: words (rows, groups, g/8) of 4-bit codes dequantized with
        their zero points (int32) and scales (the 16-bit floats' bits as int16 on the PTX path, else
        floats), times the activation columns first_col .. first_col + STEP − 1 of tokens rn."""
        BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
        if PTX:
            scale_bits = scale.to(tl.uint16, bitcast=True).to(tl.int32)
            neg_base2 = zero * 0x10001 + (_NEG_BF16_BIAS2 if BF16 else _NEG_FP16_BIAS2)
            w = dequant_words_ptx(words, neg_base2[:, :, None], (scale_bits * 0x10001)[:, :, None], BF16)
        else:
            w = dequant_words(words, zero.to(tl.float32)[:, :, None], scale.to(tl.float32)[:, :, None])
        w = tl.reshape(w, (words.shape[0], STEP))
        cols = tl.arange(0, STEP)
        x = tl.load(x_ptr + rn[None, :] * stride_xn + (first_col + cols)[:, None], mask=n_ok[None, :], other=0.0)
        if DOT_FP32:
            return acc + tl.dot(w.to(tl.float32), x.to(tl.float32), input_precision="ieee")
        return acc + tl.dot(w.to(x.dtype), x)

    @triton.jit
    def _int4_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, GROUPS, GROUPS_PER_SPLIT, stride_xn, stride_yn, stride_ys,
        HAS_BIAS: tl.constexpr, PTX: tl.constexpr, DOT_FP32: tl.constexpr, GROUP: tl.constexpr,
        STEP_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """w_ptr: the codes as int32 words (M, K/8); s_ptr: the scales (M, K/g), as an int16
        view on the PTX path; z_ptr: the zero points (M, K/g)."""
        WORDS: tl.constexpr = GROUP // 8
        STEP: tl.constexpr = STEP_GROUPS * GROUP
        tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and STEP >= 16, "tl.dot needs tiles of at least 16")
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        # rows past M read row M − 1 (never stored): the weight loads need no mask, no zero fill
        rows = tl.minimum(rm, M - 1)
        in_step = tl.arange(0, STEP_GROUPS)
        word = tl.arange(0, WORDS)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        g_start = pid_k * GROUPS_PER_SPLIT
        for g in range(g_start, tl.minimum(g_start + GROUPS_PER_SPLIT, GROUPS), STEP_GROUPS):
            slot = rows[:, None] * GROUPS + g + in_step[None, :]  # (BLOCK_M, STEP_GROUPS)
            words = tl.load(w_ptr + slot[:, :, None] * WORDS + word[None, None, :])
            zero = tl.load(z_ptr + slot).to(tl.int32)
            acc = w4_dot_step(acc, words, zero, tl.load(s_ptr + slot), x_ptr, rn, n_ok, stride_xn, g * GROUP, PTX, DOT_FP32, STEP)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        y_offsets = pid_k * stride_ys + rn[None, :] * stride_yn + rm[:, None]
        tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def step_groups(group: int, groups: int) -> int:
    """Groups per K step: enough to span MIN_STEP_COLUMNS columns when they divide the row's
    groups, else one."""
    step = max(1, MIN_STEP_COLUMNS // group)
    return step if groups % step == 0 else 1


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
    ptx: bool | None = None,
    one_token: bool | None = None,
) -> torch.Tensor:
    """y = x·Ŵᵀ + bias for W4 group quantization with every group kept in order: qweight
    (M, K/g, g/2) uint8, scales (M, K/g), zeros (M, K/g) uint8; x (..., K) -> (..., M).
    `ptx` (default: on a GPU, for fp16/bf16 inputs whose scales have the input's dtype) picks the
    PTX dequantization. One fp16/bf16 token (`one_token` overrides) goes to the one-token CUDA-core
    kernel of group-sparse W4 with every group kept (gqsa_matmul, PTX pairs: 0.15–0.16
    warp-instructions per weight byte on sm_90 where this kernel's tensor-core path at one token
    issues 0.19–0.21)."""
    check_launch(x, qweight, scales, zeros)
    m, groups, half = qweight.shape
    group = 2 * half
    if group < 16 or group & (group - 1):
        raise ValueError(f"the INT4 tensor-core kernel needs a power-of-two group size >= 16, got {group}")
    if scales.shape != (m, groups) or zeros.shape != (m, groups) or qweight.dtype != torch.uint8:
        raise ValueError("scales and zeros must be (out_features, K/g) and qweight uint8 (out_features, K/g, g/2)")
    if x.shape[-1] != groups * group:
        raise ValueError(f"x has {x.shape[-1]} features; the weight has {groups} groups of {group}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    x2 = flat_tokens(x)
    n = x2.shape[0]
    out = output_like(x, m)
    if n == 0:
        return out
    if one_token is None:
        one_token = n == 1 and x.dtype in (torch.float16, torch.bfloat16)
    if one_token:  # its own PTX (scales are read in any dtype): `ptx` as given
        from .gqsa_matmul import pair_matmul

        pair_matmul(x2, out, qweight, scales, zeros, None, bias, split_k, ptx)
        return out
    int4_dot(x, x2, out, qweight, scales, zeros, bias, split_k, ptx)
    return out


def int4_dot(x, x2, out, qweight, scales, zeros, bias, split_k: int | None, ptx: bool | None) -> None:
    """`_int4_kernel` for tokens x2 (T, K) into out: W4 codes (M, K/g, g/2) with every group kept
    in order (checked by the callers)."""
    ptx = choose_ptx(x, scales.dtype, ptx)
    group = 2 * qweight.shape[-1]
    step = step_groups(group, qweight.shape[1])
    launch_group_dot(
        _int4_kernel, x, x2, out, qweight.view(torch.int32), scales.view(torch.int16) if ptx else scales, zeros, bias, group,
        split_k, step=step, PTX=ptx, STEP_GROUPS=step,
    )  # fmt: skip


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
    if why is None and (module.group_size < 16 or module.group_size & (module.group_size - 1)):
        why = f"group size {module.group_size} is not a power of two >= 16"
    if why is None and not _all_groups_in_order(module):
        why = "the layer is group-sparse (not every group kept in order): the GQSA gather kernel serves it"
    return why


def int4_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    return int4_matmul(x, module.qweight, module.scales, module.zeros, module.bias)
