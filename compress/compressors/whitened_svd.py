"""Whitened truncated SVD (SVD-LLM): low rank that minimizes the output error on calibration data.

With S·Sᵀ = XᵀX, truncate the SVD of W·S = U Σ Vᵀ to rank r and map back:
up = U_r Σ_r^½, down = Σ_r^½ V_rᵀ S⁻¹. Dropping singular value σ_i of W·S costs exactly σ_i²
of squared calibration-weighted error ‖(W−Ŵ)Xᵀ‖², so the rank-r result is optimal for that error.
"""

from __future__ import annotations

import torch
from pydantic import Field

from .base import LayerStats, StageConfig, register_compressor
from .svd import LowRankCompressor
from .whitening import WhitenedSpectrum


class WhitenedSVDConfig(StageConfig):
    method: str = "whitened_svd"
    ratio: float = Field(gt=0.0, lt=1.0, description="fraction of the layer's weights removed")
    percdamp: float = Field(default=1e-4, ge=0.0, lt=1.0, description="damping, fraction of mean diag(XᵀX)")


def whitened_svd(
    weight: torch.Tensor, gram: torch.Tensor, percdamp: float = 1e-4, name: str = "layer", prefer: str = "cholesky"
):
    """(U, σ, Vᵀ S⁻¹) of W·S in float64, all ranks: callers truncate (allocation reuses one SVD)."""
    spectrum = WhitenedSpectrum.of(weight, gram, percdamp, name, prefer)
    return spectrum.u, spectrum.sigma, spectrum.vh @ spectrum.white.s_inv


@register_compressor
class WhitenedSVDCompressor(LowRankCompressor):
    method = "whitened_svd"
    config_class = WhitenedSVDConfig
    needs = ("gram",)

    def factorize(self, weight, stats: LayerStats, config: WhitenedSVDConfig):
        return whitened_svd(weight, stats["gram"], config.percdamp, stats.name)
