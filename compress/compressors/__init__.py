"""Compression methods, one file each, registered by name in COMPRESSORS."""

from .base import COMPRESSORS, Compressor, LayerStats, StageConfig, rank_for_ratio, register_compressor
from .eora import EoRACompressor, EoRAConfig
from .fwsvd import FWSVDCompressor, FWSVDConfig
from .gqsa import GQSACompressor, GQSAConfig
from .magnitude import MagnitudeCompressor, MagnitudeConfig
from .mfac import MFACCompressor, MFACConfig
from .sparsegpt import SparseGPTCompressor, SparseGPTConfig
from .svd import SVDCompressor, SVDConfig
from .wanda import WandaCompressor, WandaConfig
from .whitened_svd import WhitenedSVDCompressor, WhitenedSVDConfig

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "EoRACompressor",
    "EoRAConfig",
    "FWSVDCompressor",
    "FWSVDConfig",
    "GQSACompressor",
    "GQSAConfig",
    "LayerStats",
    "MagnitudeCompressor",
    "MagnitudeConfig",
    "MFACCompressor",
    "MFACConfig",
    "SVDCompressor",
    "SparseGPTCompressor",
    "SparseGPTConfig",
    "WandaCompressor",
    "WandaConfig",
    "SVDConfig",
    "StageConfig",
    "WhitenedSVDCompressor",
    "WhitenedSVDConfig",
    "rank_for_ratio",
    "register_compressor",
]
