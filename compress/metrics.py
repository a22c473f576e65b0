"""What every layer's compression is measured by: errors, the per-layer record, memory.

Plain relative Frobenius error ‖W−Ŵ‖/‖W‖ and calibration-weighted error
‖(W−Ŵ)Xᵀ‖/‖WXᵀ‖ = sqrt(tr(ΔW G ΔWᵀ)/tr(W G Wᵀ)) with G = XᵀX. Compressors (their profiles) and
pipelines both import this module, so it depends on nothing but torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch


def relative_errors(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor | None) -> tuple[float, float | None]:
    """(‖ΔW‖/‖W‖, ‖ΔW Xᵀ‖/‖W Xᵀ‖) computed in float64."""
    w = weight.double()
    delta = w - approx.double()
    rel = float(delta.norm() / w.norm().clamp_min(1e-30))
    if gram is None:
        return rel, None
    gram = gram.to(w.device)
    num = ((delta @ gram) * delta).sum()
    den = ((w @ gram) * w).sum().clamp_min(1e-30)
    return rel, float((num / den).clamp_min(0).sqrt())


@dataclass
class LayerRecord:
    """What happened to one Linear: sizes before/after, errors, time."""

    name: str
    block: int
    stage: int
    method: str
    format: str
    in_features: int
    out_features: int
    params_before: int
    values_after: int
    bytes_before: int
    bytes_after: int
    rel_error: float
    rel_weighted_error: float | None
    seconds: float
    detail: dict[str, Any]
    tokens: int | None = None  # calibration tokens the layer saw (None: compressed without statistics)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory since the last reset, or the process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20
