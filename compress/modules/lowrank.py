"""LowRankLinear: Ŵ = U·V with U (out×r) and V (r×in); y = (x·Vᵀ)·Uᵀ + b, never forming Ŵ."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import dispatch
from .base import CompressedLinear, register_format


@register_format
class LowRankLinear(CompressedLinear):
    format = "lowrank"

    def __init__(self, in_features, out_features, rank, has_bias, dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, has_bias, dtype, device)
        self.rank = rank
        self.up = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device), requires_grad=False)
        self.down = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device), requires_grad=False)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        module = cls(down.shape[1], up.shape[0], up.shape[1], bias is not None, dtype=up.dtype, device=up.device)
        module.up.data.copy_(up)
        module.down.data.copy_(down)
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch("lowrank", self, x)

    def to_dense(self) -> torch.Tensor:
        return self.up @ self.down

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "rank": self.rank}

    @classmethod
    def from_spec(cls, spec, dtype, device=None):
        return cls(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"], dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"
