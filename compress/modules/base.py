"""Base class of the nn.Linear replacements, one subclass per storage format.

A compressed module stores only its factors (never a dense reconstruction), reports its exact
storage, can rebuild the dense weight for checks (`to_dense`), and describes itself with a small
JSON `spec` from which an empty twin is built on the meta device when a checkpoint is loaded.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import LlmpressError
from ..kernels import forget_cpu_cache, forget_kernel_choice
from ..metrics import served_itemsize, tensor_bytes

FORMATS: dict[str, type["CompressedLinear"]] = {}


def register_format(cls: type["CompressedLinear"]) -> type["CompressedLinear"]:
    if cls.format in FORMATS:
        raise ValueError(f"format {cls.format!r} registered twice")
    FORMATS[cls.format] = cls
    return cls


class CompressedLinear(nn.Module):
    """y = x·Ŵᵀ + b for a compressed Ŵ of shape (out_features, in_features)."""

    format: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, has_bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if has_bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _apply(self, fn, *args, **kwargs):
        """Moving or casting the storage (.to, .cuda, .half) forgets the cached kernel choice and
        any expanded weight kept in the CPU cache."""
        forget_kernel_choice(self)
        forget_cpu_cache(self)
        return super()._apply(fn, *args, **kwargs)

    # --- what every format provides -------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """The dense weight Ŵ this module represents (for checks and dense export)."""
        raise NotImplementedError

    def to_linear(self) -> nn.Linear:
        """An nn.Linear holding `to_dense()` and the bias, on this module's device and in its value dtype."""
        with torch.no_grad():
            dense = self.to_dense().to(self.value_dtype())
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=dense.device, dtype=dense.dtype)
            linear.weight.copy_(dense)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def spec(self) -> dict[str, Any]:
        """Shape information needed to rebuild an empty module of this format."""
        return {
            "format": self.format,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device=None) -> "CompressedLinear":
        raise NotImplementedError

    def after_loading(self) -> None:
        """Called once a checkpoint's tensors are in: a format whose layout changed rewrites the
        earlier layout here (the loader calls it for every compressed module)."""

    def check_rewritable(self, tensor: torch.Tensor, what: str) -> None:
        """An earlier layout is rewritten in memory: a tensor a device_map offloaded (left on the
        meta device, loaded by hooks at each call) cannot be, and would be read in the old layout."""
        if tensor.is_meta:
            raise LlmpressError(
                f"{type(self).__name__}: this checkpoint stores {what} in an earlier layout, rewritten on load, but "
                "the tensor was offloaded by the device_map; load the checkpoint once without offloading and save "
                "it again (compress.save_compressed) to store the current layout"
            )

    # --- sizes, counted honestly ------------------------------------------------------------
    def num_values(self) -> int:
        """Stored numbers that carry the weight: factors, nonzeros, scales, bias. No index bits."""
        return sum(p.numel() for p in self.parameters())

    def num_bytes(self) -> int:
        """Every byte as served: values, indices, masks, scales, bias (floating tensors at the
        serving dtype's width, metrics.serving_dtype; as stored outside one)."""
        tensors = list(self.parameters()) + list(self.buffers())
        return sum(tensor_bytes(t) for t in tensors)

    def dense_num_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def dense_num_bytes(self) -> int:
        """Bytes of the nn.Linear this replaces, at the width `num_bytes` gives the values."""
        return self.dense_num_params() * served_itemsize(self.value_dtype())

    def value_dtype(self) -> torch.dtype:
        floats = [p.dtype for p in self.parameters() if p.is_floating_point()]
        return floats[0] if floats else torch.float32

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


def build_module(spec: dict[str, Any], dtype: torch.dtype, device=None) -> CompressedLinear:
    """An empty module of the format named in `spec` (used when loading checkpoints)."""
    name = spec.get("format")
    if name not in FORMATS:
        raise ValueError(f"unknown llmpress module format {name!r}; known formats: {sorted(FORMATS)}")
    return FORMATS[name].from_spec(spec, dtype=dtype, device=device)
