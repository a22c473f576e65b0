"""Layer-wise Optimal Brain Surgeon (SparseGPT, Frantar & Alistarh 2023): prune and compensate.

For y = x·Wᵀ the loss ‖(W−Ŵ)Xᵀ‖² has Hessian H = 2XᵀX, shared by every output row. Columns
are processed left to right; removing weight w_q with inverse-Hessian diagonal d_q costs
w_q²/d_q² in the Cholesky form, and the remaining columns of the row absorb its error:
W[:, q:] -= (w_q/d_q)·U[q, q:] with U the upper Cholesky factor of H⁻¹. The work is done in
column blocks of `blocksize` with lazy updates of the columns to the right. The mask is chosen
per block (unstructured: the lowest saliencies of the block; N:M: per group of M columns)
from the weights as updated so far, so later choices see earlier compensation.

Numerics: float32 on the working weight, damping λ = percdamp·mean(diag H), dead inputs (zero
diagonal) get H_ii = 1 and their weights zeroed; if the Cholesky factorization fails the
damping is raised tenfold, up to four times, then it is an error that names the layer.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..errors import LlmpressError
from ..modules import SparseLinear
from .base import Compressor, LayerStats, register_compressor
from .masks import PruningConfig


class SparseGPTConfig(PruningConfig):
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


def sparsegpt_prune(
    weight: torch.Tensor, gram: torch.Tensor, config: SparseGPTConfig, name: str = "layer"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(updated weight with zeros, keep-mask), both (out, in); the weight in float32."""
    w = weight.float().clone()
    rows, cols = w.shape
    u, dead = inverse_hessian_factor(gram.to(w.device), config.percdamp, name)
    w[:, dead] = 0.0
    nm = config.nm
    if nm is not None and cols % nm[1]:
        raise ValueError(f"N:M pruning needs in_features divisible by M={nm[1]}, got {cols}")
    if nm is not None and config.blocksize % nm[1]:
        raise ValueError(f"blocksize {config.blocksize} must be a multiple of M={nm[1]}")
    keep = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, cols, config.blocksize):
        end = min(start + config.blocksize, cols)
        block = w[:, start:end].clone()
        u_block = u[start:end, start:end]
        diag = u_block.diagonal()
        errors = torch.zeros_like(block)
        block_keep = torch.ones_like(block, dtype=torch.bool)
        if nm is None:  # unstructured: the block's lowest saliencies, across all rows
            saliency = block.square() / diag.square()[None, :]
            count = int(round(config.ratio * saliency.numel()))
            if count:
                block_keep.view(-1)[saliency.flatten().topk(count, largest=False).indices] = False
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                saliency = block[:, i : i + m].square() / diag[i : i + m].square()[None, :]
                drop = saliency.topk(m - n, dim=1, largest=False).indices
                block_keep[:, i : i + m].scatter_(1, drop, False)
            column = block[:, i]
            kept = torch.where(block_keep[:, i], column, torch.zeros_like(column))
            err = (column - kept) / diag[i]
            block[:, i:] -= err[:, None] * u_block[i, i:][None, :]
            block[:, i] = kept
            errors[:, i] = err
        w[:, start:end] = block
        keep[:, start:end] = block_keep
        w[:, end:] -= errors @ u[start:end, end:]
    keep &= ~dead[None, :].to(keep.device)
    return w, keep


@register_compressor
class SparseGPTCompressor(Compressor):
    method = "sparsegpt"
    config_class = SparseGPTConfig
    needs = ("gram",)
    level_field = "ratio"

    def compress(self, weight, bias, stats: LayerStats, config: SparseGPTConfig, base=None) -> SparseLinear:
        pruned, keep = sparsegpt_prune(weight, stats["gram"], config)
        return SparseLinear.from_dense(pruned.to(weight.dtype), keep, bias, pattern=config.pattern)
