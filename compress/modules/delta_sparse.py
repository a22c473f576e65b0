"""DeltaSparseLinear: unstructured sparse weights as rows of (value, 4-bit column advance) entries.

The row format of MACKO-SpMV, laid out for a decode kernel that gives each row to one thread:
each row lists its kept weights in column order; entry j carries the columns it advances past
the previous entry (0–15, packed two per byte; the first advances from column 0); a longer step
is bridged by zero-valued filler entries that advance 15 each. Rows come in slices of 32,
padded with zero-valued entries that advance 0 to the slice's longest row (a multiple of 16
entries), and are stored chunk-major (kernels/delta_matmul.py: a warp's 32 rows read 512
contiguous bytes a chunk). `slice_start` (slices + 1, int32) says where each slice begins and
`marks` (32·slices, marks, int32) where each row is (its column) every 256 entries, so split-K
programs can start mid-row.

Bytes = entries·(sizeof(value) + 1/2) + 4·(slices + 1) + 4·32·slices·marks: at 50% sparsity in
bf16 about 0.64 of dense (SparseLinear's bitmap: 0.5625), at 70% about 0.39 (0.36). More bytes
than the bitmap, but a decode kernel that does a fixed, small amount of work per stored entry
(eval/compile_kernels.py). Choose it with `sparse_format: delta` on an unstructured pruning stage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import LlmpressError
from ..kernels import dispatch
from ..kernels.delta_matmul import CHUNK, MARK_CHUNKS, MAX_ADVANCE, SLICE_ALIGN, SLICE_ROWS
from .base import CompressedLinear, register_format

LAYOUT = "slices32"  # recorded in the spec: the layout of the module docstring


def _place(row: torch.Tensor, k: torch.Tensor, slice_start: torch.Tensor) -> torch.Tensor:
    """Storage position of entry k of each row (chunk-major within the row's slice)."""
    lane = row % SLICE_ROWS
    return slice_start[row // SLICE_ROWS] + ((k // CHUNK) * SLICE_ROWS + lane) * CHUNK + k % CHUNK


def _stored_rows(codes: torch.Tensor, slice_start: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(row, k, storage position, code, column) of every stored entry, padding included, row by
    row; rows are their slice's length. `codes` (E,) unpacked, in storage order."""
    row_len = ((slice_start[1:] - slice_start[:-1]) // SLICE_ROWS).repeat_interleave(SLICE_ROWS)
    first = torch.cumsum(row_len, 0) - row_len
    row = torch.repeat_interleave(torch.arange(row_len.numel(), device=codes.device), row_len)
    k = torch.arange(row.numel(), device=codes.device) - first[row]
    position = _place(row, k, slice_start)
    code = codes[position].long()
    running = torch.cumsum(code, 0)
    col = running - torch.cat([running.new_zeros(1), running])[first[row]]  # the row's codes through each entry
    return row, k, position, code, col


def encode_rows(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values (E,), codes (E,) uint8, slice_start (S + 1,) int32, marks (32·S, marks) int32) of
    the kept weights."""
    rows, _ = mask.shape
    device = weight.device
    slices = (rows + SLICE_ROWS - 1) // SLICE_ROWS
    row_idx, col_idx = mask.nonzero(as_tuple=True)  # row-major: columns ascending within a row
    first = torch.ones_like(row_idx, dtype=torch.bool)
    first[1:] = row_idx[1:] != row_idx[:-1]
    previous = torch.where(first, torch.zeros_like(col_idx), torch.roll(col_idx, 1))
    advance = col_idx - previous
    fillers = ((advance - 1) // MAX_ADVANCE).clamp_min(0)
    span = fillers + 1  # entries each kept weight takes: its fillers, then itself
    length = torch.zeros(slices * SLICE_ROWS, dtype=torch.long, device=device).index_add_(0, row_idx, span)
    slice_len = length.view(slices, SLICE_ROWS).amax(1)
    slice_len = (slice_len + SLICE_ALIGN - 1) // SLICE_ALIGN * SLICE_ALIGN
    slice_start = torch.zeros(slices + 1, dtype=torch.long, device=device)
    slice_start[1:] = torch.cumsum(slice_len * SLICE_ROWS, 0)
    total = int(slice_start[-1])
    values = torch.zeros(total, dtype=weight.dtype, device=device)
    codes = torch.zeros(total, dtype=torch.uint8, device=device)
    longest = int(slice_len.max()) if slices else 0
    marks_per_row = max(1, -(-longest // (MARK_CHUNKS * CHUNK)))
    marks = torch.zeros(slices * SLICE_ROWS, marks_per_row, dtype=torch.long, device=device)
    if row_idx.numel():
        span_end = torch.cumsum(span, 0)
        before_row = torch.cumsum(length, 0) - length  # unpadded entries of the rows above
        entry_owner = torch.repeat_interleave(torch.arange(row_idx.numel(), device=device), span)
        within = torch.arange(entry_owner.numel(), device=device) - torch.repeat_interleave(span_end - span, span)
        row = row_idx[entry_owner]
        k = span_end[entry_owner] - span[entry_owner] - before_row[row] + within  # entry index in the row
        is_kept = within == fillers[entry_owner]
        code = torch.where(is_kept, advance[entry_owner] - MAX_ADVANCE * fillers[entry_owner], MAX_ADVANCE)
        position = _place(row, k, slice_start)
        codes[position] = code.to(torch.uint8)
        values[position[is_kept]] = weight[row_idx, col_idx]
        # each row's column before its entry 256·m; marks past the slice's end: the row's last column
        row, k, _, code, col = _stored_rows(codes, slice_start)
        ends = torch.zeros(slices * SLICE_ROWS, dtype=torch.long, device=device).scatter_reduce_(0, row, col, "amax")
        marks[:] = ends[:, None]  # columns never decrease along a row: the largest is the last
        boundary = k % (MARK_CHUNKS * CHUNK) == 0
        marks[row[boundary], k[boundary] // (MARK_CHUNKS * CHUNK)] = col[boundary] - code[boundary]
    return values, codes, slice_start.to(torch.int32), marks.to(torch.int32)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(E,) codes < 16, E even -> (E/2,) uint8, entry 2i in the low nibble, 2i+1 in the high one."""
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=1).flatten()


@register_format
class DeltaSparseLinear(CompressedLinear):
    format = "sparse_delta"

    def __init__(self, in_features, out_features, entries, nnz, has_bias, dtype=torch.float32, device=None, marks: int = 1):
        super().__init__(in_features, out_features, has_bias, dtype, device)
        slices = (out_features + SLICE_ROWS - 1) // SLICE_ROWS
        if entries % (SLICE_ROWS * SLICE_ALIGN):
            raise ValueError(f"{entries} entries: slices of {SLICE_ROWS} rows are padded to multiples of {SLICE_ALIGN} entries a row")
        self.nnz = nnz  # kept weights (entries also count fillers and padding)
        self.values = nn.Parameter(torch.empty(entries, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("gaps", torch.empty(entries // 2, dtype=torch.uint8, device=device))
        self.register_buffer("slice_start", torch.empty(slices + 1, dtype=torch.int32, device=device))
        self.register_buffer("marks", torch.empty(slices * SLICE_ROWS, marks, dtype=torch.int32, device=device))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None) -> "DeltaSparseLinear":
        out_features, in_features = weight.shape
        values, codes, slice_start, marks = encode_rows(weight, mask)
        module = cls(
            in_features, out_features, values.numel(), int(mask.sum()), bias is not None, weight.dtype, weight.device, marks.shape[1]
        )  # fmt: skip
        module.values.data.copy_(values)
        module.gaps.copy_(pack_nibbles(codes))
        module.slice_start.copy_(slice_start)
        module.marks.copy_(marks)
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def columns(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(storage position, row, column) of every entry of the layer's rows, in row order
        (fillers and padding included: they hold zeros)."""
        row, _, position, _, col = _stored_rows(unpack_nibbles(self.gaps), self.slice_start.long())
        keep = row < self.out_features  # the last slice's missing rows
        return position[keep], row[keep], col[keep]

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        position, row, col = self.columns()
        dense.index_put_((row, col), self.values[position], accumulate=True)  # fillers and pads add zeros
        return dense

    def mask(self) -> torch.Tensor:
        """The kept weights (a kept weight that is exactly zero reads as pruned, like a filler)."""
        keep = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.values.device)
        position, row, col = self.columns()
        real = self.values[position] != 0
        keep[row[real], col[real]] = True
        return keep

    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch(self.format, self, x)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "entries": self.values.numel(), "nnz": self.nnz, "marks": self.marks.shape[1], "layout": LAYOUT}

    @classmethod
    def from_spec(cls, spec, dtype, device=None):
        if spec.get("layout") != LAYOUT:
            raise LlmpressError(
                f"a sparse_delta layer of this checkpoint stores rows one after another ({spec.get('layout', 'row by row')!r}), "
                f"the layout of an earlier llmpress; this install reads {LAYOUT!r} (32-row slices): compress the model again"
            )
        return cls(
            spec["in_features"], spec["out_features"], spec["entries"], spec["nnz"], spec["bias"], dtype, device, spec["marks"]
        )  # fmt: skip

    def extra_repr(self) -> str:
        fill = self.values.numel() / max(1, self.nnz) - 1
        return super().extra_repr() + f", sparsity={self.sparsity():.3f}, entries={self.values.numel()} (+{fill:.1%} fillers and padding)"
