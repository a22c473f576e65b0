"""nn.Linear replacements, one per storage format (see FORMATS)."""

from .base import FORMATS, CompressedLinear, build_module, register_format
from .delta_sparse import DeltaSparseLinear
from .dictionary import DictLinear, tie_shared_dictionaries
from .eora import EoRALinear
from .gqsa import GQSALinear
from .int8 import Int8Linear
from .lowbit import LowBitLinear
from .embedding import QuantizedEmbedding, TiedOutputHead
from .lowrank import LowRankLinear
from .sparse import SparseLinear, pack_mask, unpack_mask
from .tile_sparse import TileSparseLinear

__all__ = [
    "FORMATS",
    "CompressedLinear",
    "DeltaSparseLinear",
    "DictLinear",
    "EoRALinear",
    "GQSALinear",
    "Int8Linear",
    "LowBitLinear",
    "QuantizedEmbedding",
    "TiedOutputHead",
    "LowRankLinear",
    "SparseLinear",
    "TileSparseLinear",
    "build_module",
    "pack_mask",
    "register_format",
    "tie_shared_dictionaries",
    "unpack_mask",
]
