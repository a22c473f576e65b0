"""LowBitLinear: W3 and W2 group quantization, codes packed at their own width in bit planes.

Ŵ[r, G] = (q − zero)·scale over groups G of g consecutive input columns, q and zero in
[0, 2^bits − 1]. A group's g codes take g·bits/8 bytes, in planes: first the low two bits of every
code (code i at bit 2i of the plane, read as little-endian words: 16 codes per 32-bit word), then
for W3 the third bit (code i at bit i: 32 codes per word). A kernel unpacks a word of either plane
with one shift and one mask per code, the same for every code, where codes packed side by side
at 3 bits would straddle bytes and words (compress/kernels/lowbit_matmul.py). g is a multiple of 8
(whole bytes per plane); the kernels read whole words, so they take g a multiple of 32.
Bytes: out·in·bits/8 + out·(in/g)·(1 zero + sizeof(scale)) + bias.

What a byte budget past W4 needs (80% of bf16 bytes removed: W4 g64 stops at 72.7%).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import dispatch
from .base import CompressedLinear, register_format

BITS = (2, 3)


def _plane(bits_of_codes: torch.Tensor, width: int) -> torch.Tensor:
    """(..., n) values of `width` bits -> (..., n·width/8) uint8, value i at bit width·i."""
    per_byte = 8 // width
    shifts = torch.arange(per_byte, device=bits_of_codes.device, dtype=torch.int32) * width
    return (bits_of_codes.unflatten(-1, (-1, per_byte)) << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)


def _unplane(packed: torch.Tensor, width: int) -> torch.Tensor:
    per_byte = 8 // width
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * width
    return ((packed.to(torch.int32)[..., None] >> shifts) & ((1 << width) - 1)).flatten(-2)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., g) codes of one group in [0, 2^bits − 1], g a multiple of 8 -> (..., g·bits/8) uint8:
    the low-two-bit plane, then (W3) the third-bit plane."""
    codes = codes.to(torch.int32)
    planes = [_plane(codes & 3, 2)]
    if bits == 3:
        planes.append(_plane((codes >> 2) & 1, 1))
    return torch.cat(planes, dim=-1)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_codes`: (..., g·bits/8) uint8 -> (..., g) int32 codes."""
    g = packed.shape[-1] * 8 // bits
    codes = _unplane(packed[..., : g // 4], 2)
    if bits == 3:
        codes = codes | (_unplane(packed[..., g // 4 :], 1) << 2)
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
        return {**super().spec(), "group_size": self.group_size, "bits": self.bits}

    @classmethod
    def from_spec(cls, spec, dtype, device=None):
        return cls(spec["in_features"], spec["out_features"], spec["group_size"], spec["bits"], spec["bias"], dtype, device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, bits={self.bits}"
