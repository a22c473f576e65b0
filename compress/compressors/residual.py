"""Stacked options: a compressed layer plus an EoRA residual, stored and allocated as one module.

EoRA's math lives here so that any stage can stack it on its own result (`residual_rank`) and the
`eora` stage can refine an earlier stage's: B·A is the rank-r minimizer of ‖(ΔW − B·A)Xᵀ‖ for the
error ΔW = W − Ŵ, from one eigendecomposition of XᵀX (float64, non-positive eigenvalues clamped).
A W3 layer with a rank-16 residual is then one knapsack option whose bytes count both parts.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from ..errors import LlmpressError
from ..modules import CompressedLinear, EoRALinear
from .whitening import WhitenedSpectrum


class ResidualOption(BaseModel):
    """The recipe key of the methods that can stack an EoRA residual on their result."""

    residual_rank: int | None = Field(
        default=None,
        ge=1,
        description="add an EoRA residual of this rank to each compressed layer (fit in the eigenspace of XᵀX; its "
        "factors count in the layer's bytes): one stacked option, e.g. W3 + rank 16",
    )


def eora_factors(
    delta: torch.Tensor, gram: torch.Tensor, rank: int, percdamp: float = 1e-6, name: str = "layer"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B·A the rank-`rank` minimizer of ‖(ΔW − B·A)Xᵀ‖ (in float64)."""
    spectrum = WhitenedSpectrum.of(delta, gram, percdamp, name, prefer="eigh")
    rank = min(rank, spectrum.sigma.numel())
    down = spectrum.vh[:rank] @ spectrum.white.s_inv
    return spectrum.u[:, :rank] * spectrum.sigma[:rank], down


def with_residual(
    weight: torch.Tensor, module: CompressedLinear, gram: torch.Tensor | None, rank: int, name: str = "layer"
) -> EoRALinear:
    """`module` plus the rank-`rank` EoRA residual of its error against `weight`."""
    if gram is None:
        raise LlmpressError(f"{name}: an EoRA residual (residual_rank) is fit on the layer's Gram: collect calibration data")
    delta = weight.double() - module.to_dense().double()
    up, down = eora_factors(delta, gram, rank, name=name)
    return EoRALinear.from_factors(module, up.to(weight.dtype), down.to(weight.dtype))
