"""LowBitLinear: W3 and W2 group quantization, codes packed at their own width in bit planes.

Ŵ[r, G] = (q − zero)·scale over groups G of g consecutive input columns, q and zero in
[0, 2^bits − 1]. A group's g codes take g·bits/8 bytes: first g/4 bytes of the low two bits
(byte j holds codes 4j..4j+3, code 4j+p at bits 2p), then for W3 g/8 bytes of third bits, byte k
holding those of the codes in low bytes k (bits 0-3) and k + g/8 (bits 4-7). So a kernel reads a
half group's low bytes and the third-bit bytes as two aligned tiles, and every code comes out of
its byte with one shift and one mask, the same for all (compress/kernels/lowbit_matmul.py), where
codes packed side by side at 3 bits would straddle bytes. g is a multiple of 8.
Bytes: out·in·bits/8 + out·(in/g)·(1 zero + sizeof(scale)) + bias.

What a byte budget past W4 needs (80% of bf16 bytes removed: W4 g64 stops at 72.7%).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import LlmpressError
from ..kernels import dispatch
from .base import CompressedLinear, register_format

BITS = (2, 3)
PACKING = "planes"  # recorded in the spec: the layout of the module docstring
_P = torch.arange(4, dtype=torch.int32)  # a code's position in its low byte


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., g) codes of one group in [0, 2^bits − 1], g a multiple of 8 -> (..., g·bits/8) uint8:
    the low-two-bit plane, then (W3) the third-bit plane (see the module docstring)."""
    codes = codes.to(torch.int32)
    p = _P.to(codes.device)
    low = ((codes & 3).unflatten(-1, (-1, 4)) << (2 * p)).sum(-1, dtype=torch.int32)  # (..., g/4)
    if bits == 2:
        return low.to(torch.uint8)
    third = ((codes >> 2) & 1).unflatten(-1, (2, -1, 4))  # (..., half, k, p)
    high = (third[..., 0, :, :] << p).sum(-1, dtype=torch.int32) | (third[..., 1, :, :] << (4 + p)).sum(-1, dtype=torch.int32)
    return torch.cat([low, high], dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_codes`: (..., g·bits/8) uint8 -> (..., g) int32 codes."""
    g = packed.shape[-1] * 8 // bits
    p = _P.to(packed.device)
    low = packed[..., : g // 4].to(torch.int32)
    codes = ((low[..., None] >> (2 * p)) & 3).flatten(-2)
    if bits == 3:
        high = packed[..., g // 4 :].to(torch.int32)[..., None, :, None]  # (..., 1, g/8, 1)
        halves = torch.tensor([0, 4], dtype=torch.int32, device=packed.device)[:, None, None]
        codes = codes | (((high >> (halves + p)) & 1) << 2).flatten(-3)
    return codes


@register_format
class LowBitLinear(CompressedLinear):
    format = "lowbit"

    def __init__(self, in_features, out_features, group_size, bits, has_bias, dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, has_bias, dtype, device)
        if bits not in BITS:
            raise ValueError(f"LowBitLinear stores {BITS} bits per weight, not {bits} (4: GQSALinear, 8: Int8Linear)")
        if group_size % 8 or in_features % group_size:
            raise ValueError(f"group_size {group_size} must be a multiple of 8 and divide in_features {in_features}")
        self.group_size = group_size
        self.bits = bits
        groups = in_features // group_size
        packed = group_size * bits // 8
        self.register_buffer("qweight", torch.empty(out_features, groups, packed, dtype=torch.uint8, device=device))
        self.scales = nn.Parameter(torch.empty(out_features, groups, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.uint8, device=device))

    @classmethod
    def from_codes(cls, codes, scales, zeros, bits: int, bias: torch.Tensor | None = None) -> LowBitLinear:
        """codes (out, groups, g) and zeros (out, groups) in [0, 2^bits − 1]; scales (out, groups)."""
        out_features, groups, g = codes.shape
        if int(codes.max()) >= 1 << bits or int(zeros.max()) >= 1 << bits:
            raise ValueError(f"codes or zero points do not fit in {bits} bits")
        module = cls(groups * g, out_features, g, bits, bias is not None, scales.dtype, scales.device)
        module.qweight.copy_(pack_codes(codes, bits))
        module.scales.data.copy_(scales)
        module.zeros.copy_(zeros.to(torch.uint8))
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def to_dense(self) -> torch.Tensor:
        codes = unpack_codes(self.qweight, self.bits).to(self.scales.dtype)
        return ((codes - self.zeros.to(self.scales.dtype)[..., None]) * self.scales[..., None]).flatten(-2)

    def num_values(self) -> int:
        """Codes, scales, zero points and bias, one value each (the bytes tell the size)."""
        groups = self.out_features * (self.in_features // self.group_size)
        return self.out_features * self.in_features + 2 * groups + (self.out_features if self.bias is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch("lowbit", self, x)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "group_size": self.group_size, "bits": self.bits, "packing": PACKING}

    @classmethod
    def from_spec(cls, spec, dtype, device=None):
        if spec.get("packing") != PACKING:
            raise LlmpressError(
                f"a W{spec.get('bits')} layer of this checkpoint packs its codes as {spec.get('packing', 'side by side')!r}, "
                f"a layout of an unreleased llmpress; this install reads {PACKING!r}: compress the model again"
            )
        return cls(spec["in_features"], spec["out_features"], spec["group_size"], spec["bits"], spec["bias"], dtype, device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, bits={self.bits}"
