"""What every pruning method shares: the ratio/N:M config and turning scores into a keep-mask.

Methods differ only in their scores (|w|, Wanda's |w|·‖x_j‖, OBS saliency) and in whether
they update the kept weights (SparseGPT); the mask shapes are the same: unstructured over the
whole layer or per output row, N:M (the N highest of every M consecutive inputs of a row), or
tile-structured: in every tile of `tile_rows` output rows × `tile_cols` input columns, all rows
keep the same columns (what the tile-sparse kernel reads as a compact value tile plus gathered
activation rows, with no per-element decoding).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from ..modules import DeltaSparseLinear, SparseLinear, TileSparseLinear
from .base import StageConfig

RATIO_PATTERNS = ("unstructured", "tile")  # patterns whose sparsity is set by `ratio`


class PruningConfig(StageConfig):
    ratio: float | None = Field(default=None, gt=0.0, lt=1.0, description="fraction of weights removed")
    pattern: str = Field(default="unstructured", description="'unstructured', 'tile', or 'N:M' such as '2:4'")
    tile_rows: int = Field(default=64, ge=1, description="tile pattern: output rows that share kept columns")
    tile_cols: int = Field(default=64, ge=8, le=256, description="tile pattern: input columns per tile")
    sparse_format: Literal["bitmap", "delta"] = Field(
        default="bitmap",
        description="storage of an unstructured or N:M mask: 'bitmap' (kept values + 1 bit per weight, fewest bytes) "
        "or 'delta' (kept values + a 4-bit column gap each, rows of entries: more bytes, a decode kernel that works "
        "per kept weight; modules/delta_sparse.py)",
    )

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        if value not in RATIO_PATTERNS and not re.fullmatch(r"\d+:\d+", value):
            raise ValueError(f"pattern must be 'unstructured', 'tile' or 'N:M' like '2:4', got {value!r}")
        if value not in RATIO_PATTERNS:
            n, m = map(int, value.split(":"))
            if not 0 < n < m:
                raise ValueError(f"N:M pattern needs 0 < N < M, got {value!r}")
        return value

    @model_validator(mode="after")
    def _ratio_matches_pattern(self):
        if self.pattern in RATIO_PATTERNS and self.ratio is None:
            raise ValueError(f"{self.pattern} pruning needs 'ratio' (fraction of weights removed, in (0, 1))")
        if self.pattern == "tile" and self.tile_keep < 1:
            raise ValueError(
                f"ratio {self.ratio} keeps no column of a {self.tile_cols}-column tile; lower the ratio or widen tile_cols"
            )
        if self.pattern == "tile" and self.sparse_format != "bitmap":
            raise ValueError("the tile pattern has its own storage; drop 'sparse_format'")
        if self.nm is not None and self.ratio is not None:
            n, m = map(int, self.pattern.split(":"))
            if abs(self.ratio - (1 - n / m)) > 1e-9:
                raise ValueError(f"pattern {self.pattern} removes {1 - n / m:g} of the weights; drop 'ratio'")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern, None for unstructured."""
        if self.pattern in RATIO_PATTERNS:
            return None
        n, m = map(int, self.pattern.split(":"))
        return n, m

    @property
    def tile_keep(self) -> int:
        """Tile pattern: columns each row block keeps per tile."""
        return int(round((1 - self.ratio) * self.tile_cols))

    def check_tile_shape(self, rows: int, cols: int) -> None:
        if rows % self.tile_rows or cols % self.tile_cols:
            raise ValueError(
                f"a {rows}x{cols} weight does not split into {self.tile_rows}x{self.tile_cols} tiles; "
                "set tile_rows/tile_cols to divisors of the layer's out/in features"
            )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in each group of m consecutive columns of every row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pruning needs in_features divisible by M={m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(rows, cols)


def unstructured_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep all but the round(ratio·numel) lowest scores (ties broken by position)."""
    num_pruned = int(round(ratio * scores.numel()))
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if num_pruned:
        mask[scores.flatten().topk(num_pruned, largest=False).indices] = False
    return mask.view_as(scores)


def row_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per output row, keep all but the round(ratio·cols) lowest scores (Wanda's comparison group)."""
    rows, cols = scores.shape
    num_pruned = int(round(ratio * cols))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if num_pruned:
        mask.scatter_(1, scores.topk(num_pruned, dim=1, largest=False).indices, False)
    return mask


def tile_mask(scores: torch.Tensor, tile_rows: int, tile_cols: int, keep: int) -> torch.Tensor:
    """In every (tile_rows × tile_cols) tile keep the `keep` columns with the highest summed score
    over the tile's rows: one column set per row block and K tile."""
    rows, cols = scores.shape
    blocks = scores.reshape(rows // tile_rows, tile_rows, cols // tile_cols, tile_cols).sum(1)
    chosen = blocks.topk(keep, dim=-1).indices
    block_keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, chosen, True)
    return block_keep[:, None].expand(-1, tile_rows, -1, -1).reshape(rows, cols)


def pruned_module(weight: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None, config: PruningConfig):
    """The storage format of a pruned weight: the compact tile format for the tile pattern, else
    the bitmap or, with `sparse_format: delta`, rows of (value, column gap) entries."""
    if config.pattern == "tile":
        return TileSparseLinear.from_dense(weight, keep, bias, config.tile_rows, config.tile_cols)
    if config.sparse_format == "delta":
        return DeltaSparseLinear.from_dense(weight * keep, keep, bias)
    return SparseLinear.from_dense(weight, keep, bias, pattern=config.pattern)


def pruning_mask(scores: torch.Tensor, config: PruningConfig, per_row: bool = False) -> torch.Tensor:
    """The keep-mask a pruning config asks for, from scores (higher = more important)."""
    if config.pattern == "tile":
        config.check_tile_shape(*scores.shape)
        return tile_mask(scores, config.tile_rows, config.tile_cols, config.tile_keep)
    if config.nm is not None:
        return nm_mask(scores, *config.nm)
    return row_mask(scores, config.ratio) if per_row else unstructured_mask(scores, config.ratio)
