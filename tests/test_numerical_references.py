"""Compressors against independent references computed the slow, obvious way (float64)."""

from __future__ import annotations

import pytest
import torch

from compress.compressors import COMPRESSORS, LayerStats, RocketConfig, SparseGPTConfig
from compress.compressors.gqsa import conditional_group_saliency, group_saliency
from compress.compressors.sparsegpt import obs_sweep, sparsegpt_prune
from compress.metrics import relative_errors


def _hessian(cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, cols, dtype=torch.float64)
    return x.T @ x + 0.1 * torch.eye(cols, dtype=torch.float64)


def _upper_inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """U upper-triangular with UᵀU = H⁻¹."""
    return torch.linalg.cholesky(torch.linalg.inv(h), upper=True)


def _direct_obs(w: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Column by column: zero column j's pruned weights and let the columns not yet processed take
    the optimal OBS update from the inverse of the Hessian restricted to them (no Cholesky trick,
    no lazy batching)."""
    w = w.clone()
    for j in range(w.shape[1]):
        hinv = torch.linalg.inv(h[j:, j:])
        err = w[:, j] - torch.where(mask[:, j], w[:, j], torch.zeros_like(w[:, j]))
        w[:, j:] -= err[:, None] * hinv[0][None, :] / hinv[0, 0]
        w[:, j] = torch.where(mask[:, j], w[:, j], torch.zeros_like(w[:, j]))
    return w


def test_obs_sweep_equals_direct_obs_for_every_blocksize():
    rows, cols = 6, 20
    h = _hessian(cols)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(2)) > 0.5
    expected = _direct_obs(w, h, mask)
    u = _upper_inverse_factor(h).float()

    def rule(j, block, i):
        return torch.where(mask[:, j], block[:, i], torch.zeros_like(block[:, i]))

    for blocksize in (1, 3, 8, 128):
        got = obs_sweep(w, u, blocksize, rule)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4, msg=f"blocksize {blocksize}")


def test_sparsegpt_nm_masks_do_not_depend_on_the_blocksize():
    """N:M groups are chosen from the weights as updated when the sweep reaches them; lazy
    batching defers only updates to later blocks, so every blocksize (a multiple of M) agrees."""
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    gram = _hessian(32, seed=4).float()
    results = [sparsegpt_prune(w, gram, SparseGPTConfig(pattern="2:4", blocksize=b)) for b in (4, 8, 32)]
    for pruned, keep in results[1:]:
        assert torch.equal(keep, results[0][1])
        torch.testing.assert_close(pruned, results[0][0], rtol=1e-4, atol=1e-5)


def _constrained_cost(w_row: torch.Tensor, h: torch.Tensor, group: slice) -> float:
    """min ½ δᵀHδ subject to δ_G = −w_G, every other coordinate free (solved directly)."""
    n = h.shape[0]
    free = torch.ones(n, dtype=torch.bool)
    free[group] = False
    d_g = -w_row[group]
    d_f = -torch.linalg.solve(h[free][:, free], h[free][:, ~free] @ d_g)
    delta = torch.zeros(n, dtype=h.dtype)
    delta[~free], delta[free] = d_g, d_f
    return float(0.5 * delta @ h @ delta)


def test_gqsa_group_saliency_equals_brute_force():
    rows, cols, g = 3, 24, 4
    h = _hessian(cols, seed=5)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    u = _upper_inverse_factor(h)
    saliency = group_saliency(w, u, g)
    conditional = conditional_group_saliency(w, u, g)
    for r in range(rows):
        for k in range(cols // g):
            group = slice(k * g, (k + 1) * g)
            assert float(saliency[r, k]) == pytest.approx(_constrained_cost(w[r], h, group), rel=1e-8)
            # conditional: every column before the group is already fixed, so only H[c:, c:] is free
            c = k * g
            rest = _constrained_cost(w[r, c:], h[c:, c:], slice(0, g))
            assert float(conditional[r, k]) == pytest.approx(rest, rel=1e-8)


def test_rocket_profile_equals_compress_at_every_level():
    torch.manual_seed(7)
    w = torch.randn(24, 40)
    x = torch.randn(200, 40) * torch.linspace(0.1, 3.0, 40)
    stats = LayerStats({"gram": (x.T @ x).double()}, 200, name="layer")
    compressor = COMPRESSORS["rocket"]()
    config = RocketConfig(ratio=0.3, ks=[1.0, 2.0])
    levels = [0.1, 0.3, 0.5, 0.7]
    for result in compressor.profile(w, None, stats, config, levels):
        module = compressor.compress(w, None, stats, config.model_copy(update={"ratio": result.level}))
        rel, weighted = relative_errors(w, module.to_dense(), stats["gram"])
        assert (result.values, result.bytes) == (module.num_values(), module.num_bytes()), result.level
        assert result.rel_error == pytest.approx(rel, rel=1e-5) and result.rel_weighted_error == pytest.approx(weighted, rel=1e-5)
