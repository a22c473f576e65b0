"""Plain truncated SVD (the data-free low-rank baseline) and what every SVD-type method shares.

W ≈ U_r Σ_r V_rᵀ, stored as up = U_r Σ_r^½ and down = Σ_r^½ V_rᵀ; the rank is the largest whose
factors remove at least `ratio` of the layer's weights. Optimal in Frobenius norm, blind to which
input directions the data actually uses (what whitened SVD fixes) and to which outputs the loss
cares about (what FWSVD tries to fix).

`LowRankCompressor` is the shared part: a method supplies a full factorization W = U·diag(σ)·Vh
ordered by importance; truncation, sizes, and the error of every rank at once (for the
allocator) come from here.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from pydantic import Field

from ..modules import LowRankLinear
from ..metrics import served_itemsize
from .base import Compressor, LayerStats, LevelResult, StageConfig, rank_for_ratio, register_compressor
from .residual import ResidualOption


class SVDConfig(ResidualOption, StageConfig):
    method: str = "svd"
    ratio: float = Field(gt=0.0, lt=1.0, description="fraction of the layer's weights removed")


def split_factors(u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor, rank: int):
    """Rank-`rank` truncation of U·diag(σ)·Vh as (U_r Σ_r^½, Σ_r^½ Vh_r): balanced factor scales."""
    root = sigma[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down the best rank-`rank` approximation of `weight` (computed in fp64)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return split_factors(u, s, vh, rank)


def _tail_sums(m: torch.Tensor) -> torch.Tensor:
    """t[r] = sum of m[r:, r:] for r = 0..k (t[k] = 0), via a reverse 2-D cumulative sum."""
    rev = m.flip(0).flip(1).cumsum(0).cumsum(1).flip(0).flip(1)
    return torch.cat([rev.diagonal(), rev.new_zeros(1)])


def truncation_errors(
    weight: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor, gram: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Relative errors of keeping the first r terms of W = U·diag(σ)·Vh, for every r = 0..k at once.

    With A = U·Σ^½ and B = Σ^½·Vh, the dropped part is A[:, r:]·B[r:], so
    ‖ΔW‖² = Σ_{i,j≥r} (AᵀA)_ij (BBᵀ)_ij and ‖ΔW Xᵀ‖² the same with B·G·Bᵀ: one k×k matrix per
    error and a tail sum, instead of one reconstruction per rank. Exact for any factorization,
    orthogonal or not (FWSVD's U is not).
    """
    w = weight.double()
    root = sigma.sqrt()
    a = u * root
    b = root[:, None] * vh
    ata = a.T @ a
    plain = (_tail_sums(ata * (b @ b.T)).clamp_min(0) / w.square().sum().clamp_min(1e-30)).sqrt()
    if gram is None:
        return plain, None
    g = gram.double()
    weighted_num = _tail_sums(ata * (b @ g @ b.T)).clamp_min(0)
    weighted = (weighted_num / ((w @ g) * w).sum().clamp_min(1e-30)).sqrt()
    return plain, weighted


class LowRankCompressor(Compressor):
    """An SVD-type method: `factorize` gives all ranks; truncation and profiling are shared."""

    level_field = "ratio"

    @abstractmethod
    def factorize(
        self, weight: torch.Tensor, stats: LayerStats, config: StageConfig
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, σ, Vh) in float64 with W ≈ U·diag(σ)·Vh, terms ordered by decreasing importance."""

    def compress(self, weight, bias, stats: LayerStats, config, base=None) -> LowRankLinear:
        rank = rank_for_ratio(weight.shape[0], weight.shape[1], config.ratio)
        u, sigma, vh = self.factorize(weight, stats, config)
        up, down = split_factors(u, sigma, vh, rank)
        return LowRankLinear.from_factors(up.to(weight.dtype), down.to(weight.dtype), bias)

    def profile(self, weight, bias, stats: LayerStats, config, levels: list[float]) -> list[LevelResult]:
        """One factorization for every level (see `truncation_errors`); with a stacked residual,
        one compression per level (the residual depends on the level's error)."""
        if getattr(config, "residual_rank", None):  # whitened SVD has none: a residual would be its next ranks
            return super().profile(weight, bias, stats, config, levels)
        u, sigma, vh = self.factorize(weight, stats, config)
        plain, weighted = truncation_errors(weight, u, sigma, vh, stats.get("gram"))
        out_f, in_f = weight.shape
        bias_values = bias.numel() if bias is not None else 0
        size = served_itemsize(weight.dtype)
        results = []
        for level in levels:
            rank = rank_for_ratio(out_f, in_f, level)
            values = rank * (out_f + in_f) + bias_values
            results.append(
                LevelResult(
                    level,
                    values,
                    values * size,
                    float(plain[rank]),
                    float(weighted[rank]) if weighted is not None else None,
                )
            )
        return results


@register_compressor
class SVDCompressor(LowRankCompressor):
    method = "svd"
    config_class = SVDConfig

    def factorize(self, weight, stats, config):
        return torch.linalg.svd(weight.double(), full_matrices=False)
