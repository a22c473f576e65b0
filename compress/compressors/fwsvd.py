"""Fisher-weighted SVD (FWSVD, Hsu et al. 2022): low rank that spares the outputs the loss cares about.

Row importance d_i = Σ_j F_ij (F: empirical Fisher, summed squared gradients of the LM loss, see
compress/fisher.py), D = diag(√(d + λ)). The SVD of D·W truncated to rank r minimizes
‖D(W − Ŵ)‖_F; then Ŵ = D⁻¹·U_r Σ_r V_rᵀ. The weighting is per output row only, so it cannot see
which input directions carry the activations (whitened SVD can); on LLMs without fine-tuning
the literature finds it close to plain SVD.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..errors import LlmpressError
from .base import LayerStats, StageConfig, register_compressor
from .residual import ResidualOption
from .svd import LowRankCompressor


class FWSVDConfig(ResidualOption, StageConfig):
    method: str = "fwsvd"
    ratio: float = Field(gt=0.0, lt=1.0, description="fraction of the layer's weights removed")
    percdamp: float = Field(default=1e-3, ge=0.0, lt=1.0, description="λ as a fraction of the mean row importance")


def fisher_weighted_svd(weight: torch.Tensor, row_fisher: torch.Tensor, percdamp: float = 1e-3):
    """(D⁻¹U, σ, Vᵀ) in float64: SVD of D·W mapped back, D = diag(√(row Fisher + λ))."""
    d = row_fisher.double().to(weight.device)
    if d.shape[0] != weight.shape[0] or not torch.isfinite(d).all() or (d < 0).any():
        raise LlmpressError("row Fisher must be finite, non-negative, one value per output row")
    mean = float(d.mean())
    scale = (d + (percdamp * mean if mean > 0 else 1.0)).sqrt()
    u, sigma, vh = torch.linalg.svd(scale[:, None] * weight.double(), full_matrices=False)
    return u / scale[:, None], sigma, vh


@register_compressor
class FWSVDCompressor(LowRankCompressor):
    method = "fwsvd"
    config_class = FWSVDConfig
    needs = ("fisher",)

    def factorize(self, weight, stats: LayerStats, config: FWSVDConfig):
        return fisher_weighted_svd(weight, stats["fisher_row"], config.percdamp)
