"""What every layer's compression is measured by: errors, the per-layer record, memory.

Plain relative Frobenius error ‖W−Ŵ‖/‖W‖ and calibration-weighted error
‖(W−Ŵ)Xᵀ‖/‖WXᵀ‖ = sqrt(tr(ΔW G ΔWᵀ)/tr(W G Wᵀ)) with G = XᵀX. Compressors (their profiles) and
pipelines both import this module, so it depends on nothing but torch.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import psutil
import torch


# The dtype float tensors are served in (a recipe's `serve_dtype`): sizes are counted at its width
# whatever dtype the model was compressed in. None: as stored.
_SERVE_DTYPE: ContextVar[torch.dtype | None] = ContextVar("serve_dtype", default=None)


@contextmanager
def serving_dtype(dtype: torch.dtype | str | None) -> Iterator[None]:
    """Within: floating tensors count at `dtype`'s width in every size (bytes as served)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    token = _SERVE_DTYPE.set(dtype)
    try:
        yield
    finally:
        _SERVE_DTYPE.reset(token)


def served_itemsize(dtype: torch.dtype) -> int:
    """Bytes per element as served: the serving dtype's for floating dtypes, else the stored one."""
    serve = _SERVE_DTYPE.get()
    return serve.itemsize if serve is not None and dtype.is_floating_point else dtype.itemsize


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of `tensor` as served: values at the serving dtype's width, indices/codes as stored."""
    return tensor.numel() * served_itemsize(tensor.dtype)


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
