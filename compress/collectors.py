"""Calibration statistics of a Linear's input, accumulated by forward hooks.

Each collector sees every calibration batch's input activations x (..., in_features) of one
Linear and keeps a running sum. Add a statistic by subclassing `Collector` and registering it;
compressors ask for statistics by name through `Compressor.needs`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from .errors import LlmpressError


class Collector(ABC):
    name: ClassVar[str]

    def __init__(self, layer_name: str, in_features: int, device: torch.device):
        self.layer_name = layer_name
        self.in_features = in_features
        self.device = device
        self.num_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if not torch.isfinite(x).all():
            raise LlmpressError(
                f"non-finite (NaN/Inf) activations enter {self.layer_name} during calibration. "
                "The model overflows in this dtype or the calibration data is broken: try --dtype float32 "
                "or bfloat16, and check the dataset"
            )
        self.num_tokens += x.shape[0]
        self.update(x)

    @abstractmethod
    def update(self, x: torch.Tensor) -> None:
        """Accumulate one batch of inputs, shaped (tokens, in_features)."""

    @abstractmethod
    def result(self) -> torch.Tensor: ...


class GramCollector(Collector):
    """XᵀX summed over calibration tokens, accumulated in float64."""

    name = "gram"

    def __init__(self, layer_name, in_features, device):
        super().__init__(layer_name, in_features, device)
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)

    def update(self, x):
        x64 = x.to(torch.float64)
        self.gram.addmm_(x64.T, x64)

    def result(self):
        return self.gram


class ChannelNormCollector(Collector):
    """Σ x_j² per input channel (the diagonal of XᵀX; Wanda's ‖X_j‖² without the full Gram)."""

    name = "channel_norm_sq"

    def __init__(self, layer_name, in_features, device):
        super().__init__(layer_name, in_features, device)
        self.sq = torch.zeros(in_features, dtype=torch.float64, device=device)

    def update(self, x):
        self.sq += x.to(torch.float64).square().sum(0)

    def result(self):
        return self.sq


COLLECTORS: dict[str, type[Collector]] = {cls.name: cls for cls in (GramCollector, ChannelNormCollector)}


def register_collector(cls: type[Collector]) -> type[Collector]:
    if cls.name in COLLECTORS:
        raise ValueError(f"collector {cls.name!r} registered twice")
    COLLECTORS[cls.name] = cls
    return cls


class LinearInputHooks:
    """Forward hooks that feed each named Linear's input to its collectors; a context manager."""

    def __init__(self, linears: dict[str, torch.nn.Module], names: set[str]):
        unknown = names - set(COLLECTORS)
        if unknown:
            raise ValueError(f"unknown collectors {sorted(unknown)}; known: {sorted(COLLECTORS)}")
        self.collectors: dict[str, dict[str, Collector]] = {}
        self._linears = linears
        self._names = sorted(names)
        self._handles = []

    def __enter__(self) -> "LinearInputHooks":
        for layer_name, linear in self._linears.items():
            device = next(linear.parameters()).device
            per_layer = {n: COLLECTORS[n](layer_name, linear.in_features, device) for n in self._names}
            self.collectors[layer_name] = per_layer

            def hook(module, args, _per_layer=per_layer):
                for collector in _per_layer.values():
                    collector.add(args[0].detach())

            self._handles.append(linear.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
