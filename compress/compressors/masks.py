"""What every pruning method shares: the ratio/N:M config and turning scores into a keep-mask.

Methods differ only in their scores (|w|, Wanda's |w|·‖x_j‖, OBS saliency) and in whether
they update the kept weights (SparseGPT); the mask shapes are the same: unstructured over the
whole layer or per output row, or N:M (the N highest of every M consecutive inputs of a row).
"""

from __future__ import annotations

import re

import torch
from pydantic import Field, field_validator, model_validator

from .base import StageConfig


class PruningConfig(StageConfig):
    ratio: float | None = Field(default=None, gt=0.0, lt=1.0, description="fraction of weights removed")
    pattern: str = Field(default="unstructured", description="'unstructured' or 'N:M' such as '2:4'")

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        if value != "unstructured" and not re.fullmatch(r"\d+:\d+", value):
            raise ValueError(f"pattern must be 'unstructured' or 'N:M' like '2:4', got {value!r}")
        if value != "unstructured":
            n, m = map(int, value.split(":"))
            if not 0 < n < m:
                raise ValueError(f"N:M pattern needs 0 < N < M, got {value!r}")
        return value

    @model_validator(mode="after")
    def _ratio_matches_pattern(self):
        if self.pattern == "unstructured" and self.ratio is None:
            raise ValueError("unstructured pruning needs 'ratio' (fraction of weights removed, in (0, 1))")
        if self.pattern != "unstructured" and self.ratio is not None:
            n, m = map(int, self.pattern.split(":"))
            if abs(self.ratio - (1 - n / m)) > 1e-9:
                raise ValueError(f"pattern {self.pattern} removes {1 - n / m:g} of the weights; drop 'ratio'")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern, None for unstructured."""
        if self.pattern == "unstructured":
            return None
        n, m = map(int, self.pattern.split(":"))
        return n, m


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


def pruning_mask(scores: torch.Tensor, config: PruningConfig, per_row: bool = False) -> torch.Tensor:
    """The keep-mask a pruning config asks for, from scores (higher = more important)."""
    if config.nm is not None:
        return nm_mask(scores, *config.nm)
    return row_mask(scores, config.ratio) if per_row else unstructured_mask(scores, config.ratio)
