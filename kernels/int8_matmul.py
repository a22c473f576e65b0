"""W8 group-quantized GEMM for decode: y = x·Ŵᵀ + b with Ŵ stored as Int8Linear's codes.

Ŵ[r, G] = (q − zero)·scale per group G of g input columns, one byte per weight. The kernel reads
each weight byte once from HBM and dequantizes on chip: byte to float by the 2^23 bit trick (no
quarter-rate I2F), then (q − z)·s = q·s − z·s as one FMA per weight. For one token the products
run on CUDA cores, each lane keeping its own partial sums, reduced once after the loop; for more
tokens the dequantized group tile goes through `tl.dot` (`_int8_dot_kernel`), since on CUDA cores
the products grow with the tokens past what HBM's bandwidth leaves (about 1.05 bytes per weight
at g = 64 with bf16 scales, against 2 for bf16); longer inputs go to cuBLAS through the reference
in `auto` The static budget (eval/compile_kernels.py, sm_90): 0.208 warp-instructions per weight byte at one
token on CUDA cores, 0.176 on tensor cores up to 16 (Hopper allows 0.218; on CUDA cores 4 tokens
took 0.39).
Used for the output head of a model whose embeddings are stored in W8 (the largest single GEMM
of a small model's decode step: 49k × 576 for SmolLM2).
"""

from __future__ import annotations

import torch

from .runtime import (
    check_group_codes,
    check_launch,
    flat_tokens,
    in_column_order,
    launch_group_dot,
    launch_group_lanes,
    launch_refusal,
    next_pow2,
    output_like,
    ptx_applies,
    tl,
    triton,
)

# tokens served on CUDA cores when the PTX dequantization is unavailable (fp32, the interpreter);
# more go to tensor cores: on CUDA cores the products grow with the tokens (0.39 warp-instructions
# per weight byte at 4 tokens, Hopper allows 0.218). With the PTX dequantization (fp16/bf16 on a
# GPU) tensor cores serve every count: 0.104 (fp16) and 0.147 (bf16) against 0.208 for CUDA cores
# at one token (eval/compile_kernels.py)
FMA_MAX_TOKENS = 1

def _w8_word_ptx(bf16: bool) -> str:
    """PTX for four W8 codes in a 32-bit word (columns 0..3 in bytes 0..3): $4 the word, $5 the
    row's −(bias + zero) and $6 its scale pair; $0..$3 the four columns (q − z)·s.
    fp16: one PRMT per pair of columns moves the two code bytes under the exponent byte 0x64 of
    the fp16 1024 + q, then the pair minus (1024 + z), exact, times the scale pair. bf16 has too
    few mantissa bits for 1024 + q, so there each code goes under the fp32 exponent of 2^23 + q
    (one PRMT), minus (2^23 + z) exact in fp32 ($5: those fp32 bits), two packed into bf16 (exact:
    |q − z| < 256) and times the scale pair."""
    lines = ["{", ".reg .b32 magic, r;"]
    if not bf16:
        lines.append("mov.b32 magic, 0x64646464;")
        for pair in range(2):
            lines += [
                f"prmt.b32 r, $4, magic, 0x{5:x}{2 * pair + 1:x}{4:x}{2 * pair:x};",  # bytes: code, 0x64, code, 0x64
                "sub.rn.f16x2 r, r, $5;",
                "mul.rn.f16x2 r, r, $6;",
                f"mov.b32 {{${2 * pair}, ${2 * pair + 1}}}, r;",
            ]
    else:
        lines += [".reg .b32 a, b, negzero;", ".reg .f32 fa, fb;", "mov.b32 magic, 0x4B000000;", "mov.b32 negzero, 0x80008000;"]
        for pair in range(2):
            lines += [
                f"prmt.b32 a, $4, magic, 0x764{2 * pair:x};",  # code, 0x00, 0x00, 0x4B: the fp32 2^23 + q
                f"prmt.b32 b, $4, magic, 0x764{2 * pair + 1:x};",
                "mov.b32 fa, a;",
                "mov.b32 fb, b;",
                "add.rn.f32 fa, fa, $5;",
                "add.rn.f32 fb, fb, $5;",
                "cvt.rn.bf16x2.f32 r, fb, fa;",  # fa in the low half
                "fma.rn.bf16x2 r, r, $6, negzero;",  # × scale, one rounding
                f"mov.b32 {{${2 * pair}, ${2 * pair + 1}}}, r;",
            ]
    return "\n".join(lines + ["}"])


# the fp16 1024 and the fp32 −2^23, as the int32 bits the row pairs start from
FP16_BIAS2 = 0x64006400
NEG_FP32_BIAS = 0xCB000000 - (1 << 32)


def w8_row_pairs(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `_int8_dot_kernel`'s PTX path computes per row and group, as int32 tensors: fp16: the
    pair 1024 + z (0x6400 | z twice); bf16: the fp32 −(2^23 + z); and the scale's bits twice."""
    scale_bits = scales.view(torch.int16).to(torch.int32) & 0xFFFF
    z = zeros.to(torch.int32)
    base = z + NEG_FP32_BIAS if scales.dtype == torch.bfloat16 else z * 0x10001 + FP16_BIAS2
    return base, scale_bits * 0x10001


if triton is not None:
    W8_WORD_FP16 = tl.constexpr(_w8_word_ptx(False))
    W8_WORD_BF16 = tl.constexpr(_w8_word_ptx(True))
    _FP16_BIAS2 = tl.constexpr(FP16_BIAS2)
    _NEG_FP32_BIAS = tl.constexpr(NEG_FP32_BIAS)

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


    @triton.jit
    def _int8_dot_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, GROUPS, GROUPS_PER_SPLIT, stride_xn, stride_yn, stride_ys,
        HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, PTX: tl.constexpr = False,
    ):  # fmt: skip
        """Tensor cores for several tokens: per group, the (BLOCK_M × g) code tile dequantized on
        chip and one `tl.dot` with the group's activation columns. On the GPU (PTX: fp16/bf16,
        q_ptr an int32 view of the codes, s_ptr an int16 view of the scales) four codes a word by
        `_w8_word_ptx`, two weights per instruction in fp16; else in Triton arithmetic (fp16
        layers in fp16: the bits 0x6400 | q are 1024 + q, exact for a byte)."""
        tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and GROUP >= 16, "tl.dot needs tiles of at least 16")
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        cols = tl.arange(0, GROUP)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        g_start = pid_k * GROUPS_PER_SPLIT
        rows = tl.minimum(rm, M - 1)  # rows past M read row M − 1 (never stored): no row mask on the PTX path
        words = tl.arange(0, GROUP // 4)
        for g in range(g_start, tl.minimum(g_start + GROUPS_PER_SPLIT, GROUPS)):
            x = tl.load(x_ptr + rn[None, :] * stride_xn + (g * GROUP + cols)[:, None], mask=n_ok[None, :], other=0.0)
            if PTX:
                slot = rows * GROUPS + g
                word = tl.load(q_ptr + slot[:, None] * (GROUP // 4) + words[None, :])
                scale2 = tl.load(s_ptr + slot).to(tl.uint16, bitcast=True).to(tl.int32) * 0x10001
                zero = tl.load(z_ptr + slot).to(tl.int32)
                bf16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
                base = zero + _NEG_FP32_BIAS if bf16 else zero * 0x10001 + _FP16_BIAS2
                c0, c1, c2, c3 = tl.inline_asm_elementwise(
                    W8_WORD_BF16 if bf16 else W8_WORD_FP16, "=h,=h,=h,=h,r,r,r", [word, base[:, None], scale2[:, None]],
                    dtype=(tl.bfloat16 if bf16 else tl.float16,) * 4, is_pure=True, pack=1,
                )  # fmt: skip
                w = tl.reshape(in_column_order(c0, c1, c2, c3), (BLOCK_M, GROUP))
                acc += tl.dot(w, x)
            else:
                slot = rm * GROUPS + g
                codes = tl.load(q_ptr + slot[:, None] * GROUP + cols[None, :], mask=m_ok[:, None], other=0)
                scale = tl.load(s_ptr + slot, mask=m_ok, other=0.0)
                zero = tl.load(z_ptr + slot, mask=m_ok, other=0)
                if DOT_FP32 or x_ptr.dtype.element_ty != tl.float16:
                    q = (codes.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    scale32 = scale.to(tl.float32)[:, None]
                    w = q * scale32 - (zero.to(tl.float32)[:, None] * scale32)
                    acc += tl.dot(w, x.to(tl.float32), input_precision="ieee") if DOT_FP32 else tl.dot(w.to(x.dtype), x)
                else:
                    q = (codes.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
                    w = (q - (1024.0 + zero.to(tl.float32)).to(tl.float16)[:, None]) * scale.to(tl.float16)[:, None]
                    acc += tl.dot(w, x)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + pid_k * stride_ys + rn[None, :] * stride_yn + rm[:, None], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int8_chunk(group_size: int) -> int:
    """Columns per inner step: the largest power of two ≤ 64 dividing the group size."""
    chunk = 64
    while group_size % chunk:
        chunk //= 2
    return chunk


def int8_tiles(n: int, chunk: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_M): at most 4096 (rows × chunk × tokens) partial sums per program (32 per
    thread of 4 warps), within 128 registers on sm_90 (93 at one token). At one token the main
    loop then issues 0.208 warp-instructions per weight byte, within Hopper's 0.218 (2048 partial
    sums: 0.218, just over); from 4 tokens on, the products alone outgrow the budget on CUDA
    cores (eval/compile_kernels.py)."""
    block_n = min(16, next_pow2(n))
    return block_n, max(2, min(64, 4096 // (chunk * block_n)))


def int8_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None = None,
    tensor_cores: bool | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x·Ŵᵀ + bias for Int8Linear's storage: qweight (M, groups, g) uint8, scales (M, groups),
    zeros (M, groups) uint8; x (..., K) -> (..., M) with K = groups·g. Tensor cores for power-of-two
    groups of at least 16 (at one token only with the PTX dequantization: fp16/bf16 on a GPU),
    else CUDA cores; `tensor_cores` overrides."""
    check_launch(x, qweight, scales, zeros)
    m, groups, group = qweight.shape
    k = x.shape[-1]
    if groups * group != k:
        raise ValueError(f"x has {k} features but the weight has {groups} groups of {group}")
    check_group_codes(qweight, scales, zeros)
    chunk = int8_chunk(group)
    if chunk < 2:
        raise ValueError(f"the kernel needs an even group size, got {group}")
    x2 = flat_tokens(x)
    n = x2.shape[0]
    out = output_like(x, m)
    if n == 0:
        return out
    ptx = ptx_applies(x, scales.dtype)
    if tensor_cores is None:  # with the PTX dequantization tensor cores issue fewer instructions even at one token
        tensor_cores = (n > FMA_MAX_TOKENS or ptx) and group >= 16 and group & (group - 1) == 0
    if tensor_cores:
        if ptx:
            codes = qweight.view(torch.int32)  # four codes a word (a power-of-two group of at least 16)
            launch_group_dot(_int8_dot_kernel, x, x2, out, codes, scales.view(torch.int16), zeros, bias, group, split_k, PTX=True)
        else:
            launch_group_dot(_int8_dot_kernel, x, x2, out, qweight, scales, zeros, bias, group, split_k)
        return out
    block_n, block_m = int8_tiles(n, chunk)
    launch_group_lanes(_int8_kernel, x2, out, qweight, scales, zeros, bias, block_n, block_m, GROUP=group, CHUNK=chunk)
    return out


def int8_refusal(module, x: torch.Tensor) -> str | None:
    why = launch_refusal(x, module.qweight, module.scales)
    if why is None and module.group_size % 2:
        why = f"group size {module.group_size} is odd"
    return why


def int8_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    return int8_matmul(x, module.qweight, module.scales, module.zeros, module.bias)

