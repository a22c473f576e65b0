"""EoRALinear: any compressed module plus a low-rank residual, y = base(x) + (x·Aᵀ)·Bᵀ."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import dispatch
from .base import CompressedLinear, build_module, register_format


@register_format
class EoRALinear(CompressedLinear):
    format = "eora"

    def __init__(self, base: CompressedLinear, rank: int, dtype=torch.float32, device=None):
        super().__init__(base.in_features, base.out_features, False, dtype, device)
        self.base = base
        self.rank = rank
        self.up = nn.Parameter(torch.empty(base.out_features, rank, dtype=dtype, device=device), requires_grad=False)
        self.down = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device), requires_grad=False)

    @classmethod
    def from_factors(cls, base: CompressedLinear, up: torch.Tensor, down: torch.Tensor) -> "EoRALinear":
        module = cls(base, up.shape[1], dtype=up.dtype, device=up.device)
        module.up.data.copy_(up)
        module.down.data.copy_(down)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch("eora", self, x)

    def to_dense(self) -> torch.Tensor:
        return self.base.to_dense() + self.up @ self.down

    def dense_num_params(self) -> int:
        return self.base.dense_num_params()

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "bias": False, "rank": self.rank, "base": self.base.spec()}

    @classmethod
    def from_spec(cls, spec, dtype, device=None):
        return cls(build_module(spec["base"], dtype, device), spec["rank"], dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"
