"""Compression methods, one file each, registered by name in COMPRESSORS."""

from .base import COMPRESSORS, Compressor, LayerStats, StageConfig, rank_for_ratio, register_compressor
from .cospadi import CoSpaDiCompressor, CoSpaDiConfig
from .eora import EoRACompressor, EoRAConfig
from .fwsvd import FWSVDCompressor, FWSVDConfig
from .gptq import GPTQCompressor, GPTQConfig
from .gqsa import GQSACompressor, GQSAConfig
from .magnitude import MagnitudeCompressor, MagnitudeConfig
from .mfac import MFACCompressor, MFACConfig
from .rocket import RocketCompressor, RocketConfig
from .sparsegpt import SparseGPTCompressor, SparseGPTConfig
from .svd import SVDCompressor, SVDConfig
from .wanda import WandaCompressor, WandaConfig
from .whitened_svd import WhitenedSVDCompressor, WhitenedSVDConfig

__all__ = [
    "COMPRESSORS",
    "CoSpaDiCompressor",
    "CoSpaDiConfig",
    "Compressor",
    "EoRACompressor",
    "EoRAConfig",
    "FWSVDCompressor",
    "FWSVDConfig",
    "GPTQCompressor",
    "GPTQConfig",
    "GQSACompressor",
    "GQSAConfig",
    "LayerStats",
    "MagnitudeCompressor",
    "MagnitudeConfig",
    "MFACCompressor",
    "MFACConfig",
    "RocketCompressor",
    "RocketConfig",
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
