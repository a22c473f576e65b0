"""LowBitLinear: W3 and W2 group quantization, codes packed at their own width in bit planes.

Ŵ[r, G] = (q − zero)·scale over groups G of g consecutive input columns, q and zero in
[0, 2^bits − 1]. A group's g codes take g·bits/8 bytes: first g/4 bytes of the low two bits
(byte j holds codes 4j..4j+3, code 4j+p at bits 2p), then for W3 g/8 bytes of third bits, two
bytes per 16 codes. Read as 32-bit words, low word u holds columns 16u + c (c = 8h + 4s + p) at
bit 16h + 8s + 2p, and third word v holds the third bits of low words 2v (column c's at bit
16h + 2p + 2 + s) and 2v + 1 (the same plus 8, modulo 32: a rotation by 8 apart). So one mask
picks the low bits of two columns (c and c + 8) at once, each at the bottom of a 16-bit half, and
their third bits sit just above them after a shift of the third word by s (and a rotation for
odd words): kernels/lowbit_matmul.py turns them into two 16-bit floats with two LOP3s, where
codes packed side by side at 3 bits would straddle bytes. g is a multiple of 16 (32 for W3).
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
PACKING = "words"  # recorded in the spec: the layout of the module docstring (32-bit words)
# the layout before 2026-12-03: W3's third-bit byte k served low bytes k and k + g/8 (the group's
# halves), code 4j + p's bit at 4·half + p; W2's bytes are the same in both. Loaded and rewritten.
PLANES = "planes"
_P = torch.arange(4, dtype=torch.int32)  # a code's position in its low byte


def _third_bit_positions(device: torch.device) -> torch.Tensor:
    """(2, 2, 2, 4) positions in a 32-bit third word of column c = 8h + 4s + p's third bit, for its
    even and odd low word: 16h + 2p + 2 + s, and that plus 8, modulo 32."""
    o, h, s, p = torch.meshgrid(*(torch.arange(n, dtype=torch.int32, device=device) for n in (2, 2, 2, 4)), indexing="ij")
    return (16 * h + 2 * p + 2 + s + 8 * o) % 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., g) codes of one group in [0, 2^bits − 1], g a multiple of 16 (of 32 for W3) ->
    (..., g·bits/8) uint8: the low-two-bit plane, then (W3) the third-bit plane (see the module
    docstring)."""
    codes = codes.to(torch.int32)
    p = _P.to(codes.device)
    low = ((codes & 3).unflatten(-1, (-1, 4)) << (2 * p)).sum(-1, dtype=torch.int32)  # (..., g/4)
    if bits == 2:
        return low.to(torch.uint8)
    third = ((codes >> 2) & 1).unflatten(-1, (-1, 2, 2, 2, 4))  # (..., third word, odd, h, s, p)
    words = (third.long() << _third_bit_positions(codes.device)).sum((-4, -3, -2, -1))  # (..., g/32), < 2^32
    high = torch.stack([(words >> (8 * i)) & 0xFF for i in range(4)], dim=-1).flatten(-2)  # little-endian
    return torch.cat([low, high.to(torch.int32)], dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_codes`: (..., g·bits/8) uint8 -> (..., g) int32 codes."""
    g = packed.shape[-1] * 8 // bits
    p = _P.to(packed.device)
    low = packed[..., : g // 4].to(torch.int32)
    codes = ((low[..., None] >> (2 * p)) & 3).flatten(-2)
    if bits == 3:
        high = packed[..., g // 4 :].long().unflatten(-1, (-1, 4))
        words = sum(high[..., i] << (8 * i) for i in range(4))[..., None, None, None, None]  # (..., g/32, 1, 1, 1, 1)
        third = (words >> _third_bit_positions(packed.device)) & 1  # (..., g/32, odd, h, s, p)
        codes = codes | (third.flatten(-5).to(torch.int32) << 2)
    return codes


def unpack_planes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (..., g) int32 from the earlier "planes" layout (see PLANES)."""
    g = packed.shape[-1] * 8 // bits
    p = _P.to(packed.device)
    codes = ((packed[..., : g // 4].to(torch.int32)[..., None] >> (2 * p)) & 3).flatten(-2)
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
        if group_size % (32 if bits == 3 else 16) or in_features % group_size:
            raise ValueError(
                f"group_size {group_size} must be a multiple of {32 if bits == 3 else 16} (whole 32-bit words of W{bits} codes) "
                f"and divide in_features {in_features}"
            )
        self.group_size = group_size
        self.bits = bits
        groups = in_features // group_size
        packed = group_size * bits // 8
        self.register_buffer("qweight", torch.empty(out_features, groups, packed, dtype=torch.uint8, device=device))
        self.scales = nn.Parameter(torch.empty(out_features, groups, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.uint8, device=device))
        self.stored_packing = PACKING  # PLANES for a layer of an earlier checkpoint until `after_loading`

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
        packing, bits, group = spec.get("packing"), spec.get("bits"), spec.get("group_size")
        if packing == PLANES and group % (32 if bits == 3 else 16) == 0:  # rewritten once loaded
            module = cls(spec["in_features"], spec["out_features"], group, bits, spec["bias"], dtype, device)
            module.stored_packing = PLANES
            return module
        if packing != PACKING:
            raise LlmpressError(
                f"a W{bits} layer of this checkpoint (groups of {group}) packs its codes as {packing or 'side by side'!r}, "
                f"a layout this install cannot read (it reads {PACKING!r}, and {PLANES!r} for groups of 16 or more, 32 for "
                "W3): compress the model again"
            )
        return cls(spec["in_features"], spec["out_features"], group, bits, spec["bias"], dtype, device)

    @torch.no_grad()
    def after_loading(self) -> None:
        """Rewrite codes loaded in the earlier layout (PLANES) into this one; called once the
        checkpoint's weights are in (hf_quantizer). W2's bytes are the same in both."""
        if self.stored_packing == PLANES and self.bits == 3:
            self.check_rewritable(self.qweight, "W3 codes")
            self.qweight.copy_(pack_codes(unpack_planes(self.qweight, 3), 3))
        self.stored_packing = PACKING

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, bits={self.bits}"
