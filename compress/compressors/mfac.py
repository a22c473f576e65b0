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

Memory: the walk holds one block's gradient windows, m·d_block fp32 values, in host memory (the
pipeline's offload device); pruning a layer streams its gradients to the compute device a chunk
of blocks at a time and keeps only Z = L⁻¹G there, m·d_layer values in `precision` (fp64 by
default). SmolLM2-135M (3.5 M weights per block, 0.9 M in its largest layer) with m = 128: 1.7 GiB
of host memory + 0.8 GiB. A Llama-3-8B block holds 0.22 G weights, its MLP layers 58.7 M each: at
m = 128, 104 GiB of host memory and 56 GiB on the GPU; Llama-3-70B (0.86 G weights per block,
235 M per MLP layer): 410 GiB of host memory and 224 GiB of Z in fp64, 112 GiB in fp32, the
precision that fits one 141 GB GPU (or m = 64 in fp64).
"""

from __future__ import annotations

import math
from typing import Literal

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
    precision: Literal["float64", "float32"] = Field(
        default="float64",
        description="dtype of the kept factor Z (m·d values per layer): float32 halves M-FAC's memory "
        "(a 70B MLP layer at m = 128: 120 instead of 240 GB); each chunk is still factorized in float64",
    )


class BlockFisherInverse:
    """The inverse of the block-diagonal empirical Fisher of m gradients over d weights.

    Only Z = L⁻¹G is kept (K = LLᵀ), since Gᵀ K⁻¹ G = ZᵀZ: one triangular solve instead of
    K⁻¹G's two, and m·d values instead of G and K⁻¹G's 2·m·d.
    """

    CHUNK = 128  # blocks per batched factorization (small chunks stay in cache)

    def __init__(
        self, grads: torch.Tensor, block_size: int, damp: float, device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ):  # fmt: skip
        """`grads` (m, d) may stay where the pipeline keeps them (host memory): a chunk of blocks
        at a time is moved to `device` (default: the gradients' own), factorized in float64 there,
        and its Z stored in `dtype`. Memory on the device: Z, m·d values."""
        m, d = grads.shape
        if d % block_size:
            raise ValueError(f"block_size {block_size} must divide the number of weights {d}")
        device = torch.device(device) if device is not None else grads.device
        blocks = d // block_size
        g32 = grads.reshape(m, blocks, block_size)
        mean_square = float(torch.linalg.vector_norm(grads.float())) ** 2 / grads.numel()
        if not math.isfinite(mean_square):
            raise LlmpressError("gradients contain NaN/Inf: the calibration loss overflowed; try float32")
        self.lam = damp * mean_square or damp
        self.z = torch.empty(blocks, m, block_size, dtype=dtype, device=device)
        damping = torch.eye(m, dtype=torch.float64, device=device).mul_(m * self.lam)
        for start in range(0, blocks, self.CHUNK):  # fp64 G a chunk at a time: memory m·d for Z only
            g = g32[:, start : start + self.CHUNK].to(device, torch.float64).transpose(0, 1).contiguous()  # (chunk, m, B)
            k = torch.baddbmm(damping.expand(len(g), m, m), g, g.transpose(1, 2))  # positive definite
            z = torch.linalg.solve_triangular(torch.linalg.cholesky(k), g, upper=False)
            self.z[start : start + self.CHUNK] = z

    def diag(self) -> torch.Tensor:
        """[F⁻¹]_qq = (1 − ‖z_q‖²)/λ for every weight, flattened (d,), in float64."""
        norms = torch.cat([z.double().square().sum(1) for z in self.z.split(self.CHUNK)])
        return ((1.0 - norms) / self.lam).reshape(-1)

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        """F⁻¹·v = (v − Zᵀ(Z·v))/λ for a flattened (d,) vector, in float64 (Z upcast a chunk at a time)."""
        vb = v.double().reshape(self.z.shape[0], -1).to(self.z.device)  # (blocks, B)
        out = torch.empty_like(vb)
        for start in range(0, len(vb), self.CHUNK):
            z = self.z[start : start + self.CHUNK].double()
            part = vb[start : start + self.CHUNK]
            out[start : start + self.CHUNK] = part - torch.einsum("kmb,km->kb", z, torch.einsum("kmb,kb->km", z, part))
        return (out / self.lam).reshape(-1).to(v.device)


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
        inverse = BlockFisherInverse(grads, config.block_size, config.damp, weight.device, getattr(torch, config.precision))
    diag = inverse.diag().clamp_min(1e-30).to(weight.device)
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
        key = ("mfac_inverse", config.block_size, config.damp, config.precision, str(weight.device))
        if key not in stats.derived:
            stats.derived[key] = BlockFisherInverse(
                stats["grads"], config.block_size, config.damp, weight.device, getattr(torch, config.precision)
            )
        pruned, keep = mfac_prune(weight, stats["grads"], config, stats.derived[key])
        return SparseLinear.from_dense(pruned, keep, bias, pattern=config.pattern)
