"""Int8Linear: W8 group quantization, one byte per weight plus a scale and zero point per group.

Ŵ[r, G] = (q − zero)·scale over groups G of g consecutive input columns, q and zero in [0, 255].
Bytes: out·in + out·(in/g)·(1 zero + sizeof(scale)) + bias. Used where 4 bits cost too much
quality for the bytes they save: the token embeddings and the output head (compress/embeddings.py).
The PyTorch path dequantizes (kept in the CPU cache on the CPU); the Triton kernel
(kernels/int8_matmul.py) reads the bytes once and dequantizes on chip at decode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import dispatch
from .base import CompressedLinear, register_format


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(rows, groups·g) values in the scales' dtype of W8 codes (rows, groups, g) with a scale and
    zero point per group (rows, groups): Int8Linear's rows, DictLinear's W8 atoms."""
    values = codes.to(scales.dtype)
    return ((values - zeros.to(scales.dtype)[..., None]) * scales[..., None]).flatten(-2)


@register_format
class Int8Linear(CompressedLinear):
    format = "int8"

    def __init__(self, in_features, out_features, group_size, has_bias, dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, has_bias, dtype, device)
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} must divide in_features {in_features}")
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, groups, group_size, dtype=torch.uint8, device=device))
        self.scales = nn.Parameter(torch.empty(out_features, groups, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.uint8, device=device))

    @classmethod
    def from_codes(cls, codes, scales, zeros, bias: torch.Tensor | None = None) -> Int8Linear:
        """codes (out, groups, g) in [0, 255]; scales, zeros (out, groups)."""
        out_features, groups, g = codes.shape
        module = cls(groups * g, out_features, g, bias is not None, scales.dtype, scales.device)
        module.qweight.copy_(codes.to(torch.uint8))
        module.scales.data.copy_(scales)
        module.zeros.copy_(zeros.to(torch.uint8))
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, in) dequantized rows `rows` (an embedding lookup reads only these)."""
        return dequantize_groups(self.qweight[rows], self.scales[rows], self.zeros[rows])

    def to_dense(self) -> torch.Tensor:
        return self.dequantize_rows(torch.arange(self.out_features, device=self.qweight.device))

    def num_values(self) -> int:
        """8-bit codes, scales, zero points and bias."""
        groups = self.out_features * (self.in_features // self.group_size)
        return self.out_features * self.in_features + 2 * groups + (self.out_features if self.bias is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch("int8", self, x)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "group_size": self.group_size}

    @classmethod
    def from_spec(cls, spec, dtype, device=None):
        return cls(spec["in_features"], spec["out_features"], spec["group_size"], spec["bias"], dtype, device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, bits=8"
