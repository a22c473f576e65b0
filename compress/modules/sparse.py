"""SparseLinear: unstructured or N:M sparse weights as nonzero values plus a 1-bit-per-weight mask.

Storage: `values` holds the kept weights in row-major order, `bitmap` packs the mask (8 input
columns per byte, little-endian bit order). Bytes = nnz·sizeof(dtype) + out·ceil(in/8), so
sparsity s saves less than s of the bytes: at 50% in fp16 the module is 0.5625 of dense.
The PyTorch path decodes to dense per call (a reference, not a fast path); the Triton kernels
use their own tiled layouts built from this one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import dispatch
from .base import CompressedLinear, register_format

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool -> (rows, ceil(cols/8)) uint8, bit j of byte k = column 8k+j."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, (cols + 7) // 8 * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask.to(torch.uint8)
    weights = _BIT_WEIGHTS.to(mask.device)
    return (padded.view(rows, -1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_mask(bitmap: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_mask."""
    shifts = torch.arange(8, device=bitmap.device, dtype=torch.uint8)
    bits = (bitmap.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmap.shape[0], -1)[:, :cols].bool()


@register_format
class SparseLinear(CompressedLinear):
    format = "sparse_bitmap"

    def __init__(self, in_features, out_features, nnz, has_bias, dtype=torch.float32, device=None, pattern=None):
        super().__init__(in_features, out_features, has_bias, dtype, device)
        self.nnz = nnz
        self.pattern = pattern  # "unstructured" or "N:M", informational
        self.values = nn.Parameter(torch.empty(nnz, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer(
            "bitmap", torch.empty(out_features, (in_features + 7) // 8, dtype=torch.uint8, device=device)
        )

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, pattern=None):
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, int(mask.sum()), bias is not None, weight.dtype, weight.device, pattern)
        module.values.data.copy_(weight[mask])
        module.bitmap.copy_(pack_mask(mask))
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def mask(self) -> torch.Tensor:
        return unpack_mask(self.bitmap, self.in_features)

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        dense[self.mask()] = self.values
        return dense

    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch("sparse_bitmap", self, x)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "nnz": self.nnz, "pattern": self.pattern}

    @classmethod
    def from_spec(cls, spec, dtype, device=None):
        return cls(
            spec["in_features"], spec["out_features"], spec["nnz"], spec["bias"], dtype, device, spec.get("pattern")
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sparsity={self.sparsity():.3f}, pattern={self.pattern}"
