"""Plain truncated SVD: the data-free low-rank baseline.

W ≈ U_r Σ_r V_rᵀ, stored as up = U_r Σ_r^½ and down = Σ_r^½ V_rᵀ; the rank is the largest whose
factors remove at least `ratio` of the layer's weights. Optimal in Frobenius norm, blind to which
input directions the data actually uses (what whitened SVD fixes).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..modules import LowRankLinear
from .base import Compressor, LayerStats, StageConfig, rank_for_ratio, register_compressor


class SVDConfig(StageConfig):
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


@register_compressor
class SVDCompressor(Compressor):
    method = "svd"
    config_class = SVDConfig

    def compress(self, weight, bias, stats: LayerStats, config: SVDConfig, base=None) -> LowRankLinear:
        rank = rank_for_ratio(weight.shape[0], weight.shape[1], config.ratio)
        up, down = truncated_svd(weight, rank)
        return LowRankLinear.from_factors(up.to(weight.dtype), down.to(weight.dtype), bias)
