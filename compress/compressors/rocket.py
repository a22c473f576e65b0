"""ROCKET: a sparse dictionary from the whitened eigenbasis in one closed-form step (no iterations).

In the whitened space A = W·S (S·Sᵀ = XᵀX) the top-k right singular vectors of A are the atoms
E and P = U_k·Σ_k the coefficients (exactly whitened SVD). Then each output row keeps only its
s most important coefficients, scored |p_ij| times the atom's sensitivity (the geometric mean,
exponent `alpha` = 0.5, of its whitened-space norm, 1, and its original-space norm ‖e_j·S⁻¹‖),
and the dictionary is refit in closed form for those sparse coefficients,
E = (PᵀP + μI)⁻¹·Pᵀ·A. Atoms map back as E·S⁻¹.

Sizes: for a fraction `ratio` removed and ks atoms per kept coefficient,
k = (1 − ratio)·out·in / (in + out/ks), s = k/ks (see `dictionary_shape`); ks = 1 keeps every
coefficient and reproduces whitened SVD. Several ks are tried per layer and the one with the
lowest calibration-weighted error kept, which is also what the knapsack profile reports, so the
allocator picks (ratio, best ks) per layer. Not implemented: the paper's small global
re-activation of masked coefficients, since the ELL format stores the same s for every row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import BaseModel, Field, field_validator

from ..errors import LlmpressError
from ..metrics import served_itemsize
from ..modules import DictLinear
from ..modules.dictionary import atom_group_size, index_bytes
from .base import (
    Compressor,
    LayerStats,
    LevelResult,
    StageConfig,
    flush_denormals,
    register_compressor,
)
from .residual import ResidualOption
from .gqsa import GQSAConfig, gqsa_quantize
from .rtn import GroupGrid
from .sparse_coding import (
    coefficient_row_multiple,
    dense_coefficients,
    dictionary_shape,
    refit_dictionary,
    top_s_support,
)
from .whitening import WhitenedSpectrum


class AtomBitsOption(BaseModel):
    """How a dictionary compressor stores its atoms (ROCKET, CoSpaDi)."""

    atom_bits: Literal[16, 8] = Field(
        default=16,
        description="16: atoms in the model's dtype; 8: W8 codes in groups of 64 input columns with a scale and zero "
        "point each (x·Dᵀ then runs on the W8 kernel; the atoms are most of a dictionary's values at k = 2s)",
    )


class RocketConfig(AtomBitsOption, ResidualOption, StageConfig):
    method: str = "rocket"
    ratio: float = Field(gt=0.0, lt=1.0, description="fraction of the layer's weights removed")
    ks: list[float] = Field(
        default=[1.0, 1.5, 2.0, 3.0],
        min_length=1,
        description="candidate atoms per kept coefficient (1 = low rank); the best per layer is kept",
    )
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, description="weight of the original-space atom norm in scores")
    ridge: float = Field(default=1e-6, ge=0.0, lt=1.0, description="dictionary refit damping, fraction of mean diag PᵀP")
    percdamp: float = Field(default=1e-4, ge=0.0, lt=1.0, description="Gram damping, fraction of mean diag(XᵀX)")
    coefficient_bits: Literal[16, 8] = Field(
        default=16,
        description="16: coefficients in the model's dtype; 8: int8 codes with a scale per row, the dictionary refit "
        "to the quantized coefficients (halves the bytes that dominate a dictionary layer in bf16)",
    )

    @field_validator("ks")
    @classmethod
    def _ks_at_least_one(cls, value: list[float]) -> list[float]:
        if any(not k >= 1.0 for k in value):
            raise ValueError(f"every ks must be >= 1 (atoms per kept coefficient; 1 = low rank), got {value}")
        return value


@dataclass
class DictionaryFactors:
    """Ŵ = C·D with D = `atoms` (k × in, original space) and C given row-wise by values/support."""

    atoms: torch.Tensor  # float64
    values: torch.Tensor  # (out × s) float64
    support: torch.Tensor  # (out × s) long
    ks: float
    rel_weighted_error: float  # ‖(A − P·E)‖/‖A‖ in the (damped) whitened space
    row_scales: torch.Tensor | None = None  # int8 coefficients: values = codes · row scale
    atom_grid: GroupGrid | None = None  # W8 atoms: `atoms` holds what these codes represent

    @property
    def num_atoms(self) -> int:
        return self.atoms.shape[0]

    def to_dense(self) -> torch.Tensor:
        return dense_coefficients(self.values, self.support, self.num_atoms) @ self.atoms

    def num_values(self, bias_values: int = 0) -> int:
        scales = 0 if self.row_scales is None else self.row_scales.numel()
        grid = 0 if self.atom_grid is None else 2 * self.atom_grid.scales.numel()  # a scale and a zero point a group
        return self.atoms.numel() + grid + self.values.numel() + scales + bias_values

    def num_bytes(self, element_size: int, bias_values: int = 0) -> int:
        """Floats (atoms, scales, bias) at `element_size`; int8 coefficients, W8 atom codes and
        zero points 1 byte each; packed indices."""
        rows, per_row = self.support.shape
        one_byte = (self.values.numel() if self.row_scales is not None else 0)
        if self.atom_grid is not None:
            one_byte += self.atoms.numel() + self.atom_grid.zeros.numel()
        floats = self.num_values(bias_values) - one_byte
        return floats * element_size + one_byte + index_bytes(rows, per_row, self.num_atoms)

    def with_int8_atoms(self, a: torch.Tensor, s: torch.Tensor) -> "DictionaryFactors":
        """The atoms as W8 groups, and the error in the whitened space (A = W·S) measured again
        with them. h = x·Dᵀ is a linear layer of its own, so the atoms are quantized like one:
        GPTQ against the (damped) input Gram S·Sᵀ, where plain rounding spent the grid on the
        columns S⁻¹ magnifies, those of the weakest inputs (ROCKET 30% on SmolLM2, 8 samples:
        perplexity 44.44 with bf16 atoms, 45.31 rounded to nearest, 44.12 by GPTQ)."""
        group = atom_group_size(self.atoms.shape[1])
        sweep = GQSAConfig(ratio=0.0, group_size=group, blocksize=group * max(1, 128 // group), percdamp=0.01)
        result = gqsa_quantize(self.atoms.float(), s @ s.T, sweep, "atoms", levels=255)
        grid = GroupGrid(result.codes.to(torch.uint8), result.scales, result.zeros.to(torch.uint8))
        atoms = grid.dequantize().double()
        residual = a - dense_coefficients(self.values, self.support, self.num_atoms) @ (atoms @ s)
        error = float(residual.norm() / a.norm().clamp_min(1e-30))
        return replace(self, atoms=atoms, atom_grid=grid, rel_weighted_error=error)

    def module(self, bias: torch.Tensor | None, dtype: torch.dtype, owner: DictLinear | None = None, owner_name: str | None = None) -> DictLinear:
        """The DictLinear storing these factors (with `owner`: sharing its atoms, storing none)."""
        atoms = None if owner is not None or self.atom_grid is not None else self.atoms.to(dtype)
        grid = None
        if owner is None and self.atom_grid is not None:
            grid = (self.atom_grid.codes, self.atom_grid.scales.to(dtype), self.atom_grid.zeros)
        shared = {"owner": owner, "owner_name": owner_name, "atom_grid": grid}
        if self.row_scales is None:
            return DictLinear.from_factors(atoms, self.values.to(dtype), self.support, bias, **shared)
        codes = torch.round(self.values / self.row_scales[:, None]).to(torch.int8)
        return DictLinear.from_factors(atoms, codes, self.support, bias, scales=self.row_scales.to(dtype), **shared)


def int8_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values rounded to int8 codes × a symmetric scale per row, the scales)."""
    scales = (values.abs().amax(dim=1) / 127.0).clamp_min(1e-30)
    return torch.round(values / scales[:, None]).clamp(-127, 127) * scales[:, None], scales


@flush_denormals()
def rocket_whitened(spec: WhitenedSpectrum, k: int, s: int, alpha: float, ridge: float, coefficient_bits: int = 16):
    """Eigenbasis → sparsified coefficients → closed-form dictionary refit, for k atoms, s per row.
    With 8-bit coefficients they are rounded first and the dictionary refit to the rounded ones.

    Returns (atoms in the whitened space, values, support, relative whitened error, row scales or None).
    """
    atoms_w = spec.vh[:k]
    coef = spec.u[:, :k] * spec.sigma[:k]
    if s >= k:  # nothing to sparsify: whitened SVD
        support = torch.arange(k, device=coef.device).expand(coef.shape[0], k).contiguous()
        values = coef
    else:
        sensitivity = (atoms_w @ spec.white.s_inv).norm(dim=1).pow(alpha)  # whitened norms are all 1
        support = top_s_support(coef.abs() * sensitivity, s)
        values = coef.gather(1, support)
        if coefficient_bits == 16:  # (8 bits: refit once, after rounding)
            atoms_w = refit_dictionary(spec.a, dense_coefficients(values, support, k), ridge)
    scales = None
    if coefficient_bits == 8:
        values, scales, atoms_w = int8_coefficients(spec.a, values, support, k, ridge)
    residual = spec.a - dense_coefficients(values, support, k) @ atoms_w
    return atoms_w, values, support, float(residual.norm() / spec.a.norm().clamp_min(1e-30)), scales


def int8_coefficients(a: torch.Tensor, values: torch.Tensor, support: torch.Tensor, k: int, ridge: float):
    """Coefficients rounded to int8 with a scale per row, and the dictionary refit in closed form
    to the rounded coefficients (it absorbs part of the rounding error): (values, scales, atoms)."""
    values, scales = int8_rows(values)
    return values, scales, refit_dictionary(a, dense_coefficients(values, support, k), ridge)


def rocket_step(
    spec: WhitenedSpectrum, k: int, s: int, alpha: float, ridge: float, ks: float, coefficient_bits: int = 16
) -> DictionaryFactors:
    """ROCKET's factors (atoms mapped back to the original space) for k atoms, s per row."""
    atoms_w, values, support, error, scales = rocket_whitened(spec, k, s, alpha, ridge, coefficient_bits)
    return DictionaryFactors(atoms_w @ spec.white.s_inv, values, support, ks, error, scales)


def rocket_best(spec: WhitenedSpectrum, ratio: float, config: RocketConfig) -> DictionaryFactors:
    """The candidate ks with the lowest calibration-weighted error at this ratio (W8 atoms: chosen
    with float atoms, then quantized once; 8 bits move the error little, and one GPTQ sweep per
    candidate doubled the compression time)."""
    out_f, in_f = spec.a.shape
    best, reasons = None, []
    multiple = coefficient_row_multiple(config.coefficient_bits)
    for ks in config.ks:
        try:
            k, s = dictionary_shape(out_f, in_f, ratio, ks, max_atoms=min(out_f, in_f), values_multiple=multiple)
        except LlmpressError as err:
            reasons.append(str(err))
            continue
        factors = rocket_step(spec, k, s, config.alpha, config.ridge, ks, config.coefficient_bits)
        if best is None or factors.rel_weighted_error < best.rel_weighted_error:
            best = factors
    if best is None:
        raise LlmpressError("; ".join(reasons))
    return best.with_int8_atoms(spec.a, spec.white.s) if config.atom_bits == 8 else best


@register_compressor
class RocketCompressor(Compressor):
    method = "rocket"
    config_class = RocketConfig
    needs = ("gram",)
    level_field = "ratio"

    def compress(self, weight, bias, stats: LayerStats, config: RocketConfig, base=None) -> DictLinear:
        spec = WhitenedSpectrum.of(weight, stats["gram"], config.percdamp, stats.name)
        return rocket_best(spec, config.ratio, config).module(bias, weight.dtype)

    def profile(self, weight, bias, stats: LayerStats, config: RocketConfig, levels: list[float]) -> list[LevelResult]:
        """One whitening and SVD per layer; per level the best ks (the one `compress` would keep),
        measured like the pipeline measures a compressed layer (undamped Gram, `relative_errors`).
        With a stacked residual, one compression per level."""
        if config.residual_rank:
            return super().profile(weight, bias, stats, config, levels)
        spec = WhitenedSpectrum.of(weight, stats["gram"], config.percdamp, stats.name)
        bias_values = bias.numel() if bias is not None else 0
        w = weight.double()
        w_norm = float(w.norm())
        results = []
        for level in levels:
            factors = rocket_best(spec, level, config)
            plain = float((w - factors.to_dense()).norm()) / max(w_norm, 1e-30)
            results.append(
                LevelResult(
                    level,
                    factors.num_values(bias_values),
                    factors.num_bytes(served_itemsize(weight.dtype), bias_values),
                    plain,
                    spec.undamped_error(factors.rel_weighted_error, plain, w_norm),
                )
            )
        return results
