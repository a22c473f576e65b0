"""Magnitude pruning: the data-free sparsity baseline.

Unstructured: drop the `ratio` smallest |w| of the whole layer. N:M (e.g. 2:4): in every group
of M consecutive input weights of a row keep the N largest.
"""

from __future__ import annotations

from ..modules import CompressedLinear
from .base import Compressor, LayerStats, register_compressor
from .residual import ResidualOption
from .masks import PruningConfig, nm_mask, pruned_module, pruning_mask, unstructured_mask

__all__ = ["MagnitudeCompressor", "MagnitudeConfig", "nm_mask", "unstructured_mask"]


class MagnitudeConfig(ResidualOption, PruningConfig):
    method: str = "magnitude"


@register_compressor
class MagnitudeCompressor(Compressor):
    method = "magnitude"
    config_class = MagnitudeConfig
    level_field = "ratio"

    def compress(self, weight, bias, stats: LayerStats, config: MagnitudeConfig, base=None) -> CompressedLinear:
        mask = pruning_mask(weight.abs().float(), config)
        return pruned_module(weight, mask, bias, config)
