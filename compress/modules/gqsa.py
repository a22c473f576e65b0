"""GQSALinear: group-sparse rows of INT4 groups (GQSA's W4 + group sparsity), in an ELL layout.

Each output row keeps the same number k of groups of g consecutive input columns (balanced rows:
every row of a kernel tile does the same work). Per kept group: its column-group index, g 4-bit
codes packed two per byte (low nibble first), an asymmetric scale and zero point;
Ŵ[r, G] = (q − zero)·scale. A row's kept groups are stored in column order (ascending indices),
which the tensor-core kernel walks. Bytes: out·k·(g/2 + 2 index + 1 zero + sizeof(scale)) + bias.
The PyTorch path dequantizes per call (a reference); the Triton kernels dequantize on chip.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import dispatch
from .base import CompressedLinear, register_format


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2n) integers in [0, 15] -> (..., n) uint8, element 2i in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4 (uint8 codes)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


@register_format
class GQSALinear(CompressedLinear):
    format = "gqsa"

    def __init__(self, in_features, out_features, group_size, groups_per_row, has_bias, dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, has_bias, dtype, device)
        if group_size % 2 or in_features % group_size:
            raise ValueError(f"group_size {group_size} must be even and divide in_features {in_features}")
        self.group_size = group_size
        self.groups_per_row = groups_per_row
        k = groups_per_row
        self.scales = nn.Parameter(torch.empty(out_features, k, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("qweight", torch.empty(out_features, k, group_size // 2, dtype=torch.uint8, device=device))
        self.register_buffer("zeros", torch.empty(out_features, k, dtype=torch.uint8, device=device))
        index = None if self.all_groups else torch.empty(out_features, k, dtype=torch.int16, device=device)
        self.register_buffer("group_index", index)  # None: every group kept, in column order

    @property
    def all_groups(self) -> bool:
        """Every group of every row kept (plain W4): no group index is stored."""
        return self.groups_per_row * self.group_size == self.in_features

    @classmethod
    def from_codes(cls, codes, scales, zeros, group_index, in_features: int, bias: torch.Tensor | None) -> "GQSALinear":
        """codes (out, k, g) in [0, 15]; scales (out, k); zeros (out, k) in [0, 15]; group_index (out, k)."""
        out_features, k, g = codes.shape
        module = cls(in_features, out_features, g, k, bias is not None, scales.dtype, scales.device)
        # slots in column order: the tensor-core kernel walks each row's kept groups in ascending order
        order = group_index.long().argsort(dim=1)
        codes, scales, zeros = codes.gather(1, order[..., None].expand_as(codes)), scales.gather(1, order), zeros.gather(1, order)
        if not module.all_groups:  # all groups: stored in column order, without an index
            module.group_index.copy_(group_index.gather(1, order).to(torch.int16))
        module.qweight.copy_(pack_int4(codes))
        module.scales.data.copy_(scales)
        module.zeros.copy_(zeros.to(torch.uint8))
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def dequantized_groups(self) -> torch.Tensor:
        """(out, k, g) float values of the kept groups."""
        codes = unpack_int4(self.qweight).to(self.scales.dtype)
        return (codes - self.zeros.to(self.scales.dtype)[..., None]) * self.scales[..., None]

    def to_dense(self) -> torch.Tensor:
        return self.place_groups(self.dequantized_groups())

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, in) dequantized rows `rows` of a layer with every group kept (an embedding lookup
        reads only these)."""
        if not self.all_groups:
            raise ValueError("row lookup needs every group kept (plain W4)")
        dtype = self.scales.dtype
        codes = unpack_int4(self.qweight[rows]).to(dtype)
        return ((codes - self.zeros[rows].to(dtype)[..., None]) * self.scales[rows][..., None]).flatten(-2)

    def place_groups(self, groups: torch.Tensor) -> torch.Tensor:
        """(out, in) dense weight from values (out, k, g) of the kept groups, zeros elsewhere
        (out of place, so gradients flow through it: compress/quant_tuning.py trains them)."""
        if self.all_groups:
            return groups.reshape(self.out_features, self.in_features)
        dense = torch.zeros(self.out_features, self.in_features // self.group_size, self.group_size, dtype=groups.dtype, device=groups.device)
        index = self.group_index.long()[..., None].expand_as(groups)
        return dense.scatter(1, index, groups).reshape(self.out_features, self.in_features)

    def num_values(self) -> int:
        """4-bit codes, scales, zero points and bias (group indices are metadata)."""
        k = self.out_features * self.groups_per_row
        return k * self.group_size + 2 * k + (self.out_features if self.bias is not None else 0)

    def group_sparsity(self) -> float:
        return 1.0 - self.groups_per_row * self.group_size / self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch("gqsa", self, x)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "group_size": self.group_size, "groups_per_row": self.groups_per_row}

    @classmethod
    def from_spec(cls, spec, dtype, device=None):
        return cls(
            spec["in_features"], spec["out_features"], spec["group_size"], spec["groups_per_row"], spec["bias"], dtype, device
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, group_sparsity={self.group_sparsity():.3f}, bits=4"
