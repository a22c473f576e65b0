"""TileSparseLinear: tile-structured sparse weights, the format the tile-sparse kernel reads.

The weight is cut into tiles of `tile_rows` output rows × `tile_cols` input columns; in each tile
all rows keep the same `keep` columns. Stored per tile: the kept columns' offsets inside the tile
(`col_index`, uint8, keep per tile) and the compact (tile_rows × keep) values, so that a kernel
loads one dense value tile and gathers `keep` activation columns, with no per-element decoding.
Bytes = values + (out/tile_rows)·(in/tile_cols)·keep index bytes: 1/tile_rows of a byte per kept
weight (about 0.016 at 64 rows), against 1/8 byte per weight for a bitmap.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import dispatch
from .base import CompressedLinear, register_format


@register_format
class TileSparseLinear(CompressedLinear):
    format = "tile_sparse"

    def __init__(self, in_features, out_features, tile_rows, tile_cols, keep, has_bias, dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, has_bias, dtype, device)
        if out_features % tile_rows or in_features % tile_cols:
            raise ValueError(f"{out_features}x{in_features} does not split into {tile_rows}x{tile_cols} tiles")
        if not 0 < keep <= tile_cols <= 256:
            raise ValueError(f"need 0 < keep ({keep}) <= tile_cols ({tile_cols}) <= 256")
        self.tile_rows, self.tile_cols, self.keep = tile_rows, tile_cols, keep
        row_blocks, col_tiles = out_features // tile_rows, in_features // tile_cols
        self.values = nn.Parameter(
            torch.empty(row_blocks, col_tiles, tile_rows, keep, dtype=dtype, device=device), requires_grad=False
        )
        self.register_buffer("col_index", torch.empty(row_blocks, col_tiles, keep, dtype=torch.uint8, device=device))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, tile_rows: int, tile_cols: int):
        """From a weight and a keep-mask whose rows agree inside every tile (tile_mask's output)."""
        rows, cols = weight.shape
        rb, ct = rows // tile_rows, cols // tile_cols
        tiles = mask.reshape(rb, tile_rows, ct, tile_cols)
        if not (tiles == tiles[:, :1]).all():
            raise ValueError("the mask is not tile-structured: rows of a tile keep different columns")
        keep_counts = tiles[:, 0].sum(-1)
        keep = int(keep_counts.max())
        if not (keep_counts == keep).all():
            raise ValueError("every tile must keep the same number of columns")
        module = cls(cols, rows, tile_rows, tile_cols, keep, bias is not None, weight.dtype, weight.device)
        # kept column offsets in increasing order: argsort of (not kept, position) puts kept first
        order = (~tiles[:, 0]).to(torch.int16) * tile_cols + torch.arange(tile_cols, device=mask.device)
        index = order.argsort(-1)[..., :keep]  # (rb, ct, keep)
        module.col_index.copy_(index.to(torch.uint8))
        w = weight.reshape(rb, tile_rows, ct, tile_cols).permute(0, 2, 1, 3)  # (rb, ct, rows, cols)
        module.values.data.copy_(torch.gather(w, 3, index[:, :, None, :].expand(-1, -1, tile_rows, -1)))
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def to_dense(self) -> torch.Tensor:
        rb, ct = self.values.shape[:2]
        dense = torch.zeros(rb, ct, self.tile_rows, self.tile_cols, dtype=self.values.dtype, device=self.values.device)
        index = self.col_index.long()[:, :, None, :].expand(-1, -1, self.tile_rows, -1)
        dense.scatter_(3, index, self.values)
        return dense.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)

    def sparsity(self) -> float:
        return 1.0 - self.keep / self.tile_cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch("tile_sparse", self, x)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "tile_rows": self.tile_rows, "tile_cols": self.tile_cols, "keep": self.keep}

    @classmethod
    def from_spec(cls, spec, dtype, device=None):
        return cls(
            spec["in_features"], spec["out_features"], spec["tile_rows"], spec["tile_cols"], spec["keep"], spec["bias"],
            dtype, device,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tile={self.tile_rows}x{self.tile_cols}, keep={self.keep}, sparsity={self.sparsity():.3f}"
