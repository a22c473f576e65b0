"""Layer-wise Optimal Brain Surgeon (SparseGPT, Frantar & Alistarh 2023): prune and compensate.

For y = x·Wᵀ the loss ‖(W−Ŵ)Xᵀ‖² has Hessian H = 2XᵀX, shared by every output row. Columns
are processed left to right; removing weight w_q with inverse-Hessian diagonal d_q costs
w_q²/d_q² in the Cholesky form, and the remaining columns of the row absorb its error:
W[:, q:] -= (w_q/d_q)·U[q, q:] with U the upper Cholesky factor of H⁻¹. The work is done in
column blocks of `blocksize` with lazy updates of the columns to the right. The mask is chosen
per block (unstructured: the lowest saliencies of the block; N:M: per group of M columns; tile:
per tile, the columns with the lowest saliency summed over the tile's rows, an OBS group score
for removing one column from all rows of the block) from the weights as updated so far, so later
choices see earlier compensation.

Numerics: float32 on the working weight, damping λ = percdamp·mean(diag H), dead inputs (zero
diagonal) get H_ii = 1 and their weights zeroed; if the Cholesky factorization fails the
damping is raised tenfold, up to four times, then it is an error that names the layer.
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field

from ..errors import LlmpressError
from ..modules import CompressedLinear
from .base import Compressor, LayerStats, register_compressor
from .residual import ResidualOption
from .masks import PruningConfig, pruned_module, tile_mask


class SparseGPTConfig(ResidualOption, PruningConfig):
    method: str = "sparsegpt"
    blocksize: int = Field(default=128, ge=1, description="columns per lazy-update block")
    percdamp: float = Field(default=0.01, gt=0.0, lt=1.0, description="damping, fraction of mean diag(H)")


def inverse_hessian_factor(gram: torch.Tensor, percdamp: float, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U upper-triangular with UᵀU = (G + λI)⁻¹ in float32, and the dead-input mask."""
    h = gram.double().clone()
    if not torch.isfinite(h).all():
        raise LlmpressError(f"the Gram matrix of {name} contains NaN/Inf: calibration activations were not finite")
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    damp = percdamp * float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(5):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper.float(), dead
        damp *= 10.0
    raise LlmpressError(
        f"the Hessian of {name} is not positive definite even with damping {damp / 10:.3e}; "
        "recollect calibration statistics or raise percdamp"
    )


ColumnRule = Callable[[int, torch.Tensor, int], torch.Tensor]


def obs_sweep(w: torch.Tensor, u: torch.Tensor, blocksize: int, rule: ColumnRule) -> torch.Tensor:
    """The OBS/GPTQ column sweep: replace column j by `rule(j, block, j - block_start)` left to
    right and let the columns to its right absorb the error through U (upper Cholesky of H⁻¹).

    `block` is the current column block (rows × blocksize) as updated so far, so a rule can pick
    masks or quantization grids for several columns at once when it reaches their first one.
    Returns the processed weight (float32); lazy batched updates keep it O(rows·cols²/blocksize).
    """
    w = w.float().clone()
    cols = w.shape[1]
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = w[:, start:end].clone()
        u_block = u[start:end, start:end]
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = block[:, i].clone()
            new = rule(start + i, block, i)
            err = (column - new) / u_block[i, i]
            block[:, i:] -= err[:, None] * u_block[i, i:][None, :]
            block[:, i] = new
            errors[:, i] = err
        w[:, start:end] = block
        w[:, end:] -= errors @ u[start:end, end:]
    return w


def sparsegpt_prune(
    weight: torch.Tensor, gram: torch.Tensor, config: SparseGPTConfig, name: str = "layer"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(updated weight with zeros, keep-mask), both (out, in); the weight in float32."""
    rows, cols = weight.shape
    u, dead = inverse_hessian_factor(gram.to(weight.device), config.percdamp, name)
    nm = config.nm
    if nm is not None and cols % nm[1]:
        raise ValueError(f"N:M pruning needs in_features divisible by M={nm[1]}, got {cols}")
    if nm is not None and config.blocksize % nm[1]:
        raise ValueError(f"blocksize {config.blocksize} must be a multiple of M={nm[1]}")
    tile = config.pattern == "tile"
    if tile:
        config.check_tile_shape(rows, cols)
        if config.blocksize % config.tile_cols:
            raise ValueError(f"blocksize {config.blocksize} must be a multiple of tile_cols={config.tile_cols}")
    keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    diag = u.diagonal()

    def rule(j: int, block: torch.Tensor, i: int) -> torch.Tensor:
        start = j - i
        if tile and j % config.tile_cols == 0:  # tile: one column set per row block, by group saliency
            width = config.tile_cols
            saliency = block[:, i : i + width].square() / diag[j : j + width].square()[None, :]
            keep[:, j : j + width] = tile_mask(saliency, config.tile_rows, width, config.tile_keep)
        if nm is None and not tile and i == 0:  # unstructured: the block's lowest saliencies, across all rows
            saliency = block.square() / diag[start : start + block.shape[1]].square()[None, :]
            count = int(round(config.ratio * saliency.numel()))
            if count:
                block_keep = torch.ones_like(saliency, dtype=torch.bool)
                block_keep.view(-1)[saliency.flatten().topk(count, largest=False).indices] = False
                keep[:, start : start + block.shape[1]] = block_keep
        if nm is not None and j % nm[1] == 0:  # N:M: per group of M columns
            n, m = nm
            saliency = block[:, i : i + m].square() / diag[j : j + m].square()[None, :]
            drop = saliency.topk(m - n, dim=1, largest=False).indices
            keep[:, j : j + m].scatter_(1, drop, False)
        return torch.where(keep[:, j], block[:, i], torch.zeros_like(block[:, i]))

    w = weight.float().clone()
    w[:, dead] = 0.0
    pruned = obs_sweep(w, u, config.blocksize, rule)
    if not tile:  # a dead input's weights are zero; the tile format keeps its fixed column count
        keep &= ~dead[None, :].to(keep.device)
    return pruned, keep


@register_compressor
class SparseGPTCompressor(Compressor):
    method = "sparsegpt"
    config_class = SparseGPTConfig
    needs = ("gram",)
    level_field = "ratio"

    def compress(self, weight, bias, stats: LayerStats, config: SparseGPTConfig, base=None) -> CompressedLinear:
        pruned, keep = sparsegpt_prune(weight, stats["gram"], config, stats.name)
        return pruned_module(pruned.to(weight.dtype), keep, bias, config)
