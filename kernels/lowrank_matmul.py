"""Low-rank GEMM y = (x·Vᵀ)·Uᵀ + b as two chained skinny GEMMs, for LowRankLinear and EoRA.

The shrink (r × K weight V, few output columns) gets split-K to fill the SMs; the expand
(M × r weight U) needs none and can add into an existing output, which is how EoRA's residual
joins the compressed main path without a separate add. Bytes read: (M + K)·r weights, the
two launches' fixed cost dominates small layers (CUDA graphs hide it in decode loops).
"""

from __future__ import annotations

import torch

from .runtime import launch_refusal
from .skinny_matmul import skinny_matmul


def lowrank_matmul(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """y = (x·downᵀ)·upᵀ + bias (+ out when `accumulate`); down (r × K), up (M × r)."""
    if down.shape[0] != up.shape[1]:
        raise ValueError(f"rank mismatch: down has {down.shape[0]} rows, up has {up.shape[1]} columns")
    hidden = skinny_matmul(x, down)
    return skinny_matmul(hidden, up, bias, out=out, accumulate=accumulate)


def lowrank_refusal(module, x: torch.Tensor) -> str | None:
    return launch_refusal(x, module.up, module.down)


def lowrank_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    return lowrank_matmul(x, module.down, module.up, module.bias)


def eora_forward_triton(module, x: torch.Tensor) -> torch.Tensor:
    """The base module's own kernel, then the residual added in place by the expand kernel."""
    y = module.base(x)
    if not y.is_contiguous():
        y = y.contiguous()
    return lowrank_matmul(x, module.down, module.up, out=y, accumulate=True)


def lowrank_reference(module, x: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: shrink (x·Vᵀ), then expand (·Uᵀ)."""
    return torch.nn.functional.linear(torch.nn.functional.linear(x, module.down), module.up, module.bias)


def eora_reference(module, x: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: the base module plus the low-rank residual."""
    return module.base(x) + torch.nn.functional.linear(torch.nn.functional.linear(x, module.down), module.up)
