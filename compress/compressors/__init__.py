"""Compression methods, one file each, registered by name in COMPRESSORS."""

from .base import COMPRESSORS, Compressor, LayerStats, StageConfig, rank_for_ratio, register_compressor
from .magnitude import MagnitudeCompressor, MagnitudeConfig
from .svd import SVDCompressor, SVDConfig

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "LayerStats",
    "MagnitudeCompressor",
    "MagnitudeConfig",
    "SVDCompressor",
    "SVDConfig",
    "StageConfig",
    "rank_for_ratio",
    "register_compressor",
]
