"""The inline PTX the kernels send to the GPU, run by a small emulator of the PTX instructions
they use, against the references: W4's and W8's dequantization of 32-bit words (int4_matmul,
int8_matmul), the 2:4 kernel's placement of each group's two values into its four columns
(nm_matmul), and the W3/W2 kernels' PTX: the one-token kernel's pair products and the
tensor-core kernel's dequantization (lowbit_matmul).

Triton's interpreter cannot run inline PTX, so without a GPU this is what checks those programs:
the PRMT selectors (and the 2:4 selector table), the LOP3 truth table, the exponent bits and the
per-row pairs (`w4_row_pairs`), bit for bit, for fp16 and bf16. The rest of each kernel (loads,
column order, tiles) runs in the interpreter in tests/test_kernels.py on its Triton-arithmetic
path; compile_kernels checks that the PTX assembles for sm_90."""

from __future__ import annotations

import re

import pytest
import torch

from compress.kernels.int4_matmul import _w4_word_ptx, w4_row_pairs
from compress.modules.gqsa import pack_int4

MASK32 = 0xFFFFFFFF


def _halves(v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 16-bit floats of 32-bit registers (low, high), as float64."""
    low = (v & 0xFFFF).to(torch.int16).view(dtype)  # int64 -> int16 keeps the low 16 bits
    high = ((v >> 16) & 0xFFFF).to(torch.int16).view(dtype)
    return low.double(), high.double()


def _pack(low: torch.Tensor, high: torch.Tensor, dtype: torch.dtype, exact: bool = True) -> torch.Tensor:
    """float64 pairs rounded to `dtype` (through fp32: exact for the dequantizations, checked; with
    `exact=False`, as for products of arbitrary activations, within a rounding of the true one)."""
    out = []
    for h in (low, high):
        assert not exact or torch.equal(h.float().double(), h), "the emulated FMA result is not exact in fp32"
        out.append(h.float().to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF)
    return out[0] | (out[1] << 16)


def run_ptx(program: str, inputs: dict[str, torch.Tensor], exact: bool = True) -> dict[str, torch.Tensor]:
    """Execute straight-line PTX (mov, shr, shf, prmt, lop3, packed 16-bit add and fma) on int64
    tensors holding 32-bit values, element-wise; returns the outputs ($0..$7 that the program
    writes, $0..$15) as int64 bit patterns. `exact`: every 16-bit float result must be exact (see `_pack`)."""
    regs = dict(inputs)

    def value(operand: str) -> torch.Tensor | int:
        if operand[0].isdigit():  # an immediate, hex or decimal
            return int(operand, 0)
        return regs[operand]

    for line in program.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if rest.startswith("{"):  # mov.b32 {$a, $b}, r: the halves of r
            names, source = re.fullmatch(r"\{(.*)\},\s*(\S+)", rest).groups()
            low, high = (n.strip() for n in names.split(","))
            regs[low], regs[high] = regs[source] & 0xFFFF, (regs[source] >> 16) & 0xFFFF
            continue
        dest, *args = (a.strip() for a in rest.split(","))
        vals = [value(a) for a in args]
        if op == "mov.b32":
            result = vals[0] + torch.zeros_like(next(iter(inputs.values()))) if isinstance(vals[0], int) else vals[0]
        elif op == "shr.u32":
            result = vals[0] >> vals[1]
        elif op == "shf.r.wrap.b32":  # funnel shift of {b, a} right: with a = b, a rotation
            a, b, shift = vals
            result = ((b << 32 | a) >> (shift % 32)) & MASK32
        elif op == "prmt.b32":  # default mode: byte i of d is byte (selector nibble i) of {b, a}
            a, b, selector = (v + torch.zeros_like(next(iter(inputs.values()))) if isinstance(v, int) else v for v in vals)
            pool = torch.stack([(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)])
            assert not bool((selector & 0x8888).any()), "sign-replicating selectors are not emulated"
            result = sum(pool.gather(0, ((selector >> (4 * i)) & 0x7)[None]).squeeze(0) << (8 * i) for i in range(4))
        elif op == "lop3.b32":  # bit k of the LUT: the output for (a, b, c) = bits of k (a = 4, b = 2, c = 1)
            a, b, c, lut = vals
            result = torch.zeros_like(a)
            for k in range(8):
                if lut >> k & 1:
                    term = (a if k & 4 else ~a) & (b if k & 2 else ~b) & (c if k & 1 else ~c)
                    result = result | (term & MASK32)
        elif op in ("fma.rn.f16x2", "fma.rn.bf16x2", "sub.rn.f16x2", "mul.rn.f16x2", "add.rn.f16x2"):
            dtype = torch.bfloat16 if "bf16" in op else torch.float16
            like = next(v for v in vals if not isinstance(v, int))
            halves = [_halves(v + torch.zeros_like(like), dtype) for v in vals]
            if op.startswith("fma"):
                (a_lo, a_hi), (b_lo, b_hi), (c_lo, c_hi) = halves
                result = _pack(a_lo * b_lo + c_lo, a_hi * b_hi + c_hi, dtype, exact)
            else:
                (a_lo, a_hi), (b_lo, b_hi) = halves
                combine = {"sub": lambda a, b: a - b, "mul": lambda a, b: a * b, "add": lambda a, b: a + b}[op[:3]]
                result = _pack(combine(a_lo, b_lo), combine(a_hi, b_hi), dtype, exact)
        elif op == "add.rn.f32":  # exact here (small integers): checked through fp64
            a, b = (v.to(torch.int32).view(torch.float32).double() for v in vals)
            total = a + b
            assert torch.equal(total.float().double(), total), "the emulated fp32 sum is not exact"
            result = total.float().view(torch.int32).to(torch.int64)
        elif op == "cvt.rn.bf16x2.f32":  # d = (bf16(a) << 16) | bf16(b)
            a, b = (v.to(torch.int32).view(torch.float32) for v in vals)
            bits = lambda f: f.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF  # noqa: E731
            result = bits(a) << 16 | bits(b)
        else:
            raise AssertionError(f"the emulator does not know {op}")
        regs[dest] = result & MASK32
    return {f"${i}": regs[f"${i}"] for i in range(16) if f"${i}" in regs}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w4_word_ptx_dequantizes_every_code_exactly(dtype):
    """Every code in every column position, every zero point, scales from tiny to large: the
    eight outputs are (q − z)·s of columns 0..7 rounded once, bit for bit as the reference's fp32
    product cast to the dtype."""
    torch.manual_seed(0)
    rows = 4096
    codes = torch.randint(0, 16, (rows, 8))
    codes[:256] = torch.arange(256)[:, None] % 16  # every code in every position
    zeros = torch.arange(rows) % 16
    scales = (torch.rand(rows) * 2.0 ** torch.randint(-12, 6, (rows,)).float()).to(dtype)
    words = pack_int4(codes).view(torch.int32).to(torch.int64).squeeze(-1) & MASK32
    neg_base2, scale2 = w4_row_pairs(scales, zeros.to(torch.uint8))
    magic, one, fma = ("0x43004300", "0x3F803F80", "fma.rn.bf16x2") if dtype == torch.bfloat16 else ("0x64006400", "0x3C003C00", "fma.rn.f16x2")
    out = run_ptx(_w4_word_ptx(magic, one, fma), {"$8": words, "$9": neg_base2.to(torch.int64) & MASK32, "$10": scale2.to(torch.int64) & MASK32})
    got = torch.stack([out[f"${i}"].to(torch.int16).view(dtype) for i in range(8)], dim=1)
    expected = ((codes - zeros[:, None]).float() * scales.float()[:, None]).to(dtype)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def test_emulator_catches_a_wrong_selector():
    """The check can fail: a PRMT that takes the wrong byte for one pair gives wrong columns."""
    program = _w4_word_ptx("0x64006400", "0x3C003C00", "fma.rn.f16x2").replace("0x501", "0x502")
    codes = torch.arange(8)[None].repeat(16, 1)
    words = pack_int4(codes).view(torch.int32).to(torch.int64).squeeze(-1) & MASK32
    scales = torch.ones(16, dtype=torch.float16)
    neg_base2, scale2 = w4_row_pairs(scales, torch.zeros(16, dtype=torch.uint8))
    out = run_ptx(program, {"$8": words, "$9": neg_base2.to(torch.int64) & MASK32, "$10": scale2.to(torch.int64) & MASK32})
    got = torch.stack([out[f"${i}"].to(torch.int16).view(torch.float16) for i in range(8)], dim=1)
    assert not torch.equal(got[0].float(), torch.arange(8).float())


def test_nm24_ptx_places_each_groups_values_in_its_columns():
    """Every 2:4 pattern: its selectors from SELECTOR_TABLE (by the group's nibble) and the
    group's PTX put v0 and v1 into the columns of the group's first and second kept weight and
    zeros elsewhere, bit for bit."""
    from compress.kernels.nm_matmul import NM24_GROUP_PTX_TEXT, SELECTOR_TABLE

    for nibble in (n for n in range(16) if bin(n).count("1") == 2):
        values = torch.randn(64, 2).to(torch.float16)  # (v0, v1) of 64 groups with this pattern
        word = values.view(torch.int16).to(torch.int64) & 0xFFFF
        word = word[:, 0] | word[:, 1] << 16
        selectors = torch.full((64,), SELECTOR_TABLE[nibble], dtype=torch.int64)
        out = run_ptx(NM24_GROUP_PTX_TEXT, {"$4": word, "$5": selectors})
        got = torch.stack([out[f"${c}"].to(torch.int16).view(torch.float16) for c in range(4)], dim=1)
        expected = torch.zeros(64, 4, dtype=torch.float16)
        kept = [c for c in range(4) if nibble >> c & 1]
        expected[:, kept[0]], expected[:, kept[1]] = values[:, 0], values[:, 1]
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), nibble


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8_word_ptx_dequantizes_every_code_exactly(dtype):
    """Every code in every byte of a word, every zero point, scales from tiny to large: the four
    outputs are (q − z)·s of columns 0..3 rounded once, bit for bit as the reference."""
    from compress.kernels.int8_matmul import _w8_word_ptx, w8_row_pairs

    torch.manual_seed(1)
    rows = 4096
    codes = torch.randint(0, 256, (rows, 4))
    codes[:256] = torch.arange(256)[:, None]  # every code in every position
    zeros = torch.randint(0, 256, (rows,))
    scales = (torch.rand(rows) * 2.0 ** torch.randint(-12, 6, (rows,)).float()).to(dtype)
    words = codes.to(torch.uint8).contiguous().view(torch.int32).to(torch.int64).squeeze(-1) & MASK32
    base, scale2 = w8_row_pairs(scales, zeros.to(torch.uint8))
    out = run_ptx(_w8_word_ptx(dtype == torch.bfloat16), {"$4": words, "$5": base.to(torch.int64) & MASK32, "$6": scale2.to(torch.int64) & MASK32})
    got = torch.stack([out[f"${i}"].to(torch.int16).view(dtype) for i in range(4)], dim=1)
    expected = ((codes - zeros[:, None]).float() * scales.float()[:, None]).to(dtype)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def _lowbit_offsets(zeros: torch.Tensor) -> list[torch.Tensor]:
    """The kernel's four pairs −(1024 + 4^p·z): p = 0 by integer arithmetic, 1..3 by its PTX."""
    from compress.kernels.pairs import NEG_FP16_BIAS2, offsets_program

    nb0 = (zeros.to(torch.int64) * 0x10001 + NEG_FP16_BIAS2) & MASK32
    out = run_ptx(offsets_program(2), {"$3": nb0})
    return [nb0, out["$0"], out["$1"], out["$2"]]


def _lowbit_group(bits: int, codes: torch.Tensor, zeros: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Groups of 32 columns (two low words) through the one-token kernel's PTX, one per row of
    codes (rows, 32), zeros (rows,) and activations x (rows, 32): the fp16 pair sums of
    Σ (q − z)·x/max|x| over each group's columns, as float64 (rows,)."""
    from compress.kernels.lowbit_matmul import _pair_program
    from compress.kernels.pairs import gemv_activations
    from compress.modules.lowbit import pack_codes

    words = pack_codes(codes, bits).view(torch.int32).to(torch.int64) & MASK32  # (rows, 2 low [+ 1 third])
    pairs = torch.stack([gemv_activations(row, 2)[0] for row in x]).to(torch.int64).view(-1, 2, 8) & MASK32
    nb = _lowbit_offsets(zeros)
    acc = torch.zeros(codes.shape[0], dtype=torch.int64)
    for u in range(2):
        inputs = {"$1": acc, "$2": words[:, u], "$3": words[:, 2] if bits == 3 else acc}
        inputs.update({f"${4 + i}": pairs[:, u, i] for i in range(8)})
        inputs.update({f"${12 + p}": nb[p] for p in range(4)})
        acc = run_ptx(_pair_program(bits, odd=u == 1), inputs, exact=False)["$0"]
    low, high = _halves(acc, torch.float16)
    return low + high


@pytest.mark.parametrize("bits", [2, 3])
def test_lowbit_pair_ptx_takes_every_code_from_its_bits(bits):
    """Every code of every column of two low words (W3: with its third bits, odd word rotated),
    every zero point: with a one-hot activation the pair sum is exactly q − z of that column; and
    the offsets −(1024 + 4^p·z) are exact, bit for bit."""
    levels = 1 << bits
    columns = torch.arange(32).repeat_interleave(levels * levels)  # (column, code, zero) cases
    case_codes = torch.arange(levels).repeat_interleave(levels).repeat(32)
    case_zeros = torch.arange(levels).repeat(32 * levels)
    rows = columns.numel()
    codes = torch.randint(0, levels, (rows, 32), generator=torch.Generator().manual_seed(bits))
    codes[torch.arange(rows), columns] = case_codes
    x = torch.zeros(rows, 32)
    x[torch.arange(rows), columns] = 1.0
    nb = _lowbit_offsets(case_zeros)
    for p in range(4):
        expected = (-(1024 + 4**p * case_zeros)).to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
        assert torch.equal(nb[p] & 0xFFFF, expected) and torch.equal(nb[p] >> 16, expected), p
    assert torch.equal(_lowbit_group(bits, codes, case_zeros, x), (case_codes - case_zeros).double())


@pytest.mark.parametrize("bits", [2, 3])
def test_lowbit_pair_ptx_matches_the_dot_product(bits):
    """Random codes, zero points and activations of a wide range: the PTX pair sums times max|x|
    are Σ (q − z)·x within fp16 accumulation (64 rows of a 32-column group)."""
    torch.manual_seed(2)
    levels = 1 << bits
    codes = torch.randint(0, levels, (64, 32))
    zeros = torch.randint(0, levels, (64,))
    x = torch.randn(32) * torch.logspace(-3, 2, 32)[torch.randperm(32)]
    got = _lowbit_group(bits, codes, zeros, x.expand(64, 32)) * x.abs().max().double()
    expected = ((codes - zeros[:, None]).double() * x.double()).sum(1)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 2e-3



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3])
def test_lowbit_dot_ptx_dequantizes_every_code_exactly(bits, dtype):
    """The tensor-core kernel's PTX for a group of 32 columns (two low words, W3 with the third
    word, rotated back for the odd one as the kernel does): every code in every column, every zero
    point, scales from tiny to large; the 16 outputs a word are (q − z)·s of columns 16u..16u + 15
    rounded once, bit for bit as the reference's fp32 product cast to the dtype."""
    from compress.kernels.lowbit_matmul import _word_values_ptx, lowbit_row_pairs
    from compress.modules.lowbit import pack_codes

    torch.manual_seed(bits)
    levels, rows = 1 << bits, 4096
    codes = torch.randint(0, levels, (rows, 32))
    codes[: 32 * levels] = (torch.arange(32 * levels)[:, None] // 32 + torch.arange(32)) % levels  # every code in every column
    zeros = torch.arange(rows) % levels
    scales = (torch.rand(rows) * 2.0 ** torch.randint(-12, 6, (rows,)).float()).to(dtype)
    words = pack_codes(codes, bits).view(torch.int32).to(torch.int64) & MASK32
    neg0, neg1, scale2 = (t.to(torch.int64) & MASK32 for t in lowbit_row_pairs(scales, zeros.to(torch.uint8)))
    expected = ((codes - zeros[:, None]).float() * scales.float()[:, None]).to(dtype)
    for u in range(2):
        third = words[:, 2] if bits == 3 else words[:, u]
        if u == 1:  # the odd word's third bits sit 8 further: rotated back
            third = ((third >> 8) | (third << 24)) & MASK32
        inputs = {"$16": words[:, u], "$17": third, "$18": neg0, "$19": neg1, "$20": scale2}
        out = run_ptx(_word_values_ptx(bits, dtype == torch.bfloat16), inputs)
        got = torch.stack([out[f"${c}"].to(torch.int16).view(dtype) for c in range(16)], dim=1)
        assert torch.equal(got.view(torch.int16), expected[:, 16 * u : 16 * u + 16].view(torch.int16)), u

def _w4_pairs(codes: torch.Tensor, zeros: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Eight columns (one word) a row through the group-sparse W4 one-token PTX: the fp16 pair sum
    of Σ (q − z)·x/max|x|, as float64 (rows,); codes (rows, 8), zeros (rows,), x (rows, 8)."""
    from compress.kernels.gqsa_matmul import _w4_pairs_program
    from compress.kernels.pairs import NEG_FP16_BIAS2, gemv_activations, offsets_program

    words = pack_int4(codes).view(torch.int32).to(torch.int64).squeeze(-1) & MASK32
    pairs = torch.stack([gemv_activations(row, 4)[0] for row in x]).to(torch.int64) & MASK32  # (rows, 4)
    nb0 = (zeros.to(torch.int64) * 0x10001 + NEG_FP16_BIAS2) & MASK32
    nb1 = run_ptx(offsets_program(4), {"$1": nb0})["$0"]
    expected = (-(1024 + 16 * zeros)).to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    assert torch.equal(nb1, expected | expected << 16), "the offsets −(1024 + 16·z) are not exact"
    inputs = {"$1": words, "$6": nb0, "$7": nb1, **{f"${2 + i}": pairs[:, i] for i in range(4)}}
    low, high = _halves(run_ptx(_w4_pairs_program(), inputs, exact=False)["$0"], torch.float16)
    return low + high


def test_gqsa_pair_ptx_takes_every_code_from_its_nibble():
    """Every code and zero point in every column of a word: with a one-hot activation the pair
    sum is exactly q − z of that column (and a wrong mask fails it)."""
    columns = torch.arange(8).repeat_interleave(256)
    case_codes = torch.arange(16).repeat_interleave(16).repeat(8)
    case_zeros = torch.arange(16).repeat(128)
    codes = torch.randint(0, 16, (columns.numel(), 8), generator=torch.Generator().manual_seed(4))
    codes[torch.arange(columns.numel()), columns] = case_codes
    x = torch.zeros(columns.numel(), 8)
    x[torch.arange(columns.numel()), columns] = 1.0
    assert torch.equal(_w4_pairs(codes, case_zeros, x), (case_codes - case_zeros).double())


def test_gqsa_pair_ptx_matches_the_dot_product():
    """Random codes, zero points and activations of a wide range: the pair sums times max|x| are
    Σ (q − z)·x within fp16 accumulation."""
    torch.manual_seed(5)
    codes = torch.randint(0, 16, (64, 8))
    zeros = torch.randint(0, 16, (64,))
    x = torch.randn(8) * torch.logspace(-3, 2, 8)[torch.randperm(8)]
    got = _w4_pairs(codes, zeros, x.expand(64, 8)) * x.abs().max().double()
    expected = ((codes - zeros[:, None]).double() * x.double()).sum(1)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 2e-3


@pytest.mark.parametrize("tokens", [2, 3, 4])
def test_gqsa_pair_ptx_for_several_tokens_is_the_one_token_program_per_token(tokens):
    """The several-token program shares the dequantization and gives each token exactly what the
    one-token program gives it (the same FMAs in the same order), from sums carried in."""
    from compress.kernels.gqsa_matmul import _w4_pairs_program
    from compress.kernels.pairs import NEG_FP16_BIAS2, gemv_activations, offsets_program

    torch.manual_seed(6)
    rows = 256
    codes, zeros = torch.randint(0, 16, (rows, 8)), torch.randint(0, 16, (rows,))
    words = pack_int4(codes).view(torch.int32).to(torch.int64).squeeze(-1) & MASK32
    nb0 = (zeros.to(torch.int64) * 0x10001 + NEG_FP16_BIAS2) & MASK32
    nb1 = run_ptx(offsets_program(4), {"$1": nb0})["$0"]
    x = torch.randn(tokens, rows, 8) * torch.logspace(-2, 1, 8)
    pairs = [torch.stack([gemv_activations(row, 4)[0] for row in x[t]]).to(torch.int64) & MASK32 for t in range(tokens)]
    carried = [torch.randint(0, 1 << 14, (rows,), dtype=torch.int64) | 0x3C003C00 for _ in range(tokens)]  # fp16 pairs in [1, 2)
    inputs = {f"${tokens + t}": carried[t] for t in range(tokens)}
    inputs[f"${2 * tokens}"] = words
    inputs.update({f"${2 * tokens + 1 + 4 * t + i}": pairs[t][:, i] for t in range(tokens) for i in range(4)})
    inputs.update({f"${6 * tokens + 1}": nb0, f"${6 * tokens + 2}": nb1})
    program = _w4_pairs_program(tokens)
    assert program.count("lop3") == 4 and program.count("add.rn.f16x2") == 4 and program.count("fma.rn.f16x2") == 4 * tokens
    several = run_ptx(program, inputs, exact=False)
    for t in range(tokens):  # the one-token program from the same carried sum: its body after `mov acc, 0`
        one = _w4_pairs_program().replace("mov.b32 a0, 0;", "mov.b32 a0, $8;")
        assert one != _w4_pairs_program()
        single = run_ptx(one, {"$1": words, "$6": nb0, "$7": nb1, "$8": carried[t], **{f"${2 + i}": pairs[t][:, i] for i in range(4)}}, exact=False)
        assert torch.equal(several[f"${t}"], single["$0"]), t
