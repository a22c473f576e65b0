"""Magnitude pruning: the data-free sparsity baseline.

Unstructured: drop the `ratio` smallest |w| of the whole layer. N:M (e.g. 2:4): in every group
of M consecutive input weights of a row keep the N largest.
"""

from __future__ import annotations

from ..modules import SparseLinear
from .base import Compressor, LayerStats, register_compressor
from .masks import PruningConfig, nm_mask, pruning_mask, unstructured_mask

__all__ = ["MagnitudeCompressor", "MagnitudeConfig", "nm_mask", "unstructured_mask"]


class MagnitudeConfig(PruningConfig):
    method: str = "magnitude"


@register_compressor
class MagnitudeCompressor(Compressor):
    method = "magnitude"
    config_class = MagnitudeConfig
    level_field = "ratio"

    def compress(self, weight, bias, stats: LayerStats, config: MagnitudeConfig, base=None) -> SparseLinear:
        mask = pruning_mask(weight.abs().float(), config)
        return SparseLinear.from_dense(weight, mask, bias, pattern=config.pattern)
