"""The compressor interface: (weight, statistics, config) -> a compressed module.

A compressor is pure tensor math in one file: it never sees the model, only one Linear's
weight and bias, the calibration statistics its `needs` names (collected by the pipeline), and
its validated config. It returns a `CompressedLinear` whose sizes are exact; the pipeline
measures the reconstruction error the same way for every method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from ..modules import CompressedLinear


class StageConfig(BaseModel):
    """Keys every recipe stage has; each method subclasses it with its own keys."""

    model_config = ConfigDict(extra="forbid")

    method: str
    targets: list[str] = ["Linear"]
    ignore: list[str] = ["lm_head"]


@dataclass
class LayerStats:
    """Calibration statistics of one Linear's input, by collector name (see collectors.py)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    num_tokens: int = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)


class Compressor(ABC):
    method: ClassVar[str]
    config_class: ClassVar[type[StageConfig]]
    needs: ClassVar[tuple[str, ...]] = ()  # collector names this method requires
    # True for methods that refine an earlier stage's result (EoRA): they target compressed
    # modules and receive the original weight plus the compressed module as `base`.
    wraps_compressed: ClassVar[bool] = False

    @abstractmethod
    def compress(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stats: LayerStats,
        config: StageConfig,
        base: CompressedLinear | None = None,
    ) -> CompressedLinear:
        """Compress one (out_features, in_features) weight (or refine `base`, its compressed form)."""


COMPRESSORS: dict[str, type[Compressor]] = {}


def register_compressor(cls: type[Compressor]) -> type[Compressor]:
    if cls.method in COMPRESSORS:
        raise ValueError(f"compressor {cls.method!r} registered twice")
    COMPRESSORS[cls.method] = cls
    return cls


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Largest rank whose two factors keep at most (1 - ratio) of the m·n weights (at least 1)."""
    budget = (1.0 - ratio) * out_features * in_features
    return max(1, min(int(budget // (out_features + in_features)), min(out_features, in_features)))
