"""M-FAC OBS pruning (Frantar, Kurtic & Alistarh 2021): the empirical Fisher from m gradients.

F = λI + (1/m)·Σ_i g_i g_iᵀ over blocks of B consecutive weights (block-diagonal). M-FAC's
recursion for F⁻¹ applies Sherman-Morrison once per gradient; its fixed point is the Woodbury
form used here, batched over all blocks:

    F⁻¹ = (1/λ)·(I − Gᵀ K⁻¹ G),   K = mλ·I_m + G·Gᵀ   (per block: G is m × B)

so with K = LLᵀ and Z = L⁻¹G precomputed (O(d·m²) in all), GᵀK⁻¹G = ZᵀZ: an
inverse-Hessian-vector product is (v − Zᵀ(Z·v))/λ in O(d·m) and a diagonal element
[F⁻¹]_qq = (1 − ‖z_q‖²)/λ costs O(m).

When m ≥ B the B×B blocks themselves are cheaper (`inverse: blocks`, the default then): the
pipeline streams each sequence's gradient into Σ_i g_i g_iᵀ per block (d·B values, however large
m is), and F⁻¹ is factorized block by block. More gradients then cost time, not memory.

Pruning follows OBS: a weight's saliency is w_q²/(2[F⁻¹]_qq), and each step removes the
lowest-saliency ones. `update: joint` (default) is the exact OBS solution for every weight of a
Fisher block pruned so far, P (earlier steps' and this one's): δw = −F⁻¹ e_P [(F⁻¹)_PP]⁻¹ w_P,
one |P|×|P| solve per block, which leaves w_P exactly zero and the rest optimally corrected.
`update: sum` adds the single-weight updates instead (δw = −F⁻¹(w_Q / [F⁻¹]_QQ), as if each
weight were removed alone) and sets pruned weights back to zero: cheaper, and wrong when
several weights of a block go at once. Several steps approach the target sparsity gradually so
that later choices see earlier updates. M-FAC's reference also recomputes the gradients of the
partly pruned model between steps: `walks: W` prunes the whole model to ratio·w/W after walk w
and recomputes every gradient in the next walk (the runner, compress/runner.py); pruned weights
are exactly zero, so they have zero saliency and stay pruned. With `walks: 1` (default) the
gradients are the dense model's.

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

With the block sums (m ≥ B) memory no longer grows with m: the walk holds Σ ggᵀ for the block
being walked, d_block·B fp32 values in host memory, plus a batch of SUM_BATCH gradients, and a
layer's inverse on the compute device is d_layer·B values in `precision`. SmolLM2: 1.8 GiB of
sums per block, 0.9 GiB for its largest layer's inverse in fp64. Llama-3-8B at B = 128: 112 GB
of host memory per block, 60 GB (fp64) or 30 GB (fp32) on the GPU per MLP layer, at m = 256 or
m = 4096 alike; folding the gradients costs 2·m·d·B flops per block (14 TFLOP at m = 256).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..errors import LlmpressError
from ..modules import CompressedLinear
from .base import Compressor, LayerStats, register_compressor
from .masks import PruningConfig, nm_mask, pruned_module, unstructured_mask


class MFACConfig(PruningConfig):
    method: str = "mfac"
    block_size: int = Field(default=128, ge=1, description="weights per diagonal block of the Fisher")
    # M-FAC's 1e-5 is absolute, for CNN gradients; relative to LLM per-sequence gradients it is
    # far too small: with m near block_size the sample Fisher has near-zero eigenvalues and the
    # OBS update explodes (SmolLM2, m = 128: perplexity 4.4e7 at 50%). 0.1 measured safe and best.
    damp: float = Field(default=0.1, gt=0.0, description="λ relative to the mean squared gradient")
    steps: int = Field(default=4, ge=1, le=64, description="pruning steps towards the target sparsity")
    update: Literal["joint", "sum"] = Field(
        default="joint", description="exact OBS update for all pruned weights of a block, or the sum of single-weight updates"
    )
    inverse: Literal["auto", "woodbury", "blocks"] = Field(
        default="auto",
        description="F⁻¹ from the m gradients (Woodbury, m·d values) or from per-block sums of gg^T (blocks, d·B values); "
        "auto: blocks when m >= block_size",
    )
    walks: int = Field(
        default=1,
        ge=1,
        le=8,
        description="backward walks: before each of the first walks−1, the model is pruned to an intermediate "
        "sparsity (ratio·w/walks) and the next walk recomputes the gradients of the partly pruned model "
        "(M-FAC's gradient recomputation; costs one walk each). Unstructured only",
    )
    precision: Literal["float64", "float32"] = Field(
        default="float64",
        description="dtype of the kept factor Z (m·d values per layer): float32 halves M-FAC's memory "
        "(a 70B MLP layer at m = 128: 120 instead of 240 GB); each chunk is still factorized in float64",
    )


    @model_validator(mode="after")
    def _walks_need_a_ratio(self):
        if self.walks > 1 and self.pattern != "unstructured":
            raise ValueError(f"walks > 1 prunes to intermediate sparsities, which needs pattern: unstructured (got {self.pattern})")
        return self


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

    def submatrix(self, index: torch.Tensor) -> torch.Tensor:
        """(blocks, q, q): [F⁻¹] restricted to `index` (blocks, q) positions within each block, float64."""
        z = self.z.gather(2, index.to(self.z.device)[:, None, :].expand(-1, self.z.shape[1], -1)).double()  # (blocks, m, q)
        eye = torch.eye(index.shape[1], dtype=torch.float64, device=z.device)
        return (eye - z.transpose(1, 2) @ z) / self.lam


def outer_product_sums(grads: torch.Tensor, block_size: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """(blocks, B, B) Σ_i g_i g_iᵀ per block of B consecutive weights, from (m, d) gradients: in
    float64, or added in place to `into` (a running sum, in its dtype)."""
    m, d = grads.shape
    g = grads.reshape(m, d // block_size, block_size).transpose(0, 1)  # (blocks, m, B)
    if into is None:
        g = g.double()
        return g.transpose(1, 2) @ g
    g = g.to(into.dtype)
    return into.baddbmm_(g.transpose(1, 2), g)


class DenseBlockFisherInverse:
    """The same inverse from the per-block sums S = Σ_i g_i g_iᵀ of m gradients: F = λI + S/m,
    each B×B block factorized (float64) and its inverse kept in `dtype` (d·B values)."""

    def __init__(self, sums: torch.Tensor, num_grads: int, damp: float, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64):  # fmt: skip
        blocks, b, _ = sums.shape
        device = torch.device(device) if device is not None else sums.device
        s = sums.to(device, torch.float64)
        mean_square = float(s.diagonal(dim1=1, dim2=2).sum()) / (num_grads * blocks * b)
        if not math.isfinite(mean_square):
            raise LlmpressError("gradients contain NaN/Inf: the calibration loss overflowed; try float32")
        self.lam = damp * mean_square or damp
        f = s / num_grads + self.lam * torch.eye(b, dtype=torch.float64, device=device)
        chol, info = torch.linalg.cholesky_ex(f)
        if int(info.max()) != 0:
            raise LlmpressError(f"an M-FAC Fisher block is not positive definite (damping {self.lam:.3e}); raise damp")
        self.inv = torch.cholesky_inverse(chol).to(dtype)

    def diag(self) -> torch.Tensor:
        return self.inv.diagonal(dim1=1, dim2=2).double().reshape(-1)

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        vb = v.double().reshape(self.inv.shape[0], -1, 1).to(self.inv.device)
        return (self.inv.double() @ vb).reshape(-1).to(v.device)

    def submatrix(self, index: torch.Tensor) -> torch.Tensor:
        index = index.to(self.inv.device)
        rows = self.inv.gather(1, index[:, :, None].expand(-1, -1, self.inv.shape[2]))
        return rows.gather(2, index[:, None, :].expand(-1, index.shape[1], -1)).double()


FisherInverse = BlockFisherInverse | DenseBlockFisherInverse


def joint_obs_coefficients(w: torch.Tensor, pruned: torch.Tensor, inverse: FisherInverse, block_size: int) -> torch.Tensor:
    """c with δw = −F⁻¹c the exact OBS update that zeroes every pruned weight: per block,
    c_P = [(F⁻¹)_PP]⁻¹ w_P and 0 elsewhere (P padded to the largest block's count with identity)."""
    blocks = w.numel() // block_size
    mask = pruned.reshape(blocks, block_size)
    counts = mask.sum(1)
    q = int(counts.max())
    coeff = torch.zeros(blocks, block_size, dtype=torch.float64, device=w.device)
    if q == 0:
        return coeff.reshape(-1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :q]  # pruned positions first
    valid = torch.arange(q, device=w.device)[None, :] < counts[:, None]
    sub = inverse.submatrix(order).to(w.device)
    both = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(q, dtype=torch.float64, device=w.device).expand_as(sub)
    sub = torch.where(both, sub, eye)
    rhs = torch.where(valid, w.reshape(blocks, block_size).gather(1, order), torch.zeros((), dtype=torch.float64, device=w.device))
    c = torch.linalg.solve(sub, rhs.unsqueeze(-1)).squeeze(-1)
    coeff.scatter_(1, order, torch.where(valid, c, torch.zeros_like(c)))
    return coeff.reshape(-1)


def fisher_inverse(stats: LayerStats, config: MFACConfig, device: torch.device | str) -> FisherInverse:
    """The layer's F⁻¹ from what the pipeline collected: per-block sums of gg^T ("grad_outer",
    with "num_grads") or the gradients themselves ("grads", m × d)."""
    dtype = getattr(torch, config.precision)
    if stats.get("grad_outer") is not None:
        sums = stats["grad_outer"]
        if sums.shape[1] != config.block_size:
            raise LlmpressError(f"{stats.name}: gradient sums were collected for block_size {sums.shape[1]}, not {config.block_size}")
        return DenseBlockFisherInverse(sums, int(stats["num_grads"]), config.damp, device, dtype)
    grads = stats["grads"]
    if config.inverse == "blocks":
        return DenseBlockFisherInverse(outer_product_sums(grads, config.block_size), grads.shape[0], config.damp, device, dtype)
    return BlockFisherInverse(grads, config.block_size, config.damp, device, dtype)


def uses_block_sums(config: MFACConfig, num_grads: int) -> bool:
    """Whether the walk should stream gradients into per-block sums instead of keeping them."""
    return config.inverse == "blocks" or (config.inverse == "auto" and num_grads >= config.block_size)


def mfac_prune(
    weight: torch.Tensor, grads: torch.Tensor | None, config: MFACConfig, inverse: FisherInverse | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(updated weight with zeros, keep-mask) after `config.steps` OBS steps with the M-FAC inverse
    (`inverse`, when given, must be that of `grads` with the config's block size and damping)."""
    rows, cols = weight.shape
    if config.pattern == "tile":
        raise ValueError("mfac does not choose tile-structured masks; use sparsegpt, wanda or magnitude for pattern 'tile'")
    if weight.numel() % config.block_size:
        raise ValueError(f"block_size {config.block_size} must divide the number of weights {weight.numel()}")
    if inverse is None:
        if grads.shape[1] != weight.numel():
            raise ValueError(f"gradients have {grads.shape[1]} entries per sample, the weight has {weight.numel()}")
        inverse = fisher_inverse(LayerStats({"grads": grads}), config, weight.device)
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
        if removed.any() and config.update == "joint":
            w -= inverse.mul(joint_obs_coefficients(w, ~new_keep, inverse, config.block_size))
        elif removed.any():
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

    def gradient_block_sums(self, config: MFACConfig, num_grads: int) -> int | None:
        """The block size whose per-block sums of gg^T the walk should collect instead of the gradients."""
        return config.block_size if uses_block_sums(config, num_grads) else None

    def compress(self, weight, bias, stats: LayerStats, config: MFACConfig, base=None) -> CompressedLinear:
        # several sparsities pruned from one gradient window (a benchmark's rows) share the inverse
        key = ("mfac_inverse", config.block_size, config.damp, config.precision, config.inverse, str(weight.device))
        if key not in stats.derived:
            stats.derived[key] = fisher_inverse(stats, config, weight.device)
        pruned, keep = mfac_prune(weight, stats.get("grads"), config, stats.derived[key])
        return pruned_module(pruned, keep, bias, config)
