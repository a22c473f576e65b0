import pytest
import torch

from compress import kernels
from compress.compressors import COMPRESSORS, LayerStats, MagnitudeConfig, SVDConfig, rank_for_ratio
from compress.compressors.masks import nm_mask
from compress.modules import LowRankLinear, SparseLinear, build_module, pack_mask, unpack_mask


def test_rank_for_ratio_respects_budget():
    for m, n, ratio in [(576, 576, 0.2), (1536, 576, 0.4), (192, 576, 0.3), (64, 64, 0.9)]:
        r = rank_for_ratio(m, n, ratio)
        assert r * (m + n) <= (1 - ratio) * m * n or r == 1
        assert (r + 1) * (m + n) > (1 - ratio) * m * n


def test_svd_is_optimal_in_frobenius_and_counts_sizes():
    torch.manual_seed(0)
    W, b = torch.randn(48, 32), torch.randn(48)
    module = COMPRESSORS["svd"]().compress(W, b, LayerStats(), SVDConfig(ratio=0.5))
    r = rank_for_ratio(48, 32, 0.5)
    assert isinstance(module, LowRankLinear) and module.rank == r
    s = torch.linalg.svdvals(W.double())
    err = (W - module.to_dense()).norm()
    assert float(err) == pytest.approx(float(s[r:].square().sum().sqrt()), rel=1e-4)
    assert module.num_values() == r * (48 + 32) + 48
    assert module.num_bytes() == 4 * module.num_values()
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(module(x), x @ module.to_dense().T + b, rtol=1e-5, atol=1e-5)


def test_magnitude_unstructured_prunes_smallest():
    torch.manual_seed(0)
    W = torch.randn(40, 24)
    module = COMPRESSORS["magnitude"]().compress(W, None, LayerStats(), MagnitudeConfig(ratio=0.3))
    dense = module.to_dense()
    kept = dense != 0
    assert module.nnz == kept.sum() == W.numel() - round(0.3 * W.numel())
    assert W.abs()[~kept].max() <= W.abs()[kept].min()
    torch.testing.assert_close(dense[kept], W[kept])


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_masks_are_exactly_n_of_m(pattern):
    n, m = map(int, pattern.split(":"))
    W = torch.randn(16, 64)
    module = COMPRESSORS["magnitude"]().compress(W, None, LayerStats(), MagnitudeConfig(pattern=pattern))
    groups = (module.to_dense() != 0).reshape(16, -1, m).sum(-1)
    assert (groups == n).all()
    assert module.spec()["pattern"] == pattern


def test_nm_needs_divisible_width():
    with pytest.raises(ValueError, match="divisible by M=4"):
        nm_mask(torch.randn(4, 6), 2, 4)


def test_bitmap_round_trip_and_honest_bytes():
    torch.manual_seed(0)
    mask = torch.rand(13, 21) > 0.5
    assert torch.equal(unpack_mask(pack_mask(mask), 21), mask)
    W = torch.randn(13, 21, dtype=torch.float16)
    module = SparseLinear.from_dense(W, mask, None)
    assert module.num_bytes() == int(mask.sum()) * 2 + 13 * 3  # values + ceil(21/8) bytes per row
    torch.testing.assert_close(module.to_dense(), W * mask)
    empty = build_module(module.spec(), dtype=torch.float16, device="meta")
    assert isinstance(empty, SparseLinear) and empty.values.shape == module.values.shape


def test_kernel_modes(monkeypatch):
    module = LowRankLinear.from_factors(torch.randn(8, 2), torch.randn(2, 6), None)
    x = torch.randn(4, 6)
    kernels.set_kernel_mode("torch")
    assert kernels.select("lowrank", module, x).backend == "torch"
    reference = module(x)
    with pytest.raises(ValueError, match="not one of"):
        kernels.set_kernel_mode("bogus")
    kernels.set_kernel_mode("triton")  # on CPU the tests run Triton's interpreter (conftest)
    assert kernels.select("lowrank", module, x).backend == "triton"
    torch.testing.assert_close(module(x), reference, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(kernels, "_MODE", [])  # the environment variable is read on first use
    monkeypatch.setenv("LLMPRESS_KERNEL", "torch")
    assert kernels.kernel_mode() == "torch"
    monkeypatch.setattr(kernels, "_MODE", [])
    monkeypatch.setenv("LLMPRESS_KERNEL", "bogus")
    with pytest.raises(ValueError, match="LLMPRESS_KERNEL='bogus' is not one of"):
        kernels.kernel_mode()
    monkeypatch.setattr(kernels, "_MODE", ["auto"])
