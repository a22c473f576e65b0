"""M-FAC OBS pruning (Frantar, Kurtic & Alistarh 2021): the empirical Fisher from m gradients.

F = λI + (1/m)·Σ_i g_i g_iᵀ over blocks of B consecutive weights (block-diagonal). M-FAC's
recursion for F⁻¹ applies Sherman-Morrison once per gradient; its fixed point is the Woodbury
form used here, batched over all blocks:

    F⁻¹ = (1/λ)·(I − Gᵀ K⁻¹ G),   K = mλ·I_m + G·Gᵀ   (per block: G is m × B)

so with K = LLᵀ and Z = L⁻¹G precomputed (O(d·m²) in all), GᵀK⁻¹G = ZᵀZ: an
inverse-Hessian-vector product is (v − Zᵀ(Z·v))/λ in O(d·m) and a diagonal element
[F⁻¹]_qq = (1 − ‖z_q‖²)/λ costs O(m).

Pruning follows OBS: a weight's saliency is w_q²/(2[F⁻¹]_qq); the weights to remove at a step
are the lowest-saliency ones, and the rest absorb them with one IHVP,
δw = −F⁻¹·(w_Q / [F⁻¹]_QQ) (the sum of the single-weight OBS updates). Several steps approach
the target sparsity gradually so that later choices see earlier updates. M-FAC's reference
recomputes gradients and the inverse over the remaining weights at each step; here both come
from the dense model (one backward walk) and the inverse is built once, so a step's update may
move weights pruned earlier, which are set back to zero: cheaper, and an approximation.

The m per-sequence gradients of every weight are too many to hold for a whole model: the
pipeline compresses each block during one backward walk (`pipeline.compress_from_gradients`).
Calibration `num_samples` is m.

Memory: the walk holds one block's gradient windows, m·d_block fp32 values, and pruning a layer
adds Z = L⁻¹G in fp64, m·d_layer·8 bytes. SmolLM2-135M (3.5 M weights per block, 0.9 M in its
largest layer) with m = 128: 1.7 GiB + 0.8 GiB. A Llama-3-8B block holds 0.22 G weights, its MLP
layers 58.7 M each: at m = 128 that is 104 GiB of gradients plus 56 GiB for one MLP layer, so an
8B model needs a large host, a smaller m (m = 16: 13 + 7 GiB), or gradients streamed per layer.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from ..errors import LlmpressError
from ..modules import SparseLinear
from .base import Compressor, LayerStats, register_compressor
from .masks import PruningConfig, nm_mask, unstructured_mask


class MFACConfig(PruningConfig):
    method: str = "mfac"
    block_size: int = Field(default=128, ge=1, description="weights per diagonal block of the Fisher")
    # M-FAC's 1e-5 is absolute, for CNN gradients; relative to LLM per-sequence gradients it is
    # far too small: with m near block_size the sample Fisher has near-zero eigenvalues and the
    # OBS update explodes (SmolLM2, m = 128: perplexity 4.4e7 at 50%). 0.1 measured safe and best.
    damp: float = Field(default=0.1, gt=0.0, description="λ relative to the mean squared gradient")
    steps: int = Field(default=4, ge=1, le=64, description="pruning steps towards the target sparsity")


class BlockFisherInverse:
    """The inverse of the block-diagonal empirical Fisher of m gradients over d weights.

    Only Z = L⁻¹G is kept (K = LLᵀ), since Gᵀ K⁻¹ G = ZᵀZ: one triangular solve instead of
    K⁻¹G's two, and m·d values instead of G and K⁻¹G's 2·m·d.
    """

    CHUNK = 128  # blocks per batched factorization (small chunks stay in cache)

    def __init__(self, grads: torch.Tensor, block_size: int, damp: float):
        m, d = grads.shape
        if d % block_size:
            raise ValueError(f"block_size {block_size} must divide the number of weights {d}")
        blocks = d // block_size
        g32 = grads.reshape(m, blocks, block_size)
        mean_square = float(torch.linalg.vector_norm(grads)) ** 2 / grads.numel()
        if not math.isfinite(mean_square):
            raise LlmpressError("gradients contain NaN/Inf: the calibration loss overflowed; try float32")
        self.lam = damp * mean_square or damp
        self.z = torch.empty(blocks, m, block_size, dtype=torch.float64, device=grads.device)
        damping = torch.eye(m, dtype=torch.float64, device=grads.device).mul_(m * self.lam)
        for start in range(0, blocks, self.CHUNK):  # fp64 G a chunk at a time: memory m·d·8 for Z only
            g = g32[:, start : start + self.CHUNK].double().transpose(0, 1).contiguous()  # (chunk, m, B)
            k = torch.baddbmm(damping.expand(len(g), m, m), g, g.transpose(1, 2))  # positive definite
            torch.linalg.solve_triangular(torch.linalg.cholesky(k), g, upper=False, out=self.z[start : start + self.CHUNK])

    def diag(self) -> torch.Tensor:
        """[F⁻¹]_qq = (1 − ‖z_q‖²)/λ for every weight, flattened (d,)."""
        return ((1.0 - self.z.square().sum(1)) / self.lam).reshape(-1)

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        """F⁻¹·v = (v − Zᵀ(Z·v))/λ for a flattened (d,) vector."""
        vb = v.double().reshape(self.z.shape[0], -1)  # (blocks, B)
        zv = torch.einsum("kmb,kb->km", self.z, vb)
        return ((vb - torch.einsum("kmb,km->kb", self.z, zv)) / self.lam).reshape(-1)


def mfac_prune(
    weight: torch.Tensor, grads: torch.Tensor, config: MFACConfig, inverse: BlockFisherInverse | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(updated weight with zeros, keep-mask) after `config.steps` OBS steps with the M-FAC inverse
    (`inverse`, when given, must be that of `grads` with the config's block size and damping)."""
    rows, cols = weight.shape
    if grads.shape[1] != weight.numel():
        raise ValueError(f"gradients have {grads.shape[1]} entries per sample, the weight has {weight.numel()}")
    if config.pattern == "tile":
        raise ValueError("mfac does not choose tile-structured masks; use sparsegpt, wanda or magnitude for pattern 'tile'")
    if inverse is None:
        inverse = BlockFisherInverse(grads, config.block_size, config.damp)
    diag = inverse.diag().clamp_min(1e-30)
    w = weight.double().reshape(-1).clone()
    keep = torch.ones_like(w, dtype=torch.bool)
    for step in range(1, config.steps + 1):
        saliency = (w.square() / (2 * diag)).reshape(rows, cols)
        saliency[~keep.reshape(rows, cols)] = -1.0  # already pruned: pruned first again
        if config.nm is not None:  # N:M: remove a growing number per group of M, reaching M-N at the end
            n, m = config.nm
            pruned_per_group = round((m - n) * step / config.steps)
            new_keep = nm_mask(saliency, m - pruned_per_group, m).reshape(-1)
        else:
            new_keep = unstructured_mask(saliency, config.ratio * step / config.steps).reshape(-1)
        removed = keep & ~new_keep
        if removed.any():
            coeff = torch.zeros_like(w)
            coeff[removed] = w[removed] / diag[removed]
            w -= inverse.mul(coeff)
        keep = new_keep
        w[~keep] = 0.0
    return w.reshape(rows, cols).to(weight.dtype), keep.reshape(rows, cols)


@register_compressor
class MFACCompressor(Compressor):
    method = "mfac"
    config_class = MFACConfig
    needs = ("grads",)
    level_field = "ratio"

    def compress(self, weight, bias, stats: LayerStats, config: MFACConfig, base=None) -> SparseLinear:
        # several sparsities pruned from one gradient window (a benchmark's rows) share the inverse
        key = ("mfac_inverse", config.block_size, config.damp)
        if key not in stats.derived:
            stats.derived[key] = BlockFisherInverse(stats["grads"], config.block_size, config.damp)
        pruned, keep = mfac_prune(weight, stats["grads"], config, stats.derived[key])
        return SparseLinear.from_dense(pruned, keep, bias, pattern=config.pattern)
