"""EoRA: training-free low-rank compensation of any compressor's error in the eigenspace of XᵀX.

ΔW = W − Ŵ; G = QΛQᵀ (float64, non-positive eigenvalues clamped); SVD of ΔW·Q·Λ^½ truncated to
rank r gives B = U_r Σ_r and A = V_rᵀ Λ^{-½} Qᵀ, so y = x·Ŵᵀ + (x·Aᵀ)·Bᵀ. Projecting into the
eigenspace makes the truncation optimal for the calibration-weighted error ‖(ΔW − B·A)Xᵀ‖ instead
of ‖ΔW − B·A‖. Run as a recipe stage after any method; the pipeline gives it the layer's original
weight, the compressed module, and a Gram collected on the compressed model's own inputs. A stage
can instead stack the residual on its own result (`residual_rank`, compress/compressors/residual.py):
one module and one knapsack option, fit on the same statistics as the stage.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from ..modules import CompressedLinear, EoRALinear
from .base import Compressor, LayerStats, StageConfig, register_compressor
from .residual import eora_factors


class EoRAConfig(StageConfig):
    method: str = "eora"
    rank: int | None = Field(default=None, ge=1, description="rank of the compensation, the same for every layer")
    budget: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="or: size of the residual as a fraction of the layer's dense size"
    )
    percdamp: float = Field(default=1e-6, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _rank_or_budget(self):
        if (self.rank is None) == (self.budget is None):
            raise ValueError("eora needs exactly one of 'rank' (fixed) or 'budget' (fraction of the layer's dense size)")
        return self

    def rank_for(self, out_features: int, in_features: int) -> int:
        """The fixed rank, or the largest whose two factors fit in `budget` of the dense weight (at least 1)."""
        if self.rank is not None:
            return self.rank
        return max(1, int(self.budget * out_features * in_features // (out_features + in_features)))


@register_compressor
class EoRACompressor(Compressor):
    method = "eora"
    config_class = EoRAConfig
    needs = ("gram",)
    wraps_compressed = True

    def compress(self, weight, bias, stats: LayerStats, config: EoRAConfig, base: CompressedLinear | None = None):
        if base is None:
            raise ValueError("EoRA compensates a compressed module: run it as a stage after a compression stage")
        delta = weight.double() - base.to_dense().double()
        rank = config.rank_for(*weight.shape)
        up, down = eora_factors(delta, stats["gram"], rank, config.percdamp, stats.name)
        return EoRALinear.from_factors(base, up.to(weight.dtype), down.to(weight.dtype))
