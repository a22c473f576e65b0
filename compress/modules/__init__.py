"""nn.Linear replacements, one per storage format (see FORMATS)."""

from .base import FORMATS, CompressedLinear, build_module, register_format
from .dictionary import DictLinear, tie_shared_dictionaries
from .eora import EoRALinear
from .gqsa import GQSALinear
from .lowrank import LowRankLinear
from .sparse import SparseLinear, pack_mask, unpack_mask
from .tile_sparse import TileSparseLinear

__all__ = [
    "FORMATS",
    "CompressedLinear",
    "DictLinear",
    "EoRALinear",
    "GQSALinear",
    "LowRankLinear",
    "SparseLinear",
    "TileSparseLinear",
    "build_module",
    "pack_mask",
    "register_format",
    "tie_shared_dictionaries",
    "unpack_mask",
]
