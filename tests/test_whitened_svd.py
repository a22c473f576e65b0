import pytest
import torch

from compress.compressors import COMPRESSORS, LayerStats, SVDConfig, WhitenedSVDConfig, rank_for_ratio
from compress.compressors.svd import split_factors
from compress.compressors.whitened_svd import whitened_svd
from compress.compressors.whitening import whiten
from compress.errors import LlmpressError
from compress.metrics import relative_errors


def _correlated_inputs(n=400, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)  # strongly anisotropic inputs
    return torch.randn(n, d, generator=g) @ mix


def test_truncating_sigma_costs_exactly_sigma_squared():
    torch.manual_seed(0)
    X, W = _correlated_inputs(), torch.randn(24, 32).double()
    gram = X.double().T @ X.double()
    u, sigma, vh = whitened_svd(W, gram, percdamp=0.0)
    for rank in (1, 5, 12, 23):
        up, down = split_factors(u, sigma, vh, rank)
        err2 = ((W - up @ down) @ X.double().T).square().sum()
        assert float(err2) == pytest.approx(float(sigma[rank:].square().sum()), rel=1e-6)


def test_whitened_beats_plain_svd_in_weighted_error():
    torch.manual_seed(1)
    X, W = _correlated_inputs(seed=1), torch.randn(24, 32)
    stats = LayerStats({"gram": (X.T @ X).double()}, X.shape[0])
    plain = COMPRESSORS["svd"]().compress(W, None, stats, SVDConfig(ratio=0.5))
    white = COMPRESSORS["whitened_svd"]().compress(W, None, stats, WhitenedSVDConfig(ratio=0.5))
    assert plain.rank == white.rank == rank_for_ratio(24, 32, 0.5)
    _, plain_w = relative_errors(W, plain.to_dense(), stats["gram"])
    _, white_w = relative_errors(W, white.to_dense(), stats["gram"])
    assert white_w < 0.7 * plain_w


def test_dead_channels_and_singular_gram():
    X = _correlated_inputs()
    X[:, 3] = 0.0  # a dead input channel
    gram = (X.T @ X).double()
    w = whiten(gram, percdamp=1e-4)
    assert w.method == "cholesky" and torch.isfinite(w.s_inv).all()
    rank_deficient = torch.ones(8, 8, dtype=torch.float64)  # rank 1, no damping: Cholesky fails
    w = whiten(rank_deficient, percdamp=0.0)
    assert w.method == "eigh"
    torch.testing.assert_close(w.s @ w.s.T, rank_deficient, atol=1e-6, rtol=1e-6)


def test_indefinite_gram_is_an_error():
    bad = torch.diag(torch.tensor([1.0, 1.0, -0.5], dtype=torch.float64))
    with pytest.raises(LlmpressError, match="q_proj is indefinite"):
        whiten(bad, percdamp=0.0, name="q_proj")
    with pytest.raises(LlmpressError, match="NaN"):
        whiten(torch.full((3, 3), float("nan")), name="x")
