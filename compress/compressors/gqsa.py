"""GQSA (group quantization and sparsity): drop whole groups of g input columns per row by a
second-order group saliency, quantize the surviving groups to INT4 with GPTQ-style error feedback.

1. Group saliency from OBS with the layer Hessian H = XᵀX: removing group G of row r costs
   w_{r,G}ᵀ [(H⁻¹)_GG]⁻¹ w_{r,G} / 2.
2. Which groups each row keeps (balanced rows, for the kernel):
   - `selection: blockwise` (default): at the start of every lazy block of the OBS sweep, each row
     keeps the (1 − sparsity) share of the block's groups with the highest saliency computed on
     the weights *as updated so far* (SparseGPT's adaptive mask selection, per group), with the
     sweep's conditional inverse Hessian: the g×g diagonal block U_GG of U (UᵀU = H⁻¹), cost
     ‖U_GG⁻ᵀ w_G‖²/2. Every row keeps the same number of groups in every block.
   - `selection: global`: every row keeps its k = (1 − sparsity)·(in/g) most salient groups of
     the original weight, chosen once (groups may cluster anywhere in the row).
3. One OBS sweep over the columns (compress/compressors/sparsegpt.obs_sweep): when it reaches a
   kept group its asymmetric 4-bit grid (scale, zero) is fitted to the group's weights *as
   updated so far*; each column is replaced by its quantized value (0 in dropped groups) and the
   columns to its right absorb the error.
4. `refit_scales` (default on): with the codes and zero points fixed, each row's k scales enter
   the layer output linearly, so the scales that minimize ‖(W − Ŵ)Xᵀ‖² solve one k×k least-squares
   system per row (damped towards the sweep's scales, so the error can only go down). This is the
   closed-form, layer-wise start of the paper's scale optimization.
5. `optimize` (optional, compress/quant_tuning.py): the paper's two training stages, on the
   calibration data. `bqpo` trains each block's kept weights (from the sweep's error-corrected
   values, rounded straight-through) and scales on the block's output error against the dense
   model (`bqpo_codes: fixed`: the scales alone); `e2e` trains every layer's scales on the language-model
   loss of the calibration sequences once all blocks are done. For `bqpo` the compressor marks
   the module (`tuning_source`: the continuous weights when they train, else None) for the
   pipeline, which removes the mark once the block is tuned.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from pydantic import Field, model_validator

from ..modules import GQSALinear
from ..errors import ShapeNotSupported
from .base import Compressor, LayerStats, StageConfig, register_compressor
from .residual import ResidualOption
from .rtn import fit_grid
from .sparsegpt import inverse_hessian_factor, obs_sweep

LEVELS = 15  # 4-bit codes 0..15


class GQSAConfig(ResidualOption, StageConfig):
    method: str = "gqsa"
    ratio: float = Field(default=0.5, ge=0.0, lt=1.0, description="fraction of weight groups removed (group sparsity)")
    group_size: int = Field(default=16, ge=2, description="input columns per group (8, 16, 32, ...)")
    blocksize: int = Field(default=128, ge=2, description="columns per lazy-update block (a multiple of group_size)")
    percdamp: float = Field(default=0.01, gt=0.0, lt=1.0)
    selection: Literal["blockwise", "global"] = Field(
        default="blockwise", description="choose kept groups per lazy block from updated weights, or once from the original"
    )
    refit_scales: bool = Field(default=True, description="least-squares refit of the scales on the layer output error")
    optimize: list[Literal["bqpo", "e2e"]] = Field(
        default=[], description="train scales (and weights): per block on its output error (bqpo), then on the LM loss (e2e)"
    )
    bqpo_codes: Literal["trained", "fixed"] = Field(
        default="trained", description="BQPO trains the kept weights' grid positions with the scales (codes may change), or the scales alone"
    )
    bqpo_epochs: int = Field(default=4, ge=1, description="passes over the calibration sequences per block")
    bqpo_lr: float = Field(default=3e-3, gt=0.0, description="Adam step on log-scales (grid positions: 10x, in quantization steps)")
    bqpo_batch_size: int = Field(default=4, ge=1, description="calibration batches per optimizer step")
    e2e_epochs: int = Field(default=2, ge=1, description="passes over the calibration sequences, whole model")
    e2e_lr: float = Field(default=1e-3, gt=0.0, description="Adam step on log-scales")
    e2e_batch_size: int = Field(default=4, ge=1, description="calibration batches per optimizer step")

    @model_validator(mode="after")
    def _sizes(self):
        if self.group_size % 2:
            raise ValueError(f"group_size must be even (two 4-bit codes per byte), got {self.group_size}")
        if self.blocksize % self.group_size:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of group_size {self.group_size}")
        if self.optimize and self.residual_rank:
            raise ValueError("optimize (bqpo/e2e) trains the W4 scales of plain GQSA layers: drop residual_rank or optimize")
        return self


def diagonal_blocks(matrix: torch.Tensor, size: int) -> torch.Tensor:
    """(n/size, size, size): the diagonal blocks of a square (n, n) matrix."""
    groups = matrix.shape[0] // size
    return torch.stack([matrix[i * size : (i + 1) * size, i * size : (i + 1) * size] for i in range(groups)])


def group_saliency(weight: torch.Tensor, u: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, groups) OBS cost of removing each group: w_Gᵀ [(H⁻¹)_GG]⁻¹ w_G / 2."""
    rows, cols = weight.shape
    groups = cols // group_size
    ug = u.double().reshape(cols, groups, group_size)
    inv = torch.linalg.inv(torch.einsum("cag,cah->agh", ug, ug))  # [(H⁻¹)_GG]⁻¹ = [U_GᵀU_G]⁻¹, (groups, g, g)
    w = weight.double().reshape(rows, groups, group_size)
    return 0.5 * torch.einsum("rng,ngh,rnh->rn", w, inv, w)


def conditional_group_saliency(block: torch.Tensor, u_block: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, groups) OBS cost of removing each group of a sweep block whose earlier columns are
    fixed: ‖U_GG⁻ᵀ w_G‖²/2 with U_GG the group's diagonal block of U (UᵀU = H⁻¹)."""
    rows, cols = block.shape
    groups = cols // group_size
    diag = diagonal_blocks(u_block, group_size)
    w = block.double().reshape(rows, groups, group_size).transpose(0, 1).unsqueeze(-1)  # (groups, rows, g, 1)
    t = torch.linalg.solve_triangular(diag.double().transpose(1, 2).unsqueeze(1), w, upper=False)  # U_GGᵀ t = w
    return 0.5 * t.squeeze(-1).square().sum(-1).T


def refit_scales(
    weight: torch.Tensor, gram: torch.Tensor, codes: torch.Tensor, zeros: torch.Tensor, index: torch.Tensor, scales: torch.Tensor,
    damp: float = 1e-4, chunk: int = 128, max_bytes: int = 2**30,
) -> torch.Tensor:  # fmt: skip
    """Scales (out, k) minimizing ‖(W − Ŵ)Xᵀ‖² with Ŵ[r, G_a] = (q − z)_{r,a}·s_{r,a}, codes fixed.

    Per row r with v_a = (q − z)_{r,a} (a g-vector): M_ab = v_aᵀ H[G_a, G_b] v_b and
    c_a = v_aᵀ (H w_r)[G_a]; solve (M + λD)s = c + λD·s0 with D = diag(M), λ = `damp`, which
    pulls ill-determined scales towards the sweep's s0 and never does worse than s0.

    Rows go in chunks whose largest temporary, (rows, groups, g, groups) in float64, stays under
    `max_bytes`: at in_features = 14336 and g = 16 a row needs 103 MB, so 128 rows at once would
    need 13 GB.
    """
    rows, k, g = codes.shape
    cols = gram.shape[0]
    groups = cols // g
    chunk = max(1, min(chunk, max_bytes // (cols * groups * 8)))
    h = gram.double().to(weight.device)
    h4 = h.reshape(groups, g, groups, g)
    hw = weight.double() @ h  # (rows, in): H w_r per row (H symmetric)
    v = codes.double() - zeros.double()[..., None]  # (rows, k, g)
    pick = index.long()[..., None].expand(-1, -1, g)
    out = scales.double().clone()
    for start in range(0, rows, chunk):
        sl = slice(start, min(start + chunk, rows))
        n = sl.stop - sl.start
        u = torch.zeros(n, groups, g, dtype=torch.float64, device=weight.device).scatter_(1, pick[sl], v[sl])  # v in place
        t = torch.einsum("aibj,rbj->raib", h4, u)  # GEMMs batched over column groups (K = g)
        m_all = torch.einsum("rai,raib->rab", u, t)  # (n, groups, groups): every group pair's v_aᵀ H_ab v_b
        idx = index.long()[sl]
        m = m_all.gather(1, idx[:, :, None].expand(-1, -1, groups)).gather(2, idx[:, None, :].expand(-1, k, -1))
        c = (v[sl] * hw[sl].reshape(n, groups, g).gather(1, pick[sl])).sum(-1)
        d = m.diagonal(dim1=1, dim2=2)
        reg = damp * d + 1e-12 * (d.mean(-1, keepdim=True) + 1e-30)
        lhs = m + torch.diag_embed(reg)
        rhs = c + reg * out[sl]
        out[sl] = torch.linalg.solve(lhs, rhs.unsqueeze(-1)).squeeze(-1)
    return out


class QuantizedGroups(NamedTuple):
    """A GQSA layer: the kept groups of each row, in ascending column order."""

    codes: torch.Tensor  # (out, k, g) in [0, levels] (15 for INT4)
    scales: torch.Tensor  # (out, k)
    zeros: torch.Tensor  # (out, k) in [0, levels]
    index: torch.Tensor  # (out, k) column-group numbers
    dequantized: torch.Tensor  # (out, in) dense Ŵ
    # (out, k, g) weights that these scales and zero points round to exactly these codes: the
    # sweep's error-corrected values, rescaled by any refit (what BQPO trains from); kept only
    # when the config trains them, else None
    continuous: torch.Tensor | None


def gqsa_quantize(
    weight: torch.Tensor, gram: torch.Tensor, config: GQSAConfig, name: str = "layer", levels: int = LEVELS
) -> QuantizedGroups:
    """Drop and quantize groups of `weight` (out, in) against the Gram `gram` (see the module doc);
    codes in [0, `levels`] (15: INT4; GPTQ W8 uses 255 with every group kept)."""
    rows, cols = weight.shape
    g = config.group_size
    if cols % g:
        raise ShapeNotSupported(f"{name}: GQSA needs in_features divisible by group_size={g}, got {cols}; choose a group_size that divides it")
    groups = cols // g
    u, dead = inverse_hessian_factor(gram.to(weight.device), config.percdamp, name)
    w = weight.float().clone()
    w[:, dead] = 0.0
    keep_groups = max(1, round((1.0 - config.ratio) * groups))
    kept = torch.zeros(rows, groups, dtype=torch.bool, device=w.device)
    if config.selection == "global":
        kept.scatter_(1, group_saliency(w, u, g).topk(keep_groups, dim=1).indices, True)
    scales = torch.zeros(rows, groups, device=w.device)
    zeros = torch.zeros(rows, groups, device=w.device)
    codes = torch.zeros(rows, cols, device=w.device)
    trains_weights = "bqpo" in config.optimize and config.bqpo_codes == "trained"
    continuous = torch.zeros(rows, cols, device=w.device) if trains_weights else None  # each column as the sweep rounded it

    def rule(j: int, block: torch.Tensor, i: int) -> torch.Tensor:
        group = j // g
        if i == 0 and config.selection == "blockwise":  # this block's groups, from its updated weights
            first, count = j // g, block.shape[1] // g
            # this block's share of the row's keep_groups (cumulative rounding: the shares sum to it)
            keep = round(keep_groups * (first + count) / groups) - round(keep_groups * first / groups)
            saliency = conditional_group_saliency(block, u[j : j + block.shape[1], j : j + block.shape[1]], g)
            kept[:, first : first + count].scatter_(1, saliency.topk(keep, dim=1).indices, True)
        if j % g == 0:  # fit this group's grid to its current (error-corrected) weights
            scales[:, group], zeros[:, group] = fit_grid(block[:, i : i + g], levels)
        scale, zero = scales[:, group], zeros[:, group]
        code = torch.clamp(torch.round(block[:, i] / scale) + zero, 0, levels)
        codes[:, j] = code
        if continuous is not None:
            continuous[:, j] = block[:, i]
        return torch.where(kept[:, group], (code - zero) * scale, torch.zeros_like(code))

    dequantized = obs_sweep(w, u, config.blocksize, rule)
    k = int(kept[0].sum())
    index = kept.nonzero()[:, 1].reshape(rows, k)  # ascending column groups per row (equal counts)
    pick = index[..., None].expand(-1, -1, g)
    grouped_codes = codes.reshape(rows, groups, g).gather(1, pick)
    kept_scales, kept_zeros = scales.gather(1, index), zeros.gather(1, index)
    kept_continuous = None if continuous is None else continuous.reshape(rows, groups, g).gather(1, pick)
    if config.refit_scales:
        sweep_scales = kept_scales
        kept_scales = refit_scales(weight, gram, grouped_codes, kept_zeros, index, kept_scales).float()
        if kept_continuous is not None:  # round(c·s'/s / s') = round(c / s): the same codes under the refitted scales
            kept_continuous = kept_continuous * (kept_scales / sweep_scales)[..., None]
        dense = torch.zeros(rows, groups, g, device=w.device)
        dense.scatter_(1, pick, (grouped_codes - kept_zeros[..., None]) * kept_scales[..., None])
        dequantized = dense.reshape(rows, cols)
    return QuantizedGroups(grouped_codes, kept_scales, kept_zeros, index, dequantized, kept_continuous)


@register_compressor
class GQSACompressor(Compressor):
    method = "gqsa"
    config_class = GQSAConfig
    needs = ("gram",)
    level_field = "ratio"

    def compress(self, weight, bias, stats: LayerStats, config: GQSAConfig, base=None) -> GQSALinear:
        result = gqsa_quantize(weight, stats["gram"], config, stats.name)
        module = GQSALinear.from_codes(result.codes, result.scales.to(weight.dtype), result.zeros, result.index, weight.shape[1], bias)
        if "bqpo" in config.optimize:  # for the block's tuning (compress/quant_tuning.py), then dropped
            module.tuning_source = result.continuous  # None: the codes stay fixed
        return module
