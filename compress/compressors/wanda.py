"""Wanda (Sun et al. 2023): prune by |W_ij|·‖X_j‖, compared within each output row.

The score is the magnitude of what a weight contributes to the output on calibration data
(the input channel's norm over all tokens), so weights fed by large activations survive even
when small. No weight update. Needs only per-channel norms, not the Gram.
"""

from __future__ import annotations

from ..modules import CompressedLinear
from .base import Compressor, LayerStats, register_compressor
from .residual import ResidualOption
from .masks import PruningConfig, pruned_module, pruning_mask


class WandaConfig(ResidualOption, PruningConfig):
    method: str = "wanda"


def wanda_scores(weight, channel_norm_sq):
    """|W_ij|·‖X_j‖ in float32."""
    return weight.abs().float() * channel_norm_sq.float().to(weight.device).sqrt()[None, :]


@register_compressor
class WandaCompressor(Compressor):
    method = "wanda"
    config_class = WandaConfig
    needs = ("channel_norm_sq",)
    level_field = "ratio"

    def compress(self, weight, bias, stats: LayerStats, config: WandaConfig, base=None) -> CompressedLinear:
        mask = pruning_mask(wanda_scores(weight, stats["channel_norm_sq"]), config, per_row=True)
        return pruned_module(weight, mask, bias, config)
