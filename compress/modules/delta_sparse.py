"""DeltaSparseLinear: unstructured sparse weights as rows of (value, 4-bit column gap) entries.

The row format of MACKO-SpMV, made for decode kernels that work per stored entry: each row lists
its kept weights in column order; entry j carries the number of columns skipped since the
previous entry (0–15, packed two per byte); a gap of 16 or more is bridged by zero-valued filler
entries that skip 16 columns each. Rows are padded to a multiple of ROW_ALIGN entries with
zero-valued entries (aligned wide loads, one mask per row and step in the kernel), and
`row_start` (out + 1 int32) says where each row begins.

Bytes = entries·(sizeof(value) + 1/2) + 4·(out + 1): at 50% sparsity in bf16 about 0.63 of dense
(SparseLinear's bitmap: 0.5625), at 70% about 0.38 (0.36). More bytes than the bitmap, but a
decode kernel that does a fixed amount of work per stored entry (eval/compile_kernels.py): the
bitmap kernel's per-column decode issues 5x the instructions per weight byte. Choose it with
`sparse_format: delta` on an unstructured pruning stage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import dispatch
from ..kernels.delta_matmul import ROW_ALIGN
from .base import CompressedLinear, register_format

MAX_GAP = 15  # a 4-bit gap code; longer gaps take filler entries that skip MAX_GAP + 1 columns


def encode_rows(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values (E,), gap codes (E,) uint8, row_start (out + 1,) int32) of the kept weights, rows
    padded to multiples of ROW_ALIGN entries."""
    rows, cols = mask.shape
    device = weight.device
    row_idx, col_idx = mask.nonzero(as_tuple=True)  # row-major: columns ascending within a row
    first = torch.ones_like(row_idx, dtype=torch.bool)
    first[1:] = row_idx[1:] != row_idx[:-1]
    previous = torch.where(first, torch.full_like(col_idx, -1), torch.roll(col_idx, 1))
    gap = col_idx - previous - 1
    fillers = gap // (MAX_GAP + 1)
    span = fillers + 1  # entries each kept weight takes: its fillers, then itself
    # unpadded entries per row, then padded row starts
    length = torch.zeros(rows, dtype=torch.long, device=device).index_add_(0, row_idx, span)
    padded = (length + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN
    row_start = torch.zeros(rows + 1, dtype=torch.long, device=device)
    row_start[1:] = torch.cumsum(padded, 0)
    total = int(row_start[-1])
    values = torch.zeros(total, dtype=weight.dtype, device=device)
    codes = torch.zeros(total, dtype=torch.uint8, device=device)
    if row_idx.numel():
        # position of each kept weight's block within its row
        span_end = torch.cumsum(span, 0)
        before_row = torch.cumsum(length, 0) - length  # unpadded entries of the rows above
        block_start = row_start[row_idx] + (span_end - span - before_row[row_idx])
        entry_owner = torch.repeat_interleave(torch.arange(row_idx.numel(), device=device), span)
        within = torch.arange(entry_owner.numel(), device=device) - torch.repeat_interleave(span_end - span, span)
        is_kept = within == fillers[entry_owner]
        position = block_start[entry_owner] + within
        codes[position] = torch.where(is_kept, gap[entry_owner] % (MAX_GAP + 1), MAX_GAP).to(torch.uint8)
        values[position[is_kept]] = weight[row_idx, col_idx]
    return values, codes, row_start.to(torch.int32)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(E,) codes < 16, E even -> (E/2,) uint8, entry 2i in the low nibble, 2i+1 in the high one."""
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=1).flatten()


@register_format
class DeltaSparseLinear(CompressedLinear):
    format = "sparse_delta"

    def __init__(self, in_features, out_features, entries, nnz, has_bias, dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, has_bias, dtype, device)
        if entries % ROW_ALIGN:
            raise ValueError(f"{entries} entries: rows are padded to multiples of {ROW_ALIGN}")
        self.nnz = nnz  # kept weights (entries also count fillers and padding)
        self.values = nn.Parameter(torch.empty(entries, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("gaps", torch.empty(entries // 2, dtype=torch.uint8, device=device))
        self.register_buffer("row_start", torch.empty(out_features + 1, dtype=torch.int32, device=device))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None) -> "DeltaSparseLinear":
        out_features, in_features = weight.shape
        values, codes, row_start = encode_rows(weight, mask)
        module = cls(in_features, out_features, values.numel(), int(mask.sum()), bias is not None, weight.dtype, weight.device)
        module.values.data.copy_(values)
        module.gaps.copy_(pack_nibbles(codes))
        module.row_start.copy_(row_start)
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of every entry; padding past the last column gets columns >= in_features."""
        codes = unpack_nibbles(self.gaps).long() + 1
        starts = self.row_start.long()
        row = torch.repeat_interleave(torch.arange(self.out_features, device=codes.device), starts[1:] - starts[:-1])
        running = torch.cumsum(codes, 0)
        before_row = torch.cat([running.new_zeros(1), running])[starts[:-1]]  # codes summed before each row
        return row, running - before_row[row] - 1

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        row, col = self.columns()
        inside = col < self.in_features
        dense.index_put_((row[inside], col[inside]), self.values[inside], accumulate=True)  # fillers and pads add zeros
        return dense

    def mask(self) -> torch.Tensor:
        """The kept weights (a kept weight that is exactly zero reads as pruned, like a filler)."""
        keep = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.values.device)
        row, col = self.columns()
        real = (col < self.in_features) & (self.values != 0)
        keep[row[real], col[real]] = True
        return keep

    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch(self.format, self, x)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "entries": self.values.numel(), "nnz": self.nnz}

    @classmethod
    def from_spec(cls, spec, dtype, device=None):
        return cls(spec["in_features"], spec["out_features"], spec["entries"], spec["nnz"], spec["bias"], dtype, device)

    def extra_repr(self) -> str:
        fill = self.values.numel() / max(1, self.nnz) - 1
        return super().extra_repr() + f", sparsity={self.sparsity():.3f}, entries={self.values.numel()} (+{fill:.1%} fillers and padding)"
