"""Magnitude pruning: the data-free sparsity baseline.

Unstructured: drop the `ratio` smallest |w| of the whole layer. N:M (e.g. 2:4): in every group
of M consecutive input weights of a row keep the N largest.
"""

from __future__ import annotations

import re

import torch
from pydantic import Field, field_validator, model_validator

from ..modules import SparseLinear
from .base import Compressor, LayerStats, StageConfig, register_compressor


class MagnitudeConfig(StageConfig):
    method: str = "magnitude"
    ratio: float | None = Field(default=None, gt=0.0, lt=1.0, description="fraction of weights removed")
    pattern: str = Field(default="unstructured", description="'unstructured' or 'N:M' such as '2:4'")

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        if value != "unstructured" and not re.fullmatch(r"\d+:\d+", value):
            raise ValueError(f"pattern must be 'unstructured' or 'N:M' like '2:4', got {value!r}")
        if value != "unstructured":
            n, m = map(int, value.split(":"))
            if not 0 < n < m:
                raise ValueError(f"N:M pattern needs 0 < N < M, got {value!r}")
        return value

    @model_validator(mode="after")
    def _ratio_matches_pattern(self):
        if self.pattern == "unstructured" and self.ratio is None:
            raise ValueError("unstructured pruning needs 'ratio' (fraction of weights removed, in (0, 1))")
        if self.pattern != "unstructured" and self.ratio is not None:
            n, m = map(int, self.pattern.split(":"))
            if abs(self.ratio - (1 - n / m)) > 1e-9:
                raise ValueError(f"pattern {self.pattern} removes {1 - n / m:g} of the weights; drop 'ratio'")
        return self


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in each group of m consecutive columns of every row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pruning needs in_features divisible by M={m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(rows, cols)


def unstructured_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep all but the round(ratio·numel) lowest scores (ties broken by position)."""
    num_pruned = int(round(ratio * scores.numel()))
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if num_pruned:
        mask[scores.flatten().topk(num_pruned, largest=False).indices] = False
    return mask.view_as(scores)


@register_compressor
class MagnitudeCompressor(Compressor):
    method = "magnitude"
    config_class = MagnitudeConfig
    level_field = "ratio"

    def compress(self, weight, bias, stats: LayerStats, config: MagnitudeConfig, base=None) -> SparseLinear:
        scores = weight.abs().float()
        if config.pattern == "unstructured":
            mask = unstructured_mask(scores, config.ratio)
        else:
            n, m = map(int, config.pattern.split(":"))
            mask = nm_mask(scores, n, m)
        return SparseLinear.from_dense(weight, mask, bias, pattern=config.pattern)
