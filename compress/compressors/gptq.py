"""GPTQ: group-wise INT4 or INT8 (or INT3/INT2) weights with second-order error feedback, every group kept.

The weight is quantized column by column in one OBS sweep over the layer Hessian H = XᵀX
(compress/compressors/sparsegpt.obs_sweep): each group of g input columns gets an asymmetric grid
(scale, zero point) fitted to its weights as updated so far, each column is rounded to it, and
the columns to its right absorb the rounding error. With `refit_scales` the scales are then refit
in closed form on the layer output error, codes fixed. This is GQSA's sweep with no group removed
(`gqsa_quantize` with ratio 0 and 2^bits − 1 levels), so both methods share one implementation.

Formats: `bits: 4` stores a `GQSALinear` with every group kept (no group index, the same bytes
as `gqsa` at ratio 0), `bits: 8` an `Int8Linear` (one byte per weight), `bits: 3` or `2` a
`LowBitLinear` (codes in bit planes, `bits` bits per weight; kernels/lowbit_matmul.py). W8 is the option for the layers where 4 bits cost more quality than their bytes are worth: in bf16 it removes about half
the bytes at almost no error, which is what a byte budget of 30-50% needs.

The method has no level for the allocator to vary; a knapsack across methods lists it as one fixed
option (`allocation.candidates: {i: [0]}`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..errors import ShapeNotSupported
from ..modules import CompressedLinear, GQSALinear, Int8Linear, LowBitLinear
from .base import Compressor, LayerStats, StageConfig, register_compressor
from .residual import ResidualOption
from .gqsa import GQSAConfig, gqsa_quantize


class GPTQConfig(ResidualOption, StageConfig):
    method: str = "gptq"
    bits: Literal[2, 3, 4, 8] = Field(
        default=4, description="bits per weight: 4 (two codes per byte), 8, or 3 and 2 (packed, for budgets past W4)"
    )
    group_size: int = Field(default=128, ge=2, description="input columns sharing one scale and zero point")
    blocksize: int = Field(default=128, ge=2, description="columns per lazy-update block (a multiple of group_size)")
    percdamp: float = Field(default=0.01, gt=0.0, lt=1.0, description="damping of H, a fraction of its mean diagonal")
    refit_scales: bool = Field(default=True, description="least-squares refit of the scales on the layer output error")

    @model_validator(mode="after")
    def _sizes(self):
        if self.group_size % 2:
            raise ValueError(f"group_size must be even, got {self.group_size}")
        words = 32 if self.bits == 3 else 16
        if self.bits < 4 and self.group_size % words:
            raise ValueError(f"{self.bits}-bit codes fill whole 32-bit words of each bit plane: group_size must be a multiple of {words}, got {self.group_size}")
        if self.blocksize % self.group_size:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of group_size {self.group_size}")
        return self


@register_compressor
class GPTQCompressor(Compressor):
    method = "gptq"
    config_class = GPTQConfig
    needs = ("gram",)

    def compress(self, weight, bias, stats: LayerStats, config: GPTQConfig, base=None) -> CompressedLinear:
        if weight.shape[1] % config.group_size:
            raise ShapeNotSupported(
                f"{stats.name}: gptq needs in_features ({weight.shape[1]}) divisible by group_size ({config.group_size}); "
                "choose a group_size that divides it"
            )
        sweep = GQSAConfig(
            ratio=0.0, group_size=config.group_size, blocksize=config.blocksize, percdamp=config.percdamp,
            refit_scales=config.refit_scales,
        )  # fmt: skip
        result = gqsa_quantize(weight, stats["gram"], sweep, stats.name, levels=2**config.bits - 1)
        scales = result.scales.to(weight.dtype)
        if config.bits == 8:
            return Int8Linear.from_codes(result.codes, scales, result.zeros, bias)
        if config.bits < 4:
            return LowBitLinear.from_codes(result.codes, scales, result.zeros, config.bits, bias)
        return GQSALinear.from_codes(result.codes, scales, result.zeros, result.index, weight.shape[1], bias)
