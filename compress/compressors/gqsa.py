"""GQSA (group quantization and sparsity): drop whole groups of g input columns per row by a
second-order group saliency, quantize the surviving groups to INT4 with GPTQ-style error feedback.

1. Group saliency from OBS with the layer Hessian H = XᵀX: removing group G of row r costs
   w_{r,G}ᵀ [(H⁻¹)_GG]⁻¹ w_{r,G} / 2 (one g×g inverse per column group, shared by all rows).
2. Every row keeps its k = (1 − sparsity)·(in/g) most salient groups (balanced rows, for the kernel).
3. One OBS sweep over the columns (compress/compressors/sparsegpt.obs_sweep): when it reaches a
   kept group its asymmetric 4-bit grid (scale, zero) is fitted to the group's weights *as
   updated so far*; each column is replaced by its quantized value (0 in dropped groups) and the
   columns to its right absorb the error.
The paper's further stages (block-wise and end-to-end parameter optimization) train the
quantization parameters; llmpress does no training, so they are not part of this method.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from ..modules import GQSALinear
from .base import Compressor, LayerStats, StageConfig, register_compressor
from .sparsegpt import inverse_hessian_factor, obs_sweep

LEVELS = 15  # 4-bit codes 0..15


class GQSAConfig(StageConfig):
    method: str = "gqsa"
    ratio: float = Field(default=0.5, ge=0.0, lt=1.0, description="fraction of weight groups removed (group sparsity)")
    group_size: int = Field(default=16, ge=2, description="input columns per group (8, 16, 32, ...)")
    blocksize: int = Field(default=128, ge=2, description="columns per lazy-update block (a multiple of group_size)")
    percdamp: float = Field(default=0.01, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _sizes(self):
        if self.group_size % 2:
            raise ValueError(f"group_size must be even (two 4-bit codes per byte), got {self.group_size}")
        if self.blocksize % self.group_size:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of group_size {self.group_size}")
        return self


def group_saliency(weight: torch.Tensor, u: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, groups) OBS cost of removing each group: w_Gᵀ [(H⁻¹)_GG]⁻¹ w_G / 2."""
    rows, cols = weight.shape
    groups = cols // group_size
    hinv = (u.T @ u).double()  # UᵀU = H⁻¹
    blocks = torch.stack([hinv[i * group_size : (i + 1) * group_size, i * group_size : (i + 1) * group_size] for i in range(groups)])
    inv = torch.linalg.inv(blocks)  # (groups, g, g)
    w = weight.double().reshape(rows, groups, group_size)
    return 0.5 * torch.einsum("rng,ngh,rnh->rn", w, inv, w)


def gqsa_quantize(weight: torch.Tensor, gram: torch.Tensor, config: GQSAConfig, name: str = "layer"):
    """(codes (out,k,g), scales (out,k), zeros (out,k), group_index (out,k), dequantized dense weight)."""
    rows, cols = weight.shape
    g = config.group_size
    if cols % g:
        raise ValueError(f"GQSA needs in_features divisible by group_size={g}, got {cols}")
    groups = cols // g
    keep_groups = max(1, round((1.0 - config.ratio) * groups))
    u, dead = inverse_hessian_factor(gram.to(weight.device), config.percdamp, name)
    w = weight.float().clone()
    w[:, dead] = 0.0
    saliency = group_saliency(w, u, g)
    index = saliency.topk(keep_groups, dim=1).indices.sort(dim=1).values  # (rows, k), ascending columns
    kept = torch.zeros(rows, groups, dtype=torch.bool, device=w.device)
    kept.scatter_(1, index, True)
    scales = torch.zeros(rows, groups, device=w.device)
    zeros = torch.zeros(rows, groups, device=w.device)
    codes = torch.zeros(rows, cols, device=w.device)

    def rule(j: int, block: torch.Tensor, i: int) -> torch.Tensor:
        group = j // g
        if j % g == 0:  # fit this group's grid to its current (error-corrected) weights
            values = block[:, i : i + g]
            lo = values.min(dim=1).values.clamp(max=0.0)
            hi = values.max(dim=1).values.clamp(min=0.0)
            scale = ((hi - lo) / LEVELS).clamp_min(1e-12)
            scales[:, group] = scale
            zeros[:, group] = torch.round(-lo / scale).clamp(0, LEVELS)
        scale, zero = scales[:, group], zeros[:, group]
        code = torch.clamp(torch.round(block[:, i] / scale) + zero, 0, LEVELS)
        codes[:, j] = code
        return torch.where(kept[:, group], (code - zero) * scale, torch.zeros_like(code))

    dequantized = obs_sweep(w, u, config.blocksize, rule)
    pick = index[..., None].expand(-1, -1, g)
    grouped_codes = codes.reshape(rows, groups, g).gather(1, pick)
    return grouped_codes, scales.gather(1, index), zeros.gather(1, index), index, dequantized


@register_compressor
class GQSACompressor(Compressor):
    method = "gqsa"
    config_class = GQSAConfig
    needs = ("gram",)
    level_field = "ratio"

    def compress(self, weight, bias, stats: LayerStats, config: GQSAConfig, base=None) -> GQSALinear:
        codes, scales, zeros, index, _ = gqsa_quantize(weight, stats["gram"], config)
        return GQSALinear.from_codes(codes, scales.to(weight.dtype), zeros, index, weight.shape[1], bias)
