"""Triton kernels against their PyTorch references.

Without a GPU these run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1) on small
shapes: they check indexing, masking, split-K and packing, not speed (eval/bench_kernels.py)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from compress import kernels
from compress.kernels.bitmap_matmul import bitmap_matmul, split_offsets
from compress.kernels.delta_matmul import delta_matmul
from compress.kernels.ell_matmul import ell_matmul
from compress.kernels.gqsa_matmul import gqsa_matmul
from compress.kernels.int4_matmul import int4_matmul
from compress.kernels.nm_matmul import nm24_matmul
from compress.kernels import runtime
from compress.kernels.runtime import interpreting
from compress.kernels.skinny_matmul import skinny_matmul, skinny_matmul_reference
from compress.compressors.masks import tile_mask
from compress.kernels.tile_sparse_matmul import tile_sparse_matmul
from compress.compressors.rtn import quantize_groups
from compress.kernels.lowbit_matmul import _dequant as lowbit_dequant
from compress.modules import DeltaSparseLinear, DictLinear, EoRALinear, GQSALinear, Int8Linear, LowBitLinear, LowRankLinear, SparseLinear, TileSparseLinear, pack_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreting(), reason="no GPU and TRITON_INTERPRET is not set"
)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all(), "output has non-finite (unwritten?) elements"
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,split_k", [(40, 3, 70, 1), (64, 17, 130, 2), (33, 1, 200, 3)])
def test_skinny_matmul(dtype, m, n, k, split_k):
    x = torch.randn(2, n, k, device=DEVICE).to(dtype)
    w = torch.randn(m, k, device=DEVICE).to(dtype)
    b = torch.randn(m, device=DEVICE).to(dtype)
    y = skinny_matmul(x, w, b, split_k=split_k)
    assert y.shape == (2, n, m) and y.dtype == dtype
    assert rel_err(y, skinny_matmul_reference(x, w, b)) < TOLERANCE[dtype]
    base = torch.randn(2, n, m, device=DEVICE).to(dtype)
    out = base.clone()
    skinny_matmul(x, w, out=out, accumulate=True, split_k=split_k)
    assert rel_err(out, base.double() + skinny_matmul_reference(x, w)) < TOLERANCE[dtype]
    poisoned = torch.full((2, n, m), float("nan"), device=DEVICE, dtype=dtype)
    skinny_matmul(x, w, out=poisoned, split_k=split_k)
    assert rel_err(poisoned, skinny_matmul_reference(x, w)) < TOLERANCE[dtype]


def test_launchers_explain_bad_input():
    x = torch.randn(3, 16, device=DEVICE)
    with pytest.raises(ValueError, match="features"):
        skinny_matmul(x, torch.randn(8, 12, device=DEVICE))
    with pytest.raises(ValueError, match="accumulate"):
        skinny_matmul(x, torch.randn(8, 16, device=DEVICE), accumulate=True)
    with pytest.raises(ValueError, match="dtype"):
        skinny_matmul(x.to(torch.int32), torch.randn(8, 16, device=DEVICE))
    with pytest.raises(ValueError, match="bitmap"):
        bitmap_matmul(x, torch.randn(10, device=DEVICE), torch.zeros(8, 3, dtype=torch.uint8, device=DEVICE), 8)
    with pytest.raises(ValueError, match="does not hold"):
        ell_matmul(x, torch.randn(8, 3, device=DEVICE), torch.zeros(8, 2, dtype=torch.uint8, device=DEVICE), 10)
    q = torch.zeros(8, 2, 4, dtype=torch.uint8, device=DEVICE)
    z = torch.zeros(8, 2, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of the group size"):
        gqsa_matmul(torch.randn(3, 20, device=DEVICE), q, torch.ones(8, 2, device=DEVICE), z, z)


def test_split_offsets_match_a_count():
    mask = torch.rand(7, 45) < 0.4
    bitmap = pack_mask(mask)
    offsets = split_offsets(bitmap, 16)
    per_row = mask.sum(1)
    for r in range(7):
        for s in range(offsets.shape[1]):
            assert offsets[r, s] == per_row[:r].sum() + mask[r, : 16 * s].sum()


def _random_sparse(m: int, k: int, sparsity: float, dtype, pattern: str = "unstructured") -> SparseLinear:
    w = torch.randn(m, k)
    if pattern == "2:4":
        keep = w.abs().view(m, -1, 4).topk(2, dim=-1).indices
        mask = torch.zeros(m, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).view(m, k)
    else:
        mask = torch.rand(m, k) >= sparsity
        mask[3] = False  # a dead row
    return SparseLinear.from_dense(w.to(dtype), mask, torch.randn(m).to(dtype), pattern=pattern).to(DEVICE)


def _random_delta(m: int, k: int, sparsity: float, dtype) -> DeltaSparseLinear:
    w = torch.randn(m, k)
    mask = torch.rand(m, k) >= sparsity
    mask[3] = False  # a dead row
    return DeltaSparseLinear.from_dense((w * mask).to(dtype), mask, torch.randn(m).to(dtype)).to(DEVICE)


def _random_gqsa(m: int, k: int, group: int, kept: int, dtype) -> GQSALinear:
    codes = torch.randint(0, 16, (m, kept, group))
    index = torch.stack([torch.randperm(k // group)[:kept].sort().values for _ in range(m)])
    scales = (torch.rand(m, kept) * 0.1 + 0.01).to(dtype)
    zeros = torch.randint(0, 16, (m, kept))
    return GQSALinear.from_codes(codes, scales, zeros, index, k, torch.randn(m).to(dtype)).to(DEVICE)


def _random_dict(m: int, k: int, atoms: int, s: int, dtype, int8: bool = False, w8_atoms: bool = False) -> DictLinear:
    index = torch.stack([torch.randperm(atoms)[:s] for _ in range(m)])
    grid = None
    if w8_atoms:  # the atoms as W8 groups of 32 columns (Int8Linear's layout): x·Dᵀ on the W8 kernel
        codes, scales, zeros = quantize_groups(torch.randn(atoms, k), 8, 32)
        grid = (codes, scales.to(dtype), zeros)
    if int8:  # int8 coefficient codes with a scale per row, and a bias
        codes = torch.randint(-127, 128, (m, s), dtype=torch.int8)
        return DictLinear.from_factors(
            torch.randn(atoms, k).to(dtype), codes, index, torch.randn(m).to(dtype), scales=(torch.rand(m) / 64).to(dtype), atom_grid=grid
        ).to(DEVICE)
    return DictLinear.from_factors(
        torch.randn(atoms, k).to(dtype), torch.randn(m, s).to(dtype), index, None, atom_grid=grid
    ).to(DEVICE)


def _random_int8(m: int, k: int, group: int, dtype) -> Int8Linear:
    grid = quantize_groups(torch.randn(m, k), 8, group)
    return Int8Linear.from_codes(grid.codes, grid.scales.to(dtype), grid.zeros, torch.randn(m).to(dtype)).to(DEVICE)


def _random_lowbit(m: int, k: int, group: int, bits: int, dtype) -> LowBitLinear:
    grid = quantize_groups(torch.randn(m, k), bits, group)
    return LowBitLinear.from_codes(grid.codes, grid.scales.to(dtype), grid.zeros, bits, torch.randn(m).to(dtype)).to(DEVICE)


def _random_tile_sparse(m: int, k: int, tile_rows: int, tile_cols: int, keep: int, dtype) -> TileSparseLinear:
    w = torch.randn(m, k)
    mask = tile_mask(torch.rand(m, k), tile_rows, tile_cols, keep)
    return TileSparseLinear.from_dense(w.to(dtype), mask, torch.randn(m).to(dtype), tile_rows, tile_cols).to(DEVICE)


def _modules(dtype):
    lowrank = LowRankLinear.from_factors(torch.randn(48, 8).to(dtype), torch.randn(8, 72).to(dtype), torch.randn(48).to(dtype))
    sparse_base = _random_sparse(48, 72, 0.5, dtype)
    eora = EoRALinear.from_factors(sparse_base, torch.randn(48, 4).to(dtype).to(DEVICE), torch.randn(4, 72).to(dtype).to(DEVICE))
    return {
        "lowrank": lowrank.to(DEVICE),
        "sparse 50%": _random_sparse(48, 72, 0.5, dtype),
        "sparse 90%": _random_sparse(40, 131, 0.9, dtype),
        "sparse 2:4": _random_sparse(48, 64, 0.5, dtype, "2:4"),
        "sparse 2:4 ragged": _random_sparse(37, 200, 0.5, dtype, "2:4"),
        "delta rows 50%": _random_delta(37, 200, 0.5, dtype),
        "delta rows 95% (fillers)": _random_delta(20, 300, 0.95, dtype),
        "gqsa W4S50 g16": _random_gqsa(40, 96, 16, 3, dtype),
        "gqsa W4 g8 dense": _random_gqsa(24, 64, 8, 8, dtype),
        "W4 g32 (int4 tensor-core kernel)": _random_gqsa(40, 128, 32, 4, dtype),
        "dict k=300 (int16 index)": _random_dict(36, 64, 300, 5, dtype),
        "dict k=20": _random_dict(36, 64, 20, 20, dtype),
        "dict k=300 int8 coefficients": _random_dict(36, 64, 300, 5, dtype, int8=True),
        "dict k=40 W8 atoms": _random_dict(36, 64, 40, 8, dtype, w8_atoms=True),
        "dict k=300 W8 atoms, int8 coefficients": _random_dict(36, 64, 300, 5, dtype, int8=True, w8_atoms=True),
        "W8 g32": _random_int8(40, 96, 32, dtype),
        "W8 g16": _random_int8(24, 64, 16, dtype),
        "W3 g32": _random_lowbit(40, 96, 32, 3, dtype),
        "W2 g64": _random_lowbit(37, 128, 64, 2, dtype),
        "W2 g16": _random_lowbit(20, 48, 16, 2, dtype),
        "eora over sparse": eora,
        "tile 50% 16x32": _random_tile_sparse(48, 96, 16, 32, 16, dtype),
        "tile 75% 32x64 (keep 16)": _random_tile_sparse(64, 128, 32, 64, 16, dtype),
        "tile keep 5 of 24": _random_tile_sparse(32, 72, 16, 24, 5, dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 19])
def test_modules_match_between_torch_and_triton(monkeypatch, dtype, tokens):
    for name, module in _modules(dtype).items():
        x = torch.randn(tokens, module.in_features, device=DEVICE).to(dtype)
        kernels.set_kernel_mode("torch")
        reference = module(x)
        bias = module.base.bias if isinstance(module, EoRALinear) else module.bias  # EoRA keeps the bias in its base
        dense = torch.nn.functional.linear(x.double(), module.to_dense().double(), None if bias is None else bias.double())
        kernels.set_kernel_mode("triton")
        assert kernels.select(module.format, module, x).backend == "triton", name
        y = module(x)
        assert y.shape == reference.shape and y.dtype == dtype, name
        assert rel_err(y, dense) < TOLERANCE[dtype], f"{name}: {rel_err(y, dense):.2e}"
        assert rel_err(y, reference) < 2 * TOLERANCE[dtype] + 1e-6, name


@pytest.mark.parametrize("split_k", [1, 2, 5])
def test_bitmap_split_k(split_k):
    module = _random_sparse(33, 150, 0.7, torch.float32)
    x = torch.randn(4, 150, device=DEVICE)
    y = bitmap_matmul(x, module.values, module.bitmap, module.out_features, module.bias, split_k=split_k)
    assert rel_err(y, torch.nn.functional.linear(x.double(), module.to_dense().double(), module.bias.double())) < 1e-5


def test_auto_never_picks_the_interpreter(monkeypatch):
    module = LowRankLinear.from_factors(torch.randn(16, 4), torch.randn(4, 16), None)
    x = torch.randn(2, 16)
    kernels.set_kernel_mode("auto")
    assert kernels.select("lowrank", module, x).backend == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kernels.set_kernel_mode("triton")
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        module(x)


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_tile_sparse_split_k(split_k):
    module = _random_tile_sparse(32, 160, 16, 32, 12, torch.float32)
    x = torch.randn(3, 160, device=DEVICE)
    y = tile_sparse_matmul(x, module.values, module.col_index, module.bias, split_k=split_k)
    assert rel_err(y, torch.nn.functional.linear(x.double(), module.to_dense().double(), module.bias.double())) < 1e-5


def test_auto_leaves_prefill_to_the_reference():
    """The token rule is a declared capability, checked before the device: it holds on CPU too."""
    module = LowRankLinear.from_factors(torch.randn(16, 4), torch.randn(4, 16), None).to(DEVICE)
    triton_kernel = next(k for k in kernels.available("lowrank") if k.backend == "triton")
    prefill = kernels.refusal(triton_kernel, module, torch.randn(65, 16, device=DEVICE), "auto")
    assert prefill is not None and "prefill" in prefill
    decode = kernels.refusal(triton_kernel, module, torch.randn(64, 16, device=DEVICE), "auto")
    assert decode is None if torch.cuda.is_available() else "prefill" not in decode
    assert "prefill" not in (kernels.refusal(triton_kernel, module, torch.randn(65, 16, device=DEVICE), "triton") or "")


def test_dispatch_chooses_once_per_device_dtype_and_token_class():
    """The choice is cached on the module: `supports` runs once per (device, dtype, decode/prefill,
    mode), and moving the module forgets it."""
    calls = []

    def supports(module, x):
        calls.append(x.shape[0])
        return None

    kernels.register_kernel("test_fmt", "ref", lambda m, x: x + 1, priority=0)
    kernels.register_kernel("test_fmt", "fast", lambda m, x: x + 2, priority=5, supports=supports, max_auto_tokens=8)
    module = torch.nn.Linear(3, 3)
    try:
        assert kernels.dispatch("test_fmt", module, torch.zeros(2, 3))[0, 0] == 2
        assert kernels.dispatch("test_fmt", module, torch.zeros(5, 3))[0, 0] == 2
        assert calls == [2]  # chosen on the first decode call only
        assert kernels.dispatch("test_fmt", module, torch.zeros(20, 3))[0, 0] == 1  # prefill: the reference
        assert kernels.dispatch("test_fmt", module, torch.zeros(2, 3, dtype=torch.float64))[0, 0] == 2
        assert calls == [2, 2]
        kernels.forget_kernel_choice(module)
        kernels.dispatch("test_fmt", module, torch.zeros(2, 3))
        assert calls == [2, 2, 2]
        compressed = LowRankLinear.from_factors(torch.randn(16, 4), torch.randn(4, 16), None)
        compressed(torch.randn(2, 16))
        assert compressed.__dict__["_kernel_choice"]
        compressed.double()
        assert "_kernel_choice" not in compressed.__dict__
    finally:
        kernels._REGISTRY.pop("test_fmt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_2of4_kernel_on_cuda_and_tensor_cores(dtype):
    """Exact 2:4 masks read straight from SparseLinear's storage, on either path, for decode and
    more tokens, with split-K; a 2:4 mask missing one weight goes to the bitmap kernel."""
    module = _random_sparse(40, 136, 0.5, dtype, "2:4")
    dense = module.to_dense().double()
    for tokens in (1, 7, 16, 64):
        x = torch.randn(tokens, 136, device=DEVICE).to(dtype)
        ref = torch.nn.functional.linear(x.double(), dense, module.bias.double())
        for tensor_cores, split_k in ((False, None), (True, 1), (True, 3)):
            y = nm24_matmul(x, module.values, module.bitmap, 40, module.bias, split_k=split_k, tensor_cores=tensor_cores)
            assert y.dtype == dtype and rel_err(y, ref) < TOLERANCE[dtype], (tokens, tensor_cores, split_k)
    kernels.set_kernel_mode("triton")
    assert kernels.select("sparse_bitmap", module, x).name == "triton_2of4"
    mask = module.mask()
    mask[5, mask[5].nonzero()[0]] = False  # one group keeps a single weight
    uneven = SparseLinear.from_dense(module.to_dense(), mask, module.bias, pattern="2:4")
    assert "exactly 2 of every 4" in kernels.refusal(kernels.available("sparse_bitmap")[0], uneven, x, "triton")
    assert kernels.select("sparse_bitmap", uneven, x).name == "triton_bitmap"
    assert kernels.select("sparse_bitmap", _random_sparse(40, 136, 0.5, dtype), x).name == "triton_bitmap"


def test_int8_kernel_on_cuda_and_tensor_cores(monkeypatch):
    import compress.kernels.int8_matmul as int8

    for dtype in (torch.float32, torch.float16):
        module = _random_int8(37, 192, 64, dtype)
        if dtype == torch.float16:  # the GPU's fp16 dequantization path (fp16 dots are right in the interpreter)
            monkeypatch.setattr(runtime, "dot_in_fp32", lambda d: False)
        for tokens in (1, 7, 16, 64):
            x = torch.randn(tokens, 192, device=DEVICE).to(dtype)
            ref = torch.nn.functional.linear(x.double(), module.to_dense().double(), module.bias.double())
            for tensor_cores, split_k in ((False, None), (True, 1), (True, 3)):
                y = int8.int8_matmul(x, module.qweight, module.scales, module.zeros, module.bias, tensor_cores=tensor_cores, split_k=split_k)
                assert rel_err(y, ref) < TOLERANCE[dtype], (dtype, tokens, tensor_cores, split_k)


@pytest.mark.parametrize("bits", [2, 3])
def test_lowbit_kernel_unpacks_every_code_on_both_paths(monkeypatch, bits):
    """Random codes (every value at every position of both kinds of words), on the CUDA-core
    kernel for one and two tokens (fp16, bf16) and on tensor cores, with split-K; fp16 also on
    the GPU's fp16 dot path."""
    import compress.kernels.lowbit_matmul as lowbit

    levels = 1 << bits
    m, k, group = 24, 256, 64
    codes = torch.randint(0, levels, (m, k // group, group), generator=torch.Generator().manual_seed(bits))
    zeros = torch.randint(0, levels, (m, k // group))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # fp16 last: the interpreter's bf16 dot needs fp32
        if dtype == torch.float16:
            monkeypatch.setattr(runtime, "dot_in_fp32", lambda d: False)
        module = LowBitLinear.from_codes(codes, torch.rand(m, k // group).to(dtype) + 0.5, zeros, bits, torch.randn(m).to(dtype)).to(DEVICE)
        assert (module.to_dense().cpu().float().reshape(m, -1, group) / module.scales.cpu().float()[..., None] + zeros[..., None]).round().long().equal(codes)
        for tokens in (1, 2, 6, 16):  # two on the CUDA-core kernel (tensor_cores=False): once a token, in one launch
            x = (torch.randn(tokens, k) * torch.logspace(-2, 1, k)).to(dtype).to(DEVICE)  # activations of a wide range
            ref = torch.nn.functional.linear(x.double(), module.to_dense().double(), module.bias.double())
            paths = [(True, 1), (True, 2)] + ([(False, None), (False, 3)] if tokens in (1, 2) and dtype != torch.float32 else [])
            for tensor_cores, split_k in paths:
                y = lowbit.lowbit_matmul(x, module.qweight, module.scales, module.zeros, bits, module.bias, tensor_cores=tensor_cores, split_k=split_k)
                assert rel_err(y, ref) < TOLERANCE[dtype], (dtype, tokens, tensor_cores, split_k)
    with pytest.raises(ValueError, match="fp16 or bf16 tokens"):
        lowbit.lowbit_matmul(x.float(), module.qweight, module.scales.float(), module.zeros, bits, tensor_cores=False)
    with pytest.raises(ValueError, match="2- or 3-bit"):
        lowbit.lowbit_matmul(x, module.qweight, module.scales, module.zeros, 4)
    with pytest.raises(ValueError, match=f"multiple of {32 if bits == 3 else 16}"):
        _random_lowbit(8, 96, 24 if bits == 2 else 16, bits, torch.float32)
    wide_groups = _random_lowbit(8, 96, 48 if bits == 2 else 96, bits, torch.float32)
    kernels.set_kernel_mode("triton")
    with pytest.raises(RuntimeError, match="not a power of two"):
        wide_groups(torch.randn(2, 96, device=DEVICE))


@pytest.mark.parametrize("code_bits", [2, 4])
def test_activation_pairs_kernel_matches_its_reference(code_bits):
    """The one-launch preparation of a token's activations for the one-token W3/W2 (2-bit words)
    and W4 (4-bit words) kernels, max|x| and then pairs scaled by 2^−b·p/max|x|, gives the PyTorch
    reference's bits, over several chunks and a tiny input; the reference puts each column where
    its word's pairs expect it."""
    from compress.kernels.pairs import gemv_activations, launch_gemv_activations

    for k, dtype in ((48, torch.float16), (2064, torch.bfloat16), (2048, torch.float32)):
        x = (torch.randn(k) * torch.logspace(-4, 3, k)).to(dtype).to(DEVICE)
        pairs, amax = launch_gemv_activations(x, code_bits)
        expected_pairs, expected_amax = gemv_activations(x, code_bits)
        assert torch.equal(amax, expected_amax) and torch.equal(pairs, expected_pairs), (k, dtype)
    pairs, amax = launch_gemv_activations(torch.zeros(16, device=DEVICE), code_bits)
    assert amax.item() > 0 and not pairs.any()
    width, positions = 32 // code_bits, 8 // code_bits
    pairs, amax = gemv_activations(torch.arange(1, 2 * width + 1, dtype=torch.float32), code_bits)
    halves = pairs.view(torch.float16).float().view(2, positions * 2, 2) * amax  # (word, pair, half)
    for i in range(2 * positions):
        scale = 2.0 ** (code_bits * (i % positions))
        assert halves[1, i].tolist() == [(width + i + 1) / scale, (width + width // 2 + i + 1) / scale]


@triton.jit
def _lowbit_dequant_probe(c_ptr, s_ptr, z_ptr, o_ptr, DTYPE: tl.constexpr):
    """The tensor-core W3/W2 kernel's dequantization of a (64, 8) tile, stored."""
    i = tl.arange(0, 64)[:, None] * 8 + tl.arange(0, 8)[None, :]
    scale = tl.load(s_ptr + tl.arange(0, 64)).to(tl.float32)[:, None]
    zero = tl.load(z_ptr + tl.arange(0, 64)).to(tl.float32)[:, None]
    tl.store(o_ptr + i, lowbit_dequant(tl.load(c_ptr + i), scale, zero, DTYPE, DTYPE == tl.float16))


def test_lowbit_tensor_core_dequantization_in_fp16():
    """The tensor-core W3/W2 kernel's fp16 dequantization (1024 + q under the exponent, minus
    1024 + z, times the scale) is the reference's (q − z)·s rounded once, bit for bit, for every
    code and zero point. (bf16 layers dequantize in fp32: the interpreter's bf16 arithmetic is
    wrong, so a bf16 version of this trick could not be checked here.)"""
    dtype = torch.float16
    codes = torch.arange(512, dtype=torch.int32).reshape(64, 8) % 8
    zeros = torch.arange(64, dtype=torch.int32) % 8
    scales = (torch.rand(64) * 2.0 ** torch.randint(-10, 4, (64,)).float()).to(dtype)
    out = torch.empty(64, 8, dtype=dtype, device=DEVICE)
    _lowbit_dequant_probe[(1,)](codes.to(DEVICE), scales.to(DEVICE), zeros.to(torch.uint8).to(DEVICE), out, DTYPE=tl.float16)
    expected = (codes.to(dtype) - zeros.to(dtype)[:, None]) * scales[:, None]
    assert torch.equal(out.cpu().view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("bits", [5, 9, 10, 11, 13, 16])
@pytest.mark.parametrize("gemv", [False, True])
def test_ell_kernels_unpack_every_index_width(bits, gemv):
    """Both ELL kernels on every index width: the byte-reading one (two bytes for 5, 9, 10, 16;
    three for 11, 13) and the decode one (words split by funnel shifts; chunks of 32 indices for
    odd widths). Rows of 13 coefficients: a chunk's tail past the row's end."""
    from compress.kernels.ell_matmul import gemv_warps, index_fits_two_bytes
    from compress.modules.dictionary import pack_bits

    assert index_fits_two_bytes(bits) == (bits in (5, 9, 10, 16))
    atoms, rows, s = min(2**bits, 3000 if not gemv else 2048), 21, 13
    index = torch.randint(0, atoms, (rows, s))
    index[0, :] = atoms - 1  # every bit of the widest index
    values = torch.randn(rows, s)
    tokens = 3 if not gemv else 2
    assert not gemv or gemv_warps(2, atoms) is not None
    h = torch.randn(tokens, atoms, device=DEVICE)
    y = ell_matmul(h, values.to(DEVICE), pack_bits(index, bits).to(DEVICE), bits, gemv=gemv)
    dense = torch.zeros(rows, atoms, dtype=torch.float64).scatter_add_(1, index, values.double())
    assert rel_err(y, h.double() @ dense.T.to(DEVICE)) < 1e-5


@pytest.mark.parametrize(
    "dtype,int8,split_k,s", [(torch.float32, False, 1, 150), (torch.float16, True, 2, 144), (torch.bfloat16, False, 3, 152)]
)
def test_ell_decode_kernel_one_to_four_tokens(dtype, int8, split_k, s):
    """The decode ELL kernel for 1–4 tokens and 7 in two groups (one h row each, gathered on chip), ragged rows (70
    rows: a last program of 6; 150, 144 or 152 coefficients (rows aligned to 1, 16 or 8 values): a
    pass with one lane's chunk cut short and lanes past the row's end; split-K programs starting
    mid-row at a pass), a bias (added once over the splits), int8 coefficients with row scales; h
    from a dictionary of 600 atoms (a 1024-wide tile with 424 masked)."""
    torch.manual_seed(3)
    module = _random_dict(70, 32, 600, s, dtype, int8=int8)
    if not int8:
        module.bias = torch.nn.Parameter(torch.randn(70).to(dtype).to(DEVICE), requires_grad=False)
    for tokens in (1, 2, 3, 4, 7):  # 7: a group of 4 and a group of 3 (a token past the end)
        h = torch.randn(tokens, 600).to(dtype).to(DEVICE)
        y = ell_matmul(h, module.coef_values, module.coef_index, module.index_bits, module.bias, module.coef_scales, gemv=True, split_k=split_k)
        ref = torch.nn.functional.linear(h.double(), module.dense_coefficients().double(), module.bias.double())
        assert y.shape == (tokens, 70) and y.dtype == dtype
        assert rel_err(y, ref) < TOLERANCE[dtype], tokens


def test_ell_decode_kernel_refuses_what_it_cannot_hold():
    """4 warps while the tokens' fp32 h rows take 16 KB, 8 up to 32 KB; more tokens in groups of
    the most a program holds, up to 4·t groups of t; else the other kernel."""
    from compress.kernels.ell_matmul import gemv_token_group, gemv_warps

    assert gemv_warps(1, 4096) == gemv_warps(2, 2048) == gemv_warps(4, 1000) == 4
    assert gemv_warps(1, 8192) == gemv_warps(2, 3000) == gemv_warps(4, 2048) == 8
    assert gemv_warps(5, 64) is None and gemv_warps(1, 8193) is None and gemv_warps(4, 2049) is None
    assert gemv_token_group(3, 2048) == 3 and gemv_token_group(16, 2048) == 4 and gemv_token_group(64, 1024) == 4
    assert gemv_token_group(16, 4096) == 2 and gemv_token_group(17, 4096) is None
    assert gemv_token_group(4, 8192) == 1 and gemv_token_group(5, 8192) is None and gemv_token_group(1, 8193) is None
    module = _random_dict(8, 16, 9000, 4, torch.float32)
    with pytest.raises(ValueError, match="groups of at most 4 tokens"):
        ell_matmul(torch.randn(1, 9000, device=DEVICE), module.coef_values, module.coef_index, module.index_bits, gemv=True)


@pytest.mark.parametrize("dtype,split_k", [(torch.float32, 1), (torch.bfloat16, 3), (torch.float16, 2)])
def test_delta_kernel_marks_split_k_and_token_counts(dtype, split_k):
    """Rows long enough for three marks (split-K programs start mid-row at them), a row with every
    weight kept, rows emptied, a last slice with 5 of 32 rows, 1–64 tokens."""
    torch.manual_seed(4)
    w = torch.randn(37, 600)
    mask = torch.rand(37, 600) >= 0.4
    mask[0] = True
    mask[3] = False
    mask[36, :550] = False  # a short row beside long ones: padding that advances nothing
    module = DeltaSparseLinear.from_dense((w * mask).to(dtype), mask, torch.randn(37).to(dtype)).to(DEVICE)
    assert module.marks.shape[1] == 3  # the full row: 608 entries, a mark every 256
    for tokens in (1, 7, 64):
        x = torch.randn(tokens, 600).to(dtype).to(DEVICE)
        y = delta_matmul(x, module.values, module.gaps, module.slice_start, module.marks, 37, module.bias, split_k=split_k)
        ref = torch.nn.functional.linear(x.double(), module.to_dense().double(), module.bias.double())
        assert y.dtype == dtype and rel_err(y, ref) < TOLERANCE[dtype], tokens


@pytest.mark.parametrize("split_k", [1, 3])
def test_gqsa_kernel_split_k_and_token_counts(split_k):
    module = _random_gqsa(37, 160, 16, 7, torch.float32)  # ragged rows, 7 of 10 groups per row
    for tokens in (1, 7, 16, 64):
        x = torch.randn(tokens, 160, device=DEVICE)
        y = gqsa_matmul(x, module.qweight, module.scales, module.zeros, module.group_index, module.bias, split_k=split_k)
        ref = torch.nn.functional.linear(x.double(), module.to_dense().double(), module.bias.double())
        assert rel_err(y, ref) < 1e-5, tokens


@pytest.mark.parametrize("group", [8, 16, 32, 64, 128])
def test_gqsa_pair_kernel_every_code_group_size_tokens_and_split(group):
    """The pair kernel (four lanes a row, PTX pairs on a GPU, the same pairs in Triton arithmetic
    here) for 1–4 tokens in one program and more in token groups side by side (5: two groups of 3,
    the last with a padding token; 7: 4 + 3; 16: four of 4): every code and zero point in every
    column of a word, kept groups that do and do not fill the lanes, split-K, every group kept
    without an index, fp16 and bf16, activations of a wide range; fp32 goes to the other kernel."""
    from compress.kernels import gqsa_matmul as gm
    from compress.kernels.pairs import token_groups

    assert [token_groups(n, 4) for n in (1, 3, 4, 5, 7, 8, 9, 16, 17)] == [(1, 1), (3, 1), (4, 1), (3, 2), (4, 2), (4, 2), (3, 3), (4, 4), (4, 5)]
    k = 8 * group
    for kept, all_groups in ((5, False), (8, True)):
        codes = torch.randint(0, 16, (33, kept, group), generator=torch.Generator().manual_seed(group))
        codes[:16, 0, :8] = torch.arange(16)[:, None]  # every code in every column of a word
        zeros = torch.arange(33 * kept).reshape(33, kept) % 16
        index = torch.stack([torch.randperm(8)[:kept].sort().values for _ in range(33)])
        for dtype in (torch.float16, torch.bfloat16):
            module = GQSALinear.from_codes(codes, (torch.rand(33, kept) * 0.1 + 0.01).to(dtype), zeros, index, k, torch.randn(33).to(dtype)).to(DEVICE)
            assert (module.group_index is None) == all_groups
            # (the interpreter's cost grows with the group and the tokens: the token groups are spread over the sizes)
            groups_case = {8: (16, 1), 16: (7, 2), 32: (5, 1), 64: (5, 2), 128: (1, 2)}[group]
            cases = ((1, 1), (1, 2), (2, 2), (3, 1), (4, 2)) if group <= 32 else ((4, 1),)
            for tokens, split_k in cases + (groups_case,):
                x = (torch.randn(tokens, k) * torch.logspace(-2, 1, k)).to(dtype).to(DEVICE)
                ref = torch.nn.functional.linear(x.double(), module.to_dense().double(), module.bias.double())
                y = gm.gqsa_matmul(x, module.qweight, module.scales, module.zeros, module.group_index, module.bias, split_k=split_k, pairs=True)
                assert y.dtype == dtype and rel_err(y, ref) < TOLERANCE[dtype], (kept, dtype, tokens, split_k)
    with pytest.raises(ValueError, match="fp16 or bf16 tokens"):
        gm.gqsa_matmul(x.float(), module.qweight, module.scales.float(), module.zeros, module.group_index, pairs=True)


@pytest.mark.parametrize("group,groups,kept", [(16, 40, 20), (32, 6, 3), (64, 5, 2), (128, 3, 1), (16, 8, 8)])
def test_gqsa_tensor_core_kernel_walks_each_rows_kept_groups(monkeypatch, group, groups, kept):
    """Five tokens and more on tensor cores: every column group of a row tile, each row's kept
    groups found from its bits (40 groups: two bit words, split-K programs starting mid-word,
    their first slot found by binary search), rows that keep the first or the last groups only,
    every group kept through an index, 5, 7, 16 and 64 tokens, fp16/bf16, ragged rows; the module sends 16
    tokens there and fewer, or indices that do not ascend, to the pair kernel."""
    from compress.kernels import gqsa_matmul as gm

    torch.manual_seed(group + kept)
    m, k = 37, group * groups
    codes = torch.randint(0, 16, (m, kept, group))
    index = torch.stack([torch.randperm(groups)[:kept] for _ in range(m)])  # unsorted: from_codes stores them ascending
    index[0], index[1] = torch.arange(kept), torch.arange(groups - kept, groups)
    bits = gm.kept_group_bits(index, groups)
    assert bits.dtype == torch.int32 and bits.shape == (m, -(-groups // 32))
    unpacked = (bits[:, :, None].long() >> torch.arange(32)) & 1
    assert torch.equal(unpacked.flatten(1)[:, :groups].bool(), torch.zeros(m, groups, dtype=torch.bool).scatter(1, index, True))
    for dtype in (torch.float16, torch.bfloat16):
        module = GQSALinear.from_codes(codes, (torch.rand(m, kept) * 0.1 + 0.01).to(dtype), torch.randint(0, 16, (m, kept)), index, k, torch.randn(m).to(dtype)).to(DEVICE)
        assert module.group_index is None or bool((module.group_index[:, 1:] > module.group_index[:, :-1]).all())
        for tokens, split_k in ((5, 1), (7, 2), (16, 3), (64, 2)):
            x = (torch.randn(tokens, k) * torch.logspace(-2, 1, k)).to(dtype).to(DEVICE)
            ref = torch.nn.functional.linear(x.double(), module.to_dense().double(), module.bias.double())
            y = gm.gqsa_matmul(x, module.qweight, module.scales, module.zeros, module.group_index, module.bias, split_k=split_k, dot=True)
            assert y.dtype == dtype and rel_err(y, ref) < TOLERANCE[dtype], (dtype, tokens, split_k)
    ran = []
    for name in ("dot_matmul", "pair_matmul"):
        monkeypatch.setattr(gm, name, lambda *a, _name=name, _f=getattr(gm, name), **kw: ran.append(_name) or _f(*a, **kw))
    x = torch.randn(16, k, device=DEVICE).to(dtype)
    y = gm.gqsa_forward_triton(module, x)
    gm.gqsa_forward_triton(module, x[:4])
    assert ran == ["dot_matmul", "pair_matmul"]
    if kept > 1 and module.group_index is not None:  # indices that do not ascend (an edited module): the pair kernel
        module.group_index.copy_(module.group_index.flip(1))
        module.qweight.copy_(module.qweight.flip(1))
        module.scales.data.copy_(module.scales.flip(1))
        module.zeros.copy_(module.zeros.flip(1))
        assert rel_err(gm.gqsa_forward_triton(module, x), y.double()) < TOLERANCE[dtype] and ran[-1] == "pair_matmul"


@pytest.mark.parametrize("split_k", [1, 3])
def test_int4_kernel_serves_plain_w4_and_split_k(monkeypatch, split_k):
    module = _random_gqsa(48, 192, 32, 6, torch.float32)  # every group kept, in order
    sparse = _random_gqsa(48, 192, 32, 3, torch.float32)
    x = torch.randn(5, 192, device=DEVICE)
    kernels.set_kernel_mode("triton")
    assert kernels.select("gqsa", module, x).name == "triton_int4"
    assert kernels.select("gqsa", sparse, x).name == "triton_gqsa"
    y = int4_matmul(x, module.qweight, module.scales, module.zeros, module.bias, split_k=split_k)
    assert rel_err(y, torch.nn.functional.linear(x.double(), module.to_dense().double(), module.bias.double())) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,groups", [(16, 8), (32, 6), (32, 5), (64, 3), (128, 2)])
def test_int4_kernel_group_sizes_tokens_and_ragged_rows(dtype, group, groups):
    """Every power-of-two group from 16 (several groups a K step when they divide the row: g16
    takes 4, g32 2; 5 groups of 32 one at a time), 1 to 64 tokens, rows that fill no tile (the
    rows past M read row M − 1 and are never stored)."""
    from compress.kernels.int4_matmul import step_groups

    assert (step_groups(16, 8), step_groups(32, 6), step_groups(32, 5), step_groups(128, 2)) == (4, 2, 1, 1)
    k = group * groups
    module = _random_gqsa(37, k, group, groups, dtype)
    dense = module.to_dense().double()
    for tokens, one_token in ((1, None), (1, False), (7, None), (16, None), (64, None)):  # one fp16/bf16 token: the pair kernel
        x = torch.randn(tokens, k, device=DEVICE).to(dtype)
        y = int4_matmul(x, module.qweight, module.scales, module.zeros, module.bias, split_k=2 if tokens == 7 else None, one_token=one_token)
        assert y.dtype == dtype and y.shape == (tokens, 37)
        assert rel_err(y, torch.nn.functional.linear(x.double(), dense, module.bias.double())) < TOLERANCE[dtype], tokens


@pytest.fixture
def cpu_cache(monkeypatch):
    """The CPU cache of expanded weights, emptied and bounded at 1 MiB for the test, restored after."""
    before = kernels.cpu_cache_limit()
    kernels.set_cpu_cache_limit(0)  # drops what earlier tests left
    kernels.set_cpu_cache_limit(2**20)
    yield
    kernels.set_cpu_cache_limit(0)
    kernels.set_cpu_cache_limit(before)


def _counting_to_dense(monkeypatch, module) -> tuple[list, object]:
    calls: list = []
    original = type(module).to_dense
    monkeypatch.setattr(type(module), "to_dense", lambda self: calls.append(1) or original(self))
    return calls, original


def test_expanded_weights_are_cached_inside_the_scope(monkeypatch, cpu_cache):
    """Pipelines run every calibration batch through a compressed block: inside
    `expanded_weights_cached` the dense-expanding references expand each module once, and the copy
    goes with the scope (the process-wide cache is not filled)."""
    module = _random_sparse(16, 32, 0.5, torch.float32)
    calls, original = _counting_to_dense(monkeypatch, module)
    kernels.set_kernel_mode("torch")
    x = torch.randn(3, 32)
    expected = torch.nn.functional.linear(x, original(module), module.bias)
    with kernels.expanded_weights_cached():
        for _ in range(4):
            torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
    assert len(calls) == 1 and kernels.cpu_cache_bytes() == 0
    kernels.set_cpu_cache_limit("off")
    module(x), module(x)
    assert len(calls) == 3  # cache off: expanded per call, nothing kept


def test_cpu_cache_keeps_one_expansion_per_module_until_its_storage_changes(monkeypatch, cpu_cache):
    """Outside a scope, evaluation and generate on the CPU expand each module once (26x the dense
    time per token otherwise); an in-place change, a move or a gradient-carrying storage expands
    again, and the cache never holds more than its bound."""
    module = _random_sparse(16, 32, 0.5, torch.float32)
    calls, original = _counting_to_dense(monkeypatch, module)
    kernels.set_kernel_mode("torch")
    x = torch.randn(3, 32)
    for _ in range(3):
        torch.testing.assert_close(module(x), torch.nn.functional.linear(x, original(module), module.bias))
    assert len(calls) == 1
    assert kernels.cpu_cache_bytes(module) == 16 * 32 * 4 == kernels.cpu_cache_bytes()
    with torch.no_grad():
        module.values.mul_(2)  # storage changed in place: the old expansion is stale
    torch.testing.assert_close(module(x), torch.nn.functional.linear(x, original(module), module.bias))
    assert len(calls) == 2
    module.to(torch.float64)  # moved or cast: dropped
    assert kernels.cpu_cache_bytes() == 0
    module.to(torch.float32)
    module.values.requires_grad_(True)  # training the values (E2E tuning): never cached
    module(x), module(x)
    assert len(calls) == 4 and kernels.cpu_cache_bytes() == 0
    module.values.requires_grad_(False)
    kernels.set_cpu_cache_limit(16 * 32 * 4 - 1)  # one expansion does not fit: per call again
    module(x), module(x)
    assert len(calls) == 6 and kernels.cpu_cache_bytes() == 0
    with pytest.raises(ValueError, match="LLMPRESS_CPU_WEIGHT_CACHE.*not a size"):
        kernels.set_cpu_cache_limit("lots")


def test_dispatch_skips_kernels_measured_slower_than_dense(monkeypatch, tmp_path):
    """A speed table (as bench_kernels writes it on a GPU) makes `auto` skip a Triton kernel
    measured below 1x of cuBLAS for that GPU and token count, and says so; the token classes
    follow the measured counts."""
    import json

    from compress.eval.bench_kernels import dispatch_table

    rows = [
        {"kernel": "triton_2of4", "tokens": 1, "speedup": 1.4}, {"kernel": "triton_2of4", "tokens": 1, "speedup": 1.2},
        {"kernel": "triton_2of4", "tokens": 16, "speedup": 0.8}, {"kernel": None, "tokens": 1, "speedup": 1.0},
    ]  # fmt: skip
    table = dispatch_table(rows, "Test GPU", "torch.float16")
    assert table["entries"] == [{"kernel": "triton_2of4", "tokens": 1, "speedup": 1.2}, {"kernel": "triton_2of4", "tokens": 16, "speedup": 0.8}]
    (tmp_path / "t.json").write_text(json.dumps(table))
    monkeypatch.setenv("LLMPRESS_KERNEL_TABLES", str(tmp_path / "t.json"))
    kernels.forget_measured()
    monkeypatch.setattr(kernels, "measured_device", lambda x: "Test GPU")
    try:
        module = _random_sparse(40, 136, 0.5, torch.float32, "2:4")
        two_of_four = next(k for k in kernels.available("sparse_bitmap") if k.name == "triton_2of4")
        for tokens, slow in ((1, False), (2, True), (16, True), (40, True)):
            why = kernels.refusal(two_of_four, module, torch.randn(tokens, 136, device=DEVICE).half(), "auto") or ""
            assert ("measured 0.80x" in why) == slow, (tokens, why)
        # the table was measured in fp16: bf16 inputs (other kernel paths) are not judged by it
        assert "measured" not in (kernels.refusal(two_of_four, module, torch.randn(16, 136, device=DEVICE).bfloat16(), "auto") or "")
        assert "measured" not in (kernels.refusal(two_of_four, module, torch.randn(2, 136, device=DEVICE).half(), "triton") or "")
        assert 1 in kernels._token_bounds("sparse_bitmap") and 16 in kernels._token_bounds("sparse_bitmap")
        monkeypatch.setattr(kernels, "measured_device", lambda x: "Another GPU")  # the table is for one GPU only
        assert "measured" not in (kernels.refusal(two_of_four, module, torch.randn(16, 136, device=DEVICE).half(), "auto") or "")
    finally:
        monkeypatch.delenv("LLMPRESS_KERNEL_TABLES")
        kernels.forget_measured()
