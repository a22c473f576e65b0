"""Round-to-nearest group quantization with a per-group clipping search (no calibration data).

Each row is cut into groups of g consecutive columns; each group gets an asymmetric grid of
2^b levels, Ŵ = (q − zero)·scale with q, zero in [0, 2^b − 1]. Plain min-max grids waste levels
on a group's outliers; for each group we try shrinking its range by factors 1, 0.95, ..., and keep
the grid with the smallest squared error (the clipping search of AWQ/llama.cpp-style quantizers,
per group, data-free). Used for the token embeddings and the output head, where there is no
input Gram to weight the error by (the embedding table is read by lookup, not multiplied).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class GroupGrid(NamedTuple):
    codes: torch.Tensor  # (rows, groups, g) uint8 in [0, 2^bits − 1]
    scales: torch.Tensor  # (rows, groups) float32
    zeros: torch.Tensor  # (rows, groups) uint8

    def dequantize(self) -> torch.Tensor:
        """(rows, groups·g) float32 values the grid represents."""
        values = (self.codes.float() - self.zeros.float()[..., None]) * self.scales[..., None]
        return values.flatten(1)


def fit_grid(values: torch.Tensor, levels: int, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of the asymmetric grid of `levels` + 1 codes spanning each group's range
    (over the last dimension, widened to include 0, times `shrink`). GQSA fits its groups this way too."""
    lo = values.amin(dim=-1).clamp(max=0.0) * shrink
    hi = values.amax(dim=-1).clamp(min=0.0) * shrink
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    return scale, torch.round(-lo / scale).clamp(0, levels)


def _grid(groups: torch.Tensor, shrink: float, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale, zero = fit_grid(groups, levels, shrink)
    codes = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], 0, levels)
    return codes, scale, zero


def quantize_groups(
    weight: torch.Tensor, bits: int, group_size: int, shrink_steps: int = 10, chunk_rows: int = 4096
) -> GroupGrid:
    """Quantize `weight` (rows, cols) to `bits` per value in groups of `group_size` columns,
    choosing each group's range among `shrink_steps` shrink factors 1, 0.95, ... (1: min-max)."""
    rows, cols = weight.shape
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    if group_size < 2 or cols % group_size:
        raise ValueError(f"group_size {group_size} must be at least 2 and divide the {cols} columns")
    if not torch.isfinite(weight).all():
        raise ValueError("the weight has non-finite values (NaN or inf); check the model's weights")
    levels = 2**bits - 1
    codes = torch.empty(rows, cols // group_size, group_size, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(rows, cols // group_size, dtype=torch.float32, device=weight.device)
    zeros = torch.empty_like(scales, dtype=torch.uint8)
    for start in range(0, rows, chunk_rows):  # bounded temporaries for vocabularies of 100k+ rows
        groups = weight[start : start + chunk_rows].float().reshape(-1, cols // group_size, group_size)
        best = None
        for step in range(max(1, shrink_steps)):
            q, s, z = _grid(groups, 1.0 - 0.05 * step, levels)
            error = ((q - z[..., None]) * s[..., None] - groups).square().sum(-1)
            if best is None:
                best = [error, q, s, z]
                continue
            better = error < best[0]
            best[0] = torch.where(better, error, best[0])
            best[1] = torch.where(better[..., None], q, best[1])
            best[2] = torch.where(better, s, best[2])
            best[3] = torch.where(better, z, best[3])
        end = start + groups.shape[0]
        codes[start:end] = best[1].to(torch.uint8)
        scales[start:end] = best[2]
        zeros[start:end] = best[3].to(torch.uint8)
    return GroupGrid(codes, scales, zeros)
